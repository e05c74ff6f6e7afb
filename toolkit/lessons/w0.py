"""Lesson `w0`: why one output matrix W0 and not one per head, and what it does, on the real model.

The block output is Concat(z_0..z_{h-1}) @ W0 + b0 = sum_i z_i @ w0[i] + b0: W0's row blocks
belong to the heads. The lesson then swaps one layer's W0 for (a) the identity and (b) one head's
block repeated for every head, and measures how much the layer's and the model's outputs move.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from toolkit.analysis.verify import (
    concat_then_w0,
    layer_mask,
    positional_rotation,
    recompute_layer,
    score_details,
)
from toolkit.attention import AttentionModel, head_frobenius, load_attention
from toolkit.runtime import captured_blocks, load_model, make_inputs


@dataclass
class W0Replacement:
    """One substitute for the layer's W0 and how much it changes the outputs."""

    kind: str  # "identity" or "repeat"
    head: int | None  # for "repeat": whose block is copied into every head's rows
    layer_output_relative_change: float  # ||block' - block|| / ||block|| over real tokens
    final_output_relative_change: float  # the same for the model's last hidden states


@dataclass
class W0Lesson:
    model: str
    family: str
    layer: int
    n_heads: int
    d_head: int
    d_model: int
    inputs: dict  # texts (or random ids) the model ran on
    tokens: int  # real tokens of the first input, used in the shapes below
    z_shape: list[int]  # one head's output z_i: [tokens, d_head]
    concat_shape: list[int]  # Concat(z): [tokens, h*d_head]
    w0_shape: list[int]  # [h*d_head, d_model]
    output_shape: list[int]  # [tokens, d_model]
    concat_vs_sum_max_abs_diff: float  # Concat(z) @ W0  vs  sum_i z_i @ w0[i]
    sum_vs_model_max_abs_diff: float  # sum_i z_i @ w0[i] + b0  vs  the model's own block output
    w0_rank: int  # numerical rank of W0
    w0_singular_max: float
    w0_singular_min: float
    head_block_norms: list[float]  # ||w0[i]||_F, [h]
    head_block_abs_mean: list[list[float]]  # mean |W0| over each head's rows, [h, d_model]
    reinserted_max_abs_diff: float  # the swap route with the original W0 vs the untouched model
    replacements: list[W0Replacement] = field(default_factory=list)
    n_kv_heads: int | None = None  # key/value heads; fewer than n_heads: grouped-query attention
    # the range of the replacements' relative changes: [min, max]
    layer_output_change_range: list[float] = field(default_factory=list)
    final_output_change_range: list[float] = field(default_factory=list)

    @property
    def concat_width(self) -> int:
        return self.n_heads * self.d_head

    def to_dict(self) -> dict:
        return {**asdict(self), "concat_width": self.concat_width}


def explain_w0(
    model: str | None = None,
    texts: Sequence[str] | None = None,
    *,
    layer: int = 0,
    revision: str | None = None,
    allow_pickle: bool = False,
    attention: AttentionModel | None = None,
) -> W0Lesson:
    """Shapes, the Concat/sum identity and the W0 replacement experiment for one layer."""
    import torch

    attention = attention or load_attention(model, revision=revision, allow_pickle=allow_pickle)
    standard = attention.layer(layer)  # validates the layer index
    net = load_model(attention, allow_pickle)
    input_ids, padding, inputs_info = make_inputs(attention, texts, seed=0)
    d = attention.dims
    valid = padding.bool()  # [batch, tokens]: real tokens, not padding

    with captured_blocks(net, attention) as captured, torch.no_grad():
        final = net(input_ids=input_ids, attention_mask=padding).last_hidden_state
    block = captured.outputs[layer]  # [batch, tokens, d_model]
    scale = attention.family.score_scale(attention.config, layer, d)
    mask = layer_mask(attention, layer, padding)
    rotation = positional_rotation(attention, input_ids.shape[1], layer)
    details = score_details(attention, net, layer, padding)  # q/k norms, ALiBi, soft-cap
    # z: [batch, heads, tokens, d_head], each head's output before W0
    with torch.no_grad():
        _, z, per_head_sum = recompute_layer(  # per_head_sum: sum_i z_i @ w0[i] + b0
            standard, captured.inputs[layer], mask, scale, rotation, details
        )
    concat_route = concat_then_w0(standard, z)  # Concat(z) @ W0 + b0

    w0 = standard.full("w0")  # [h*d_head, d_model]
    singular = torch.linalg.svdvals(torch.from_numpy(w0).double()).numpy()
    # numerical rank with numpy's matrix_rank tolerance
    rank = int((singular > singular.max() * max(w0.shape) * np.finfo(np.float64).eps).sum())
    _, reinserted = run_with_w0(net, attention, layer, w0, input_ids, padding)  # the route itself
    tokens = int(valid[0].sum())
    lesson = W0Lesson(
        model=str(attention.name),
        family=attention.family.name,
        layer=layer,
        n_heads=d.n_heads,
        d_head=d.d_head,
        d_model=d.d_model,
        inputs=inputs_info,
        tokens=tokens,
        z_shape=[tokens, d.d_head],
        concat_shape=[tokens, d.n_heads * d.d_head],
        w0_shape=list(w0.shape),
        output_shape=[tokens, d.d_model],
        concat_vs_sum_max_abs_diff=(concat_route - per_head_sum).abs().max().item(),
        sum_vs_model_max_abs_diff=(per_head_sum - block)[valid].abs().max().item(),
        w0_rank=rank,
        w0_singular_max=float(singular.max()),
        w0_singular_min=float(singular.min()),
        head_block_norms=head_frobenius(standard.w0).tolist(),
        head_block_abs_mean=np.abs(standard.w0).mean(axis=1).tolist(),
        reinserted_max_abs_diff=(reinserted - final)[valid].abs().max().item(),
        n_kv_heads=d.n_kv_heads,
    )

    def replaced(kind: str, head: int | None, new_w0: np.ndarray) -> W0Replacement:
        new_block, new_final = run_with_w0(net, attention, layer, new_w0, input_ids, padding)
        return W0Replacement(
            kind, head, _relative(new_block, block, valid), _relative(new_final, final, valid)
        )

    if w0.shape[0] == w0.shape[1]:  # the identity exists only when h*d_head == d_model
        identity = np.eye(w0.shape[0], dtype=np.float32)
        lesson.replacements.append(replaced("identity", None, identity))
    for head in range(d.n_heads):
        repeated = np.tile(standard.w0[head], (d.n_heads, 1))  # [h*d_head, d_model]
        lesson.replacements.append(replaced("repeat", head, repeated))
    layer_changes = [rep.layer_output_relative_change for rep in lesson.replacements]
    final_changes = [rep.final_output_relative_change for rep in lesson.replacements]
    lesson.layer_output_change_range = [min(layer_changes), max(layer_changes)]
    lesson.final_output_change_range = [min(final_changes), max(final_changes)]
    return lesson


def run_with_w0(net, attention: AttentionModel, layer: int, w0: np.ndarray, input_ids, padding):
    """Run the real model with layer `layer`'s W0 replaced by `w0` [h*d_head, d_model] (b0 kept).

    A forward hook on the module that applies W0 recomputes its output from its input, Concat(z),
    so the weights themselves are never touched. Returns (that layer's block output
    [batch, tokens, d_model], the final hidden states [batch, tokens, d_model]).
    """
    import torch

    _, output_module = attention.family.hook_modules(net, layer)
    new_w0 = torch.from_numpy(np.ascontiguousarray(w0, dtype=np.float32))
    b0 = attention.layer(layer).b0
    b0 = 0.0 if b0 is None else torch.from_numpy(b0)  # bias-free models (Llama) have none
    seen = {}

    def replace(module, args, output):
        seen["block"] = args[0] @ new_w0 + b0  # Concat(z) [batch, tokens, h*d_head] @ W0'
        return seen["block"]

    handle = output_module.register_forward_hook(replace)
    try:
        with torch.no_grad():
            final = net(input_ids=input_ids, attention_mask=padding).last_hidden_state
    finally:
        handle.remove()
    return seen["block"].float(), final.float()


def _relative(new, old, valid) -> float:
    """||new - old||_F / ||old||_F over the real (not padding) tokens."""
    return ((new - old)[valid].norm() / old[valid].norm()).item()
