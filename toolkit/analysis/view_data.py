"""The numbers behind `toolkit view`: a run's shift over its steps, a comparison, and the
attention probabilities of a base and a fine-tuned model on a few texts, as plain JSON data.

The page runs no model, so everything it shows is gathered here ahead of time:

    run:        DIR/shift/trajectory.json (+ the step-0 snapshot's head norms, for "all four")
                DIR/baselines.json (classification: majority class and bag of words)
                DIR/compare.json when the report wrote one (step 0 against the final model)
    attention:  for each text, softmax(q k^T / sqrt(d_head)) of every layer and head, from the
                real model run with eager attention: [n_layers][n_heads][tokens][tokens]
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from toolkit.analysis.compare import Comparison
from toolkit.attention import WEIGHT_ROLES, head_frobenius, load_attention
from toolkit.errors import ToolkitError
from toolkit.runtime import DEFAULT_TEXTS, load_model, make_inputs, token_strings
from toolkit.training.baseline import BASELINES_FILE

ALL_ROLES = "all"  # the four weights of a head together


def run_view_data(run_dir: str | Path, texts: Sequence[str] | None = None) -> dict:
    """Everything the page of a fine-tuning run shows, with its base and final models' attention."""
    run_dir = Path(run_dir)
    trajectory_file = run_dir / "shift" / "trajectory.json"
    if not trajectory_file.is_file():
        raise ToolkitError(
            f"{run_dir} holds no fine-tuning run (no shift/trajectory.json): pass the "
            "--output-dir of a 'toolkit finetune' run"
        )
    trajectory = json.loads(trajectory_file.read_text())
    settings_file = run_dir / "config.json"
    settings = json.loads(settings_file.read_text()) if settings_file.is_file() else {}
    compare_file = run_dir / "compare.json"
    baselines_file = run_dir / BASELINES_FILE
    texts = list(texts or DEFAULT_TEXTS)
    base_model, base_unavailable = _run_base_model(settings, trajectory["model"])
    return {
        "kind": "run",
        "title": f"{trajectory['model']} fine-tuned ({trajectory['task']})",
        "run": {
            "model": trajectory["model"],
            "task": trajectory["task"],
            "n_layers": trajectory["n_layers"],
            "n_heads": trajectory["n_heads"],
            **shift_over_steps(trajectory, run_dir / "shift"),
            "train_loss": trajectory["train_loss"],
            "evaluations": trajectory["evaluations"],
            # classification: majority and bag_of_words scores on the validation rows
            "baselines": (
                json.loads(baselines_file.read_text()) if baselines_file.is_file() else None
            ),
        },
        "comparison": (
            comparison_data(Comparison.from_dict(json.loads(compare_file.read_text())))
            if compare_file.is_file()
            else None
        ),
        "attention": attention_pair(
            base_model,
            run_dir / "final",
            texts,
            labels=(f"base: {trajectory['model']} (step 0)", "fine-tuned (final)"),
            unavailable_a=base_unavailable,
        ),
    }


def comparison_view_data(
    comparison: Comparison,
    model_a: str | Path,
    model_b: str | Path,
    texts: Sequence[str] | None = None,
) -> dict:
    """The page of `toolkit compare A B`: its result and both models' attention on the texts."""
    return {
        "kind": "comparison",
        "title": f"{comparison.a.name} against {comparison.b.name}",
        "run": None,
        "comparison": comparison_data(comparison),
        "attention": attention_pair(
            model_a,
            model_b,
            list(texts or DEFAULT_TEXTS),
            labels=(f"A: {comparison.a.name}", f"B: {comparison.b.name}"),
        ),
    }


def comparison_data(comparison: Comparison) -> dict:
    """`Comparison.to_dict()` plus, per layer, each head's change in all four weights together."""
    return {
        **comparison.to_dict(),
        "head_relative_change": [layer.head_relative_change() for layer in comparison.layers],
    }


def shift_over_steps(trajectory: dict, shift_dir: Path) -> dict:
    """Per tracked step: the layer x head relative change of each weight and of all four together.

    All four together, query head h: sqrt(sum_m ||ΔW_m[h]||^2 / sum_m ||W_m[h]||^2) over m in
    wq, wk, wv, w0 (wk, wv: the key/value head that h reads, as in compare), from each
    weight's relative change and the step-0 head norms ||W_m[h]||
    (||ΔW_m[h]|| = change_m[h] * ||W_m[h]||).
    """
    points = trajectory["shift"]
    head_change = {role: [p["head_change"][role] for p in points] for role in WEIGHT_ROLES}
    if points:
        start = list(load_attention(shift_dir / points[0]["snapshot"]).layers())  # F32 or BF16
        n_query_heads = len(head_change["wq"][0][0])

        def per_query_head(values: np.ndarray) -> np.ndarray:
            """[..., heads of one weight] -> [..., query heads]: a key/value head repeated for
            each query head of its group (grouped-query attention)."""
            return np.repeat(values, n_query_heads // values.shape[-1], axis=-1)

        norms = np.stack(  # [role, layer, query head]
            [
                per_query_head(np.stack([head_frobenius(getattr(layer, role)) for layer in start]))
                for role in WEIGHT_ROLES
            ]
        )
        changes = np.stack(  # [role, step, layer, query head]
            [per_query_head(np.array(head_change[role])) for role in WEIGHT_ROLES]
        )
        moved = np.square(changes * norms[:, None]).sum(axis=0)  # [step, layer, head]
        together = np.sqrt(moved / np.square(norms).sum(axis=0))
        head_change[ALL_ROLES] = together.tolist()
    return {"steps": [p["step"] for p in points], "head_change": head_change}


def attention_pair(
    model_a: str | Path | None,
    model_b: str | Path,
    texts: list[str],
    labels: tuple[str, str],
    unavailable_a: str | None = None,
) -> dict:
    """Both models' attention on each text; a model that cannot be run is named with the reason."""
    sides = []
    for model, label, unavailable in (
        (model_a, labels[0], unavailable_a),
        (model_b, labels[1], None),
    ):
        maps, reason = None, unavailable
        if reason is None:
            try:
                maps = attention_maps(model, texts)
            except ToolkitError as err:
                reason = str(err)
        sides.append({"label": label, "maps": maps, "unavailable": reason})
    return {"texts": texts, "a": sides[0], "b": sides[1]}


def attention_maps(model: str | Path, texts: Sequence[str]) -> list[dict]:
    """Per text: its tokens and the model's attention probabilities
    `probs[layer][head][query][key]`, one text per forward pass (no padding)."""
    import torch
    from transformers.utils import logging as transformers_logging

    attention = load_attention(model)
    verbosity = transformers_logging.get_verbosity()
    # a fine-tuned classifier's head is not part of the base model: a notice that is expected
    transformers_logging.set_verbosity_error()
    try:
        net = load_model(attention)
    finally:
        transformers_logging.set_verbosity(verbosity)
    maps = []
    for text in texts:
        input_ids, padding, _ = make_inputs(attention, [text], seed=0)
        with torch.no_grad():
            outputs = net(input_ids=input_ids, attention_mask=padding, output_attentions=True)
        if not outputs.attentions:
            raise ToolkitError(f"{attention.name} returned no attention probabilities")
        probs = torch.stack(outputs.attentions)[:, 0].float()  # [layers, heads, tokens, tokens]
        maps.append(
            {
                "tokens": token_strings(attention, input_ids[0].tolist()),
                "probs": probs.numpy().tolist(),
            }
        )
    return maps


def _run_base_model(settings: dict, model: str) -> tuple[str | None, str | None]:
    """The model a run started from, or None and why its attention cannot be shown."""
    if settings.get("init", "pretrained") == "random" or model.startswith("gpt2-config:"):
        return None, (
            "the run started from freshly initialised weights, which were not saved whole "
            "(shift/step_000000.safetensors keeps only the attention tensors, and attention "
            "on a text needs every layer)"
        )
    return model, None
