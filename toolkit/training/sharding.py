"""Sharded fine-tuning (`--fsdp`): shard the model; read and checkpoint whole weights from shards.

Under FSDP each process holds a slice of every parameter (FSDP2: a `DTensor` whose local part is
a block of rows, e.g. 24 of the 48 rows of `attention.self.query.weight`). Tracking and saving
need whole tensors, so they all go through `full_state_dict`, a collective that every process
must enter (a gather on the main process alone would hang).

Two routes ask for sharding with `--fsdp`:
    GPUs  Accelerate's FSDP plugin (FSDP2, one shard unit per transformer block); Accelerate wraps,
          checkpoints and restores the model and optimizer.
    CPU   Accelerate ignores an FSDP plugin there and would wrap the model in DDP, so torch's
          `fully_shard` is applied here instead, and the model and optimizer stay outside
          Accelerate: `accelerator.save_state` / `load_state` keep the scheduler, sampler and RNG
          states, and hooks registered here add the model and optimizer shards through
          torch.distributed.checkpoint (each process writes and reads its own shard).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from toolkit.errors import ToolkitError, first_line

if TYPE_CHECKING:
    from accelerate import Accelerator, FullyShardedDataParallelPlugin
    from torch import Tensor
    from torch.nn import Module
    from torch.optim import Optimizer

SHARDS = "sharded"  # DIR/checkpoints/step_N/sharded/: the DCP checkpoint of model and optimizer


def accelerate_fsdp_plugin() -> FullyShardedDataParallelPlugin:
    """Accelerate's FSDP2 plugin: one shard unit per transformer block (`_no_split_modules`)."""
    from accelerate import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        state_dict_type="SHARDED_STATE_DICT",  # each process checkpoints its own shard
    )


def check_sharding(accelerator: Accelerator, on_cpu: bool, mixed_precision: str) -> None:
    """Refuse `--fsdp` where it would not shard, before the run writes anything."""
    from accelerate.utils import DistributedType

    if not on_cpu and accelerator.distributed_type != DistributedType.FSDP:
        raise ToolkitError(
            "--fsdp: Accelerate did not shard the model (it does on GPUs in processes started by "
            "torchrun or accelerate launch): launch with torchrun --nproc_per_node N"
        )
    if on_cpu and accelerator.num_processes < 2:
        raise ToolkitError(
            "--fsdp shards the model across processes: launch with "
            "torchrun --nproc_per_node N -m toolkit finetune ... (N at least 2)"
        )
    if on_cpu and mixed_precision != "no":
        raise ToolkitError(
            f"--fsdp on CPU trains in float32: drop --mixed-precision {mixed_precision}"
        )


def shard_on_cpu(model: Module) -> Module:
    """Shard `model` in place with FSDP2 over the gloo process group; seed-identical on every rank.

    Each block named in the model's `_no_split_modules` (BertLayer, GPT2Block, ...) becomes one
    shard unit, gathered just before it runs; the root unit holds the rest (embeddings, heads,
    GPT-2's tied `lm_head`). Call before the optimizer is built: sharding replaces the parameters.
    """
    from torch.distributed.fsdp import fully_shard

    blocks = set(getattr(model, "_no_split_modules", None) or ())
    for module in model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module)
    fully_shard(model)
    return model


def checkpoint_shards(accelerator: Accelerator, model: Module, optimizer: Optimizer) -> None:
    """Make `accelerator.save_state` / `load_state` write and read the model's and optimizer's
    shards with torch.distributed.checkpoint, in `SHARDS/` beside Accelerate's own files."""
    accelerator.register_save_state_pre_hook(
        lambda models, weights, folder: _save_shards(model, optimizer, Path(folder) / SHARDS)
    )
    accelerator.register_load_state_pre_hook(
        lambda models, folder: _load_shards(model, optimizer, Path(folder) / SHARDS)
    )


def _save_shards(model: Module, optimizer: Optimizer, folder: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=folder)


def _load_shards(model: Module, optimizer: Optimizer, folder: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    # The current state gives DCP the layout (shard shapes) to read each process's part into.
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=folder)
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"]
    )


def full_state_dict(accelerator: Accelerator, model: Module) -> dict[str, Tensor]:
    """The model's whole weights, on the main process; call it on EVERY process.

    FSDP2 (`DTensor` parameters, from `--fsdp` on either route): every process gathers each
    tensor in turn, and only the main process keeps it (on the CPU); a tensor shared by two names
    (GPT-2's tied `lm_head.weight`) is gathered once and stays shared. FSDP1 and DeepSpeed
    ZeRO-3 (an accelerate config): Accelerate's own gather. DDP or one process: the model's own
    state dict, no copy, no communication. The other processes get an empty or partial dict.
    """
    import torch
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    # After a forward pass without backward, FSDP2 may leave some parameters unsharded (plain
    # tensors), but its state dict always holds DTensors: ask the module, not one parameter.
    if isinstance(model, FSDPModule) or any(isinstance(p, DTensor) for p in model.parameters()):
        whole: dict[str, Tensor] = {}
        gathered: dict[int, Tensor | None] = {}  # id(parameter) -> whole tensor (main process)
        # keep_vars: the parameters themselves, so that a tied pair is one object
        for name, tensor in model.state_dict(keep_vars=True).items():
            if isinstance(tensor, DTensor):
                if id(tensor) not in gathered:
                    with torch.no_grad():  # a collective: every process, in the same order
                        full = tensor.full_tensor()
                    gathered[id(tensor)] = full.cpu() if accelerator.is_main_process else None
                tensor = gathered[id(tensor)]
            if accelerator.is_main_process:
                whole[name] = tensor.detach()
        return whole
    try:
        return accelerator.get_state_dict(model)
    except ValueError as err:  # ZeRO-3 without 16-bit gathering raises ValueError
        raise ToolkitError(
            "cannot gather the full weights to track them under DeepSpeed ZeRO-3: set "
            "zero3_save_16bit_model: true (stage3_gather_16bit_weights_on_model_save) in the "
            f"accelerate config ({first_line(err, 120)})"
        ) from None
