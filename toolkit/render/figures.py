"""PNG figures of the lessons (matplotlib, Agg backend). Each takes a result and a file path.

Titles and labels are in plain notation that needs no CJK font; the report's caption carries
the language.
"""

from __future__ import annotations

from pathlib import Path

from toolkit.attention import WEIGHT_ROLES
from toolkit.lessons.lora import LoraLesson
from toolkit.lessons.pretrained import PretrainedLesson
from toolkit.lessons.qkv import QKV, QkvLesson
from toolkit.lessons.softmax import SoftmaxLesson
from toolkit.lessons.w0 import W0Lesson


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def softmax_bars(lesson: SoftmaxLesson, path: Path) -> None:
    """The probabilities of one query over its keys, the model's own as dots on top."""
    plt = _pyplot()
    labels = [f"{k}:{lesson.tokens[k]}" for k in lesson.keys]
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(labels)), 3.5))
    ax.bar(range(len(labels)), lesson.probs, color="tab:blue", label="exp(s - max) / sum")
    ax.plot(range(len(labels)), lesson.model_probs, "o", color="tab:orange", label="model")
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("probability")
    ax.set_ylim(0, 1.3 * max(max(lesson.probs), max(lesson.model_probs)))  # room for the legend
    ax.set_title(f"layer {lesson.layer}, head {lesson.head}, query {lesson.query}")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)


def w0_blocks(lesson: W0Lesson, path: Path) -> None:
    """Mean |W0| of each head's row block over the output dimensions, and each block's norm."""
    plt = _pyplot()
    fig, (heat, bars) = plt.subplots(1, 2, figsize=(10, 3.5), width_ratios=(4, 1))
    image = heat.imshow(
        lesson.head_block_abs_mean, aspect="auto", cmap="viridis", interpolation="nearest"
    )
    heat.set_xlabel("output dimension (d_model)")
    heat.set_ylabel(f"head i (rows i*{lesson.d_head}..)")
    heat.set_title(f"layer {lesson.layer}: mean |W0| per head block {lesson.w0_shape}")
    fig.colorbar(image, ax=heat)
    bars.barh(range(lesson.n_heads), lesson.head_block_norms, color="tab:green")
    bars.invert_yaxis()
    bars.set_title("||w0[i]||_F")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)


def qkv_spectra(lesson: QkvLesson, path: Path) -> None:
    """Singular values per layer for Wq, Wk, Wv: fresh initialisation dashed, trained solid."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(QKV), figsize=(12, 3.5), sharey=True)
    colors = plt.cm.viridis([i / max(1, len(lesson.layers) - 1) for i in range(len(lesson.layers))])
    for ax, role in zip(axes, QKV, strict=True):
        for layer, color in zip(lesson.layers, colors, strict=True):
            ax.plot(layer.init[role].singular_values, "--", color=color, linewidth=1)
            ax.plot(
                layer.trained[role].singular_values,
                "-",
                color=color,
                linewidth=1.2,
                label=f"layer {layer.layer}",
            )
        ax.set_yscale("log")
        ax.set_title(role)
        ax.set_xlabel("index")
    axes[0].set_ylabel("singular value")
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)


def pretrained_runs(lesson: PretrainedLesson, path: Path) -> None:
    """Left: each run's training loss per step (thin) and its moving average over 10 steps.
    Right: relative change of each role by layer, solid for the pretrained start, dashed random."""
    import numpy as np

    plt = _pyplot()
    fig, (losses, change) = plt.subplots(1, 2, figsize=(12, 4))
    styles = {"pretrained": ("tab:blue", "-"), "random": ("tab:red", "--")}
    for init, run in lesson.runs.items():
        color, line = styles[init]
        steps = np.arange(1, len(run.train_loss) + 1)
        losses.plot(steps, run.train_loss, color=color, alpha=0.3, linewidth=0.8)
        window = min(10, len(run.train_loss))
        smooth = np.convolve(run.train_loss, np.ones(window) / window, mode="valid")
        losses.plot(steps[window - 1 :], smooth, color=color, label=f"{init} start")
    losses.set_xlabel("step")
    losses.set_ylabel("training loss")
    losses.set_title(f"{lesson.task} on {lesson.dataset}")
    losses.legend()
    colors = dict(zip(WEIGHT_ROLES, plt.cm.tab10.colors, strict=False))
    layers = range(lesson.n_layers)
    for init, run in lesson.runs.items():
        for role in WEIGHT_ROLES:
            change.plot(
                layers,
                run.layer_change[role],
                styles[init][1],
                marker="o",
                color=colors[role],
                label=f"{role} ({init})",
            )
    change.set_xticks(list(layers))
    change.set_xlabel("layer")
    change.set_ylabel("||W_end - W_start|| / ||W_start||")
    change.set_yscale("log")
    change.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)


def lora_runs(lesson: LoraLesson, path: Path) -> None:
    """Left: training loss of both runs. Middle: ΔW's numerical rank by layer, per matrix, with r
    dashed. Right: intruder dimensions by layer, per matrix (solid LoRA, dotted full)."""
    import numpy as np

    plt = _pyplot()
    fig, (losses, ranks, intruders) = plt.subplots(1, 3, figsize=(15, 4))
    styles = {"full": ("tab:red", ":"), "lora": ("tab:blue", "-")}
    for method, run in lesson.runs.items():
        steps = np.arange(1, len(run.train_loss) + 1)
        losses.plot(steps, run.train_loss, color=styles[method][0], label=method, linewidth=0.9)
    losses.set_xlabel("step")
    losses.set_ylabel("training loss")
    losses.legend()
    colors = dict(zip(WEIGHT_ROLES, plt.cm.tab10.colors, strict=False))
    layers = range(lesson.n_layers)
    for method, run in lesson.runs.items():
        for role in WEIGHT_ROLES:
            style = dict(color=colors[role], linestyle=styles[method][1], marker="o")
            ranks.plot(layers, run.delta_rank[role], label=f"{role} ({method})", **style)
            intruders.plot(layers, run.intruders[role], label=f"{role} ({method})", **style)
    ranks.axhline(lesson.rank, color="gray", linestyle="--", linewidth=0.8)
    ranks.set_yscale("symlog")
    ranks.set_ylabel("numerical rank of ΔW")
    intruders.set_ylabel(
        f"intruders (top {lesson.intruder_k}, |cos| < {lesson.intruder_epsilon:g})"
    )
    for axis in (ranks, intruders):
        axis.set_xticks(list(layers))
        axis.set_xlabel("layer")
        axis.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)
