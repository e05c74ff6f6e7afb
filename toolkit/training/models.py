"""The model and tokenizer a run starts from: a pretrained checkpoint (a folder, or a GGUF file
dequantized to a plain float32 model, its tokenizer read from the file's header), or a GPT-2 or
Llama built from a config.

`--model gpt2-config:n_layer=2,n_head=4,n_embd=128` builds a fresh GPT-2-architecture model
(no pretrained weights needed) with a byte-level BPE tokenizer trained on the run's training
texts; `vocab_size` there sets the tokenizer's size (default 4096). `--model llama-config:
num_hidden_layers=2,num_attention_heads=6,num_key_value_heads=2,hidden_size=96` does the same
for the Llama architecture (grouped-query attention, rotary positions, RMSNorm). The trained
tokenizer is saved in DIR/tokenizer/ so that every process and every resumed run uses the same one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from toolkit.attention import family_of_source
from toolkit.errors import ToolkitError
from toolkit.families import Family
from toolkit.fileio import atomic_folder
from toolkit.gguf_model import gguf_model_config, load_gguf_model
from toolkit.runtime import load_tokenizer
from toolkit.sources import ModelSource, resolve_source
from toolkit.training.data import train_bpe_tokenizer

# spec prefix -> (transformers config class, an example)
CONFIG_SPECS = {
    "gpt2-config": ("GPT2Config", "gpt2-config:n_layer=2,n_head=4,n_embd=128"),
    "llama-config": (
        "LlamaConfig",
        "llama-config:num_hidden_layers=2,num_attention_heads=6,num_key_value_heads=2,"
        "hidden_size=96,intermediate_size=192",
    ),
}
DEFAULT_BPE_VOCAB = 4096
# Training never needs the attention probabilities (verify and the lessons load eager models):
# transformers' default is the fused scaled-dot-product kernel (faster, less memory) where the
# architecture has it, eager attention where it does not (MPT, and others with custom kernels).
TRAINING_ATTENTION = None

# A model built from a config spec holds at least this many positions.
MIN_POSITIONS = 128


def config_overrides(model: str) -> tuple[str, dict] | None:
    """`gpt2-config:key=value,...` or `llama-config:...` -> (config class name, {key: value});
    None for any other model spec."""
    name, _, settings = model.partition(":")
    if name not in CONFIG_SPECS:
        return None
    import transformers

    class_name, example = CONFIG_SPECS[name]
    known = getattr(transformers, class_name)().to_dict()
    overrides = {}
    for item in filter(None, settings.split(",")):
        key, equals, value = item.partition("=")
        if not equals or key not in known:
            raise ToolkitError(
                f"'{item}' in --model {model} is not key=value with a {class_name} key "
                f"(e.g. {example})"
            )
        overrides[key] = _number(value)
    return class_name, overrides


@dataclass(frozen=True)
class ModelStart:
    """What `--model` names, resolved once: a config spec, or a local checkpoint."""

    spec: tuple[str, dict] | None  # (config class name, overrides) for `gpt2-config:...`
    source: ModelSource | None  # the checkpoint otherwise
    family: Family | None = None  # the checkpoint's attention description

    @property
    def pretrained_checkpoint(self) -> bool:
        return self.spec is None


def resolve_model(model: str) -> ModelStart:
    """Resolve `--model` (a typo, a missing folder, an attention this toolkit cannot track)
    before the run writes anything."""
    spec = config_overrides(model)
    if spec is not None:
        return ModelStart(spec, None)
    source = resolve_source(model)
    return ModelStart(None, source, family_of_source(source))


def training_tokenizer(config, train_texts, run_dir: Path, start: ModelStart | None = None):
    """The pretrained model's tokenizer, or (for a config spec) the BPE tokenizer of this run.

    Loaded by `toolkit.runtime.load_tokenizer` (one policy); training cannot do without one.
    `start`: `config.model` already resolved (resolved here otherwise).
    """
    start = start or resolve_model(config.model)
    if start.spec is None:
        folder = start.source.path
    else:
        overrides = start.spec[1]
        folder = run_dir / "tokenizer"
        if not folder.is_dir():
            tokenizer = train_bpe_tokenizer(
                train_texts, overrides.get("vocab_size", DEFAULT_BPE_VOCAB)
            )
            with atomic_folder(folder) as tmp:
                tokenizer.save_pretrained(tmp)
    tokenizer = load_tokenizer(folder)
    if tokenizer is None:
        raise ToolkitError(f"{folder} has no tokenizer: save one beside the model")
    return tokenizer


def build_model(config, tokenizer, label_names: list[str] | None, start: ModelStart | None = None):
    """The model for `config.task`, with label names in its config; seed torch first.

    `config.init` "pretrained" loads the checkpoint's weights; "random" builds the same
    architecture from the checkpoint's config with freshly initialised weights. A
    `gpt2-config:` or `llama-config:` model is always built fresh. `start`: `config.model`
    already resolved (resolved here otherwise).
    """
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    labels = {}
    if label_names is not None:
        labels = {
            "num_labels": len(label_names),
            "id2label": dict(enumerate(label_names)),
            "label2id": {name: i for i, name in enumerate(label_names)},
        }
    start = start or resolve_model(config.model)
    if start.spec is not None:
        class_name, overrides = start.spec
        positions = "n_positions" if class_name == "GPT2Config" else "max_position_embeddings"
        model_config = getattr(transformers, class_name)(
            **{
                # room for texts longer than the training cut (the run's view, evaluate)
                positions: max(config.max_length, MIN_POSITIONS),
                **overrides,
                "vocab_size": len(tokenizer),
                "bos_token_id": tokenizer.eos_token_id,
                "eos_token_id": tokenizer.eos_token_id,
                "pad_token_id": tokenizer.pad_token_id,
                **labels,
            },
            attn_implementation=TRAINING_ATTENTION,
        )
        model_class = (
            AutoModelForCausalLM
            if config.task == "causal-lm"
            else AutoModelForSequenceClassification
        )
        return model_class.from_config(model_config)
    source, family = start.source, start.family
    if config.task == "causal-lm" and not family.causal:
        raise ToolkitError(
            f"{config.model} is a {family.name} model, which is not a causal language model: "
            "use --task classification, or a GPT-2-family model"
        )
    model_class = (
        AutoModelForCausalLM if config.task == "causal-lm" else AutoModelForSequenceClassification
    )
    settings = dict(labels)
    if config.task == "classification":
        settings["pad_token_id"] = tokenizer.pad_token_id
    if source.is_gguf:
        # The file's own architecture class holding its dequantized float32 tensors (a plain
        # model that trains and saves like any other), or the same class freshly initialised.
        if config.init == "random":
            return model_class.from_config(
                gguf_model_config(source.path, **settings), attn_implementation=TRAINING_ATTENTION
            )
        return load_gguf_model(source.path, model_class, TRAINING_ATTENTION, **settings)
    try:
        if config.init == "random":
            # The checkpoint's architecture, every weight drawn afresh by the model's own
            # initializer (normal(0, initializer_range) for BERT and GPT-2) from the seeded RNG.
            model_config = AutoConfig.from_pretrained(source.path, **settings)
            return model_class.from_config(model_config, attn_implementation=TRAINING_ATTENTION)
        # A classifier checkpoint with another number of labels gets a new head.
        mismatched = {} if config.task == "causal-lm" else {"ignore_mismatched_sizes": True}
        return model_class.from_pretrained(
            source.path, attn_implementation=TRAINING_ATTENTION, **settings, **mismatched
        )
    except OSError as err:
        raise ToolkitError(f"cannot load {config.model} ({err})") from None


def save_final(model, tokenizer, state_dict: dict, final_dir: Path) -> None:
    """save_pretrained (safetensors) into a temporary folder, then move it to `final_dir`."""
    with atomic_folder(final_dir) as tmp:
        model.save_pretrained(tmp, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)


def _number(text: str) -> int | float | bool | str:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)
