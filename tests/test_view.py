"""`toolkit view`: the HTML page of a run and of a comparison, opened in headless Chromium.

The page's numbers are read back from the DOM and checked against the run's own files and
against independent computations from the models' weights.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import tiny_classification_run
from safetensors.numpy import load_file

import toolkit
from toolkit.analysis.view_data import run_view_data
from toolkit.cli import main
from toolkit.render.html_view import rounded

ROLES = ("wq", "wk", "wv", "w0")
TEXT = "the film was very good"  # every word is in the toy tokenizer's vocabulary
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def run_dir(toy_sentiment_csv, tiny_bert_with_tokenizer, tmp_path_factory) -> Path:
    """4 steps of the tiny BERT classifier, snapshots at 0, 2 and 4; the report writes view.html."""
    out = tmp_path_factory.mktemp("view") / "run"
    tiny_classification_run(
        toy_sentiment_csv,
        tiny_bert_with_tokenizer,
        out,
        report=True,
        learning_rate=5e-3,
        max_steps=4,
        track_every=2,
        eval_every=2,
    )
    return out


@pytest.fixture(scope="module")
def run_page(run_dir, browser):
    """The page of the run, written again with one extra text, opened in a tab."""
    page_file = run_dir / "view-text.html"
    result = CliRunner().invoke(main, ["view", str(run_dir), "-o", str(page_file), "--text", TEXT])
    assert result.exit_code == 0, result.output
    return browser.open(page_file.as_uri())


def _trajectory(run_dir: Path) -> dict:
    return json.loads((run_dir / "shift" / "trajectory.json").read_text())


def _set_step(page, index: int) -> None:
    page.evaluate(
        f"(() => {{ const s = document.getElementById('step-slider'); s.value = '{index}'; "
        "s.dispatchEvent(new Event('input')); })()"
    )


def _heatmap(page, name: str) -> np.ndarray:
    """The values of a layer x head heatmap, as the page's cells carry them."""
    cells = page.evaluate(
        f"[...document.querySelectorAll('svg[data-map=\"{name}\"] rect.cell')]"
        ".map(r => [+r.dataset.layer, +r.dataset.head, +r.dataset.value])"
    )
    values = np.zeros((max(c[0] for c in cells) + 1, max(c[1] for c in cells) + 1))
    for layer, head, value in cells:
        values[layer, head] = value
    return values


def test_finetune_writes_the_view_beside_the_report(run_dir):
    page = (run_dir / "view.html").read_text()
    assert (run_dir / "report.md").is_file()
    assert page.startswith("<!DOCTYPE html>") and '<script type="application/json"' in page
    # self-contained: nothing is fetched, no library from elsewhere
    assert not re.search(r"""(src|href)=["'](https?:)?//""", page)


def test_page_loads_without_errors_or_network_requests(run_page):
    assert run_page.evaluate("document.body.dataset.ready") == "true"
    assert run_page.problems() == []
    assert run_page.requests() == [run_page.evaluate("location.href")]


def test_slider_shows_each_snapshots_head_change(run_page, run_dir):
    shift = _trajectory(run_dir)["shift"]
    assert [p["step"] for p in shift] == [0, 2, 4]
    for index, point in enumerate(shift):
        _set_step(run_page, index)
        assert run_page.evaluate("document.getElementById('step-label').textContent").startswith(
            str(point["step"])
        )
        for role in ROLES:  # the page's numbers against the trajectory's, via JSON: rtol 1e-4
            np.testing.assert_allclose(
                _heatmap(run_page, f"run-{role}"), point["head_change"][role], rtol=1e-4, atol=0
            )
        marker = "document.querySelector('#run .marker').dataset.step"
        assert run_page.evaluate(marker) == str(point["step"])


def test_all_four_map_is_each_heads_whole_change_from_the_snapshots(run_page, run_dir):
    """Independent route: the four weights of a head stacked, from the snapshot files."""
    shift_dir = run_dir / "shift"
    start = load_file(shift_dir / "step_000000.safetensors")
    for index, point in enumerate(_trajectory(run_dir)["shift"]):
        now = load_file(shift_dir / point["snapshot"])
        expected = np.zeros((2, 3))
        for layer in range(2):
            for head in range(3):
                before = np.concatenate(
                    [start[f"layers.{layer}.{r}"][head].ravel() for r in ROLES]
                ).astype(np.float64)
                after = np.concatenate([now[f"layers.{layer}.{r}"][head].ravel() for r in ROLES])
                expected[layer, head] = np.linalg.norm(after - before) / np.linalg.norm(before)
        _set_step(run_page, index)
        # float32 snapshots' norms (page) against float64 numpy: ~1e-6 relative; rtol 1e-4
        np.testing.assert_allclose(_heatmap(run_page, "run-all"), expected, rtol=1e-4)


def test_top_heads_follow_the_slider(run_page, run_dir):
    shift = _trajectory(run_dir)["shift"]
    _set_step(run_page, 1)
    rows = run_page.evaluate(
        "[...document.querySelectorAll('#top-heads tr')].slice(1)"
        ".map(r => [...r.children].map(c => c.textContent))"
    )
    assert len(rows) == 6  # 2 layers x 3 heads
    wq = [float(row[3]) for row in rows]
    for row in rows:  # the table shows 4 significant digits (view.js): rel 1e-3
        assert float(row[3]) == pytest.approx(
            shift[1]["head_change"]["wq"][int(row[0])][int(row[1])], rel=1e-3
        )
    all_four = [float(row[2]) for row in rows]
    assert all_four == sorted(all_four, reverse=True) and wq  # largest first


def test_play_runs_through_every_snapshot(run_page, run_dir):
    _set_step(run_page, 2)  # at the end, play starts over from the first snapshot
    run_page.evaluate("document.getElementById('play').click()")
    seen = run_page.evaluate(
        "new Promise(done => { const seen = []; const label = document.getElementById("
        "'step-label'); const timer = setInterval(() => { seen.push(label.textContent.split(' ')"
        "[0]); if (document.getElementById('play').textContent === 'Play') { clearInterval(timer);"
        " done(seen); } }, 50); })"
    )
    assert list(dict.fromkeys(seen)) == [str(p["step"]) for p in _trajectory(run_dir)["shift"]]


def test_hover_shows_the_heads_numbers(run_page, run_dir):
    last = _trajectory(run_dir)["shift"][-1]
    _set_step(run_page, 2)
    x, y = run_page.centre_of('svg[data-map="run-wv"] rect[data-layer="1"][data-head="2"]')
    run_page.mouse("mouseMoved", x, y)
    tip = run_page.evaluate("document.getElementById('tooltip').textContent")
    assert run_page.evaluate("document.getElementById('tooltip').hidden") is False
    assert "wv · layer 1 · head 2" in tip and f"step {last['step']}" in tip
    shown = float(re.search(r"relative change (\S+)", tip).group(1))
    assert shown == pytest.approx(last["head_change"]["wv"][1][2], rel=1e-3)  # 4 digits shown


def _manual_attention(model_dir: Path, layer: int, head: int) -> tuple[list[str], np.ndarray]:
    """softmax(q k^T / sqrt(d_head)) of one BERT head from its query/key Linear layers and the
    layer's input hidden state: a route apart from the model's eager attention."""
    import torch
    from transformers import AutoTokenizer, BertModel

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = BertModel.from_pretrained(model_dir).eval()
    encoded = tokenizer(TEXT, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**encoded, output_hidden_states=True).hidden_states[layer][0]  # [T, 48]
        attention = model.encoder.layer[layer].attention.self
        d_head = 16
        columns = slice(head * d_head, (head + 1) * d_head)
        q, k = attention.query(hidden)[:, columns], attention.key(hidden)[:, columns]
        probs = torch.softmax(q @ k.T / math.sqrt(d_head), dim=-1)
    tokens = tokenizer.convert_ids_to_tokens(encoded["input_ids"][0])
    return tokens, probs.numpy()


def _attention_cells(page, side: str) -> np.ndarray:
    values = page.evaluate(
        f"[...document.querySelectorAll('[data-side={side}] .attention-matrix rect')]"
        ".map(r => +r.dataset.value)"
    )
    n = math.isqrt(len(values))
    return np.array(values).reshape(n, n)


def test_clicking_a_cell_shows_that_heads_attention_before_and_after(
    run_page, run_dir, tiny_bert_with_tokenizer
):
    x, y = run_page.centre_of('svg[data-map="run-wq"] rect[data-layer="1"][data-head="2"]')
    run_page.mouse("click", x, y)
    assert run_page.evaluate("document.getElementById('layer-select').value") == "1"
    assert run_page.evaluate("document.getElementById('head-select').value") == "2"
    assert "layer 1, head 2" in run_page.evaluate(
        "document.getElementById('head-info').textContent"
    )
    run_page.evaluate(
        "(() => { const s = document.getElementById('text-select'); s.value = '0'; "
        "s.dispatchEvent(new Event('change')); })()"
    )
    assert run_page.evaluate("document.getElementById('text-select').selectedOptions[0].text") == (
        TEXT
    )
    base_tokens, base = _manual_attention(tiny_bert_with_tokenizer, 1, 2)
    final_tokens, final = _manual_attention(run_dir / "final", 1, 2)
    # probabilities in [0, 1], the page's from the toolkit's float32 run and these from a manual
    # float32 recomputation: atol 1e-4, well under the 1e-3 change asserted below
    np.testing.assert_allclose(_attention_cells(run_page, "a"), base, atol=1e-4)
    np.testing.assert_allclose(_attention_cells(run_page, "b"), final, atol=1e-4)
    assert np.abs(base - final).max() > 1e-3  # fine-tuning moved this head's attention
    labels = run_page.evaluate(
        "[...document.querySelectorAll('[data-side=b] .attention-matrix text.token')]"
        ".map(t => t.textContent)"
    )
    assert labels == final_tokens == base_tokens


def test_a_chosen_tokens_softmax_row_and_the_lines_view(run_page, run_dir):
    run_page.evaluate(
        "(() => { const s = document.getElementById('mode-select'); s.value = 'lines'; "
        "s.dispatchEvent(new Event('change')); })()"
    )
    x, y = run_page.centre_of("[data-side=b] .attention-lines text.token[data-token='2']")
    run_page.mouse("click", x, y)
    row = run_page.evaluate(
        "[...document.querySelectorAll('[data-side=b] .softmax-row rect')]"
        ".map(r => +r.dataset.value)"
    )
    _, final = _manual_attention(run_dir / "final", 1, 2)
    np.testing.assert_allclose(row, final[2], atol=1e-4)  # probabilities, as above
    assert sum(row) == pytest.approx(1, abs=1e-3)  # a softmax row; the page's values are rounded
    assert run_page.evaluate(
        "document.querySelectorAll('[data-side=a] .attention-lines line').length"
    )


def test_screenshot_is_not_blank(run_page, tmp_path):
    from PIL import Image

    run_page.evaluate("window.scrollTo(0, 0)")
    shot = run_page.screenshot(tmp_path / "view.png")
    colours = Image.open(shot).convert("RGB").getcolors(maxcolors=1 << 20)
    assert len(colours) > 50


def test_view_of_two_models_shows_the_comparison(
    run_dir, tiny_bert_with_tokenizer, browser, tmp_path
):
    """`compare --html`: relative change per head checked against numpy on the two models."""
    page_file = tmp_path / "compare.html"
    final = run_dir / "final"
    result = CliRunner().invoke(
        main, ["compare", str(tiny_bert_with_tokenizer), str(final), "--html", str(page_file)]
    )
    assert result.exit_code == 0, result.output
    page = browser.open(page_file.as_uri())
    assert page.problems() == [] and len(page.requests()) == 1
    a, b = toolkit.load_attention(tiny_bert_with_tokenizer), toolkit.load_attention(final)
    for role in ROLES:
        expected = [
            [
                np.linalg.norm(getattr(b.layer(i), role)[h] - getattr(a.layer(i), role)[h])
                / np.linalg.norm(getattr(a.layer(i), role)[h])
                for h in range(3)
            ]
            for i in range(2)
        ]
        # compare's float64 numbers against numpy's on the same weights: rtol 1e-4 is a margin
        np.testing.assert_allclose(_heatmap(page, f"compare-{role}"), expected, rtol=1e-4)
    assert page.evaluate("document.querySelectorAll('#ranks tr').length") == 1 + 2 * 4
    assert page.evaluate("document.querySelectorAll('.attention-matrix').length") == 2


def test_structural_view_sets_spectra_side_by_side(tiny_bert, tiny_gpt2, browser, tmp_path):
    page_file = tmp_path / "structural.html"
    result = CliRunner().invoke(
        main, ["view", str(tiny_bert), str(tiny_gpt2), "-o", str(page_file)]
    )
    assert result.exit_code == 0, result.output
    page = browser.open(page_file.as_uri())
    assert page.problems() == []
    assert page.evaluate("document.querySelectorAll('#comparison .chart').length") == 2  # 2 pairs
    # neither fixture has a tokenizer: the page says so instead of showing attention
    notes = page.evaluate(
        "[...document.querySelectorAll('#attention .note')].map(n => n.textContent)"
    )
    assert len(notes) == 2 and all("has no tokenizer" in note for note in notes)


def test_a_text_cannot_break_out_of_the_page(run_dir, browser, tmp_path):
    text = "bad </script><script>document.title='x'</script> {{data}} film"
    page_file = tmp_path / "odd.html"
    toolkit_view = CliRunner().invoke(
        main, ["view", str(run_dir), "-o", str(page_file), "--text", text]
    )
    assert toolkit_view.exit_code == 0, toolkit_view.output
    page = browser.open(page_file.as_uri())
    assert page.problems() == []
    assert page.evaluate("document.getElementById('text-select').options[0].text") == text


def test_run_without_tracking_still_shows_curves_and_attention(run_dir, browser, tmp_path):
    """--track-every 0: no snapshots, no comparison; the page says so and shows the rest."""
    copy = tmp_path / "untracked"
    shutil.copytree(run_dir, copy)
    trajectory = {**_trajectory(run_dir), "shift": [], "n_layers": 0, "n_heads": 0}
    (copy / "shift" / "trajectory.json").write_text(json.dumps(trajectory))
    (copy / "compare.json").unlink()
    result = CliRunner().invoke(main, ["view", str(copy)])
    assert result.exit_code == 0, result.output
    page = browser.open((copy / "view.html").as_uri())
    assert page.problems() == []
    assert "tracking was off" in page.evaluate("document.getElementById('run').textContent")
    # the loss chart: training loss and validation loss (evaluated at steps 2 and 4)
    assert (
        page.evaluate("document.querySelector('#run .chart').querySelectorAll('polyline').length")
        == 2
    )
    assert page.evaluate("document.querySelectorAll('.attention-matrix').length") == 2


def test_random_init_run_says_why_base_attention_is_missing(run_dir, tmp_path):
    copy = tmp_path / "random"
    shutil.copytree(run_dir, copy)
    settings = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**settings, "init": "random"}))
    attention = run_view_data(copy, [TEXT])["attention"]
    assert attention["a"]["maps"] is None and "freshly initialised" in attention["a"]["unavailable"]
    assert attention["b"]["maps"] is not None


def test_view_of_a_folder_without_a_run_fails_in_one_line(tmp_path):
    result = CliRunner().invoke(main, ["view", str(tmp_path)])
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and "no shift/trajectory.json" in result.output
    assert list(tmp_path.iterdir()) == []


def test_numbers_keep_five_significant_digits():
    assert rounded({"a": [0.123456789, 12345.678, float("nan")], "b": 3}) == {
        "a": [0.12346, 12346.0, None],
        "b": 3,
    }


def test_the_page_sets_the_model_beside_the_majority_class_and_the_bag_of_words(run_page, run_dir):
    # the numbers the run scored before training, and its final validation evaluation
    baselines = json.loads((run_dir / "baselines.json").read_text())
    final = _trajectory(run_dir)["evaluations"][-1]
    rows = run_page.evaluate(
        "[...document.querySelectorAll('#baselines tr')].map(r => [...r.cells].map(c => "
        "c.textContent))"
    )
    expected = [baselines["majority"], baselines["bag_of_words"], final]
    assert [row[0] for row in rows[1:]] == [
        "always the most common training class",
        "bag of words (TF-IDF 1-2-grams + logistic regression)",
        "fine-tuned model",
    ]
    for row, scores in zip(rows[1:], expected, strict=True):
        # the page shows 4 significant digits
        assert float(row[1]) == pytest.approx(scores["accuracy"], rel=1e-3)
        assert float(row[2]) == pytest.approx(scores["f1"], rel=1e-3)
