"""`verify`: recompute every layer's multi-head attention from the standard tensors alone and
compare it with what the real model computes.

This is the proof that the extraction is right, and the concrete answer to "why one W0":
the block output is Concat(z_0..z_{h-1}) @ W0 + b0, which equals sum_i z_i @ w0[i] + b0,
where w0[i] is the d_head-row block of W0 that belongs to head i. Rotary models have q and k
rotated by position (full, partial or GPT-J-interleaved; none on NoPE layers); grouped-query
models repeat each key/value head for its group of query heads; causal and sliding-window masks
are the model's own. Where the family has them, q and k go through the model's own q/k norm
modules (their weights are not among the standard tensors), ALiBi biases or a learned
relative-position bias (MPNet's table, read from the checkpoint) are added to the scores and
Gemma 2's soft-cap is applied before the mask.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from toolkit.attention import AttentionLayer, AttentionModel, load_attention
from toolkit.errors import ToolkitError
from toolkit.families.base import RelativeBias
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


@dataclass(frozen=True)
class ScoreDetails:
    """What a layer's scores need beyond (q . k) * scale and the mask (`score_details`)."""

    qk_norms: tuple | None = None  # (q norm, k norm): the model's own norm modules
    qk_norm_over_heads: bool = False  # one norm over all heads' values (OLMo 2)
    qk_norm_heads_first: bool = False  # the norm takes [batch, heads, tokens, d_head] (StableLM)
    # [batch or 1, heads, 1 or tokens, tokens] added to the scores (ALiBi, relative bias)
    additive_bias: object = None
    softcap: float | None = None  # scores -> softcap * tanh(scores / softcap) (Gemma 2)


def recompute_layer(
    layer: AttentionLayer,
    hidden,
    mask,
    scale: float,
    rotation=None,
    details: ScoreDetails | None = None,
):
    """Multi-head (or grouped-query) attention from the standard tensors alone.

    hidden: [batch, tokens, d_model] input of the attention block.
    mask: [batch, 1 or heads, tokens, tokens] bool, True where a query may attend to a key.
    rotation: (cos, sin, interleaved) for rotary models (`positional_rotation`), or None.
    details: q/k norms, an additive bias and soft-capping where the model has them.
    Returns (probs [batch, heads, tokens, tokens], z [batch, heads, tokens, d_head], output
    [batch, tokens, d_model]).
    """
    import torch

    details = details or ScoreDetails()
    q, k, v = query_key_value(layer, hidden, rotation, details)
    scores = (q @ k.transpose(-1, -2)) * scale  # [batch, heads, tokens, tokens]
    if details.additive_bias is not None:
        scores = scores + details.additive_bias
    if details.softcap is not None:
        scores = torch.tanh(scores / details.softcap) * details.softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    z = probs @ v  # [batch, heads, tokens, d_head]
    batch, heads, tokens, d_head = z.shape
    # sum_i z_i @ w0[i]: each head's [batch * tokens, d_head] rows by its block of W0
    per_head = z.transpose(0, 1).reshape(heads, batch * tokens, d_head) @ _tensor(layer.w0)
    output = per_head.sum(0).reshape(batch, tokens, -1)
    return probs, z, output if layer.b0 is None else output + torch.from_numpy(layer.b0)


def query_key_value(
    layer: AttentionLayer, hidden, rotation=None, details: ScoreDetails | None = None
):
    """q, k, v: [batch, heads, tokens, d_head] for every query head, from hidden [batch, tokens,
    d_model]: q and k normalised (models with q/k norms), positions rotated into q and k (rotary
    models), and each key/value head repeated for the h / h_kv query heads of its group (query
    head i reads key/value head i // group)."""
    from toolkit.families.rotary import rotate

    q, k, v = (_project(hidden, layer, role) for role in "qkv")
    if details is not None and details.qk_norms is not None:
        q_norm, k_norm = details.qk_norms
        q = _normed(q, q_norm, details)
        k = _normed(k, k_norm, details)
    if rotation is not None:
        q, k = rotate(q, *rotation), rotate(k, *rotation)
    group = q.shape[1] // k.shape[1]
    return q, k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)


def _normed(x, norm, details: ScoreDetails):
    """The model's norm module on x [batch, heads, tokens, d_head], in the layout the model
    gives it: over each head's d_head values, or over all heads' values of a token."""
    if details.qk_norm_heads_first:
        return norm(x).float()
    per_token = x.transpose(1, 2)  # [batch, tokens, heads, d_head], as the model holds it
    if details.qk_norm_over_heads:
        per_token = norm(per_token.flatten(-2)).unflatten(-1, per_token.shape[-2:])
    else:
        per_token = norm(per_token)
    return per_token.transpose(1, 2).float()


def _project(hidden, layer: AttentionLayer, role: str):
    """hidden [batch, tokens, d_model] @ w{role} (+ b{role}) -> [batch, heads, tokens, d_head]."""
    import torch

    weight, bias = getattr(layer, "w" + role), getattr(layer, "b" + role)
    batch, tokens, d_model = hidden.shape
    # every token's row by each head's [d_model, d_head] (one product per head, the batch as
    # rows: broadcasting a batch dimension over the weight would copy it per batch)
    rows = hidden.reshape(1, batch * tokens, d_model)
    projected = (rows @ _tensor(weight)).unflatten(1, (batch, tokens)).transpose(0, 1)
    return projected if bias is None else projected + torch.from_numpy(bias)[None, :, None, :]


def _tensor(array: np.ndarray):
    """A tensor on `array`'s memory, its strides kept: the per-head views of a fused or
    transposed checkpoint tensor go to the matrix products as they are (BLAS reads a transposed
    or strided matrix in place; a contiguous copy of each weight cost more than the products).
    A read-only array (a mapped checkpoint) is shared too: nothing here writes to it."""
    import warnings

    import torch

    if any(stride < 0 for stride in array.strides):  # torch takes no reversed views
        array = np.ascontiguousarray(array)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def positional_rotation(attention: AttentionModel, tokens: int, layer: int | None = None):
    """(cos, sin, interleaved) with cos, sin [tokens, rotary_dim] at positions 0..tokens-1 for
    a rotary model, else None; None too on a `layer` the model leaves unrotated (NoPE)."""
    import torch

    from toolkit.families.rotary import config_for_layer, rotation

    family, config = attention.family, attention.config
    if layer is not None:
        if not family.rotary_on_layer(config, layer):
            return None
        config = config_for_layer(config, layer)
    rotary = family.rotary(config)
    return None if rotary is None else rotation(rotary, torch.arange(tokens))


def score_details(attention: AttentionModel, net, index: int, padding) -> ScoreDetails:
    """Layer `index`'s q/k norms (the model's modules), additive bias (ALiBi or a learned
    relative-position bias) and soft-cap."""
    family = attention.family
    return ScoreDetails(
        qk_norms=None if family.qk_norms is None else family.qk_norms(net, index),
        qk_norm_over_heads=family.qk_norm_over_heads,
        qk_norm_heads_first=family.qk_norm_heads_first,
        additive_bias=additive_bias(attention, padding),
        softcap=family.logit_softcap(attention.config),
    )


def additive_bias(attention: AttentionModel, padding):
    """What the family adds to every layer's scores: ALiBi [batch, heads, 1, tokens], a learned
    relative-position bias [1, heads, tokens, tokens], or None."""
    family = attention.family
    if family.alibi:
        return alibi_bias(attention.dims.n_heads, padding)
    if family.relative_bias is not None:
        return relative_position_bias(
            attention.relative_bias_table(), padding.shape[1], family.relative_bias
        )
    return None


def alibi_bias(n_heads: int, padding):
    """ALiBi (Press et al. 2022): slope_h * key position, [batch, heads, 1, tokens]. A shift of
    all key positions by the query's adds a constant per query row, which softmax ignores.

    Slopes 2^(-8 i / n) for i = 1..n when n is a power of two; otherwise those of the next
    power of two n2, odd-numbered first, then the even ones (BLOOM's and MPT's rule)."""
    import torch

    n2 = 2 ** math.ceil(math.log2(n_heads))
    slopes = 2.0 ** (-8.0 * torch.arange(1, n2 + 1, dtype=torch.float64) / n2)
    if n2 != n_heads:
        slopes = torch.cat((slopes[1::2], slopes[::2]))[:n_heads]
    key_positions = (padding.cumsum(-1) - 1).clamp(min=0)  # [batch, tokens]
    bias = slopes[None, :, None] * key_positions[:, None, :].double()
    return bias[:, :, None, :].float()


def relative_position_bias(table: np.ndarray, tokens: int, relative_bias: RelativeBias):
    """table[bucket(k - q), head] as [1, heads, tokens, tokens], table [buckets, heads].

    As MPNet's encoder computes it: positions 0..tokens-1 in every sequence whatever its padding
    (the encoder is given no position ids), so one bias serves the whole batch."""
    import torch

    positions = torch.arange(tokens)
    offsets = positions[None, :] - positions[:, None]  # [query, key]: key - query
    buckets = relative_position_buckets(
        offsets, relative_bias.num_buckets, relative_bias.max_distance
    )
    bias = torch.from_numpy(table)[buckets]  # [query, key, heads]
    return bias.permute(2, 0, 1)[None]


def relative_position_buckets(offsets, num_buckets: int, max_distance: int):
    """The bucket of each offset key - query (a long tensor), T5's scheme as MPNet uses it.

    Keys at or before the query take buckets 0..half-1, keys after it half..num_buckets-1
    (half = num_buckets / 2). Within a half, distances below exact = half / 2 have a bucket
    each; longer ones share log-spaced buckets, exact + floor(log(d / exact) /
    log(max_distance / exact) * (half - exact)), the last of which holds every distance from
    max_distance on."""
    import torch

    half = num_buckets // 2
    exact = half // 2
    distance = offsets.abs()
    # log2 in float64: its ratios at powers of two are exact, so boundaries floor as integers
    octaves = torch.log2(distance.clamp(min=1).double() / exact) / math.log2(max_distance / exact)
    far = exact + (octaves * (half - exact)).floor().long()
    within_half = torch.where(distance < exact, distance, far.clamp(max=half - 1))
    return within_half + half * (offsets > 0).long()


def layer_mask(attention: AttentionModel, index: int, padding):
    """The mask of layer `index`: padding, causal order and the sliding window, as the model's."""
    family = attention.family
    return allowed_mask(padding, family.causal, family.sliding_window(attention.config, index))


def concat_then_w0(layer: AttentionLayer, z):
    """The textbook route: Concat(z_0..z_{h-1}) [batch, tokens, h*d_head] @ W0 + b0."""
    import torch

    batch, heads, tokens, d_head = z.shape
    concat = z.transpose(1, 2).reshape(batch, tokens, heads * d_head)
    output = concat @ _tensor(layer.full("w0"))
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
        rotation = positional_rotation(attention, input_ids.shape[1], index)
        details = score_details(attention, net, index, padding)
        with torch.no_grad():
            probs, z, output = recompute_layer(
                layer, captured.inputs[index], mask, scale, rotation, details
            )
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
