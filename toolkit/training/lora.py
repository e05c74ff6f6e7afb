"""LoRA through `peft`: wrap a model's attention matrices, and read back its effective weights.

`--method lora` freezes every pretrained weight and trains, beside each targeted matrix W, a
low-rank pair B [out, r], A [r, in] (Hu et al. 2021). The layer then computes with the effective
weight

    W_eff = W + (alpha / r) · B · A        rank(W_eff - W) <= r

Tracking, the final model and every other command see W_eff under the base model's own tensor
names (`merged_state_dict`), computed from peft's layers without touching the model being
trained; the adapter alone is saved in PEFT format beside it (`save_adapter`).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

from toolkit.errors import ToolkitError
from toolkit.families import Family, family_for_checkpoint
from toolkit.fileio import atomic_folder
from toolkit.training.recipe import FinetuneConfig, lora_roles

ADAPTER = "default"  # peft's name for a model's single adapter
ADAPTER_DIR = "adapter"


def lora_modules(family: Family, roles: list[str]) -> list[str]:
    """The module names (peft suffixes) holding `roles` in this family, checked for fused roles.

    A family that stores several roles in one matrix (GPT-2's q|k|v `c_attn`) can only adapt
    them together: asking for some of them alone is refused rather than silently widened.
    """
    if not family.lora_targets:
        raise ToolkitError(f"--method lora is not available for {family.name} models yet")
    modules = sorted({family.lora_targets[role] for role in roles})
    for module in modules:
        together = [role for role, name in family.lora_targets.items() if name == module]
        if not set(together) <= set(roles):
            raise ToolkitError(
                f"{family.name} stores {', '.join(together)} in one matrix ({module}): "
                f"--lora-targets must name all of them or none"
            )
    return modules


def model_family(model) -> Family:
    """The attention description of an in-memory transformers model: its registry line, or the
    common names its parameters follow (an unregistered model_type)."""
    return family_for_checkpoint(model.config.to_dict(), model.state_dict().keys())


def check_targets_are_adaptable(model, family: Family, targets: list[str]) -> None:
    """Every target names, somewhere in `model`, an nn.Linear or Conv1D (what peft's LoRA
    adapts here): otherwise one line naming it, before peft fails with its own error."""
    import torch
    from transformers.pytorch_utils import Conv1D

    for target in targets:
        found = [
            module
            for path, module in model.named_modules()
            if path == target or path.endswith("." + target)
        ]
        if not found or not all(isinstance(m, torch.nn.Linear | Conv1D) for m in found):
            kinds = ", ".join(sorted({type(m).__name__ for m in found})) or "nothing"
            raise ToolkitError(
                f"--method lora cannot adapt this {family.name} model: its attention projection "
                f"'{target}' is not an nn.Linear or Conv1D in every layer (found: {kinds})"
            )


def wrap_with_lora(model, config: FinetuneConfig):
    """`model` as a peft LoRA model: attention matrices adapted, the task head fully trained.

    The target modules come from the model's attention description (`toolkit.families`), for a
    registered architecture and one read by the common names alike. peft's task types keep a
    classifier's new head trainable (`modules_to_save`) and save it in the adapter, so a
    classification run learns the head it could not do without.
    """
    from peft import LoraConfig, TaskType, get_peft_model

    family = model_family(model)
    targets = lora_modules(family, lora_roles(config))
    check_targets_are_adaptable(model, family, targets)
    task_type = TaskType.CAUSAL_LM if config.task == "causal-lm" else TaskType.SEQ_CLS
    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets,
        fan_in_fan_out=family.conv1d,  # Conv1D stores [in, out], the transpose of nn.Linear
        task_type=task_type,
    )
    with warnings.catch_warnings():
        # peft asks the model `is_gradient_checkpointing`, which transformers 5 deprecates: a
        # warning to peft's authors, not to the user of a LoRA run
        warnings.filterwarnings(
            "ignore", message=".*is_gradient_checkpointing", category=FutureWarning
        )
        return get_peft_model(model, lora)


def is_lora_model(model) -> bool:
    """Whether `model` is a peft model (without importing peft for a full fine-tune)."""
    peft = sys.modules.get("peft")  # a peft model exists only once peft is imported
    return peft is not None and isinstance(model, peft.PeftModel)


def merged_state_dict(peft_model) -> dict:
    """The base model's state dict with every adapted weight replaced by W + (alpha/r)·B·A.

    Names are the base model's own (peft's `base_layer.`, `modules_to_save.default.` and the
    adapter matrices are taken out), so the family adapters read it as they read any checkpoint.
    New tensors: the model being trained is not modified, and nothing returned aliases an
    adapted weight. Equal to peft's `merge_and_unload()` state dict.
    """
    import torch
    from peft.tuners.lora import LoraLayer

    inner = peft_model.get_base_model()
    with torch.no_grad():
        deltas = {
            f"{name}.base_layer.weight": layer.get_delta_weight(ADAPTER)
            for name, layer in inner.named_modules()
            if isinstance(layer, LoraLayer) and ADAPTER in layer.lora_A
        }
        merged = {}
        for name, tensor in inner.state_dict().items():
            if ".lora_" in name or ".original_module." in name:
                continue  # the adapter's own matrices; the head's frozen copy
            if name in deltas:
                tensor = tensor + deltas[name].to(tensor.dtype)
            plain = name.replace(".base_layer.", ".").replace(f".modules_to_save.{ADAPTER}.", ".")
            merged[plain] = tensor
    return merged


def base_model(model):
    """The transformers model inside a peft model (whose `save_pretrained` writes an adapter)."""
    return model.get_base_model() if is_lora_model(model) else model


def save_adapter(peft_model, tokenizer, folder: Path) -> None:
    """The adapter in PEFT format (adapter_config.json, adapter_model.safetensors) and the
    tokenizer: `PeftModel.from_pretrained(base, folder)` loads it onto the base model."""
    with atomic_folder(folder) as tmp:
        peft_model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def trainable_parameters(model) -> tuple[int, int]:
    """(parameters the optimizer updates, all parameters), each tensor counted once."""
    seen, trainable, total = set(), 0, 0
    for parameter in model.parameters():
        if id(parameter) in seen:
            continue
        seen.add(id(parameter))
        total += parameter.numel()
        trainable += parameter.numel() if parameter.requires_grad else 0
    return trainable, total
