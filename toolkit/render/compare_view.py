"""Rich terminal view of a `compare` result: what moved most, the depth profile, ΔW's structure;
or, across architectures, the two models' layers side by side."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from toolkit.analysis.compare import ELEMENTWISE, Comparison, mean_defined
from toolkit.attention import WEIGHT_ROLES

BAR_WIDTH = 30


def number(value: float | None, digits: int = 4) -> str:
    """A number for a table cell; None (undefined, e.g. change relative to a zero matrix) is n/a."""
    return "n/a" if value is None else f"{value:.{digits}g}"


def render_comparison(comparison: Comparison, console: Console) -> None:
    c = comparison
    console.print(f"[bold]A[/bold] {escape(_describe(c.a))}")
    console.print(f"[bold]B[/bold] {escape(_describe(c.b))}")
    console.print(f"mode [cyan]{c.mode}[/cyan]")
    if c.note:
        console.print(f"[yellow]note:[/yellow] {escape(c.note)}")
    if c.mode == ELEMENTWISE:
        _render_elementwise(c, console)
    else:
        _render_structural(c, console)


def _describe(info) -> str:
    return (
        f"{info.name}  family {info.family}  layers {info.n_layers}  heads {info.n_heads}"
        f"{_kv_heads(info)}  d_model {info.d_model}  d_head {info.d_head}"
    )


def _kv_heads(info) -> str:
    """' (3 key/value heads)' for grouped-query attention, '' when every head has its own."""
    shared = info.n_kv_heads is not None and info.n_kv_heads != info.n_heads
    return f" ({info.n_kv_heads} key/value heads)" if shared else ""


def _render_elementwise(c: Comparison, console: Console) -> None:
    per_layer = Table(
        title="Relative change ||W_b - W_a||_F / ||W_a||_F per layer (circuits: mean over heads)"
    )
    for column in ("layer", *WEIGHT_ROLES, "all four", "QK", "OV", "min cos"):
        per_layer.add_column(column, justify="right")
    for layer in c.layers:
        circuits = [
            mean_defined([h.relative_change for h in layer.circuits[name]]) for name in ("qk", "ov")
        ]
        per_layer.add_row(
            str(layer.layer),
            *(number(layer.matrices[role].relative_change) for role in WEIGHT_ROLES),
            number(layer.relative_change()),
            *(number(v) for v in circuits),
            number(min(m.cosine for m in layer.matrices.values()), 6),
        )
    console.print(per_layer)

    structure = Table(
        title="Structure of ΔW = W_b - W_a (full matrices)",
        caption=f"stable/effective rank of ΔW; top-{c.top_k}: share of ||ΔW||² in its top "
        f"{c.top_k} singular values; φ: LoRA subspace similarity of the top-{c.rank} "
        f"input/output directions of W_a and ΔW; amp.: ||ΔW|| / ||U^T W_a V||",
    )
    for column in (
        "layer",
        "matrix",
        "||ΔW||",
        "stable",
        "effective",
        f"top-{c.top_k}",
        "φ in",
        "φ out",
        "amp.",
    ):
        structure.add_column(column, justify="right")
    for layer in c.layers:
        for role in WEIGHT_ROLES:
            m = layer.matrices[role]
            structure.add_row(
                str(layer.layer),
                role,
                number(m.fro_delta),
                number(m.stable_rank_delta),
                number(m.effective_rank_delta),
                number(m.top_k_energy_delta),
                number(m.subspace_similarity_input),
                number(m.subspace_similarity_output),
                number(m.amplification),
            )
    console.print(structure)

    _render_intruders(c, console)

    if all(layer.relative_change() == 0.0 for layer in c.layers):
        console.print("[green]no change: the attention weights of A and B are identical[/green]")
        return
    top = Table(title=f"The {len(c.top_heads())} heads that moved most (relative change)")
    for column in ("layer", "head", "all four", *WEIGHT_ROLES, "QK", "OV"):
        top.add_column(column, justify="right")
    by_index = {layer.layer: layer for layer in c.layers}
    for entry in c.top_heads():
        layer, head = by_index[entry["layer"]], entry["head"]
        top.add_row(
            str(entry["layer"]),
            str(head),
            number(entry["relative_change"]),
            *(number(layer.head_change(role, head).relative_change) for role in WEIGHT_ROLES),
            *(number(layer.circuits[name][head].relative_change) for name in ("qk", "ov")),
        )
    console.print(top)

    profile = c.depth_profile()
    largest = max((p["all"] for p in profile if p["all"] is not None), default=0.0)
    depth = Table(title="Depth profile: mean relative change of the heads, by layer")
    depth.add_column("layer", justify="right")
    depth.add_column("mean", justify="right")
    depth.add_column("")
    for point in profile:
        share = point["all"] / largest if point["all"] and largest > 0 else 0.0
        depth.add_row(str(point["layer"]), number(point["all"]), "█" * round(share * BAR_WIDTH))
    console.print(depth)


def _render_structural(c: Comparison, console: Console) -> None:
    matrices = Table(
        title="Full matrices side by side (A | B) at matched relative depth; "
        "ranks as shares of the matrix's dimension"
    )
    for column in (
        "layer A",
        "layer B",
        "depth A",
        "matrix",
        "||W||_F",
        "stable rank / dim",
        "effective rank / dim",
        "head-norm spread",
    ):
        matrices.add_column(column, justify="right")
    for pair in c.pairs:
        for role in WEIGHT_ROLES:
            a, b = pair.a.matrices[role], pair.b.matrices[role]
            matrices.add_row(
                str(pair.a.layer),
                str(pair.b.layer),
                f"{pair.a.relative_depth:.2f}",
                role,
                _side_by_side(a.fro, b.fro),
                _side_by_side(a.stable_rank_share, b.stable_rank_share),
                _side_by_side(a.effective_rank_share, b.effective_rank_share),
                _side_by_side(a.head_fro_spread, b.head_fro_spread),
            )
    console.print(matrices)

    circuits = Table(title="QK and OV circuits side by side (A | B): means over heads")
    for column in ("layer A", "layer B", "circuit", "||circuit||_F", "stable rank"):
        circuits.add_column(column, justify="right")
    for pair in c.pairs:
        for name in ("qk", "ov"):
            a, b = pair.a.circuits[name], pair.b.circuits[name]
            circuits.add_row(
                str(pair.a.layer),
                str(pair.b.layer),
                name.upper(),
                _side_by_side(mean_defined(a.head_fro), mean_defined(b.head_fro)),
                _side_by_side(mean_defined(a.head_stable_rank), mean_defined(b.head_stable_rank)),
            )
    console.print(circuits)


def _side_by_side(a: float | None, b: float | None) -> str:
    return f"{number(a)} | {number(b)}"


def _render_intruders(c: Comparison, console: Console) -> None:
    """Layer x matrix counts of intruder dimensions (Shuttleworth et al. 2024)."""
    first = c.layers[0].matrices[WEIGHT_ROLES[0]].intruders if c.layers else None
    if first is None:
        return
    table = Table(
        title=f"Intruder dimensions: of B's top {first.k} singular vectors, those with "
        f"max |cos| < {first.epsilon:g} to every singular vector of A",
        caption="Shuttleworth et al. 2024 (arXiv 2410.21228): LoRA makes them, full "
        "fine-tuning rarely does; output-side singular vectors",
    )
    for column in ("layer", *WEIGHT_ROLES, "lowest max |cos| (matrix)"):
        table.add_column(column, justify="right")
    for layer in c.layers:
        found = {role: layer.matrices[role].intruders for role in WEIGHT_ROLES}
        role, lowest = min(
            ((role, min(f.max_similarity)) for role, f in found.items()), key=lambda x: x[1]
        )
        table.add_row(
            str(layer.layer),
            *(str(found[role].count) for role in WEIGHT_ROLES),
            f"{lowest:.3f} ({role})",
        )
    console.print(table)
