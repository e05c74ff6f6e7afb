"""The lessons on a grouped-query, rotary, bias-free model (tiny Llama: 6 query heads sharing 2
key/value heads), every number checked against the model's own modules."""

from __future__ import annotations

import pytest
import torch

from toolkit.analysis.verify import verify
from toolkit.attention import load_attention
from toolkit.lessons.qkv import explain_qkv
from toolkit.lessons.softmax import explain_softmax
from toolkit.lessons.w0 import explain_w0
from toolkit.render.lessons import present_qkv, present_w0
from toolkit.render.report import Paragraph
from toolkit.runtime import make_inputs

pytestmark = pytest.mark.numerics  # CI reruns these under other CPU kernels


def _eager(path):
    from transformers import AutoModel

    return AutoModel.from_pretrained(path, attn_implementation="eager").eval()


def test_w0_sum_matches_the_model_and_a_swapped_o_proj(tiny_llama):
    layer = 1
    lesson = explain_w0(str(tiny_llama), layer=layer)
    report = verify(str(tiny_llama))
    assert (lesson.n_heads, lesson.n_kv_heads, lesson.d_head) == (6, 2, 10)
    assert lesson.w0_shape == [60, 48]  # h * d_head != d_model: no identity replacement
    # two float32 recomputations of the same block output (size ~0.1): rounding, far below 1e-6
    assert lesson.sum_vs_model_max_abs_diff == pytest.approx(
        report.layers[layer].max_abs_diff["output"], abs=1e-6
    )
    # "every head uses w0[2]": the same swap made in the model's own o_proj weight
    attention = load_attention(str(tiny_llama))
    input_ids, padding, _ = make_inputs(attention, None, seed=0)
    valid = padding.bool()
    model = _eager(tiny_llama)
    with torch.no_grad():
        before = model(input_ids=input_ids, attention_mask=padding).last_hidden_state
        w0 = torch.from_numpy(attention.layer(layer).full("w0"))  # [h*d_head, d_model]
        repeated = w0[20:30].repeat(6, 1)
        model.layers[layer].self_attn.o_proj.weight.copy_(repeated.T)
        after = model(input_ids=input_ids, attention_mask=padding).last_hidden_state
    expected = ((after - before)[valid].norm() / before[valid].norm()).item()
    (case,) = [r for r in lesson.replacements if r.kind == "repeat" and r.head == 2]
    # float32 forward passes summed in other orders: ~1e-6 of a change of size ~1
    assert case.final_output_relative_change == pytest.approx(expected, rel=1e-4)
    texts = [b.text for b in present_w0(lesson, "en") if isinstance(b, Paragraph)]
    assert any("6 query heads share 2 key/value heads" in t for t in texts)


def test_softmax_row_of_a_head_that_shares_its_keys(tiny_llama):
    """Query head 4 reads key/value head 1; its rotated scores give the model's row."""
    layer, head, token = 1, 4, 5
    lesson = explain_softmax(str(tiny_llama), layer=layer, head=head, token=token)
    attention = load_attention(str(tiny_llama))
    input_ids, padding, _ = make_inputs(attention, None, seed=0)
    with torch.no_grad():
        out = _eager(tiny_llama)(input_ids=input_ids[:1], output_attentions=True)
    row = out.attentions[layer][0, head, token]
    assert lesson.keys == list(range(token + 1))
    # probabilities in [0, 1], float32 from two routes: a few ulps of 1
    assert lesson.probs == pytest.approx(row[: token + 1].tolist(), abs=1e-6)
    assert lesson.max_abs_diff_vs_model < 1e-5


def test_qkv_gradients_per_key_value_head(tiny_llama):
    lesson = explain_qkv(str(tiny_llama), lr=0.05)
    import torch.nn.functional as F

    attention = load_attention(str(tiny_llama))
    input_ids, padding, _ = make_inputs(attention, None, seed=0)
    ids = input_ids[:1, : int(padding[0].sum())]
    model = _eager(tiny_llama)
    logits = model(input_ids=ids).last_hidden_state[0, :-1] @ model.embed_tokens.weight.T
    loss = F.cross_entropy(logits, ids[0, 1:])
    loss.backward()
    # two float32 forward/backward passes: losses to ~1e-6 relative, gradient norms to ~1e-5
    # (the abs floor for heads whose gradient is ~0)
    assert lesson.loss == pytest.approx(loss.item(), rel=1e-5)
    for layer in lesson.layers:
        block = model.layers[layer.layer].self_attn
        for role, linear, heads in (
            ("wq", block.q_proj, 6),
            ("wk", block.k_proj, 2),
            ("wv", block.v_proj, 2),
        ):
            expected = linear.weight.grad.reshape(heads, -1).norm(dim=1).tolist()
            assert layer.grad_norm_per_head[role] == pytest.approx(expected, rel=1e-4, abs=1e-8)
    for lang, words in (("en", "shared by 3 query heads"), ("zh", "由 3 个查询头共享")):
        texts = [b.text for b in present_qkv(lesson, lang) if isinstance(b, Paragraph)]
        assert any(words in t for t in texts)
