"""The Python API a user meets first: dir(toolkit) and the printed model."""

from __future__ import annotations

import toolkit


def test_dir_lists_the_public_api_and_every_name_resolves():
    assert sorted(dir(toolkit)) == sorted([*toolkit.__all__, "__version__"])
    for name in toolkit.__all__:
        assert getattr(toolkit, name) is not None


def test_printed_model_is_short_and_shows_its_dimensions(tiny_gpt2):
    import json

    config = json.loads((tiny_gpt2 / "config.json").read_text())
    text = repr(toolkit.load_attention(tiny_gpt2))
    assert f"layers={config['n_layer']}" in text and f"heads={config['n_head']}" in text
    assert f"d_model={config['n_embd']}" in text
    assert f"d_head={config['n_embd'] // config['n_head']}" in text
    assert "function" not in text and " at 0x" not in text and len(text) < 200
