"""A GGUF file as a runnable transformers model: the architecture's own model class, built from
the config of the file's header (`gguf_config`), holding the tensors `GGUFCheckpoint` reads.

One route for every GGUF architecture we read (verify runs it, finetune trains it), instead of
transformers' own GGUF loader, which rebuilds some of them wrongly: its config maps leave out
`attention.key_length` for qwen3 (head_dim falls back to Qwen3Config's 128) and
`attn_logit_softcapping` for gemma2 (Gemma2Config's 50 replaces the file's value), keep Phi3Config's
token ids (32000) whatever the vocabulary, know no gemma at all, and drop tensors they have no
name for (Phi-3's rope factors, Llama 3's rope_freqs) without a word. Here those two become the
config's rope parameters (`gguf_config`), and any other tensor the model has no place for, or a
model weight the file lacks, stops the load in one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from toolkit.errors import ToolkitError
from toolkit.gguf_checkpoint import ROPE_TENSORS, GGUFCheckpoint, gguf_config

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel


def gguf_model_config(path: Path, **overrides) -> PretrainedConfig:
    """The transformers config of a GGUF file's model (`overrides`: num_labels, pad_token_id...)."""
    from transformers import AutoConfig

    settings = {**gguf_config(path), **overrides}
    return AutoConfig.for_model(settings.pop("model_type"), **settings)


def load_gguf_model(
    path: Path, model_class: type | None = None, attn_implementation: str | None = None, **overrides
) -> PreTrainedModel:
    """The model of a GGUF file as float32 torch weights, dequantized by the gguf package.

    `model_class`: a transformers auto class (default AutoModelForCausalLM); a task head the
    file does not hold (a classifier's `score`) keeps its fresh initialisation, as
    `from_pretrained` leaves it."""
    import torch
    from transformers import AutoModelForCausalLM

    from toolkit.progress import transient_progress

    checkpoint = GGUFCheckpoint(path)
    unplaced = [
        name
        for name in checkpoint.names()
        if not name.startswith(("model.", "lm_head.")) and name not in ROPE_TENSORS
    ]
    if unplaced:
        raise ToolkitError(
            f"{path} holds {', '.join(unplaced[:3])}, which a transformers "
            f"{checkpoint.architecture} model has no place for: this GGUF is not supported"
        )
    config = gguf_model_config(path, **overrides)
    # seconds for a real file (SmolLM2-135M: about 4): a transient bar on a terminal's stderr
    with transient_progress() as progress:
        task = progress.add_task(f"building the {checkpoint.architecture} model", total=None)
        # no random initialisation of weights the file overwrites (a second of SmolLM2's load)
        with _no_init_weights():
            model = (model_class or AutoModelForCausalLM).from_config(
                config, attn_implementation=attn_implementation, dtype=torch.float32
            )
        expected = model.state_dict()
        # a causal LM's output projection is left out where the model is a classifier
        names = [name for name in checkpoint.names() if name in expected]
        progress.update(task, description=f"dequantizing {path.name}", total=len(names))
        state = {}
        for name in names:
            state[name] = torch.from_numpy(checkpoint.get(name))
            progress.advance(task)
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise ToolkitError(
                f"{path}: {name} is {tuple(tensor.shape)} but its header makes it "
                f"{tuple(expected[name].shape)}: the file is inconsistent"
            )
    missing, _ = model.load_state_dict(state, strict=False)
    base = model.base_model_prefix + "."  # a head outside it (lm_head, score) may be fresh
    lacking = [name for name in missing if name.startswith(base)]
    if lacking:
        raise ToolkitError(f"tensor {lacking[0]} is missing from {path}: the file is incomplete")
    # a head the file lacks gets the model's own initialisation, as from_pretrained gives it
    for owner in dict.fromkeys(name.rpartition(".")[0] for name in missing):
        model._init_weights(model.get_submodule(owner))
    model.tie_weights()  # the output projection, where the file writes none
    return model


def _no_init_weights():
    """transformers' context that skips weight initialisation (it moved in transformers 5)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()
