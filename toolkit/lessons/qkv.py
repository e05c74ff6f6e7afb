"""Lesson `qkv`: where Wq/Wk/Wv come from (the initializer) and how training adjusts them.

Part 1 sets the trained weights beside a freshly initialised model of the same config (seeded):
standard deviation and singular-value spectrum per layer. Part 2 runs one real backpropagation
step on a sentence with a self-supervised loss that needs no task head, reports the gradient norm
of each head's Wq/Wk/Wv, and checks that an SGD step moves every weight by exactly -lr * grad.

The loss: the final hidden states are turned into token scores with the model's own input
embedding matrix (tied weights, as BERT's and GPT-2's pretraining heads do) and
  - causal models (GPT-2) predict every next token,
  - bidirectional models (BERT) predict one masked token: the middle token of the text, replaced
    by the tokenizer's mask token (token id 0 when there is none).
The model runs in eval mode (no dropout) so that the step is reproducible.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field

import numpy as np

from toolkit.attention import (
    AttentionModel,
    attention_from_state_dict,
    frobenius,
    head_frobenius,
    load_attention,
)
from toolkit.errors import LessonDoesNotApply
from toolkit.runtime import load_model, load_tokenizer, make_inputs, token_strings

QKV = ("wq", "wk", "wv")


@dataclass
class WeightStats:
    """One layer's x @ W matrix [d_model, h*d_head] for one role."""

    std: float
    mean: float
    singular_values: list[float]  # descending
    singular_median: float
    spread: float  # largest singular value / median: how much the top directions dominate


@dataclass
class LayerQkv:
    layer: int
    init: dict[str, WeightStats]  # role -> stats of the freshly initialised model
    trained: dict[str, WeightStats]  # role -> stats of the model at hand
    grad_norm: dict[str, float]  # role -> ||dL/dW||_F of the whole layer matrix
    # role -> ||dL/dW[i]||_F per head of the standard layout: [h] for wq, [h_kv] for wk and wv
    grad_norm_per_head: dict[str, list[float]]
    update_vs_minus_lr_grad_max_abs_diff: dict[str, float]  # role -> max |ΔW - (-lr * grad)|
    update_relative: dict[str, float]  # role -> ||ΔW||_F / ||W||_F


@dataclass
class QkvLesson:
    model: str
    family: str
    n_heads: int
    d_model: int
    d_head: int
    initializer_range: float | None  # config's std of the normal initializer
    seed: int  # seed of the fresh initialisation
    loss_kind: str  # "masked" (bidirectional) or "next_token" (causal)
    inputs: dict
    masked_position: int | None
    masked_token_id: int | None  # the original token the masked position must predict
    masked_token: str | None
    lr: float
    loss: float
    loss_after_step: float
    layers: list[LayerQkv] = field(default_factory=list)
    n_kv_heads: int | None = None  # fewer than n_heads: each wk/wv head serves a group of queries
    # Averages over every layer's Wq, Wk and Wv
    mean_std_init: float = 0.0
    mean_std_trained: float = 0.0
    mean_spread_init: float = 0.0
    mean_spread_trained: float = 0.0
    spectra: str = ""  # "steeper" when training raised the mean spread, else "flatter"
    update_max_abs_diff: float = 0.0  # the largest |ΔW - (-lr * grad)| of any layer and role
    update_relative_range: list[float] = field(default_factory=list)  # [min, max] ||ΔW|| / ||W||

    def to_dict(self) -> dict:
        return asdict(self)


def explain_qkv(
    model: str | None = None,
    text: str | None = None,
    *,
    lr: float = 0.01,
    seed: int = 0,
    revision: str | None = None,
    allow_pickle: bool = False,
    attention: AttentionModel | None = None,
) -> QkvLesson:
    """Init vs trained statistics of Wq/Wk/Wv, then one backprop + SGD step on `text`."""
    import torch
    from transformers import AutoModel

    attention = attention or load_attention(model, revision=revision, allow_pickle=allow_pickle)
    net = load_model(attention, allow_pickle)
    _check_tied_scores_apply(attention, net)
    config = net.config.to_dict()
    torch.manual_seed(seed)
    fresh = AutoModel.from_config(net.config)
    initial = attention_from_state_dict(fresh.state_dict(), config, "fresh initialisation")

    input_ids, padding, inputs_info = make_inputs(attention, None if text is None else [text], seed)
    n_tokens = int(padding[0].sum())
    input_ids = input_ids[:1, :n_tokens]  # the first text only, without padding
    batch = self_supervised_batch(attention, input_ids)
    loss = self_supervised_loss(net, **batch)
    loss.backward()
    gradients = {
        name: p.grad if p.grad is not None else torch.zeros_like(p)
        for name, p in net.named_parameters()
    }  # unused parameters (pooler) get none
    grads = attention_from_state_dict(gradients, config, "gradients")
    before = attention_from_state_dict(_snapshot(net), config, "before the step")
    torch.optim.SGD(net.parameters(), lr=lr).step()
    after = attention_from_state_dict(_snapshot(net), config, "after the step")
    with torch.no_grad():
        loss_after = self_supervised_loss(net, **batch)

    d = attention.dims
    masked_id = None if batch["masked_position"] is None else int(batch["targets"][0])
    lesson = QkvLesson(
        model=str(attention.name),
        family=attention.family.name,
        n_heads=d.n_heads,
        d_model=d.d_model,
        d_head=d.d_head,
        initializer_range=config.get("initializer_range"),
        seed=seed,
        loss_kind="next_token" if attention.family.causal else "masked",
        inputs=inputs_info,
        masked_position=batch["masked_position"],
        masked_token_id=masked_id,
        masked_token=None if masked_id is None else token_strings(attention, [masked_id])[0],
        lr=lr,
        loss=loss.item(),
        loss_after_step=loss_after.item(),
        n_kv_heads=d.n_kv_heads,
    )
    for index in attention.layer_indices:
        trained, init, grad = attention.layer(index), initial.layer(index), grads.layer(index)
        old, new = before.layer(index), after.layer(index)
        lesson.layers.append(
            LayerQkv(
                layer=index,
                init={role: _stats(init.full(role)) for role in QKV},
                trained={role: _stats(trained.full(role)) for role in QKV},
                grad_norm={role: frobenius(grad.full(role)) for role in QKV},
                grad_norm_per_head={
                    role: head_frobenius(getattr(grad, role)).tolist() for role in QKV
                },
                update_vs_minus_lr_grad_max_abs_diff={
                    role: float(
                        np.abs((new.full(role) - old.full(role)) + lr * grad.full(role)).max()
                    )
                    for role in QKV
                },
                update_relative={
                    role: float(
                        np.linalg.norm(new.full(role) - old.full(role))
                        / np.linalg.norm(old.full(role))
                    )
                    for role in QKV
                },
            )
        )
    _summarise(lesson)
    return lesson


def _summarise(lesson: QkvLesson) -> None:
    """The averages and extremes the lesson states, over every layer and role."""
    every = [(layer, role) for layer in lesson.layers for role in QKV]
    lesson.mean_std_init = statistics.fmean(layer.init[role].std for layer, role in every)
    lesson.mean_std_trained = statistics.fmean(layer.trained[role].std for layer, role in every)
    lesson.mean_spread_init = statistics.fmean(layer.init[role].spread for layer, role in every)
    lesson.mean_spread_trained = statistics.fmean(
        layer.trained[role].spread for layer, role in every
    )
    lesson.spectra = (
        "steeper" if lesson.mean_spread_trained > lesson.mean_spread_init else "flatter"
    )
    lesson.update_max_abs_diff = max(
        layer.update_vs_minus_lr_grad_max_abs_diff[role] for layer, role in every
    )
    relative = [layer.update_relative[role] for layer, role in every]
    lesson.update_relative_range = [min(relative), max(relative)]


def self_supervised_batch(attention: AttentionModel, input_ids) -> dict:
    """Inputs and targets of the loss in the module docstring; input_ids [1, tokens]."""
    if attention.family.causal:
        return {"input_ids": input_ids, "targets": input_ids[:, 1:], "masked_position": None}
    tokenizer = load_tokenizer(attention.source.path)
    mask_id = getattr(tokenizer, "mask_token_id", None) or 0
    position = input_ids.shape[1] // 2
    masked = input_ids.clone()
    masked[0, position] = mask_id
    return {"input_ids": masked, "targets": input_ids[:, position], "masked_position": position}


def self_supervised_loss(net, input_ids, targets, masked_position: int | None):
    """Cross-entropy of the tied-embedding token scores: next tokens, or the one masked token."""
    import torch.nn.functional as F

    hidden = net(input_ids=input_ids).last_hidden_state  # [1, tokens, d_model]
    embeddings = net.get_input_embeddings().weight  # [vocab, d_model]
    if masked_position is None:
        logits = hidden[:, :-1] @ embeddings.T  # [1, tokens-1, vocab]: position t predicts t+1
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    logits = hidden[:, masked_position] @ embeddings.T  # [1, vocab]
    return F.cross_entropy(logits, targets)


def _check_tied_scores_apply(attention: AttentionModel, net) -> None:
    """The loss scores hidden states [d_model] against the input embeddings: refused in one line
    where those are narrower (ALBERT's factorised embeddings, OPT's projected ones)."""
    width = net.get_input_embeddings().weight.shape[1]
    if width != attention.dims.d_model:
        raise LessonDoesNotApply(
            f"the qkv lesson does not apply to this {attention.family.name} model: its loss "
            f"scores the {attention.dims.d_model}-wide hidden states against the token "
            f"embeddings (tied weights), which are {width} wide here",
            "skip.qkv_narrow",
            family=attention.family.name,
            d_model=attention.dims.d_model,
            width=width,
        )


def _snapshot(net) -> dict:
    return {name: p.detach().clone() for name, p in net.named_parameters()}


def _stats(matrix: np.ndarray) -> WeightStats:
    import torch

    singular = torch.linalg.svdvals(torch.from_numpy(matrix).double())  # descending
    median = statistics.median(singular.tolist())
    return WeightStats(
        std=float(matrix.std()),
        mean=float(matrix.mean()),
        singular_values=singular.tolist(),
        singular_median=median,
        spread=singular[0].item() / median,
    )
