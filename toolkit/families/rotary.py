"""Rotary position embeddings (RoPE) as transformers computes them, from a config dict alone.

The inverse frequencies and the cos/sin scale come from transformers' own initialisers for the
model's `rope_type` (default, linear, dynamic, yarn, longrope, llama3), so that every scaling
variant the installed transformers supports for a family is applied exactly as the model applies
it. Rotating q and k is written out here (the model's `rotate_half` convention).
"""

from __future__ import annotations

from toolkit.families.base import Rotary


def rotary_from_config(config: dict, interleaved: bool = False) -> Rotary:
    """The Rotary of a rotary model's config.json dict (`interleaved`: GPT-J's pairing)."""
    import torch
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if config.get("rotary_dim") and not config.get("rope_parameters"):
        # GPT-J and CodeGen: the first `rotary_dim` dimensions, base 10000, no scaling
        dim = config["rotary_dim"]
        inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        return Rotary(inv_freq, 1.0, interleaved)
    settings = {key: value for key, value in config.items() if key != "model_type"}
    model_config = AutoConfig.for_model(config["model_type"], **settings)
    parameters = rope_parameters(model_config)
    rope_type = parameters.get("rope_type", "default")
    if rope_type == "default":
        inv_freq, scaling = _default_inv_freq(model_config, parameters)
    else:
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](model_config, "cpu")
    return Rotary(inv_freq.float(), float(scaling), interleaved)


def config_for_layer(config: dict, layer: int) -> dict:
    """The config as layer `layer` sees it: models with rope settings per layer type (OLMo 3,
    Gemma 3) keep `rope_parameters` as {layer type: settings}; the layer's own are picked."""
    parameters = config.get("rope_parameters") or {}
    layer_types = config.get("layer_types") or []
    if layer < len(layer_types) and isinstance(parameters.get(layer_types[layer]), dict):
        return {**config, "rope_parameters": parameters[layer_types[layer]]}
    return config


def rope_settings(config: dict) -> dict:
    """rope_type, rope_theta and the scaling settings of a config.json dict, without building
    the config (inspect must not import transformers): transformers 5 writes
    `rope_parameters`; 4.x wrote `rope_theta` and `rope_scaling`; `partial_rotary_factor` may
    stand beside them."""
    settings = dict(config.get("rope_parameters") or {})
    if not settings:
        settings = dict(config.get("rope_scaling") or {})
        settings.setdefault("rope_type", settings.pop("type", "default"))
        settings["rope_theta"] = config.get("rope_theta", 10000.0)
    if "partial_rotary_factor" in config:
        settings.setdefault("partial_rotary_factor", config["partial_rotary_factor"])
    settings.setdefault("rope_type", "default")
    return settings


def rope_parameters(model_config) -> dict:
    """rope_type, rope_theta and scaling settings (transformers 5: `rope_parameters`; 4.x:
    `rope_theta` and `rope_scaling`)."""
    parameters = getattr(model_config, "rope_parameters", None)
    if parameters:
        return dict(parameters)
    scaling = dict(getattr(model_config, "rope_scaling", None) or {})
    scaling.setdefault("rope_type", scaling.pop("type", "default"))
    return {"rope_theta": model_config.rope_theta, **scaling}


def _default_inv_freq(model_config, parameters: dict):
    import torch

    head_dim = getattr(model_config, "head_dim", None) or (
        model_config.hidden_size // model_config.num_attention_heads
    )
    dim = int(head_dim * parameters.get("partial_rotary_factor", 1.0))
    base = parameters["rope_theta"]
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)), 1.0


def rotation(rotary: Rotary, positions):
    """cos, sin: [tokens, rotary_dim] for integer `positions` [tokens]."""
    import torch

    angles = positions[:, None].float() * rotary.inv_freq[None, :]  # [tokens, rotary_dim / 2]
    if rotary.interleaved:  # pairs (2j, 2j + 1) share an angle
        angles = angles.repeat_interleave(2, dim=-1)
    else:  # pairs (j, j + rotary_dim / 2) share an angle
        angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos() * rotary.attention_scaling, angles.sin() * rotary.attention_scaling
    return cos, sin, rotary.interleaved


def rotate(x, cos, sin, interleaved: bool = False):
    """Rotate the first rotary_dim dimensions of x [..., tokens, d_head] by position.

    Pair (a, b) turns by its angle: x_a cos - x_b sin, x_b cos + x_a sin, with (a, b) =
    (j, j + rotary_dim / 2), or (2j, 2j + 1) when `interleaved`. Dimensions past rotary_dim
    (partial rotary) pass through unchanged."""
    import torch

    width = cos.shape[-1]
    turned, passed = x[..., :width], x[..., width:]
    if interleaved:
        even, odd = turned[..., 0::2], turned[..., 1::2]
        rotated_half = torch.stack((-odd, even), dim=-1).flatten(-2)
    else:
        first, second = turned[..., : width // 2], turned[..., width // 2 :]
        rotated_half = torch.cat((-second, first), dim=-1)
    return torch.cat((turned * cos + rotated_half * sin, passed), dim=-1)
