"""Lesson `softmax`: one query token's attention row, step by step, equal to the model's own.

scores = k_j . q / sqrt(d_head) (the family's scale), minus the largest, exp, divided by the sum.
The lesson also shows live why the largest score is subtracted: the same scores plus a constant
(which leaves softmax unchanged) make the naive exp overflow in float16 and float32.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from toolkit.analysis.verify import (
    layer_mask,
    positional_rotation,
    query_key_value,
    score_details,
)
from toolkit.attention import AttentionModel, load_attention
from toolkit.errors import LessonDoesNotApply, ToolkitError
from toolkit.runtime import captured_blocks, load_model, make_inputs, token_strings

OVERFLOW_DTYPES = ("float16", "float32")


@dataclass
class OverflowCase:
    """The scores shifted so that the largest is `largest`, softmaxed naively and stably."""

    largest: float
    dtype: str
    naive_nonfinite: int  # probabilities that came out inf or NaN from exp(s) / sum(exp(s))
    naive_max_abs_diff: float | None  # vs the exact probabilities (None when some are not finite)
    stable_max_abs_diff: float  # exp(s - max) / sum(exp(s - max)) vs the exact probabilities


@dataclass
class SoftmaxLesson:
    model: str
    family: str
    layer: int
    head: int
    inputs: dict
    tokens: list[str]  # every token of the text
    query: int  # the query token's position
    keys: list[int]  # the positions this query may attend to (all, or up to itself if causal)
    d_head: int
    scale: float  # the factor the model multiplies q.k by (1/sqrt(d_head) unless configured)
    raw_scores: list[float]  # q . k_j, one per key
    scores: list[float]  # raw * scale
    largest: float
    shifted: list[float]  # scores - largest (all <= 0)
    exps: list[float]  # exp(shifted), in (0, 1]
    exp_sum: float
    probs: list[float]  # exps / exp_sum
    model_probs: list[float]  # the model's own attention row at these keys (output_attentions)
    max_abs_diff_vs_model: float  # over the whole row (masked keys included, where both are 0)
    ranking: list[int]  # indices into `keys`, most attended first
    exp_overflow_threshold: dict[str, float]  # dtype -> ln(largest finite value): exp(above) = inf
    overflow: list[OverflowCase] = field(default_factory=list)
    # The race for attention, by index into `keys`: the most attended key, the runner-up, the least
    leader: int = 0
    runner_up: int = 0
    least: int = 0
    score_gap: float = 0.0  # scores[leader] - scores[runner_up]
    runner_up_share: float = 1.0  # probs[runner_up] / probs[leader] = exp(-score_gap)
    least_gap: float = 0.0  # scores[leader] - scores[least]
    naive_broken: int = 0  # overflow cases whose naive probabilities are not all finite
    stable_finite: int = 0  # overflow cases whose stable probabilities are finite

    @property
    def textbook_scale(self) -> float:
        """1 / sqrt(d_head), the scale of the original Transformer."""
        return 1 / math.sqrt(self.d_head)

    def to_dict(self) -> dict:
        return asdict(self)


def explain_softmax(
    model: str | None = None,
    text: str | None = None,
    *,
    layer: int = 0,
    head: int = 0,
    token: int | None = None,
    revision: str | None = None,
    allow_pickle: bool = False,
    attention: AttentionModel | None = None,
) -> SoftmaxLesson:
    """The attention row of query `token` (default: the middle token) in `layer`, `head`."""
    import torch

    attention = attention or load_attention(model, revision=revision, allow_pickle=allow_pickle)
    d = attention.dims
    standard = attention.layer(layer)  # validates the layer index
    if not 0 <= head < d.n_heads:
        raise ToolkitError(
            f"head {head} is out of range: {attention.name} has heads 0-{d.n_heads - 1}"
        )
    name = attention.family.name
    for present, why, key in (
        (attention.family.alibi, "add ALiBi position biases to", "skip.softmax_alibi"),
        (
            attention.family.relative_bias is not None,
            "add a learned relative-position bias to",
            "skip.softmax_relative_bias",
        ),
        (attention.family.logit_softcap(attention.config), "soft-cap", "skip.softmax_cap"),
    ):
        if present:  # the lesson's row is softmax(q . k * scale) alone
            raise LessonDoesNotApply(
                f"the softmax lesson does not apply to {name} models: their scores {why} "
                "q . k * scale (verify checks them)",
                key,
                family=name,
            )
    net = load_model(attention, allow_pickle)
    texts = None if text is None else [text]
    input_ids, padding, inputs_info = make_inputs(attention, texts, seed=0)
    n_tokens = int(padding[0].sum())
    query = n_tokens // 2 if token is None else token
    if not 0 <= query < n_tokens:
        raise ToolkitError(
            f"token {query} is out of range: the text has {n_tokens} tokens "
            f"(0-{n_tokens - 1}); run without --token to see them"
        )
    input_ids, padding = input_ids[:1, :n_tokens], padding[:1, :n_tokens]  # the first text only

    with captured_blocks(net, attention) as captured, torch.no_grad():
        outputs = net(input_ids=input_ids, attention_mask=padding, output_attentions=True)
    x = captured.inputs[layer][0]  # [tokens, d_model], the attention block's input
    keys = layer_mask(attention, layer, padding)[0, 0].expand(n_tokens, n_tokens)[query]
    keys = keys.nonzero().flatten()  # [keys]

    # every head's q and k [1, heads, tokens, d_head]: rotated by position in rotary models, and
    # k the key head this query head shares with its group in grouped-query models
    rotation = positional_rotation(attention, n_tokens, layer)
    details = score_details(attention, net, layer, padding)  # q/k norms where the model has them
    with torch.no_grad():
        q, k, _ = query_key_value(standard, x[None], rotation, details)
    q, k = q[0, head, query], k[0, head, keys]  # [d_head], [keys, d_head]
    raw = k @ q  # [keys]
    scale = attention.family.score_scale(attention.config, layer, d)
    scores = raw * scale
    largest = scores.max()
    shifted = scores - largest
    exps = shifted.exp()
    probs = exps / exps.sum()

    model_row = outputs.attentions[layer][0, head, query].float()  # [tokens]
    ours = torch.zeros(n_tokens).index_put((keys,), probs)
    lesson = SoftmaxLesson(
        model=str(attention.name),
        family=attention.family.name,
        layer=layer,
        head=head,
        inputs=inputs_info,
        tokens=token_strings(attention, input_ids[0].tolist()),
        query=query,
        keys=keys.tolist(),
        d_head=d.d_head,
        scale=scale,
        raw_scores=raw.tolist(),
        scores=scores.tolist(),
        largest=largest.item(),
        shifted=shifted.tolist(),
        exps=exps.tolist(),
        exp_sum=exps.sum().item(),
        probs=probs.tolist(),
        model_probs=model_row[keys].tolist(),
        max_abs_diff_vs_model=(ours - model_row).abs().max().item(),
        ranking=probs.argsort(descending=True).tolist(),
        exp_overflow_threshold={
            name: math.log(torch.finfo(getattr(torch, name)).max) for name in OVERFLOW_DTYPES
        },
    )
    lesson.overflow = overflow_cases(scores.double(), lesson.exp_overflow_threshold)
    ranking = lesson.ranking
    lesson.leader, lesson.runner_up, lesson.least = (
        ranking[0],
        ranking[min(1, len(ranking) - 1)],
        ranking[-1],
    )
    lesson.score_gap = lesson.scores[lesson.leader] - lesson.scores[lesson.runner_up]
    lesson.runner_up_share = math.exp(-lesson.score_gap)
    lesson.least_gap = lesson.scores[lesson.leader] - lesson.scores[lesson.least]
    lesson.naive_broken = sum(case.naive_max_abs_diff is None for case in lesson.overflow)
    lesson.stable_finite = sum(math.isfinite(case.stable_max_abs_diff) for case in lesson.overflow)
    return lesson


def overflow_cases(scores, thresholds: dict[str, float]) -> list[OverflowCase]:
    """The scores as they are, then shifted so the largest is just past each dtype's exp limit.

    Adding a constant c to every score multiplies every exp by e^c, so the probabilities do not
    change; the naive formula still breaks once exp(largest) is past the dtype's largest value.
    """
    import torch

    exact = torch.softmax(scores, dim=-1)  # float64
    largest = scores.max().item()
    cases = []
    for target in (largest, *(math.ceil(limit) for limit in thresholds.values())):
        shifted_up = scores + (target - largest)
        for name in OVERFLOW_DTYPES:
            s = shifted_up.to(getattr(torch, name))
            naive = s.exp() / s.exp().sum()
            stable = (s - s.max()).exp() / (s - s.max()).exp().sum()
            nonfinite = int((~naive.isfinite()).sum())
            naive_diff = (naive.double() - exact).abs().max().item()
            cases.append(
                OverflowCase(
                    largest=float(target),
                    dtype=name,
                    naive_nonfinite=nonfinite,
                    naive_max_abs_diff=None if nonfinite else naive_diff,
                    stable_max_abs_diff=(stable.double() - exact).abs().max().item(),
                )
            )
    return cases
