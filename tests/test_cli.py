"""The command line: JSON output checked against independent computations, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from toolkit import load_attention
from toolkit.cli import main


def run(*args: str, env: dict | None = None):
    return CliRunner().invoke(main, list(args), env=env)


def assert_clean_error(result, *words: str):
    """One line on stderr, non-zero exit, no traceback."""
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.output + result.stderr
    for word in words:
        assert word in lines[0]


def test_inspect_json_norms_match_the_models_parameters(tiny_bert):
    from transformers import AutoModel

    result = run("inspect", str(tiny_bert), "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert (data["family"], data["n_layers"], data["n_heads"], data["d_model"], data["d_head"]) == (
        "bert",
        2,
        3,
        48,
        16,
    )
    model = AutoModel.from_pretrained(tiny_bert)
    for entry in data["layers"]:
        query = model.encoder.layer[entry["layer"]].attention.self.query.weight  # [out, in]
        assert entry["wq"]["shape"] == [3, 48, 16]
        # norms of the same float32 weights, accumulated in two orders: rel 1e-5 is a margin
        assert entry["wq"]["fro"] == pytest.approx(torch.linalg.norm(query).item(), rel=1e-5)
        # head i owns output rows i*16..(i+1)*16 of the nn.Linear weight
        expected = [torch.linalg.norm(query[i * 16 : (i + 1) * 16]).item() for i in range(3)]
        assert entry["wq"]["head_fro"] == pytest.approx(expected, rel=1e-5)
        dense = model.encoder.layer[entry["layer"]].attention.output.dense.weight  # [out, in]
        expected_w0 = [torch.linalg.norm(dense[:, i * 16 : (i + 1) * 16]).item() for i in range(3)]
        assert entry["w0"]["head_fro"] == pytest.approx(expected_w0, rel=1e-5)


def test_inspect_layer_selection(tiny_gpt2):
    data = json.loads(run("inspect", str(tiny_gpt2), "--json", "--layer", "1").stdout)
    assert [entry["layer"] for entry in data["layers"]] == [1]


def test_inspect_table_shows_the_header(minilm):
    result = run("inspect")
    assert result.exit_code == 0
    assert (
        "minilm" in result.stdout and "heads 12" in result.stdout and "d_model 384" in result.stdout
    )


def test_extract_round_trips_through_load_attention(tiny_gpt2_lm_scaled, tmp_path):
    from safetensors import safe_open

    out = tmp_path / "attn.safetensors"
    result = run(
        "extract", str(tiny_gpt2_lm_scaled), "-o", str(out), "--layer", "0", "--layer", "2"
    )
    assert result.exit_code == 0, result.stderr
    with safe_open(str(out), "np") as f:
        assert set(f.keys()) == {
            f"layers.{layer}.{r}"
            for layer in (0, 2)
            for r in ("wq", "wk", "wv", "w0", "bq", "bk", "bv", "b0")
        }
        meta = f.metadata()
    assert (meta["family"], meta["n_heads"], meta["d_head"]) == ("gpt2", "4", "16")
    original, extracted = load_attention(str(tiny_gpt2_lm_scaled)), load_attention(str(out))
    assert extracted.layer_indices == (0, 2)
    for role, tensor in original.layer(2).tensors().items():  # exact: copied, not computed
        np.testing.assert_array_equal(extracted.layer(2).tensors()[role], tensor)
    # the extracted file is itself a model spec for inspect
    data = json.loads(run("inspect", str(out), "--json").stdout)
    assert [e["layer"] for e in data["layers"]] == [0, 2]


def test_verify_json_reports_every_layer(tiny_gpt2):
    result = run("verify", str(tiny_gpt2), "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["passed"] is True
    assert [entry["layer"] for entry in data["layers"]] == [0, 1]
    for entry in data["layers"]:
        # the absolute figures stay under their old key; the verdict's relative ones are added
        assert set(entry["max_abs_diff"]) == set(entry["max_rel_diff"]) == {"probs", "output"}
        assert set(entry["reference_max_abs"]) == {"probs", "output"}
        assert max(entry["max_rel_diff"].values()) <= data["tolerance"]


# --- bad input -------------------------------------------------------------------------------


def test_missing_folder(tmp_path):
    assert_clean_error(run("inspect", str(tmp_path / "nope")), "no such file or folder")


def test_unknown_hub_id_offline_fails_fast(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    assert_clean_error(
        run("inspect", "bert-base-uncased", env=env), "not in the Hugging Face cache"
    )


def test_unsupported_architecture_names_the_supported_families(tmp_path):
    from transformers import T5Config, T5Model

    config = T5Config(d_model=32, num_heads=2, num_layers=1, d_ff=32, d_kv=16, vocab_size=50)
    T5Model(config).save_pretrained(tmp_path)
    assert_clean_error(run("inspect", str(tmp_path)), "t5", "bert, biogpt, bloom")


def test_pickled_weights_are_refused_then_allowed_by_flag(tiny_bert, tmp_path):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tiny_bert)
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    assert_clean_error(run("inspect", str(tmp_path)), "pickled", "--allow-pickle")
    allowed = run("inspect", str(tmp_path), "--json", "--allow-pickle")
    assert allowed.exit_code == 0, allowed.stderr
    reference = json.loads(run("inspect", str(tiny_bert), "--json").stdout)
    assert json.loads(allowed.stdout)["layers"] == reference["layers"]
    assert run("verify", str(tmp_path), "--allow-pickle").exit_code == 0


def test_truncated_safetensors(tiny_bert, tmp_path):
    import shutil

    shutil.copy(tiny_bert / "config.json", tmp_path)
    data = (tiny_bert / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert_clean_error(run("inspect", str(tmp_path)), "corrupt or truncated")


def test_garbage_safetensors(tiny_bert, tmp_path):
    import shutil

    shutil.copy(tiny_bert / "config.json", tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 64)
    assert_clean_error(run("inspect", str(tmp_path)), "corrupt or truncated")


@pytest.mark.parametrize("command", ["inspect", "extract"])
def test_layer_out_of_range(tiny_bert, tmp_path, command):
    out = tmp_path / "x.safetensors"
    extra = ["-o", str(out)] if command == "extract" else []
    assert_clean_error(run(command, str(tiny_bert), "--layer", "7", *extra), "layer 7", "0-1")
    assert not out.exists()


def test_output_folder_missing(tiny_bert, tmp_path):
    out = tmp_path / "missing" / "x.safetensors"
    assert_clean_error(run("extract", str(tiny_bert), "-o", str(out)), "does not exist")
    assert not out.parent.exists()


def test_extract_leaves_no_partial_file_on_failure(tiny_bert, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_bert, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[:-100])
    out = tmp_path / "out.safetensors"
    assert_clean_error(run("extract", str(broken), "-o", str(out)))
    assert list(tmp_path.glob("*out.safetensors*")) == []


def test_verify_rejects_empty_text(minilm):
    assert_clean_error(run("verify", "--text", "  "), "empty")


def test_verify_exits_1_when_the_adapter_is_wrong(tiny_bert, monkeypatch):
    """A BERT adapter that forgets nn.Linear's transpose must be caught by verify."""
    import dataclasses

    import toolkit.families as families
    from toolkit.families.base import split_heads_in

    bert = families.family_by_name("bert")

    def untransposed(tensors, dims):
        right = bert.convert(tensors, dims)
        return {**right, "wk": split_heads_in(tensors["wk"], dims.n_heads)}

    wrong = dataclasses.replace(bert, convert=untransposed)
    monkeypatch.setattr(families, "FAMILIES", (wrong, *families.FAMILIES[1:]))
    result = run("verify", str(tiny_bert))
    assert result.exit_code == 1
    assert "FAIL" in result.stdout


def test_help_does_not_import_torch():
    code = "import sys; from toolkit.cli import main; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_python_dash_m_entry_point():
    out = subprocess.run(
        [sys.executable, "-m", "toolkit", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0 and "inspect" in out.stdout and "verify" in out.stdout


def test_verify_says_how_many_texts_of_how_many_tokens(minilm):
    from transformers import AutoTokenizer

    texts = ["attention is all you need", "hello"]
    padded = len(AutoTokenizer.from_pretrained(minilm)(texts[0])["input_ids"])
    result = run("verify", "--text", texts[0], "--text", texts[1])
    assert result.exit_code == 0, result.output
    assert f"input: 2 texts x {padded} tokens" in result.stdout


def test_a_finetune_run_folder_points_at_its_final_model(tiny_bert, tmp_path):
    import shutil

    shutil.copytree(tiny_bert, tmp_path / "run" / "final")
    (tmp_path / "run" / "shift").mkdir()
    assert_clean_error(run("inspect", str(tmp_path / "run")), str(tmp_path / "run" / "final"))


def test_threads_option_is_checked(minilm):
    assert_clean_error(run("--threads", "0", "inspect"), "--threads must be at least 1")


def test_qkv_terminal_output_mentions_no_figure(tiny_bert):
    result = run("explain", "qkv", str(tiny_bert), "--lang", "en")
    assert result.exit_code == 0, result.output
    assert "Singular values:" in result.stdout and "(figure)" not in result.stdout
