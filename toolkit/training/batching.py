"""Length-grouped batches (`--group-by-length`): texts of similar length share a batch, so the
padding collator adds little padding.

Each epoch: shuffle the rows (seeded by seed and epoch), cut the order into mega-batches of
MEGA_BATCHES batches, sort each mega-batch by length (longest first), and shuffle the order of
the batches. The order depends on the seed and the epoch only, so a resumed run that skips the
batches it has done sees the same batches again, and every row comes once per epoch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

MEGA_BATCHES = 50


class LengthGroupedSampler:
    """Row indices in length-grouped order; the DataLoader cuts them into batches of
    `batch_size` consecutive indices. Accelerate calls `set_epoch` before each epoch."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int):
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        import torch

        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        mega = self.batch_size * MEGA_BATCHES
        batches = []
        for start in range(0, len(order), mega):
            group = sorted(order[start : start + mega], key=lambda i: -self.lengths[i])
            batches += [
                group[i : i + self.batch_size] for i in range(0, len(group), self.batch_size)
            ]
        # The last batch may be short: keep it last, so every other batch is full.
        full, last = batches[:-1], batches[-1:]
        if last and len(last[0]) == self.batch_size:
            full, last = batches, []
        shuffled = [full[i] for i in torch.randperm(len(full), generator=generator).tolist()]
        return iter([index for batch in shuffled + last for index in batch])
