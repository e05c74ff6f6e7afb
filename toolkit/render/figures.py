"""PNG figures of the lessons (matplotlib, Agg backend). Each takes a result and a file path.

Titles and labels are in plain notation that needs no CJK font; the report's caption carries
the language.
"""

from __future__ import annotations

from pathlib import Path

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
