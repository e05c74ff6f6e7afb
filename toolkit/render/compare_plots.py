"""PNG figures of a `compare` result, and the Markdown section that embeds them in a report."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from toolkit.analysis.compare import CIRCUITS, ELEMENTWISE, Comparison, mean_defined
from toolkit.attention import WEIGHT_ROLES
from toolkit.errors import ToolkitError
from toolkit.fileio import write_atomic
from toolkit.render.compare_view import number
from toolkit.render.scales import within_noise


def write_compare_plots(comparison: Comparison, out_dir: str | Path) -> list[Path]:
    """Write the figures for `comparison` into `out_dir` (created if its parent exists)."""
    out_dir = plot_folder(out_dir)
    import matplotlib

    matplotlib.use("Agg")
    if comparison.mode == ELEMENTWISE:
        figures = {
            "relative_change_heatmaps.png": _change_heatmaps(comparison, WEIGHT_ROLES),
            "circuit_change_heatmaps.png": _change_heatmaps(comparison, CIRCUITS),
            "depth_profile.png": _depth_profile(comparison),
            "delta_spectra.png": _delta_spectra(comparison),
        }
        if comparison.layers and comparison.layers[0].matrices["wq"].intruders is not None:
            figures["intruder_dimensions.png"] = _intruder_grid(comparison)
    else:
        figures = {
            "spectra_overlay.png": _spectra_overlay(comparison),
            "circuit_spectra_overlay.png": _circuit_spectra_overlay(comparison),
            "rank_profile.png": _rank_profile(comparison),
        }
    return [_save(figure, out_dir / name) for name, figure in figures.items()]


def plot_folder(out_dir: str | Path) -> Path:
    """The folder for the figures, created now with its parents (like `mkdir -p`); a clear error
    before any work if it cannot be."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ToolkitError(f"plot folder {out_dir} is a file: give a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ToolkitError(f"cannot create plot folder {out_dir} ({err.strerror})") from None
    return out_dir


def _save(figure, path: Path) -> Path:
    import matplotlib.pyplot as plt

    write_atomic(path, lambda tmp: figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    plt.close(figure)
    return path


def _title(comparison: Comparison) -> str:
    return f"A = {comparison.a.name}  vs  B = {comparison.b.name}"


def _change_heatmaps(comparison: Comparison, names: tuple[str, ...]):
    """Layer x head heatmaps of the relative change, one panel per matrix or circuit."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    grids = {}
    for name in names:
        rows = [
            layer.matrices[name].heads if name in WEIGHT_ROLES else layer.circuits[name]
            for layer in comparison.layers
        ]
        grids[name] = np.array(
            [
                [np.nan if h.relative_change is None else h.relative_change for h in heads]
                for heads in rows
            ]
        )  # [layers, heads]
    top = max(float(np.nanmax(g)) if np.isfinite(g).any() else 0.0 for g in grids.values())
    unchanged = within_noise(0.0, top)
    n_layers = len(comparison.layers)
    # a deep model's panels side by side, a shallow one's two by two; one colour scale for all
    columns = len(names) if n_layers > 8 else 2
    rows = -(-len(names) // columns)
    figure, axes = plt.subplots(
        rows,
        columns,
        squeeze=False,
        figsize=(4.2 * columns + 1, rows * (0.3 * n_layers + 1.6) + 0.6),
        layout="constrained",
    )
    labels = [str(layer.layer) for layer in comparison.layers]
    for axis, name in zip(axes.flat, names, strict=False):
        # a range within float noise is drawn flat at the "no change" end, not stretched
        image = axis.imshow(
            grids[name], aspect="auto", cmap="viridis", vmin=0, vmax=1.0 if unchanged else top
        )
        axis.set_title(
            (
                f"{name}: ||ΔW||_F / ||W_a||_F per head"
                if name in WEIGHT_ROLES
                else f"{name.upper()} circuit: relative change per head"
            )
            + (" (no change)" if unchanged else "")
        )
        axis.set_xlabel("head")
        axis.set_ylabel("layer")
        axis.set_yticks(range(len(labels)), labels)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))  # heads are whole numbers
    figure.colorbar(image, ax=axes, shrink=0.6 if rows == 1 else 0.8, label="relative change")
    figure.suptitle(_title(comparison))
    return figure


def _intruder_grid(comparison: Comparison):
    """Layer x matrix counts of intruder dimensions, each cell labelled with its count."""
    import matplotlib.pyplot as plt

    counts = np.array(
        [
            [layer.matrices[role].intruders.count for role in WEIGHT_ROLES]
            for layer in comparison.layers
        ]
    )  # [layers, 4]
    settings = comparison.layers[0].matrices["wq"].intruders
    figure, axis = plt.subplots(figsize=(5, 0.45 * len(counts) + 2), layout="constrained")
    image = axis.imshow(counts, aspect="auto", cmap="magma_r", vmin=0, vmax=max(settings.k, 1))
    for (row, column), value in np.ndenumerate(counts):
        axis.text(column, row, str(value), ha="center", va="center", color="tab:blue")
    axis.set_xticks(range(len(WEIGHT_ROLES)), WEIGHT_ROLES)
    axis.set_yticks(range(len(counts)), [str(layer.layer) for layer in comparison.layers])
    axis.set_xlabel("matrix")
    axis.set_ylabel("layer")
    axis.set_title(
        f"Intruder dimensions (top {settings.k}, max |cos| < {settings.epsilon:g})\n"
        f"{_title(comparison)}",
        fontsize="small",
    )
    figure.colorbar(image, ax=axis)
    return figure


def _depth_profile(comparison: Comparison):
    import matplotlib.pyplot as plt

    profile = comparison.depth_profile()
    layers = [point["layer"] for point in profile]
    figure, axis = plt.subplots(figsize=(7, 4), layout="constrained")
    for key in (*WEIGHT_ROLES, "all"):
        values = [np.nan if point[key] is None else point[key] for point in profile]
        axis.plot(
            layers,
            values,
            marker="o",
            label="all four" if key == "all" else key,
            linewidth=2.5 if key == "all" else 1.2,
        )
    axis.set_xlabel("layer")
    axis.set_ylabel("mean relative change of the heads")
    axis.set_title(f"Depth profile\n{_title(comparison)}")
    axis.legend()
    return figure


def _panels(grid: tuple[int, int], size: tuple[float, float], lines: int):
    """A figure of panels sharing the y axis, and one colour per layer (shallow to deep)."""
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(*grid, figsize=size, sharey=True, layout="constrained")
    return figure, axes, plt.cm.viridis(np.linspace(0, 1, max(lines, 2)))


def _delta_spectra(comparison: Comparison):
    """Cumulative share of ||ΔW||_F^2 against the number of singular values, per layer."""

    figure, axes, colors = _panels((2, 2), (10, 7), len(comparison.layers))
    for axis, role in zip(axes.flat, WEIGHT_ROLES, strict=True):
        for color, layer in zip(colors, comparison.layers, strict=False):
            energy = np.square(layer.matrices[role].delta_singular_values)
            if energy.sum() > 0:
                axis.plot(
                    np.arange(1, energy.size + 1),
                    np.cumsum(energy) / energy.sum(),
                    color=color,
                    label=f"layer {layer.layer}",
                )
        axis.set_xscale("log")
        axis.set_title(f"{role}: ΔW")
        axis.set_xlabel("singular values kept")
        axis.set_ylabel("share of ||ΔW||²")
    if axes.flat[0].lines:
        axes.flat[0].legend(fontsize="small")
    figure.suptitle(f"How low-rank is the change?\n{_title(comparison)}")
    return figure


def _spectra_overlay(comparison: Comparison):
    """Normalised singular-value spectra of A (solid) and B (dashed) at matched depth."""

    figure, axes, colors = _panels((2, 2), (10, 7), len(comparison.pairs))
    for axis, role in zip(axes.flat, WEIGHT_ROLES, strict=True):
        for color, pair in zip(colors, comparison.pairs, strict=False):
            for side, style in (("a", "-"), ("b", "--")):
                spectrum = np.asarray(getattr(pair, side).matrices[role].spectrum)
                axis.plot(
                    np.arange(spectrum.size) / spectrum.size,
                    spectrum,
                    style,
                    color=color,
                    label=_pair_label(pair) if side == "a" else None,
                )
        axis.set_yscale("log")
        axis.set_title(f"{role}: σ_i / rms(σ)")
        axis.set_xlabel("i / number of singular values")
    axes.flat[0].legend(fontsize="x-small", ncol=2)
    figure.suptitle(f"Normalised spectra, A solid, B dashed\n{_title(comparison)}")
    return figure


def _pair_label(pair) -> str:
    return f"A layer {pair.a.layer} / B layer {pair.b.layer}"


def _circuit_spectra_overlay(comparison: Comparison):
    """Per circuit: the mean over heads of the normalised head spectra, A solid, B dashed."""

    figure, axes, colors = _panels((1, 2), (10, 4), len(comparison.pairs))
    for axis, name in zip(axes, CIRCUITS, strict=True):
        for color, pair in zip(colors, comparison.pairs, strict=False):
            for side, style in (("a", "-"), ("b", "--")):
                spectrum = np.mean(getattr(pair, side).circuits[name].head_spectra, axis=0)
                axis.plot(
                    np.arange(spectrum.size) / spectrum.size,
                    spectrum,
                    style,
                    color=color,
                    label=_pair_label(pair) if side == "a" else None,
                )
        axis.set_title(f"{name.upper()} circuits: σ_i / rms(σ), mean over heads")
        axis.set_xlabel("i / d_head")
    axes[0].legend(fontsize="x-small", ncol=2)
    figure.suptitle(f"Circuit spectra, A solid, B dashed\n{_title(comparison)}")
    return figure


def _rank_profile(comparison: Comparison):
    """Stable and effective rank, as shares of the matrix's dimension, against relative depth."""
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    for side, style in (("a", "-"), ("b", "--")):
        profiles = [getattr(pair, side) for pair in comparison.pairs]
        depths = [p.relative_depth for p in profiles]
        for color, role in enumerate(WEIGHT_ROLES):
            matrices = [p.matrices[role] for p in profiles]
            for axis, share in zip(
                axes, ("stable_rank_share", "effective_rank_share"), strict=True
            ):
                axis.plot(
                    depths,
                    [getattr(m, share) for m in matrices],
                    style,
                    marker="o",
                    color=f"C{color}",
                    label=f"{role} {side.upper()}",
                )
    axes[0].set_ylabel("stable rank / dimension")
    axes[1].set_ylabel("effective rank / dimension")
    for axis in axes:
        axis.set_xlabel("relative depth")
        axis.legend(fontsize="x-small", ncol=2)
    figure.suptitle(f"Ranks by relative depth, A solid, B dashed\n{_title(comparison)}")
    return figure


def comparison_markdown(
    comparison: Comparison, plot_dir: str | Path, *, link_base: str | Path | None = None
) -> str:
    """Write the figures into `plot_dir` and return a Markdown section that embeds them with the
    key numbers. Image links are relative to `link_base` (the report's folder) when given."""
    paths = write_compare_plots(comparison, plot_dir)
    c = comparison
    lines = [
        f"## How the attention weights differ: {c.a.name} → {c.b.name}",
        "",
        f"Mode: **{c.mode}**.",
    ]
    if c.note:
        lines += ["", f"> {c.note}"]
    lines.append("")
    if c.mode == ELEMENTWISE:
        lines += _elementwise_markdown(c)
    else:
        lines += _structural_markdown(c)
    for path in paths:
        link = os.path.relpath(path, link_base) if link_base is not None else str(path)
        lines += ["", f"![{path.stem.replace('_', ' ')}]({Path(link).as_posix()})"]
    return "\n".join(lines) + "\n"


def _elementwise_markdown(c: Comparison) -> list[str]:
    lines = ["| layer | wq | wk | wv | w0 | all four |", "|---:|---:|---:|---:|---:|---:|"]
    for layer in c.layers:
        cells = [number(layer.matrices[role].relative_change) for role in WEIGHT_ROLES]
        lines.append(f"| {layer.layer} | {' | '.join(cells)} | {number(layer.relative_change())} |")
    lines += [
        "",
        "Relative change ||W_b - W_a||_F / ||W_a||_F of each full matrix.",
        "",
        "Heads that moved most (all four matrices together): "
        + ", ".join(
            f"layer {h['layer']} head {h['head']} ({number(h['relative_change'], 3)})"
            for h in c.top_heads()
        )
        + ".",
    ]
    settings = c.layers[0].matrices["wq"].intruders if c.layers else None
    if settings is not None:
        totals = {
            role: sum(layer.matrices[role].intruders.count for layer in c.layers)
            for role in WEIGHT_ROLES
        }
        lines += [
            "",
            f"Intruder dimensions (of each matrix's top {settings.k} singular vectors, those with "
            f"max |cos| < {settings.epsilon:g} to every singular vector of A; Shuttleworth et al. "
            "2024), summed over layers: "
            + ", ".join(f"{role} {count}" for role, count in totals.items())
            + ".",
        ]
    return lines


def _structural_markdown(c: Comparison) -> list[str]:
    lines = [
        "| layer A | layer B | matrix | stable rank A | stable rank B | head-norm spread A "
        "| head-norm spread B |",
        "|---:|---:|---|---:|---:|---:|---:|",
    ]
    for pair in c.pairs:
        for role in WEIGHT_ROLES:
            a, b = pair.a.matrices[role], pair.b.matrices[role]
            lines.append(
                f"| {pair.a.layer} | {pair.b.layer} | {role} | {number(a.stable_rank)} | "
                f"{number(b.stable_rank)} | {number(a.head_fro_spread)} | "
                f"{number(b.head_fro_spread)} |"
            )
    qk = {
        side: mean_defined(
            [mean_defined(getattr(p, side).circuits["qk"].head_stable_rank) for p in c.pairs]
        )
        for side in ("a", "b")
    }
    lines += ["", f"Mean stable rank of the QK circuits: A {number(qk['a'])}, B {number(qk['b'])}."]
    return lines
