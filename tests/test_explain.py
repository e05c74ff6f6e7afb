"""`toolkit explain`: every number a lesson shows, checked against another route to it."""

from __future__ import annotations

import json
import math
import string

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from toolkit.analysis.verify import verify
from toolkit.attention import load_attention
from toolkit.cli import main
from toolkit.lessons import LESSONS
from toolkit.lessons.qkv import explain_qkv
from toolkit.lessons.softmax import explain_softmax
from toolkit.lessons.w0 import explain_w0
from toolkit.render.text import TEXT, resolve_language
from toolkit.runtime import make_inputs

pytestmark = pytest.mark.numerics  # CI reruns these under other CPU kernels

SENTENCE = "The cat sat on the mat because it was tired."
BOTH_FAMILIES = pytest.mark.parametrize(
    ("fixture", "family"), [("tiny_bert", "bert"), ("tiny_gpt2", "gpt2")]
)


def _eager(path):
    from transformers import AutoModel

    return AutoModel.from_pretrained(path, attn_implementation="eager").eval()


def _set_w0(model, family: str, layer: int, w0: torch.Tensor) -> None:
    """Write W0 [h*d_head, d_model] into the model's own output projection."""
    with torch.no_grad():
        if family == "bert":  # nn.Linear stores [out, in]
            model.encoder.layer[layer].attention.output.dense.weight.copy_(w0.T)
        else:  # GPT-2 Conv1D stores [in, out]
            model.h[layer].attn.c_proj.weight.copy_(w0)


def _output_projection(model, family: str, layer: int):
    return (
        model.encoder.layer[layer].attention.output.dense
        if family == "bert"
        else model.h[layer].attn.c_proj
    )


def _run(model, family, layer, input_ids, padding):
    """(that layer's output projection output, last hidden state), from the model's own modules."""
    seen = {}
    handle = _output_projection(model, family, layer).register_forward_hook(
        lambda module, args, output: seen.update(block=output)
    )
    with torch.no_grad():
        final = model(input_ids=input_ids, attention_mask=padding).last_hidden_state
    handle.remove()
    return seen["block"], final


def _relative(new, old, valid):
    return ((new - old)[valid].norm() / old[valid].norm()).item()


# ---- w0 -------------------------------------------------------------------------------------


@BOTH_FAMILIES
def test_w0_shapes_and_concat_identity_agree_with_verify(request, fixture, family):
    path = request.getfixturevalue(fixture)
    lesson = explain_w0(str(path), layer=1)
    report = verify(str(path))
    model = _eager(path)
    weight = _output_projection(model, family, 1).weight
    d_model = weight.shape[0] if family == "gpt2" else weight.shape[1]
    h = model.config.num_attention_heads
    d_head = d_model // h
    assert lesson.w0_shape == report.w0_shape == [h * d_head, d_model]
    assert lesson.z_shape == [lesson.tokens, d_head]
    assert lesson.concat_shape == [lesson.tokens, h * d_head]
    assert lesson.output_shape == [lesson.tokens, d_model]
    # float32, the same products summed in two orders: ~1e-7 of outputs of size ~1; 1e-5 margin
    assert lesson.concat_vs_sum_max_abs_diff < 1e-5
    # verify's bound is relative to the block output's largest |value| (docs/numerics.md)
    scale = report.layers[1].reference_max_abs["output"]
    assert lesson.sum_vs_model_max_abs_diff <= report.tolerance * scale
    # two float32 recomputations of the same block output: they agree to rounding, ~1e-7 * scale
    assert lesson.sum_vs_model_max_abs_diff == pytest.approx(
        report.layers[1].max_abs_diff["output"], abs=1e-6
    )
    w0 = weight.detach().double().numpy()
    assert lesson.w0_rank == np.linalg.matrix_rank(w0)
    singular = np.linalg.svd(w0, compute_uv=False)
    # the lesson's float32 figures against float64 numpy: rel 1e-5, ~100 float32 epsilons
    assert lesson.w0_singular_max == pytest.approx(singular.max(), rel=1e-5)
    blocks = (w0.T if family == "bert" else w0).reshape(h, d_head, d_model)
    assert lesson.head_block_norms == pytest.approx(np.linalg.norm(blocks, axis=(1, 2)), rel=1e-5)


@BOTH_FAMILIES
def test_w0_replacements_match_swapping_the_models_own_weight(request, fixture, family):
    path = request.getfixturevalue(fixture)
    layer = 0
    lesson = explain_w0(str(path), layer=layer)
    attention = load_attention(str(path))
    input_ids, padding, _ = make_inputs(attention, None, seed=0)
    valid = padding.bool()
    model = _eager(path)
    block, final = _run(model, family, layer, input_ids, padding)
    w0 = torch.from_numpy(attention.layer(layer).full("w0"))
    h, d_head = attention.dims.n_heads, attention.dims.d_head
    expected = {("identity", None): torch.eye(w0.shape[0])}
    for head in range(h):
        expected[("repeat", head)] = w0[head * d_head : (head + 1) * d_head].repeat(h, 1)
    assert {(r.kind, r.head) for r in lesson.replacements} == set(expected)
    layer_changes, final_changes = [], []
    for replacement in lesson.replacements:
        swapped = _eager(path)
        _set_w0(swapped, family, layer, expected[(replacement.kind, replacement.head)])
        new_block, new_final = _run(swapped, family, layer, input_ids, padding)
        layer_changes.append(_relative(new_block, block, valid))
        final_changes.append(_relative(new_final, final, valid))
        # two float32 forward passes of the same swapped model, summed in other orders: the
        # outputs agree to ~1e-6 relative, the changes (0.1 .. 1) to far better than rel 1e-4
        assert replacement.layer_output_relative_change == pytest.approx(
            layer_changes[-1], rel=1e-4
        )
        assert replacement.final_output_relative_change == pytest.approx(
            final_changes[-1], rel=1e-4
        )
    # the original W0 put back: float32 rounding only, on outputs of size ~1
    assert lesson.reinserted_max_abs_diff < 1e-5
    assert lesson.layer_output_change_range == pytest.approx(
        [min(layer_changes), max(layer_changes)], rel=1e-4
    )
    assert lesson.final_output_change_range == pytest.approx(
        [min(final_changes), max(final_changes)], rel=1e-4
    )


# ---- softmax --------------------------------------------------------------------------------


def test_softmax_steps_equal_the_models_attention_row(minilm):
    layer, head, token = 3, 5, 6
    lesson = explain_softmax(str(minilm), SENTENCE, layer=layer, head=head, token=token)
    from transformers import AutoTokenizer

    encoded = AutoTokenizer.from_pretrained(minilm)(SENTENCE, return_tensors="pt")
    model = _eager(minilm)
    with torch.no_grad():
        out = model(**encoded, output_attentions=True, output_hidden_states=True)
        x = out.hidden_states[layer][0]  # input of layer `layer`
        module = model.encoder.layer[layer].attention.self
        d_head = model.config.hidden_size // model.config.num_attention_heads
        part = slice(head * d_head, (head + 1) * d_head)
        q = module.query(x)[token, part]
        k = module.key(x)[:, part]
    row = out.attentions[layer][0, head, token]
    assert lesson.tokens == AutoTokenizer.from_pretrained(minilm).convert_ids_to_tokens(
        encoded["input_ids"][0]
    )
    assert lesson.keys == list(range(len(lesson.tokens)))
    # float32 dot products of 32 terms from two routes; raw scores reach tens: abs 1e-4 is
    # ~1e-6 of them. Probabilities lie in [0, 1]: abs 1e-6 (1e-7 for the model's own row, the
    # same tensor read back) is a few float32 ulps of 1
    assert lesson.raw_scores == pytest.approx((k @ q).tolist(), abs=1e-4)
    assert lesson.scale == pytest.approx(1 / math.sqrt(d_head))
    scores = torch.tensor(lesson.raw_scores) / math.sqrt(d_head)
    assert lesson.scores == pytest.approx(scores.tolist(), abs=1e-6)
    assert lesson.largest == pytest.approx(scores.max().item())
    assert lesson.exp_sum == pytest.approx((scores - scores.max()).exp().sum().item(), rel=1e-6)
    assert lesson.probs == pytest.approx(torch.softmax(scores, -1).tolist(), abs=1e-6)
    assert lesson.model_probs == pytest.approx(row.tolist(), abs=1e-7)
    assert lesson.max_abs_diff_vs_model == pytest.approx(
        (torch.tensor(lesson.probs) - row).abs().max().item(), abs=1e-7
    )
    assert lesson.max_abs_diff_vs_model < 1e-5  # probabilities: ~100 float32 ulps of 1
    assert lesson.ranking[0] == int(row.argmax())


def test_softmax_causal_query_sees_only_earlier_tokens(tiny_gpt2):
    lesson = explain_softmax(str(tiny_gpt2), layer=1, head=2, token=4)
    attention = load_attention(str(tiny_gpt2))
    input_ids, padding, _ = make_inputs(attention, None, seed=0)
    with torch.no_grad():
        out = _eager(tiny_gpt2)(input_ids=input_ids[:1], output_attentions=True)
    row = out.attentions[1][0, 2, 4]
    assert lesson.keys == [0, 1, 2, 3, 4]
    # probabilities in [0, 1], float32 from two routes: a few ulps of 1
    assert lesson.probs == pytest.approx(row[:5].tolist(), abs=1e-6)
    assert lesson.max_abs_diff_vs_model < 1e-5


def test_softmax_naive_formula_overflows_and_stable_does_not(tiny_gpt2):
    lesson = explain_softmax(str(tiny_gpt2))
    exact = torch.softmax(torch.tensor(lesson.scores, dtype=torch.float64), -1)
    for name in ("float16", "float32"):
        assert lesson.exp_overflow_threshold[name] == pytest.approx(
            math.log(torch.finfo(getattr(torch, name)).max)
        )
    cases = {(c.largest, c.dtype): c for c in lesson.overflow}
    for (largest, dtype), case in cases.items():
        shifted = torch.tensor(lesson.scores, dtype=torch.float64) + (largest - lesson.largest)
        naive = shifted.to(getattr(torch, dtype)).exp()
        assert case.naive_nonfinite == int((~(naive / naive.sum()).isfinite()).sum())
        assert math.isfinite(case.stable_max_abs_diff)
        # the stable formula's error is its dtype's rounding of probabilities <= 1: float16's
        # eps is 1e-3 (and exp of scores near 12 loses more), float32's 1.2e-7
        assert case.stable_max_abs_diff < (2e-2 if dtype == "float16" else 1e-6)
        if case.naive_max_abs_diff is not None:  # the same float64 subtraction: abs 1e-9
            assert case.naive_max_abs_diff == pytest.approx(
                ((naive / naive.sum()).double() - exact).abs().max().item(), abs=1e-9
            )
    assert lesson.naive_broken == sum(c.naive_nonfinite > 0 for c in lesson.overflow)
    assert lesson.stable_finite == len(lesson.overflow)  # the stable formula never breaks
    assert cases[(12.0, "float16")].naive_nonfinite > 0  # exp(12) > 65504
    assert cases[(12.0, "float32")].naive_nonfinite == 0
    assert cases[(89.0, "float32")].naive_nonfinite > 0  # exp(89) > 3.4e38


# ---- qkv ------------------------------------------------------------------------------------


def _per_head_grad_norms(model, family: str, layer: int, h: int) -> dict[str, list[float]]:
    """||dL/dW|| per head straight from the model's parameters' .grad."""
    if family == "bert":
        block = model.encoder.layer[layer].attention.self
        grads = {
            "wq": block.query.weight.grad,
            "wk": block.key.weight.grad,
            "wv": block.value.weight.grad,
        }  # [h*d_head, d_model]: head i's rows
        return {role: g.reshape(h, -1).norm(dim=1).tolist() for role, g in grads.items()}
    grad = model.h[layer].attn.c_attn.weight.grad  # [d_model, 3*d_model]: q | k | v columns
    d_model = grad.shape[0]
    return {
        role: grad[:, i * d_model : (i + 1) * d_model]
        .reshape(d_model, h, -1)
        .transpose(0, 1)
        .reshape(h, -1)
        .norm(dim=1)
        .tolist()
        for i, role in enumerate(("wq", "wk", "wv"))
    }


@BOTH_FAMILIES
def test_qkv_loss_gradients_and_sgd_step_match_autograd(request, fixture, family):
    import torch.nn.functional as F

    path = request.getfixturevalue(fixture)
    lr = 0.05
    lesson = explain_qkv(str(path), lr=lr)
    attention = load_attention(str(path))
    input_ids, padding, _ = make_inputs(attention, None, seed=0)
    ids = input_ids[:1, : int(padding[0].sum())]
    position = ids.shape[1] // 2
    masked = ids.clone()
    masked[0, position] = 0  # no tokenizer, so no mask token: id 0

    def stated_loss(model):
        """BERT: the middle token masked and predicted; GPT-2: every next token."""
        embeddings = model.get_input_embeddings().weight
        if family == "bert":
            logits = model(input_ids=masked).last_hidden_state[0, position] @ embeddings.T
            return F.cross_entropy(logits[None], ids[0, position : position + 1])
        logits = model(input_ids=ids).last_hidden_state[0, :-1] @ embeddings.T
        return F.cross_entropy(logits, ids[0, 1:])

    model = _eager(path)
    loss = stated_loss(model)
    loss.backward()
    if family == "bert":
        assert (lesson.masked_position, lesson.masked_token_id) == (position, int(ids[0, position]))
    else:
        assert lesson.loss_kind == "next_token" and lesson.masked_position is None
    # two float32 forward and backward passes of the same model: losses agree to ~1e-6
    # relative, gradients (longer sums, and near-zero entries: the abs floor) to ~1e-5
    assert lesson.loss == pytest.approx(loss.item(), rel=1e-5)
    h = attention.dims.n_heads
    for layer in lesson.layers:
        expected = _per_head_grad_norms(model, family, layer.layer, h)
        for role in ("wq", "wk", "wv"):
            assert layer.grad_norm_per_head[role] == pytest.approx(
                expected[role], rel=1e-4, abs=1e-8
            )
            assert layer.grad_norm[role] == pytest.approx(np.linalg.norm(expected[role]), rel=1e-4)
            # ΔW = -lr * grad up to float32 rounding of W + ΔW: ~6e-8 of weights of size ~0.1
            assert layer.update_vs_minus_lr_grad_max_abs_diff[role] < 1e-6
            weight = attention.layer(layer.layer).full(role)
            # float32 cannot resolve steps below ~1e-7 of a weight: hence the absolute tolerance
            assert layer.update_relative[role] == pytest.approx(
                lr * layer.grad_norm[role] / np.linalg.norm(weight), rel=1e-3, abs=1e-6
            )
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= lr * p.grad
        loss_after = stated_loss(model)
    # after a step from float32 weights updated in two orders: rel 1e-4 leaves room for it
    assert lesson.loss_after_step == pytest.approx(loss_after.item(), rel=1e-4)


def test_qkv_initial_and_trained_statistics(tiny_bert):
    lesson = explain_qkv(str(tiny_bert), seed=3)
    model = _eager(tiny_bert)
    assert lesson.initializer_range == model.config.initializer_range
    for layer in lesson.layers:
        module = model.encoder.layer[layer.layer].attention.self
        for role, linear in (("wq", module.query), ("wk", module.key), ("wv", module.value)):
            weight = linear.weight.detach().double()
            # the lesson's statistics in float32 against float64 torch: ~1e-6 relative
            assert layer.trained[role].std == pytest.approx(
                weight.std(unbiased=False).item(), rel=1e-4
            )
            assert layer.trained[role].singular_values == pytest.approx(
                torch.linalg.svdvals(weight).tolist(), rel=1e-5, abs=1e-9
            )
            singular = torch.linalg.svdvals(weight)
            assert layer.trained[role].singular_median == pytest.approx(
                singular.quantile(0.5).item()  # the middle value, or the mean of the two middle
            )
            assert layer.trained[role].spread == pytest.approx(
                (singular[0] / singular.quantile(0.5)).item(), rel=1e-5
            )
            # 48 x 48 normal draws: the sample std is within a few percent of the configured one
            assert layer.init[role].std == pytest.approx(model.config.initializer_range, rel=0.1)
            assert abs(layer.init[role].mean) < 0.005
    trained = [
        getattr(model.encoder.layer[layer].attention.self, name).weight.detach().double()
        for layer in range(len(lesson.layers))
        for name in ("query", "key", "value")
    ]
    assert lesson.mean_std_trained == pytest.approx(
        np.mean([w.std(unbiased=False).item() for w in trained]), rel=1e-4
    )
    spreads = [(s[0] / s.quantile(0.5)).item() for s in map(torch.linalg.svdvals, trained)]
    assert lesson.mean_spread_trained == pytest.approx(np.mean(spreads), rel=1e-5)
    assert lesson.spectra == (
        "steeper" if lesson.mean_spread_trained > lesson.mean_spread_init else "flatter"
    )


# ---- text, rendering, CLI -------------------------------------------------------------------


def _placeholders(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


def test_both_languages_have_the_same_keys_and_placeholders():
    assert TEXT["en"].keys() == TEXT["zh"].keys()
    for key, template in TEXT["en"].items():
        assert _placeholders(template) == _placeholders(TEXT["zh"][key]), key


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"LC_ALL": "zh_CN.UTF-8", "LANG": "en_US.UTF-8"}, "zh"),
        ({"LC_ALL": "", "LC_MESSAGES": "", "LANG": "zh_TW.UTF-8"}, "zh"),
        ({"LC_ALL": "", "LC_MESSAGES": "", "LANG": "de_DE.UTF-8"}, "en"),
    ],
)
def test_language_defaults_from_the_locale(monkeypatch, env, expected):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert resolve_language(None) == expected
    assert resolve_language("en") == "en"


@pytest.mark.parametrize(("lang", "marker"), [("zh", "问题二"), ("en", "Question 2")])
def test_softmax_renders_in_each_language(tiny_bert, lang, marker):
    result = CliRunner().invoke(main, ["explain", "softmax", str(tiny_bert), "--lang", lang])
    assert result.exit_code == 0, result.output
    assert marker in result.stdout
    assert "{" not in result.stdout  # every placeholder was filled


def test_rendered_race_and_check_use_the_models_numbers(minilm):
    from rich.console import Console

    from toolkit.render.lessons import lesson_blocks
    from toolkit.render.report import print_blocks

    lesson = explain_softmax(str(minilm), SENTENCE, layer=3, head=5, token=6)
    from transformers import AutoTokenizer

    encoded = AutoTokenizer.from_pretrained(minilm)(SENTENCE, return_tensors="pt")
    with torch.no_grad():
        row = _eager(minilm)(**encoded, output_attentions=True).attentions[3][0, 5, 6]
    top2 = row.topk(2)
    scores = torch.tensor(lesson.scores)
    gap = (scores[top2.indices[0]] - scores[top2.indices[1]]).item()
    # the race as fields: the model's two most attended keys, and their probabilities' ratio
    assert [lesson.keys[lesson.leader], lesson.keys[lesson.runner_up]] == top2.indices.tolist()
    # a ratio of float32 probabilities from two routes: rel 1e-4
    assert lesson.runner_up_share == pytest.approx((top2.values[1] / top2.values[0]).item(), 1e-4)
    assert lesson.keys[lesson.least] == row.argmin().item()  # BERT: every key is allowed
    console = Console(record=True, width=1000)
    print_blocks(lesson_blocks({"softmax": lesson}, "en"), console)
    text = console.export_text()
    assert f"takes {top2.values[0].item():.1%} of the attention" in text
    assert f"{gap:.2f} behind, so it gets e^-{gap:.2f} = {math.exp(-gap):.3f}" in text
    assert f": {top2.values[1].item():.1%}." in text


def test_json_has_the_numbers(tiny_bert):
    result = CliRunner().invoke(
        main, ["explain", "softmax", str(tiny_bert), "--json", "--head", "2"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["head"] == 2
    assert sum(data["probs"]) == pytest.approx(1, abs=1e-6)
    assert data["max_abs_diff_vs_model"] < 1e-5


def test_explain_all_writes_markdown_with_figures_and_json(tiny_bert, tmp_path):
    report = tmp_path / "report.md"
    result = CliRunner().invoke(
        main,
        ["explain", "all", str(tiny_bert), "--lang", "zh", "--json", "--markdown", str(report)]
        + ["--skip", "pretrained", "--skip", "lora"],  # they fine-tune; tiny_bert has no tokenizer
    )
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]  # JSON Lines
    data = {line.pop("lesson"): line for line in lines}
    assert list(data) == [name for name in LESSONS if name not in ("pretrained", "lora")]
    assert data["w0"]["w0_shape"] == [48, 48]
    text = report.read_text(encoding="utf-8")
    assert "问题一" in text and "问题二" in text and "问题三" in text
    figures = sorted(tmp_path.glob("report-*.png"))
    assert [f.name for f in figures] == ["report-qkv.png", "report-softmax.png", "report-w0.png"]
    for figure in figures:
        assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({figure.name})" in text
    assert not list(tmp_path.glob(".*tmp"))  # no temporary files left behind


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["softmax", "--layer", "7"], "layer 7 is out of range"),
        (["softmax", "--head", "3"], "head 3 is out of range"),
        (["softmax", "--token", "40"], "token 40 is out of range"),
        (["w0", "--layer", "2"], "layer 2 is out of range"),
        (["softmax", "--markdown", "no/such/folder/r.md"], "does not exist"),
    ],
)
def test_bad_arguments_give_one_line_errors(tiny_bert, args, message):
    result = CliRunner().invoke(main, ["explain", args[0], str(tiny_bert), *args[1:]])
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert message in result.stderr


def test_empty_text_is_a_one_line_error(minilm):
    result = CliRunner().invoke(main, ["explain", "softmax", str(minilm), "--text", "  "])
    assert result.exit_code == 1
    assert result.stderr.startswith("error: --text is empty") and result.stderr.count("\n") == 1
