"""The contract between model families and the rest of the toolkit.

A family adapter knows its checkpoint's tensor names and storage layout and turns one layer's
tensors into the standard per-head layout, with h query heads and h_kv key/value heads:

    wq         : [h,    d_model, d_head]   query head i is  x @ wq[i] + bq[i]
    wk, wv     : [h_kv, d_model, d_head]   query head i reads key/value head i // (h / h_kv)
    w0         : [h,    d_head, d_model]   the block's output is  sum_i z_i @ w0[i] + b0
    bq         : [h, d_head];  bk, bv : [h_kv, d_head];  b0 : [d_model]

Multi-head attention is the case h_kv = h (BERT, GPT-2). Grouped-query attention (Llama,
Mistral, Qwen2) has h_kv < h: the h / h_kv query heads of a group share one key/value head.
A bias the model does not have is absent from the converted dict (never a zero tensor).

Everything downstream works on that layout only. An adapter (`Family`) supplies:

- `dimensions(config)`: the Dimensions, from the `config.json` dict.
- `layer_names(layer, config)`: role -> checkpoint tensor name (without the model prefix) for
  every attention tensor of that layer the checkpoint holds.
- `convert(tensors, dims)`: those tensors -> the standard layout above (numpy, float32). It
  may only split, reshape and transpose (no arithmetic): `extract` passes it a half-precision
  checkpoint's raw storage (uint16 bits for bfloat16) to copy it bit for bit.
- `bias_roles(config)`: which of bq, bk, bv, b0 the model has.
- `score_scale(config, layer, dims)`: the factor the model multiplies q . k by.
- `causal`: whether a token attends only to itself and earlier tokens.
- `sliding_window(config, layer)`: the window (a query sees keys with q - k < window) or None.
- `rotary(config)`: None for models whose positions are added to the embeddings; for rotary
  models a `Rotary` (inverse frequencies and the scale of cos/sin, computed as the model does).
- `positions(config)`: the positional scheme and its parameters, for metadata and inspect.
- `hook_modules(model, layer)`: (module whose input is the attention block's input, module whose
  output is the block's output before dropout and residual), on the model `AutoModel` builds.
- `pattern`, `alibi`, `relative_bias`, `logit_softcap(config)`, `rotary_on_layer(config,
  layer)`, `qk_norms(model, layer)`, `qk_norm_over_heads`: the score details verify recomputes
  (`toolkit.families.pattern` describes them).
- `refused`: the feature that makes the family's attention impossible to recompute from the
  standard tensors; every command stops with it.
- `lora_targets`: role (wq, wk, wv, w0) -> the name, as `peft` matches it (a suffix of the
  module's path), of the `nn.Linear`/`Conv1D` that holds the role's weight in every layer; roles
  stored fused in one module map to the same name. Empty: LoRA is not supported.
- `conv1d`: the projections are GPT-2's Conv1D, whose weight is stored [in, out].
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

# role -> tensor name (without the model prefix) for one layer
NameMap = dict[str, str]
ALL_BIASES = ("bq", "bk", "bv", "b0")


@dataclass(frozen=True)
class Dimensions:
    n_layers: int
    n_heads: int
    d_model: int
    d_head: int
    n_kv_heads: int | None = None  # None: one key/value head per query head (h_kv = h)

    def __post_init__(self):
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)

    @property
    def group_size(self) -> int:
        """Query heads per key/value head: h / h_kv."""
        return self.n_heads // self.n_kv_heads

    def kv_head(self, head: int) -> int:
        """The key/value head that query head `head` reads."""
        return head // self.group_size


@dataclass(frozen=True)
class Rotary:
    """Rotary position embedding of one model: angle of pair j at position p = p * inv_freq[j].

    inv_freq: [rotary_dim / 2] float32 torch tensor (the first rotary_dim dimensions of each
    head rotate; the rest pass through when the rotary is partial).
    attention_scaling: the factor cos and sin are multiplied by (1 except for yarn/longrope).
    """

    inv_freq: object
    attention_scaling: float
    interleaved: bool = False  # GPT-J style: pairs (2j, 2j+1) turn, not (j, j + rotary_dim/2)

    @property
    def rotary_dim(self) -> int:
        return 2 * self.inv_freq.numel()


@dataclass(frozen=True)
class RelativeBias:
    """A learned relative-position bias (MPNet, after T5): every layer adds
    table[bucket(key - query), head] to its scores.

    table: the checkpoint name (without the model prefix) of the [buckets, n_heads] table.
    num_buckets: half for keys before the query, half for keys after it; in each half the first
    half of the buckets are exact offsets and the rest log-spaced up to max_distance, beyond
    which offsets share the last bucket.
    """

    table: str
    num_buckets: int = 32
    max_distance: int = 128


@dataclass(frozen=True)
class Family:
    """One model family's adapter (the contract is in the module docstring)."""

    name: str
    model_types: tuple[str, ...]
    dimensions: Callable[[dict], Dimensions]
    layer_names: Callable[[int, dict], NameMap]
    convert: Callable[[dict[str, np.ndarray], Dimensions], dict[str, np.ndarray]]
    score_scale: Callable[[dict, int, Dimensions], float]
    causal: bool
    hook_modules: Callable[[object, int], tuple[object, object]]
    bias_roles: Callable[[dict], tuple[str, ...]] = lambda config: ALL_BIASES
    sliding_window: Callable[[dict, int], int | None] = lambda config, layer: None
    rotary: Callable[[dict], Rotary | None] = lambda config: None
    positions: Callable[[dict], dict] = lambda config: {"scheme": "learned absolute"}
    lora_targets: Mapping[str, str] = field(default_factory=dict)
    conv1d: bool = False
    # the defaults above describe BERT and GPT-2: every bias, full attention, learned positions
    pattern: str = ""  # the attention pattern this family follows (`toolkit.families.pattern`)
    alibi: bool = False  # a per-head linear bias on key positions (BLOOM, MPT) is added
    relative_bias: RelativeBias | None = None  # a learned bias by relative position (MPNet)
    logit_softcap: Callable[[dict], float | None] = lambda config: None
    rotary_on_layer: Callable[[dict, int], bool] = lambda config, layer: True
    # (q norm, k norm) modules of a layer on the model AutoModel builds, or None
    qk_norms: Callable[[object, int], tuple[object, object]] | None = None
    qk_norm_over_heads: bool = False  # one norm over all heads' values (OLMo 2), not per head
    qk_norm_heads_first: bool = False  # the norm module takes [batch, heads, tokens, d_head]
    refused: str | None = None  # a feature the recomputation cannot express: the family refuses
    by_convention: bool = False  # an unregistered model_type read by the common names

    def __repr__(self) -> str:  # the functions' addresses say nothing to a reader
        return f"Family({self.name!r}, model_types={self.model_types}, causal={self.causal})"


def split_heads_in(weight_in_out: np.ndarray, n_heads: int) -> np.ndarray:
    """[d_model, n_heads*d_head] (x @ W layout) -> [n_heads, d_model, d_head], as a view."""
    d_model, width = weight_in_out.shape
    return weight_in_out.reshape(d_model, n_heads, width // n_heads).transpose(1, 0, 2)


def split_heads_out(weight_in_out: np.ndarray, n_heads: int) -> np.ndarray:
    """[n_heads*d_head, d_model] (z @ W layout) -> [n_heads, d_head, d_model], as a view."""
    width, d_model = weight_in_out.shape
    return weight_in_out.reshape(n_heads, width // n_heads, d_model)


def split_bias(bias: np.ndarray, n_heads: int) -> np.ndarray:
    """[n_heads*d_head] -> [n_heads, d_head]."""
    return bias.reshape(n_heads, -1)
