"""`toolkit view` beyond BERT: the page data of a short tracked fine-tune of a fused-per-head
ALiBi model (BLOOM), an ALiBi model with fused [q; k; v] (MPT), a grouped-query model with q/k
norms (Qwen3) and a multi-query one (GPT-BigCode), read back from the HTML file and checked
against the run's snapshot files and the model's own eager forward."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from test_architectures import GPT_STYLE, GQA, MODELS

import toolkit
from toolkit.cli import main

pytestmark = [pytest.mark.numerics, pytest.mark.usefixtures("one_torch_thread")]
ROLES = ("wq", "wk", "wv", "w0")
TEXT = "the cat sees the ball."  # words of the toy corpus the tokenizer is trained on
CASES = {
    "bloom": MODELS["bloom"][0],  # fused per head [h, 3, d_head], ALiBi
    "mpt": MODELS["mpt"][0],  # fused [q; k; v], ALiBi over 6 heads (not a power of two)
    "qwen3": GQA,  # 6 query heads over 2 key/value heads, per-head q/k norms
    "gpt_bigcode": GPT_STYLE,  # multi-query: one key/value head
}


@pytest.fixture(scope="module", params=sorted(CASES))
def tracked_run(request, toy_corpus_txt, tmp_path_factory):
    """(base folder, run folder, page data): 2 full fine-tuning steps tracked at 0, 1 and 2,
    then `toolkit view RUN -o page.html --text TEXT`, its JSON read back from the file."""
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    from toolkit.training.data import train_bpe_tokenizer

    model_type = request.param
    folder = tmp_path_factory.mktemp(model_type)
    tokenizer = train_bpe_tokenizer(toy_corpus_txt.read_text().splitlines(), 300)
    torch.manual_seed(0)
    config = CONFIG_MAPPING[model_type](**{**CASES[model_type], "vocab_size": len(tokenizer)})
    base = folder / "base"
    AutoModelForCausalLM.from_config(config).save_pretrained(base)
    tokenizer.save_pretrained(base)
    run = folder / "run"
    toolkit.finetune(
        toolkit.FinetuneConfig(
            model=str(base),
            dataset=str(toy_corpus_txt),
            task="causal-lm",
            output_dir=str(run),
            max_length=16,
            max_steps=2,
            track_every=1,
            learning_rate=1e-2,
            warmup_ratio=0.0,
        )
    )
    page = folder / "page.html"
    result = CliRunner().invoke(main, ["view", str(run), "-o", str(page), "--text", TEXT])
    assert result.exit_code == 0, result.output
    payload = re.search(
        r'<script type="application/json" id="view-data">(.*?)</script>', page.read_text(), re.S
    )
    return base, run, json.loads(payload.group(1).replace("<\\/", "</"))


def _snapshots(run) -> dict[int, dict[str, np.ndarray]]:
    """Tracked point's index -> its snapshot's standard tensors (float64), for every point
    that has one: step 0 always; a later one is skipped while the previous is being written."""
    trajectory = json.loads((run / "shift" / "trajectory.json").read_text())
    return {
        index: {n: t.double().numpy() for n, t in load_file(run / "shift" / file).items()}
        for index, file in enumerate(p["snapshot"] for p in trajectory["shift"])
        if file
    }


def _final_weights(run) -> dict[str, np.ndarray]:
    """The final model's standard tensors (float64): the weights at the run's last step."""
    final = toolkit.load_attention(str(run / "final"))
    return {
        f"layers.{i}.{role}": getattr(final.layer(i), role).astype(np.float64)
        for i in final.layer_indices
        for role in ROLES
    }


def test_each_weights_head_change_is_read_from_the_snapshots(tracked_run):
    """head_change[role][step][layer][head] = ||W_step[h] - W_0[h]|| / ||W_0[h]||, with one entry
    per stored head (a multi-query model's single key/value head is one entry). The page keeps 5
    significant digits: rtol 1e-4."""
    _, run, data = tracked_run
    snapshots = _snapshots(run)
    shown = data["run"]["head_change"]
    assert data["run"]["steps"] == [0, 1, 2]
    snapshots[len(shown["wq"]) - 1] = _final_weights(run)
    for step, now in snapshots.items():
        for role in ROLES:
            for (layer, head), value in _expected_change(snapshots[0], now, role).items():
                assert shown[role][step][layer][head] == pytest.approx(value, rel=1e-4, abs=1e-12)
            assert len(shown[role][step][0]) == snapshots[0][f"layers.0.{role}"].shape[0]
    assert max(max(row) for row in shown["wq"][-1]) > 1e-3  # the run moved the weights


def test_all_four_change_of_a_query_head_includes_its_shared_key_value_head(tracked_run):
    """ "all": the four weights a query head computes with, stacked: its own wq[h] and w0[h],
    and the key/value head wk[g], wv[g] of its group (g = h // (h / h_kv))."""
    _, run, data = tracked_run
    snapshots = _snapshots(run)
    snapshots[len(data["run"]["steps"]) - 1] = _final_weights(run)
    start = snapshots[0]
    n_heads, n_kv_heads = start["layers.0.wq"].shape[0], start["layers.0.wk"].shape[0]
    for step, now in snapshots.items():
        expected = np.zeros((2, n_heads))
        for layer in range(2):
            for head in range(n_heads):
                own = {"wq": head, "w0": head}
                own["wk"] = own["wv"] = head // (n_heads // n_kv_heads)
                names = [(f"layers.{layer}.{r}", own[r]) for r in ROLES]
                before = np.concatenate([start[n][i].ravel() for n, i in names])
                after = np.concatenate([now[n][i].ravel() for n, i in names])
                expected[layer, head] = np.linalg.norm(after - before) / np.linalg.norm(before)
        np.testing.assert_allclose(data["run"]["head_change"]["all"][step], expected, rtol=1e-4)


def test_attention_maps_are_the_models_own_eager_probabilities(tracked_run):
    """Both sides of the page's attention: the base and the final model's probabilities on the
    text, [layer][query head][query][key], against transformers' eager forward of each folder.
    Probabilities <= 1 kept to 5 significant digits: atol 1e-5."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, run, data = tracked_run
    attention = data["attention"]
    text_index = attention["texts"].index(TEXT)
    maps = {}
    for side, folder in (("a", base), ("b", run / "final")):
        assert attention[side]["unavailable"] is None
        shown = attention[side]["maps"][text_index]
        tokenizer = AutoTokenizer.from_pretrained(folder)
        ids = tokenizer(TEXT, return_tensors="pt")["input_ids"]
        model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
        with torch.no_grad():
            probs = torch.stack(model(input_ids=ids, output_attentions=True).attentions)[:, 0]
        assert len(shown["tokens"]) == ids.shape[1]
        np.testing.assert_allclose(np.array(shown["probs"]), probs.numpy(), atol=1e-5)
        maps[side] = probs
    assert probs.shape[1] == model.config.num_attention_heads  # one map per query head
    assert (maps["a"] - maps["b"]).abs().max() > 1e-4  # fine-tuning moved the attention


def _cells(page, name: str) -> dict[tuple[int, int], float]:
    """(layer, column) -> value of a heatmap's cells, as the page draws them."""
    cells = page.evaluate(
        f"[...document.querySelectorAll('svg[data-map=\"{name}\"] rect.cell')]"
        ".map(r => [+r.dataset.layer, +r.dataset.head, +r.dataset.value])"
    )
    return {(layer, head): value for layer, head, value in cells}


def _expected_change(start: dict, now: dict, role: str) -> dict[tuple[int, int], float]:
    """(layer, stored head) -> ||W_now[h] - W_start[h]|| / ||W_start[h]||, numpy float64."""
    return {
        (layer, h): np.linalg.norm(now[f"layers.{layer}.{role}"][h] - before[h])
        / np.linalg.norm(before[h])
        for layer in range(2)
        for before in [start[f"layers.{layer}.{role}"]]
        for h in range(before.shape[0])
    }


def test_the_pages_draw_one_column_per_stored_head(tracked_run, browser, tmp_path):
    """The run's page and `compare BASE FINAL --html` open without a script error, and each
    weight's map has one column per head the weight stores (wk, wv of a grouped- or multi-query
    model: its key/value heads), with the snapshots' relative changes (rtol 1e-4: 5 digits)."""
    base, run, _ = tracked_run
    start, final = _snapshots(run)[0], _final_weights(run)
    compare_page = tmp_path / "compare.html"
    argv = ["compare", str(base), str(run / "final"), "--html", str(compare_page)]
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 0, result.output
    for file, prefix in ((run.parent / "page.html", "run"), (compare_page, "compare")):
        page = browser.open(file.as_uri())
        assert page.evaluate("document.body.dataset.ready") == "true"
        assert page.problems() == []
        for role in ROLES:
            # the run's page opens at its last step, whose weights are final/'s
            expected = _expected_change(start, final, role)
            shown = _cells(page, f"{prefix}-{role}")
            assert shown.keys() == expected.keys(), (prefix, role)
            for cell, value in expected.items():
                assert shown[cell] == pytest.approx(value, rel=1e-4), (prefix, role, cell)
