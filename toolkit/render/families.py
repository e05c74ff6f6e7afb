"""`toolkit families`: the supported attention patterns, as text or as the README's table."""

from __future__ import annotations

# config rules shared by every pattern (`toolkit.families.pattern`)
EVERY_PATTERN = (
    "Every pattern reads from config.json: grouped- and multi-query key/value heads, which biases "
    "exist, per-layer sliding windows, Gemma 2's logit soft-capping, query_pre_attn_scalar and "
    "attention_multiplier scales, rope_scaling variants (transformers' own initialisers), partial "
    "rotary and SmolLM3's layers without rotary."
)


def families_markdown(rows: list[dict]) -> str:
    """The README's table: one line per pattern."""
    lines = ["| Attention pattern | Architectures (model_type) | Details |", "|---|---|---|"]
    for row in rows:
        details = "; ".join(row["features"])
        if row["refused"]:
            details = f"refused: {row['refused']}"
        lines.append(f"| {row['pattern']} | {', '.join(row['architectures'])} | {details} |")
    return "\n".join(lines) + "\n\n" + EVERY_PATTERN


def families_text(rows: list[dict]) -> str:
    """One paragraph per pattern: its name, architectures and features."""
    blocks = []
    for row in rows:
        details = [f"refused: {row['refused']}"] if row["refused"] else row["features"]
        blocks.append(
            "\n".join(
                [row["pattern"], "  architectures: " + ", ".join(row["architectures"])]
                + ["  " + detail for detail in details]
            )
        )
    supported = [row for row in rows if not row["refused"]]
    count = sum(len(row["architectures"]) for row in supported)
    refused = len(rows) - len(supported)
    summary = f"{count} architectures in {len(supported)} patterns; {refused} refused"
    return "\n\n".join(blocks) + "\n\n" + summary + "\n" + EVERY_PATTERN
