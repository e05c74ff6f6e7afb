"""Rich terminal views of `inspect`, `extract` and `verify` results."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from toolkit.analysis.summary import ModelSummary
from toolkit.analysis.verify import VerifyReport
from toolkit.attention import WEIGHT_ROLES


def _shape(shape: list[int]) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def render_summary(summary: ModelSummary, heads: bool, console: Console) -> None:
    s = summary
    total = f"{s.total_parameters:,}" if s.total_parameters is not None else "n/a"
    share = (
        f" ({100 * s.attention_parameters / s.total_parameters:.1f}% of {total})"
        if s.total_parameters
        else ""
    )
    console.print(
        f"[bold]{s.model}[/bold]  family [cyan]{s.family}[/cyan]  "
        f"layers {s.n_layers}  heads {s.n_heads}  key/value heads {s.n_kv_heads}  "
        f"d_model {s.d_model}  d_head {s.d_head}"
    )
    if s.n_kv_heads != s.n_heads:
        console.print(
            f"grouped-query attention: query head i reads key/value head i // "
            f"{s.n_heads // s.n_kv_heads} (wk, wv have {s.n_kv_heads} heads)"
        )
    console.print(f"positions: {escape(_positions(s.positions))}")
    absent = ", ".join(s.absent_biases)
    console.print(
        f"biases: {', '.join(s.biases) or 'none'}" + (f"  (absent: {absent})" if absent else "")
    )
    console.print(f"attention parameters {s.attention_parameters:,}{share}")
    table = Table(title="Frobenius norms of the attention weights (standard layout)")
    table.add_column("layer", justify="right")
    for role in WEIGHT_ROLES:
        table.add_column(
            f"{role} {_shape(getattr(s.layers[0], role).shape)}" if s.layers else role,
            justify="right",
        )
    for layer in s.layers:
        table.add_row(
            str(layer.layer), *(f"{getattr(layer, role).fro:.3f}" for role in WEIGHT_ROLES)
        )
    console.print(table)
    if heads:
        for layer in s.layers:
            per_head = Table(title=f"layer {layer.layer}: Frobenius norm per head")
            per_head.add_column("head", justify="right")
            for role in WEIGHT_ROLES:
                per_head.add_column(role, justify="right")
            group = s.n_heads // s.n_kv_heads
            for head in range(s.n_heads):
                # wk, wv: the key/value head this query head reads (shared within its group)
                index = {"wq": head, "w0": head, "wk": head // group, "wv": head // group}
                per_head.add_row(
                    str(head) if group == 1 else f"{head} (kv {head // group})",
                    *(f"{getattr(layer, role).head_fro[index[role]]:.3f}" for role in WEIGHT_ROLES),
                )
            console.print(per_head)


def _positions(positions: dict) -> str:
    """'rotary (rope_theta 10000, rope_type default)' or 'learned absolute'."""
    settings = {key: value for key, value in positions.items() if key != "scheme"}
    details = ", ".join(f"{key} {value}" for key, value in settings.items() if value is not None)
    return positions.get("scheme", "?") + (f" ({details})" if details else "")


def render_verify(report: VerifyReport, console: Console) -> None:
    r = report
    sequences, tokens = r.inputs["shape"]
    inputs = (
        f"{sequences} texts x {tokens} tokens"
        if r.inputs["kind"] == "texts"
        else f"{sequences} sequences x {tokens} {r.inputs['kind']}"
    )
    console.print(f"[bold]{r.model}[/bold]  family [cyan]{r.family}[/cyan]  input: {inputs}")
    console.print(f"positions: {escape(_positions(r.positions))}")
    if r.n_kv_heads != r.n_heads:
        console.print(
            f"{r.n_heads} query heads share {r.n_kv_heads} key/value heads: each key/value head "
            f"is repeated for its group of {r.n_heads // r.n_kv_heads} before the scores"
        )
    table = Table(
        title="Attention recomputed from the extracted tensors vs the real model\n"
        f"relative = max |diff| / max |model| (bound {r.tolerance:g}), absolute = max |diff|"
    )
    table.add_column("layer", justify="right")
    table.add_column("\nprobabilities\nrelative  absolute", justify="right")
    table.add_column("\nblock output\nrelative  absolute", justify="right")
    table.add_column(escape("Concat(z)@W0 vs\nΣ z_i@w0[i]\nrelative  absolute"), justify="right")
    table.add_column("", justify="center")
    for check in r.layers:
        table.add_row(
            str(check.layer),
            _relative_absolute(check.max_rel_diff["probs"], check.max_abs_diff["probs"]),
            _relative_absolute(check.max_rel_diff["output"], check.max_abs_diff["output"]),
            _relative_absolute(check.concat_vs_sum_max_rel_diff, check.concat_vs_sum_max_abs_diff),
            "[green]ok[/green]" if check.worst_rel_diff <= r.tolerance else "[red]FAIL[/red]",
        )
    console.print(table)
    console.print(
        escape(
            f"W0 is one {_shape(r.w0_shape)} matrix: rows {{i*{r.d_head} .. (i+1)*{r.d_head}-1}} "
            f"belong to head i, so Concat(z_0..z_{r.n_heads - 1}) @ W0 = "
            f"Σ_i z_i @ W0[rows of head i]; each head writes into all {r.d_model} output "
            "dimensions and the sum mixes the heads."
        )
    )
    console.print("[green]verified[/green]" if r.passed else "[red]verification FAILED[/red]")


def _relative_absolute(relative: float, absolute: float) -> str:
    return f"{relative:.2e}  {absolute:.2e}"


def render_recipes(recipes: list, console: Console) -> None:
    """(name, FinetuneConfig) pairs: a table of the settings, then each recipe's description."""
    table = Table(title="Recipes (run one with: toolkit finetune NAME)")
    table.add_column("name", no_wrap=True, style="bold")
    table.add_column("model", overflow="fold")
    for column in ("dataset", "task", "steps"):
        table.add_column(column)
    for name, config in recipes:
        dataset = config.dataset + (f" ({config.dataset_config})" if config.dataset_config else "")
        steps = (
            str(config.max_steps)
            if config.max_steps
            else f"{config.epochs} epoch(s)"
            if config.epochs
            else "default"
        )
        table.add_row(name, config.model, dataset, config.task, steps)
    console.print(table)
    for name, config in recipes:
        console.print(f"[bold]{name}[/bold]: {escape(config.description)}")


def score_table(metrics: dict[str, float], baselines: dict[str, dict[str, float]]) -> list[str]:
    """Accuracy and macro-F1 of the majority class, the bag of words and the fine-tuned model
    on the same rows, one line each; [] without baselines."""
    if not baselines or "accuracy" not in metrics:
        return []
    rows = [
        ("majority class", baselines["majority"]),
        ("bag of words", baselines["bag_of_words"]),
        ("fine-tuned", metrics),
    ]
    return [f"{'':<16}accuracy  macro-F1"] + [
        f"{name:<16}{row['accuracy']:>8.3f}  {row.get('f1', float('nan')):>8.3f}"
        for name, row in rows
    ]


def evaluation_summary(result) -> str:
    """The lines `toolkit evaluate` prints (an EvaluationResult)."""
    lines = [
        f"{result.run_dir} on {result.dataset}: {result.rows} rows, texts cut at "
        f"{result.max_length} tokens",
        *score_table(result.metrics, result.baselines),
    ]
    if result.warning:
        lines.append(f"WARNING: {result.warning}")
    return "\n".join(lines)


def finetune_summary(result) -> str:
    """The lines `toolkit finetune` prints at the end of a run (a FinetuneResult)."""
    metrics = ", ".join(f"{name} {value:.4g}" for name, value in result.metrics.items())
    speed = []
    if result.train_samples_per_second:
        speed.append(f"{result.train_samples_per_second:.1f} samples/s")
    if result.train_tokens_per_second:
        speed.append(f"{result.train_tokens_per_second:.0f} tokens/s")
    if result.mfu is not None:
        speed.append(f"MFU {result.mfu:.1%}")
    lines = [
        f"{result.steps} steps in {result.seconds:.0f} s"
        + (f" ({', '.join(speed)})" if speed else "")
        + f"; {metrics}",
        f"learning rate {result.learning_rate:.1e}, {result.epochs} epoch(s)"
        + (
            f" (chosen by the default rule: {', '.join(result.defaults)})"
            if result.defaults
            else ""
        ),
    ]
    lines += score_table(result.metrics, result.baselines)
    if "perplexity" in result.start_metrics:
        lines.append(
            f"perplexity of the starting model on the same rows: "
            f"{result.start_metrics['perplexity']:.4g}"
        )
    if result.warning:
        lines.append(f"WARNING: {result.warning}")
    lines.append(f"report: {result.report}")
    if result.view:
        lines.append(f"view: {result.view}")
    lines.append(
        f"final model: {result.final_dir}"
        + (
            f" (step {result.best_step}: the best validation macro-F1)"
            if result.best_step is not None
            else ""
        )
    )
    if result.adapter_dir:
        lines.append(f"adapter: {result.adapter_dir}")
    return "\n".join(lines)
