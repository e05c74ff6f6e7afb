"""`toolkit.runtime`: one tokenizer policy, and block hooks that never outlive their block."""

from __future__ import annotations

import shutil

import pytest
import torch

from toolkit import load_attention
from toolkit.errors import ToolkitError
from toolkit.runtime import captured_blocks, load_model, load_tokenizer, make_inputs


def _hook_count(net) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in net.modules())


def test_captured_blocks_match_the_model_and_leave_no_hook(tiny_bert):
    """Each captured block input is the hidden state entering that layer (the model's own
    output_hidden_states: a second route to the same tensor); outputs are caught for every layer."""
    attention = load_attention(tiny_bert)
    net = load_model(attention)
    input_ids, padding, _ = make_inputs(attention, None, seed=0)
    with torch.no_grad():  # transformers adds its own hooks for hidden states on first use
        net(input_ids=input_ids, attention_mask=padding, output_hidden_states=True)
    before = _hook_count(net)
    with captured_blocks(net, attention) as captured, torch.no_grad():
        outputs = net(input_ids=input_ids, attention_mask=padding, output_hidden_states=True)
        assert _hook_count(net) > before
    assert _hook_count(net) == before
    for layer in attention.layer_indices:
        torch.testing.assert_close(captured.inputs[layer], outputs.hidden_states[layer])
    assert sorted(captured.outputs) == list(attention.layer_indices)


def test_captured_blocks_remove_their_hooks_when_the_forward_pass_fails(tiny_bert):
    attention = load_attention(tiny_bert)
    net = load_model(attention)
    before = _hook_count(net)
    with pytest.raises(IndexError), captured_blocks(net, attention):
        net(input_ids=torch.tensor([[10**6]]))  # an id past the vocabulary
    assert _hook_count(net) == before


def test_a_model_without_tokenizer_files_has_none(tiny_bert):
    assert load_tokenizer(tiny_bert) is None


def test_tokenizer_files_that_do_not_load_are_an_error_not_absence(
    tiny_bert_with_tokenizer, tmp_path
):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_bert_with_tokenizer, broken)
    for name in ("tokenizer.json", "vocab.txt"):
        if (broken / name).exists():
            (broken / name).write_text("{ not a tokenizer")
    with pytest.raises(ToolkitError, match="does not load"):
        load_tokenizer(broken)


def test_every_loaded_tokenizer_can_pad(tiny_gpt2_lm_with_tokenizer):
    tokenizer = load_tokenizer(tiny_gpt2_lm_with_tokenizer)
    assert tokenizer.pad_token is not None
    assert tokenizer(["a", "a b c"], padding=True)["attention_mask"][0][-1] == 0
