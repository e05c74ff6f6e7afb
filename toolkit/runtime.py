"""Running the real model: load it, make its inputs, name its tokens, capture its attention blocks.

`verify` and every lesson run the model through these functions, so the tokenizer policy and the
hook sequence (register, forward, remove) are written once.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from toolkit.attention import AttentionModel
from toolkit.errors import ToolkitError, first_line
from toolkit.gguf_checkpoint import ARCHITECTURES, read_index
from toolkit.gguf_model import load_gguf_model

if TYPE_CHECKING:
    import torch

DEFAULT_TEXTS = (
    "The cat sat on the mat because it was tired.",
    "Attention is all you need.",
)
# Any of these beside a model means it ships a tokenizer.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.txt",
    "vocab.json",
)


def load_model(attention: AttentionModel, allow_pickle: bool = False):
    """The real model with eager attention (so that it returns its attention probabilities)."""
    import torch
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    if attention.source.is_standard_file:
        raise ToolkitError(
            "this needs the full model to run: pass the model folder, not a standard-tensor file"
        )
    hf_logging.disable_progress_bar()
    path = attention.source.path
    if attention.source.is_gguf:
        return load_gguf_model(path, attn_implementation="eager").base_model.eval()
    has_safetensors = any(path.glob("*.safetensors"))
    weights = {"use_safetensors": True if has_safetensors or not allow_pickle else None}
    try:
        net = AutoModel.from_pretrained(
            path, attn_implementation="eager", dtype=torch.float32, **weights
        )
    except Exception as err:
        raise ToolkitError(f"transformers cannot load {path} ({first_line(err)})") from None
    return net.eval()


def load_tokenizer(path: str | Path):
    """The tokenizer saved beside a model (or in a .gguf file's header), with a padding token;
    None when the folder has none.

    One policy for every caller: a model without tokenizer files is a legitimate case (a model
    built from a config, a checkpoint saved without its tokenizer), so the answer is None and the
    caller decides (`verify` and the lessons run on random token ids; fine-tuning stops with a
    message). Tokenizer files that are there but do not load are damage, not absence: that raises
    a ToolkitError instead of silently running on random ids.
    """
    from transformers import AutoTokenizer

    path = Path(path)
    if path.suffix == ".gguf":  # the tokenizer is in the file's header, where there is one
        header = read_index(path)[0]
        if "tokenizer.ggml.model" not in header:
            return None
        folder, files = path.parent, {"gguf_file": path.name}
        architecture = ARCHITECTURES.get(header.get("general.architecture"))
        if architecture and architecture.tokenizer_type:
            files["tokenizer_type"] = architecture.tokenizer_type
    elif any((path / name).exists() for name in TOKENIZER_FILES):
        folder, files = path, {}
    else:
        return None
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **files)
    except Exception as err:
        raise ToolkitError(
            f"the tokenizer in {path} does not load ({first_line(err)}): save it again beside "
            "the model, or remove its files to run on random token ids"
        ) from None
    if tokenizer.pad_token is None:  # GPT-2 has no padding token; batches need one
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def make_inputs(attention: AttentionModel, texts: Sequence[str] | None, seed: int):
    """Token ids and padding mask [batch, tokens], and how they were made (a dict).

    The texts (default: DEFAULT_TEXTS) through the model's tokenizer, or seeded random ids when
    the model has no tokenizer.
    """
    import torch

    if texts is not None and any(not t.strip() for t in texts):
        raise ToolkitError("--text is empty: give some words to run the model on")
    tokenizer = load_tokenizer(attention.source.path)
    if tokenizer is None:
        if texts:
            raise ToolkitError(
                f"{attention.source.path} has no tokenizer, so --text cannot be used: "
                "leave it out to run on random token ids"
            )
        vocab = attention.config.get("vocab_size", 100)
        generator = torch.Generator().manual_seed(seed)
        input_ids = torch.randint(0, vocab, (2, 12), generator=generator)
        padding = torch.ones_like(input_ids)
        padding[1, 7:] = 0  # second sequence shorter: exercises the padding mask
        return (
            input_ids,
            padding,
            {
                "kind": "random token ids (no tokenizer)",
                "seed": seed,
                "shape": list(input_ids.shape),
            },
        )
    texts = list(texts or DEFAULT_TEXTS)
    encoded = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=128)
    return (
        encoded["input_ids"],
        encoded["attention_mask"],
        {"kind": "texts", "texts": texts, "shape": list(encoded["input_ids"].shape)},
    )


def token_strings(attention: AttentionModel, ids: list[int]) -> list[str]:
    """Readable tokens for ids: the tokenizer's, or '#id' when the model has none."""
    tokenizer = load_tokenizer(attention.source.path)
    if tokenizer is None:
        return [f"#{i}" for i in ids]
    return [tokenizer.decode([i]).strip() or repr(tokenizer.decode([i])) for i in ids]


@dataclass
class CapturedBlocks:
    """Each attention block's input and output, float32 [batch, tokens, d_model], by layer."""

    inputs: dict[int, torch.Tensor] = field(default_factory=dict)
    outputs: dict[int, torch.Tensor] = field(default_factory=dict)


@contextmanager
def captured_blocks(net, attention: AttentionModel) -> Iterator[CapturedBlocks]:
    """Record every attention block's input and output during the forward passes run inside.

        with captured_blocks(net, attention) as captured, torch.no_grad():
            outputs = net(input_ids=...)
        captured.inputs[layer]  # [batch, tokens, d_model]

    The hooks are removed on leaving the block, also when the forward pass fails.
    """
    captured = CapturedBlocks()
    handles = []
    # Layers that share one module (ALBERT) are told apart by call order: the k-th call of a
    # module is the k-th of the layers that use it.
    layers_of: dict[int, list[int]] = {}
    modules = {}
    for index in attention.layer_indices:
        for module in attention.family.hook_modules(net, index):
            layers_of.setdefault(id(module), []).append(index)
            modules[id(module)] = module
    calls = dict.fromkeys(layers_of, 0)

    def next_layer(module) -> int:
        layers = layers_of[id(module)]
        calls[id(module)] += 1
        return layers[(calls[id(module)] - 1) % len(layers)]

    def save_input(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        captured.inputs[next_layer(module)] = hidden.float()

    def save_output(module, args, output):
        captured.outputs[next_layer(module)] = output.float()

    try:
        inputs = {id(attention.family.hook_modules(net, i)[0]) for i in attention.layer_indices}
        for key, module in modules.items():
            if key in inputs:
                handles.append(module.register_forward_pre_hook(save_input, with_kwargs=True))
            else:
                handles.append(module.register_forward_hook(save_output))
        yield captured
    finally:
        for handle in handles:
            handle.remove()
