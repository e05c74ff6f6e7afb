"""`verify`: recompute every layer's multi-head attention from the standard tensors alone and
compare it with what the real model computes.

This is the proof that the extraction is right, and the concrete answer to "why one W0":
the block output is Concat(z_0..z_{h-1}) @ W0 + b0, which equals sum_i z_i @ w0[i] + b0,
where w0[i] is the d_head-row block of W0 that belongs to head i. Rotary models have q and k
rotated by position; grouped-query models repeat each key/value head for its group of query
heads; causal and sliding-window masks are the model's own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from toolkit.attention import AttentionLayer, AttentionModel, load_attention
from toolkit.errors import ToolkitError
from toolkit.runtime import captured_blocks, load_model, make_inputs

# The verdict's bound on max |recomputed - model| / max |model| per layer and quantity: float32
# rounding in two different summation orders stays below it on any CPU's kernels, a wrong
# extraction is far above it (docs/numerics.md derives it).
TOLERANCE = 1e-4


@dataclass
class LayerCheck:
    layer: int
    max_abs_diff: dict[str, float]  # "probs": attention probabilities, "output": block output
    concat_vs_sum_max_abs_diff: float  # Concat(z) @ W0  vs  sum_i z_i @ w0[i]
    # max |model's value| over the compared positions, per quantity: the scale of max_abs_diff
    reference_max_abs: dict[str, float] = field(default_factory=dict)
    # max_abs_diff / reference_max_abs per quantity, and the Concat route's against the output
    max_rel_diff: dict[str, float] = field(default_factory=dict)
    concat_vs_sum_max_rel_diff: float = 0.0

    @property
    def worst_rel_diff(self) -> float:
        """The largest relative difference of the layer, the figure the verdict bounds."""
        return max(*self.max_rel_diff.values(), self.concat_vs_sum_max_rel_diff)


@dataclass
class VerifyReport:
    model: str
    family: str
    n_heads: int
    d_head: int
    d_model: int
    w0_shape: list[int]  # [n_heads * d_head, d_model]
    tolerance: float  # the bound on every relative difference (max_rel_diff), not on max_abs_diff
    inputs: dict  # how the input was made: texts or random ids, and its shape
    layers: list[LayerCheck] = field(default_factory=list)
    n_kv_heads: int | None = None  # key/value heads (h_kv = n_heads for multi-head attention)
    positions: dict = field(default_factory=dict)  # the positional scheme the check applied

    @property
    def passed(self) -> bool:
        return all(c.worst_rel_diff <= self.tolerance for c in self.layers)

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def recompute_layer(layer: AttentionLayer, hidden, mask, scale: float, rotation=None):
    """Multi-head (or grouped-query) attention from the standard tensors alone.

    hidden: [batch, tokens, d_model] input of the attention block.
    mask: [batch, 1 or heads, tokens, tokens] bool, True where a query may attend to a key.
    rotation: (cos, sin) [tokens, rotary_dim] for rotary models (`positional_rotation`), or None.
    Returns (probs [batch, heads, tokens, tokens], z [batch, heads, tokens, d_head], output
    [batch, tokens, d_model]).
    """
    import torch

    q, k, v = query_key_value(layer, hidden, rotation)
    scores = (q @ k.transpose(-1, -2)) * scale  # [batch, heads, tokens, tokens]
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    z = probs @ v  # [batch, heads, tokens, d_head]
    output = torch.einsum("bhte,hed->btd", z, torch.from_numpy(layer.w0))
    return probs, z, output if layer.b0 is None else output + torch.from_numpy(layer.b0)


def query_key_value(layer: AttentionLayer, hidden, rotation=None):
    """q, k, v: [batch, heads, tokens, d_head] for every query head, from hidden [batch, tokens,
    d_model]: positions rotated into q and k (rotary models), and each key/value head repeated
    for the h / h_kv query heads of its group (query head i reads key/value head i // group)."""
    from toolkit.families.rotary import rotate

    q, k, v = (_project(hidden, layer, role) for role in "qkv")
    if rotation is not None:
        q, k = rotate(q, *rotation), rotate(k, *rotation)
    group = q.shape[1] // k.shape[1]
    return q, k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)


def _project(hidden, layer: AttentionLayer, role: str):
    """hidden [batch, tokens, d_model] @ w{role} (+ b{role}) -> [batch, heads, tokens, d_head]."""
    import torch

    weight, bias = getattr(layer, "w" + role), getattr(layer, "b" + role)
    weight = torch.from_numpy(np.ascontiguousarray(weight))  # [heads, d_model, d_head]
    projected = torch.einsum("btd,hde->bhte", hidden, weight)
    return projected if bias is None else projected + torch.from_numpy(bias)[None, :, None, :]


def positional_rotation(attention: AttentionModel, tokens: int):
    """(cos, sin) [tokens, rotary_dim] at positions 0..tokens-1 for a rotary model, else None."""
    import torch

    from toolkit.families.rotary import rotation

    rotary = attention.family.rotary(attention.config)
    return None if rotary is None else rotation(rotary, torch.arange(tokens))


def layer_mask(attention: AttentionModel, index: int, padding):
    """The mask of layer `index`: padding, causal order and the sliding window, as the model's."""
    family = attention.family
    return allowed_mask(padding, family.causal, family.sliding_window(attention.config, index))


def concat_then_w0(layer: AttentionLayer, z):
    """The textbook route: Concat(z_0..z_{h-1}) [batch, tokens, h*d_head] @ W0 + b0."""
    import torch

    batch, heads, tokens, d_head = z.shape
    concat = z.transpose(1, 2).reshape(batch, tokens, heads * d_head)
    output = concat @ torch.from_numpy(np.ascontiguousarray(layer.full("w0")))
    return output if layer.b0 is None else output + torch.from_numpy(layer.b0)


def verify(
    model: str | None = None,
    texts: Sequence[str] | None = None,
    *,
    attention: AttentionModel | None = None,
    revision: str | None = None,
    allow_pickle: bool = False,
    seed: int = 0,
) -> VerifyReport:
    """Run the real model (eager attention) and check each layer against `recompute_layer`.

    `attention` overrides the extracted tensors (tests use it to feed a deliberately wrong one).
    """
    import torch

    attention = attention or load_attention(model, revision=revision, allow_pickle=allow_pickle)
    net = load_model(attention, allow_pickle)
    input_ids, padding, inputs_info = make_inputs(attention, texts, seed)
    with captured_blocks(net, attention) as captured, torch.no_grad():
        outputs = net(input_ids=input_ids, attention_mask=padding, output_attentions=True)
    if outputs.attentions is None or len(outputs.attentions) != attention.dims.n_layers:
        raise ToolkitError(
            "the model returned no attention probabilities: it does not use eager attention"
        )

    d = attention.dims
    rotation = positional_rotation(attention, input_ids.shape[1])
    report = VerifyReport(
        model=str(attention.name),
        family=attention.family.name,
        n_heads=d.n_heads,
        d_head=d.d_head,
        d_model=d.d_model,
        w0_shape=[d.n_heads * d.d_head, d.d_model],
        tolerance=TOLERANCE,
        inputs=inputs_info,
        n_kv_heads=d.n_kv_heads,
        positions=attention.positions(),
    )
    valid = padding.bool()  # compare only real (not padding) query positions
    for index in attention.layer_indices:
        layer = attention.layer(index)
        scale = attention.family.score_scale(attention.config, index, d)
        mask = layer_mask(attention, index, padding)
        probs, z, output = recompute_layer(layer, captured.inputs[index], mask, scale, rotation)
        model_probs = outputs.attentions[index].float()
        model_output = captured.outputs[index]
        report.layers.append(
            compare_layer(
                index,
                {"probs": (probs, model_probs), "output": (output, model_output)},
                concat_then_w0(layer, z),
                valid,
            )
        )
    return report


def compare_layer(index: int, pairs: dict, concat_output, valid) -> LayerCheck:
    """One layer's differences over the valid (not padding) query positions.

    pairs: quantity -> (recomputed, model's), probabilities [batch, heads, tokens, tokens] or
    outputs [batch, tokens, d_model]; concat_output: the Concat(z) @ W0 route's output.
    valid: [batch, tokens] bool. Each quantity's absolute difference is also divided by the
    largest |model's value|, which makes it independent of the layer's scale (docs/numerics.md).
    """
    absolute, reference = {}, {}
    for quantity, (ours, theirs) in pairs.items():
        absolute[quantity] = _max_over_valid_queries((ours - theirs).abs(), valid)
        reference[quantity] = _max_over_valid_queries(theirs.abs(), valid)
    output = pairs["output"][0]
    concat = _max_over_valid_queries((concat_output - output).abs(), valid)
    return LayerCheck(
        index,
        absolute,
        concat,
        reference_max_abs=reference,
        max_rel_diff={q: _ratio(absolute[q], reference[q]) for q in absolute},
        concat_vs_sum_max_rel_diff=_ratio(concat, reference["output"]),
    )


def _max_over_valid_queries(values, valid) -> float:
    """max of values ([batch, heads, tokens, tokens] or [batch, tokens, d_model]) over the query
    positions where valid [batch, tokens] is True."""
    per_query = values.amax(dim=(1, 3)) if values.dim() == 4 else values.amax(dim=-1)
    return per_query[valid].max().item()


def _ratio(difference: float, reference: float) -> float:
    """difference / reference; an all-zero reference leaves the absolute difference (0 if equal)."""
    return difference / reference if reference > 0 else difference


def allowed_mask(padding, causal: bool, sliding_window: int | None = None):
    """[batch, 1, tokens, tokens] bool: True where a query may attend to a key.

    A sliding window lets query q see key k only when q - k < sliding_window."""
    import torch

    keys = padding.bool()[:, None, None, :]
    if not causal:
        return keys
    tokens = padding.shape[1]
    allowed = torch.ones(tokens, tokens, dtype=torch.bool).tril()
    if sliding_window is not None:
        allowed = allowed.triu(-(sliding_window - 1))
    return keys & allowed[None, None]
