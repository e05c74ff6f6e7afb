"""33 architectures beyond the seven first families, each a tiny random model built by
transformers from its own config class: inspect opens it, the extracted per-head tensors equal
the model's own projections, and verify recomputes its attention."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from toolkit import extract, load_attention, verify
from toolkit.render.text import say

pytestmark = pytest.mark.numerics  # CI reruns these under other CPU kernels

# Odd shapes where the config allows them: 6 heads, 2 key/value heads (groups of 3), d_head 10.
DECODER = {
    "hidden_size": 48,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "intermediate_size": 40,
    "vocab_size": 120,
    "max_position_embeddings": 64,
}
GQA = {**DECODER, "head_dim": 10}
ENCODER = {k: v for k, v in DECODER.items() if k != "num_key_value_heads"}
GPT_STYLE = {"n_embd": 48, "n_head": 6, "n_layer": 2, "vocab_size": 120, "n_positions": 64}

# model_type -> (config settings, where the model keeps q/k/v: how the test reads them)
#   ("separate", block, (q, k, v), o)   one nn.Linear each
#   ("blocks", block, qkv, o)          one nn.Linear, output [q; k; v]
#   ("groups", block, qkv, o)          one nn.Linear, output [h_kv, h/h_kv + 2, d_head]: each
#                                      key/value group's query heads, its key, its value
#   ("four groups", block, qkv, o)     CodeGen: output [4, 3 (q, v, k), h/4, d_head]
LLAMA_NAMES = ("separate", "layers.{}.self_attn", ("q_proj", "k_proj", "v_proj"), "o_proj")
BERT_NAMES = (
    "separate",
    "encoder.layer.{}.attention",
    ("self.query", "self.key", "self.value"),
    "output.dense",
)
FALCON_NAMES = ("groups", "h.{}.self_attention", "query_key_value", "dense")
MPNET_NAMES = ("separate", "encoder.layer.{}.attention", ("attn.q", "attn.k", "attn.v"), "attn.o")
MODELS = {
    "qwen3": (GQA, LLAMA_NAMES),
    "gemma": (GQA, LLAMA_NAMES),
    "gemma2": (
        {**GQA, "query_pre_attn_scalar": 12, "attn_logit_softcapping": 2.0, "sliding_window": 3},
        LLAMA_NAMES,
    ),
    "phi": (
        {**DECODER, "partial_rotary_factor": 0.5},
        ("separate", "layers.{}.self_attn", ("q_proj", "k_proj", "v_proj"), "dense"),
    ),
    "phi3": (
        {**DECODER, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
        ("blocks", "layers.{}.self_attn", "qkv_proj", "o_proj"),
    ),
    "olmo": (DECODER, LLAMA_NAMES),
    "olmo2": (DECODER, LLAMA_NAMES),
    "olmo3": ({**DECODER, "sliding_window": 3}, LLAMA_NAMES),  # rope settings per layer type
    "apertus": (DECODER, LLAMA_NAMES),
    "granite": ({**DECODER, "attention_multiplier": 0.3}, LLAMA_NAMES),
    "cohere": (DECODER, LLAMA_NAMES),
    "cohere:qk-norm": ({**DECODER, "use_qk_norm": True}, LLAMA_NAMES),
    "phi:qk-norm": (
        {**DECODER, "partial_rotary_factor": 0.5, "qk_layernorm": True},
        ("separate", "layers.{}.self_attn", ("q_proj", "k_proj", "v_proj"), "dense"),
    ),
    "stablelm:qk-norm": ({**DECODER, "qk_layernorm": True}, LLAMA_NAMES),
    "stablelm": ({**DECODER, "use_qkv_bias": True}, LLAMA_NAMES),
    "starcoder2": ({**DECODER, "sliding_window": 4}, LLAMA_NAMES),
    "gpt_neox": (
        {**ENCODER, "rotary_pct": 0.5},
        ("groups", "layers.{}.attention", "query_key_value", "dense"),
    ),
    "gptj": (
        {**GPT_STYLE, "rotary_dim": 4},
        ("separate", "h.{}.attn", ("q_proj", "k_proj", "v_proj"), "out_proj"),
    ),
    "falcon": (ENCODER, FALCON_NAMES),  # multi-query: one key/value head
    "falcon:multi-head": ({**ENCODER, "multi_query": False}, FALCON_NAMES),
    "falcon:grouped": (
        {**ENCODER, "new_decoder_architecture": True, "num_kv_heads": 2},
        FALCON_NAMES,
    ),
    "opt": (
        {**ENCODER, "ffn_dim": 40, "word_embed_proj_dim": 48},
        ("separate", "decoder.layers.{}.self_attn", ("q_proj", "k_proj", "v_proj"), "out_proj"),
    ),
    "bloom": (
        {**ENCODER, "n_head": 6, "n_layer": 2},
        ("groups", "h.{}.self_attention", "query_key_value", "dense"),
    ),
    "gpt_bigcode": (GPT_STYLE, ("groups", "h.{}.attn", "c_attn", "c_proj")),  # multi-query
    "gpt_bigcode:multi-head": (
        {**GPT_STYLE, "multi_query": False},
        ("groups", "h.{}.attn", "c_attn", "c_proj"),
    ),
    "mpt:softmax-scale": (
        {
            "d_model": 48,
            "n_heads": 6,
            "n_layers": 2,
            "expansion_ratio": 1,
            "max_seq_len": 64,
            "vocab_size": 120,
            "attn_config": {"softmax_scale": 0.2},
        },
        ("blocks", "blocks.{}.attn", "Wqkv", "out_proj"),
    ),
    "mpt": (
        {
            "d_model": 48,
            "n_heads": 6,
            "n_layers": 2,
            "expansion_ratio": 1,
            "max_seq_len": 64,
            "vocab_size": 120,
        },
        ("blocks", "blocks.{}.attn", "Wqkv", "out_proj"),
    ),
    "helium": ({**DECODER, "head_dim": 8}, LLAMA_NAMES),  # its o_proj ignores head_dim
    "glm": ({**GQA, "pad_token_id": 0}, LLAMA_NAMES),
    "smollm3": ({**DECODER, "no_rope_layers": [1, 0], "pad_token_id": 0}, LLAMA_NAMES),
    "mixtral": (
        {**DECODER, "num_local_experts": 2, "num_experts_per_tok": 1, "sliding_window": 3},
        LLAMA_NAMES,
    ),
    "qwen2_moe": (
        {
            **DECODER,
            "num_experts": 2,
            "num_experts_per_tok": 1,
            "moe_intermediate_size": 16,
            "shared_expert_intermediate_size": 16,
        },
        LLAMA_NAMES,
    ),
    "electra": (
        {**ENCODER, "embedding_size": 48},
        BERT_NAMES,
    ),
    "xlm-roberta": (
        ENCODER,
        BERT_NAMES,
    ),
    "mpnet": (ENCODER, MPNET_NAMES),  # a learned relative-position bias in every layer
    # the encoder buckets with 32 whatever relative_attention_num_buckets says
    "mpnet:64-buckets": ({**ENCODER, "relative_attention_num_buckets": 64}, MPNET_NAMES),
    "albert": (
        {**ENCODER, "embedding_size": 16},
        (
            "separate",
            "encoder.albert_layer_groups.0.albert_layers.0.attention",
            ("query", "key", "value"),
            "dense",
        ),
    ),
    "codegen": (
        {**GPT_STYLE, "n_head": 8, "rotary_dim": 4, "n_ctx": 64},
        ("four groups", "h.{}.attn", "qkv_proj", "out_proj"),
    ),
    "biogpt": (
        ENCODER,
        ("separate", "layers.{}.self_attn", ("q_proj", "k_proj", "v_proj"), "out_proj"),
    ),
    "xglm": (
        {
            "d_model": 48,
            "attention_heads": 6,
            "num_layers": 2,
            "ffn_dim": 40,
            "vocab_size": 120,
            "max_position_embeddings": 64,
        },
        ("separate", "layers.{}.self_attn", ("q_proj", "k_proj", "v_proj"), "out_proj"),
    ),
}
REFUSED = {
    "deberta-v2": (ENCODER, "disentangled attention"),
    "falcon:alibi": ({**ENCODER, "alibi": True}, "Falcon's ALiBi variant"),
    "albert:groups": ({**ENCODER, "embedding_size": 16, "inner_group_num": 2}, "layer groups"),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """model_type -> folder of its tiny model, built on first use."""
    from transformers import CONFIG_MAPPING, AutoModel

    folders = {}

    def build(model_type: str):
        if model_type not in folders:
            settings = {**MODELS, **REFUSED}[model_type][0]
            torch.manual_seed(len(folders))
            config = CONFIG_MAPPING[model_type.split(":")[0]](**settings)
            model = AutoModel.from_config(config)
            # larger than the default init, so a wrong head, scale or bias shows (as conftest)
            with torch.no_grad():
                for name, parameter in model.named_parameters():
                    if name.endswith("bias"):
                        parameter.normal_(0, 0.5)
                    elif parameter.dim() >= 2:
                        parameter.normal_(0, 0.2)
            folder = tmp_path_factory.mktemp(model_type)
            model.save_pretrained(folder)
            folders[model_type] = folder
        return folders[model_type]

    return build


def _heads(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[batch, tokens, n_heads*d_head] -> [batch, n_heads, tokens, d_head]"""
    b, n, width = t.shape
    return t.view(b, n, n_heads, width // n_heads).transpose(1, 2)


def _models_own_qkv(model, layout, layer: int, x: torch.Tensor, h: int, h_kv: int, d_head: int):
    """q, k, v [batch, heads, tokens, d_head] as the model's own modules compute them."""
    kind, block, names, _ = layout
    attention = model.get_submodule(block.format(layer))
    if kind == "separate":
        return [
            _heads(attention.get_submodule(n)(x), c)
            for n, c in zip(names, (h, h_kv, h_kv), strict=True)
        ]
    fused = attention.get_submodule(names)(x)  # [batch, tokens, width]
    b, t, _ = fused.shape
    if kind == "blocks":
        q, k, v = fused.split([h * d_head, h_kv * d_head, h_kv * d_head], dim=-1)
        return _heads(q, h), _heads(k, h_kv), _heads(v, h_kv)
    if kind == "groups":
        group = h // h_kv
        grouped = fused.view(b, t, h_kv, group + 2, d_head)
        q = grouped[:, :, :, :group].reshape(b, t, h, d_head).transpose(1, 2)
        return q, grouped[:, :, :, group].transpose(1, 2), grouped[:, :, :, -1].transpose(1, 2)
    grouped = fused.view(b, t, 4, 3, h // 4, d_head)  # four groups of [q; v; k]
    q, v, k = (grouped[:, :, :, i].reshape(b, t, h, d_head).transpose(1, 2) for i in range(3))
    return q, k, v


@pytest.mark.parametrize("model_type", sorted(MODELS))
def test_extracted_heads_are_the_models_own_projections(built, model_type, tmp_path):
    """The file `extract` writes holds, head by head, the model's own q/k/v projections and its
    output projection split by head: checked on random inputs through the model's modules.
    Relative tolerance 1e-5: float32 sums of 48 products in another order differ by ~1e-7."""
    from transformers import AutoModel

    folder = built(model_type)
    layout = MODELS[model_type][1]
    model = AutoModel.from_pretrained(folder).eval()
    out = tmp_path / "heads.safetensors"
    extract(str(folder), out)
    attention = load_attention(str(out))
    d = attention.dims
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, d.d_model, generator=generator)
    z = torch.randn(2, d.n_heads, 5, d.d_head, generator=generator)

    def close(ours, theirs):
        assert ours.shape == theirs.shape
        assert (ours - theirs).abs().max() <= 1e-5 * theirs.abs().max()

    with torch.no_grad():
        for index in attention.layer_indices:
            layer = attention.layer(index).as_torch()
            expected = _models_own_qkv(model, layout, index, x, d.n_heads, d.n_kv_heads, d.d_head)
            for role, theirs in zip("qkv", expected, strict=True):
                ours = torch.einsum("btd,hde->bhte", x, layer["w" + role])
                if "b" + role in layer:
                    ours = ours + layer["b" + role][None, :, None, :]
                close(ours, theirs)
            block = model.get_submodule(layout[1].format(index))
            concat = z.transpose(1, 2).reshape(2, 5, d.n_heads * d.d_head)
            per_head_sum = torch.einsum("bhte,hed->btd", z, layer["w0"])
            if "b0" in layer:
                per_head_sum = per_head_sum + layer["b0"]
            close(per_head_sum, block.get_submodule(layout[3])(concat))


@pytest.mark.parametrize("model_type", sorted(MODELS))
def test_verify_recomputes_the_models_attention(built, model_type):
    report = verify(str(built(model_type)))
    assert report.passed, report.layers
    assert len(report.layers) == 2


@pytest.mark.parametrize("model_type", sorted(MODELS))
def test_inspect_reads_the_config_dimensions(built, model_type):
    from click.testing import CliRunner
    from transformers import AutoConfig

    from toolkit.cli import main

    folder = built(model_type)
    result = CliRunner().invoke(main, ["inspect", str(folder), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    config = AutoConfig.from_pretrained(folder)
    assert data["n_heads"] == config.num_attention_heads
    assert data["d_model"] == config.hidden_size
    assert len(data["layers"]) == config.num_hidden_layers


@pytest.mark.parametrize("model_type", sorted(REFUSED))
def test_attention_we_cannot_recompute_is_refused_in_one_line(built, model_type, tmp_path):
    from click.testing import CliRunner

    from toolkit.cli import main

    folder, feature = built(model_type), REFUSED[model_type][1]
    out = tmp_path / "out.safetensors"
    for command in (["inspect", str(folder)], ["extract", str(folder), "-o", str(out)]):
        result = CliRunner().invoke(main, command)
        assert result.exit_code == 1
        assert feature in result.output and len(result.output.strip().splitlines()) == 1
        assert result.exception is None or isinstance(result.exception, SystemExit)
    assert not out.exists()


# --- each score detail is needed: without it verify fails ----------------------------------


def _without(built, model_type: str, **changes):
    attention = load_attention(str(built(model_type)))
    family = dataclasses.replace(attention.family, **changes)
    return verify(attention=dataclasses.replace(attention, family=family))


@pytest.mark.parametrize(
    ("model_type", "change"),
    [
        ("gemma2", {"logit_softcap": lambda config: None}),
        ("bloom", {"alibi": False}),
        ("mpt", {"alibi": False}),
        ("mpnet", {"relative_bias": None}),
        ("qwen3", {"qk_norms": None}),
        ("smollm3", {"rotary_on_layer": lambda config, layer: True}),
        ("granite", {"score_scale": lambda config, layer, dims: dims.d_head**-0.5}),
        ("gemma2", {"score_scale": lambda config, layer, dims: dims.d_head**-0.5}),
    ],
)
def test_verify_fails_without_the_score_detail(built, model_type, change):
    report = _without(built, model_type, **change)
    assert not report.passed
    assert max(max(c.max_abs_diff.values()) for c in report.layers) > 1e-2


def test_verify_fails_with_the_wrong_rotary_pairing(built):
    from toolkit.families.rotary import rotary_from_config

    report = _without(built, "cohere", rotary=lambda config: rotary_from_config(config, False))
    assert not report.passed


def test_relative_position_buckets_are_mpnets():
    """Our bucketing against transformers' own, over offsets key - query of both signs, within
    the exact range, across the log-spaced one and far beyond max_distance, for MPNet's 32
    buckets and 128 and for other settings of the same scheme."""
    from transformers.models.mpnet.modeling_mpnet import MPNetEncoder

    from toolkit.analysis.verify import relative_position_buckets

    offsets = torch.arange(-600, 601)
    for num_buckets, max_distance in ((32, 128), (64, 256), (16, 40)):
        ours = relative_position_buckets(offsets, num_buckets, max_distance)
        theirs = MPNetEncoder.relative_position_bucket(offsets, num_buckets, max_distance)
        assert torch.equal(ours, theirs), (num_buckets, max_distance)
    buckets = relative_position_buckets(offsets, 32, 128)
    # every bucket is reached but 16: offset 0 falls in the first half's bucket 0
    assert set(buckets.tolist()) == set(range(32)) - {16}


def test_relative_position_bias_is_the_encoders_own(built):
    """The bias verify adds, from the checkpoint's table, equals what MPNet's encoder computes
    for 300 tokens (past max_distance 128 in both directions): [1, heads, query, key]."""
    from transformers import AutoModel

    from toolkit.analysis.verify import relative_position_bias

    folder = built("mpnet")
    attention = load_attention(str(folder))
    ours = relative_position_bias(
        attention.relative_bias_table(), 300, attention.family.relative_bias
    )
    encoder = AutoModel.from_pretrained(folder).encoder
    with torch.no_grad():
        theirs = encoder.compute_position_bias(torch.zeros(1, 300, 48))
    assert ours.shape == (1, 6, 300, 300)
    assert torch.equal(ours, theirs)


def test_gemma2_slides_only_on_its_sliding_layers(built):
    report = _without(built, "gemma2", sliding_window=lambda config, layer: None)
    assert report.layers[0].max_abs_diff["probs"] > 1e-2  # layer 0: "sliding_attention"
    assert report.layers[1].max_abs_diff["probs"] <= 1e-4


def test_alibi_slopes_follow_the_published_rule():
    """Press et al.: 2^(-8/n), 2^(-16/n), ... for n a power of two; BLOOM's rule for 6 heads
    takes the 4-head slopes, then every other slope of the 8-head sequence."""
    from toolkit.analysis.verify import alibi_bias

    padding = torch.ones(1, 3, dtype=torch.long)
    slopes = alibi_bias(6, padding)[0, :, 0, 1]  # key position 1: the slope itself
    expected = [2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3]
    np.testing.assert_allclose(slopes.numpy(), expected, rtol=1e-7)
    np.testing.assert_allclose(
        alibi_bias(4, padding)[0, :, 0, 2].numpy(), [2 * 2 ** (-2 * i) for i in range(1, 5)]
    )


# --- bad input: one line, exit 1, nothing written ---------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_attention_heads": 7, "head_dim": None}, "7 heads do not divide d_model 48"),
        ({"num_key_value_heads": 4}, "do not form groups over 4 key/value heads"),
        ({"head_dim": 12}, "does not match its config.json"),
    ],
)
def test_a_config_that_contradicts_its_weights_is_one_line(built, tmp_path, change, message):
    import shutil

    from click.testing import CliRunner

    from toolkit.cli import main

    folder = tmp_path / "model"
    shutil.copytree(built("qwen3"), folder)  # 6 heads of 10, 2 key/value heads, d_model 48
    config = json.loads((folder / "config.json").read_text())
    config.update({k: v for k, v in change.items() if v is not None})
    config = {k: v for k, v in config.items() if k not in change or change[k] is not None}
    (folder / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out.safetensors"
    result = CliRunner().invoke(main, ["extract", str(folder), "-o", str(out)])
    assert result.exit_code == 1
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert not out.exists() and list(tmp_path.glob("out*")) == []


# every command that reads a model, with the file it would write: each refuses in one line,
# exit 1, and writes nothing
READING_COMMANDS = {
    "inspect": lambda model, out: ["inspect", model],
    "extract": lambda model, out: ["extract", model, "-o", out],
    "verify": lambda model, out: ["verify", model],
    "explain": lambda model, out: ["explain", "w0", model, "--markdown", out],
}


def _refused_everywhere(folder: Path, tmp_path: Path, *expected: str) -> None:
    from click.testing import CliRunner

    from toolkit.cli import main

    for command, arguments in READING_COMMANDS.items():
        out = tmp_path / f"{command}.out"
        result = CliRunner().invoke(main, arguments(str(folder), str(out)))
        assert result.exit_code == 1, (command, result.output)
        assert all(text in result.output for text in expected), (command, result.output)
        assert len(result.output.strip().splitlines()) == 1, (command, result.output)
        assert not out.exists(), command


def test_missing_attention_tensors_are_named(built, tmp_path):
    from safetensors.numpy import load_file, save_file

    folder = tmp_path / "model"
    folder.mkdir()
    source = built("phi3")
    (folder / "config.json").write_text((source / "config.json").read_text())
    tensors = load_file(str(source / "model.safetensors"))
    del tensors["layers.1.self_attn.qkv_proj.weight"]
    save_file(tensors, str(folder / "model.safetensors"))
    _refused_everywhere(folder, tmp_path, "layers.1.self_attn.qkv_proj.weight")


@pytest.mark.parametrize("model_type", sorted(MODELS))
def test_lora_targets_name_the_models_projection_modules(built, model_type):
    """peft matches target names as suffixes of module paths: every name the description gives
    must be, in every layer, an nn.Linear or Conv1D holding that role."""
    from transformers import AutoModel
    from transformers.pytorch_utils import Conv1D

    from toolkit.families import family_for_config

    folder = built(model_type)
    family = family_for_config(json.loads((folder / "config.json").read_text()))
    model = AutoModel.from_pretrained(folder)
    for target in set(family.lora_targets.values()):
        matches = [
            module
            for path, module in model.named_modules()
            if path == target or path.endswith("." + target)
        ]
        assert matches and all(isinstance(m, torch.nn.Linear | Conv1D) for m in matches)
        assert len(matches) in (1, model.config.num_hidden_layers)  # ALBERT shares one


# --- LoRA through the description's target names ----------------------------------------------


# model_type -> (config settings, layout as MODELS, LoRA targets, task): one per way of storing
# q/k/v, each with a role left out where the storage allows it (its heads must not move)
LORA_CASES = {
    "qwen3": (GQA, LLAMA_NAMES, "wq,wv", "causal-lm"),  # separate, grouped-query, q/k norms
    "phi3": (*MODELS["phi3"], "wq,wk,wv", "causal-lm"),  # fused [q; k; v]
    "gpt_neox": (*MODELS["gpt_neox"], "wq,wk,wv", "causal-lm"),  # fused per head
    "gpt2": (GPT_STYLE, ("blocks", "h.{}.attn", "c_attn", "c_proj"), "wq,wk,wv,w0", "causal-lm"),
    "gpt_bigcode": (*MODELS["gpt_bigcode"], "wq,wk,wv", "causal-lm"),  # multi-query, per group
    "mpt": (*MODELS["mpt"], "w0", "classification"),  # ALiBi, a new head trained beside
    # a task model's prefix (mpnet.); the relative-position bias table must not move
    "mpnet": (*MODELS["mpnet"], "wq,wv,w0", "classification"),
    "arcee": (DECODER, LLAMA_NAMES, "wk,w0", "causal-lm"),  # unregistered: by convention
}
CONV1D_TYPES = {"gpt2"}  # weight stored [in, out]


def _lora_run(model_type: str, corpus, reviews, folder):
    """(base folder, run folder) of 3 LoRA steps (r = 2, alpha = 6) on a tiny random model."""
    from transformers import (
        CONFIG_MAPPING,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
    )

    import toolkit
    from toolkit.training.data import train_bpe_tokenizer
    from toolkit.training.recipe import FinetuneConfig

    settings, _, targets, task = LORA_CASES[model_type]
    tokenizer = train_bpe_tokenizer(corpus.read_text().splitlines(), 300)
    settings = {**settings, "vocab_size": len(tokenizer)}
    causal = task == "causal-lm"
    model_class = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
    torch.manual_seed(0)
    base = folder / "base"
    model = model_class.from_config(CONFIG_MAPPING[model_type](**settings, num_labels=2))
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    run = folder / "run"
    toolkit.finetune(
        FinetuneConfig(
            model=str(base),
            dataset=str(corpus if causal else reviews),
            task=task,
            output_dir=str(run),
            method="lora",
            lora_rank=2,
            lora_alpha=6.0,
            lora_dropout=0.0,
            lora_targets=targets,
            max_length=16,
            max_steps=3,
            learning_rate=5e-2,
            warmup_ratio=0.0,
        )
    )
    return base, run


def _adapter_deltas(run, conv1d: bool) -> dict[str, torch.Tensor]:
    """Saved weight name -> (alpha/r)·B·A (float64) read from the PEFT adapter file, in the
    saved weight's own orientation ([in, out] for Conv1D)."""
    from safetensors.torch import load_file

    adapter = load_file(run / "adapter" / "adapter_model.safetensors")
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    deltas = {}
    for name in adapter:
        if name.endswith(".lora_A.weight"):
            module = name.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            a = adapter[name].double()  # [r, in]
            b = adapter[name.replace(".lora_A.", ".lora_B.")].double()  # [out, r]
            delta = scale * b @ a  # [out, in]
            deltas[module + ".weight"] = delta.T if conv1d else delta
    return deltas


def _heads_of(delta: torch.Tensor, layout, module: str, h: int, h_kv: int, d_head: int) -> dict:
    """role -> the per-head [heads, d_model, d_head] (w0: [h, d_head, d_model]) pieces of a
    module's weight change [out, in], sliced by the test's own reading of the layout."""
    kind, _, names, o = layout
    if module == o:
        return {"w0": delta.T.reshape(h, d_head, -1)}
    if kind == "separate":
        role = "wqkv"[1 + names.index(module)]
        heads = h if role == "q" else h_kv
        return {"w" + role: delta.view(heads, d_head, -1).transpose(1, 2)}
    slices = _weight_slices(delta, kind, h, h_kv, d_head)
    return {"w" + r: w.transpose(1, 2) for r, w in slices.items()}


@pytest.mark.parametrize("model_type", sorted(LORA_CASES))
def test_lora_final_is_w_plus_scaled_b_a_in_the_heads_it_targets(
    model_type, toy_corpus_txt, toy_sentiment_csv, tmp_path, one_torch_thread
):
    """A few LoRA steps on each way of storing attention, the unregistered convention included.
    `final/` (merged) minus the start equals (alpha/r)·B·A computed from the saved adapter
    tensors, every other weight is unchanged (the classifier's new head aside), and the per-head
    tensors `extract` reads from `final/` move by exactly that product's slices for each head,
    in the targeted roles only. Tolerance 1e-6 of the weights' magnitude: the merged weight is
    one float32 rounding of W + ΔW (2^-24 relative), ΔW a float32 product of rank 2."""
    from safetensors.torch import load_file

    settings, layout, targets, task = LORA_CASES[model_type]
    base, run = _lora_run(model_type, toy_corpus_txt, toy_sentiment_csv, tmp_path)
    conv1d = model_type in CONV1D_TYPES
    deltas = _adapter_deltas(run, conv1d)
    before = load_file(base / "model.safetensors")
    after = load_file(run / "final" / "model.safetensors")
    scale = max(t.abs().max().item() for t in before.values())
    assert deltas
    for name, weight in before.items():
        change = after[name].double() - weight.double()
        if name in deltas:
            assert deltas[name].abs().max() > 1e-3 * scale, name  # B has moved off zero
            assert (change - deltas[name]).abs().max() <= 1e-6 * scale, name
        elif not name.startswith(("score.", "classifier.")):
            assert not change.any(), name

    start, final = load_attention(str(base)), load_attention(str(run / "final"))
    d = start.dims
    kind, block, names, o = layout
    modules = [o] + ([names] if isinstance(names, str) else list(names))
    for index in start.layer_indices:
        expected = {}
        for module in modules:
            path = f"{block.format(index)}.{module}.weight"
            saved = [n for n in deltas if n == path or n.endswith("." + path)]
            if saved:
                delta = deltas[saved[0]].T if conv1d else deltas[saved[0]]  # [out, in]
                expected.update(_heads_of(delta, layout, module, d.n_heads, d.n_kv_heads, d.d_head))
        assert set(expected) == set(targets.split(","))
        for role in ("wq", "wk", "wv", "w0"):
            moved = torch.from_numpy(getattr(final.layer(index), role)).double()
            moved -= torch.from_numpy(getattr(start.layer(index), role)).double()
            if role in expected:
                assert moved.shape == expected[role].shape, role
                assert (moved - expected[role]).abs().max() <= 1e-6 * scale, (index, role)
            else:
                assert not moved.any(), (index, role)


def test_lora_on_attention_we_cannot_recompute_is_refused_in_one_line(
    built, toy_sentiment_csv, tmp_path
):
    from click.testing import CliRunner

    from toolkit.cli import main

    out = tmp_path / "run"
    argv = ["finetune", "--model", str(built("deberta-v2")), "--dataset", str(toy_sentiment_csv)]
    result = CliRunner().invoke(main, [*argv, "--method", "lora", "--output-dir", str(out)])
    assert result.exit_code == 1
    assert "disentangled attention" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not out.exists()


def test_lora_refuses_a_projection_that_is_not_a_linear_layer():
    """peft adapts nn.Linear and Conv1D here: a model whose q_proj is something else (one layer
    of it swapped for a custom module) is refused naming the module, before peft is called."""
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    from toolkit.errors import ToolkitError
    from toolkit.training.lora import wrap_with_lora
    from toolkit.training.recipe import FinetuneConfig

    class Projection(torch.nn.Module):
        def __init__(self, linear: torch.nn.Linear):
            super().__init__()
            self.weight = linear.weight

        def forward(self, x):
            return x @ self.weight.T

    model = AutoModelForCausalLM.from_config(CONFIG_MAPPING["qwen3"](**GQA))
    attention = model.model.layers[1].self_attn
    attention.q_proj = Projection(attention.q_proj)
    config = FinetuneConfig(dataset="x", output_dir="x", method="lora", task="causal-lm")
    with pytest.raises(ToolkitError, match=r"'self_attn.q_proj' is not an nn.Linear or Conv1D"):
        wrap_with_lora(model, config)


# --- an unregistered model_type is tried by the common names ----------------------------------


def _unregistered(model_type: str, folder):
    from transformers import CONFIG_MAPPING, AutoModel

    settings = {k: v for k, v in DECODER.items()}
    torch.manual_seed(0)
    model = AutoModel.from_config(CONFIG_MAPPING[model_type](**settings))
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2:
                parameter.normal_(0, 0.2)
    model.save_pretrained(folder)
    return folder


def test_an_unregistered_llama_like_model_is_read_by_convention_and_verified(tmp_path):
    """Arcee (not in the registry) keeps Llama's q/k/v/o_proj: read by the common names, with a
    note, and verify confirms the recomputation."""
    import subprocess
    import sys

    folder = _unregistered("arcee", tmp_path / "arcee")
    run = subprocess.run(
        [sys.executable, "-m", "toolkit", "verify", str(folder), "--json"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert "note: model_type 'arcee' is not registered" in run.stderr
    assert json.loads(run.stdout)["passed"] is True


def test_verify_says_when_the_convention_is_wrong(tmp_path):
    """EXAONE 4 normalises q and k, which the convention does not know: the recomputation is
    read and run, and verify fails (exit 1) instead of passing silently."""
    from click.testing import CliRunner

    from toolkit.cli import main

    folder = _unregistered("exaone4", tmp_path / "exaone4")
    result = CliRunner().invoke(main, ["verify", str(folder)])
    assert result.exit_code == 1 and "FAIL" in result.output


def test_a_model_following_no_pattern_is_refused_in_one_line(tmp_path):
    folder = _unregistered("persimmon", tmp_path / "persimmon")  # fused query_key_value
    _refused_everywhere(folder, tmp_path, "'persimmon'", "none of the common names")


# --- compare and the lessons on the new layouts -------------------------------------------------


@pytest.mark.parametrize("model_type", ["bloom", "codegen", "albert", "falcon"])
def test_compare_with_itself_is_zero_in_every_head(built, model_type):
    from toolkit import compare

    result = compare(built(model_type), built(model_type))
    assert result.mode == "elementwise"
    for layer in result.layers:
        assert layer.head_relative_change() == [0.0] * result.a.n_heads


@pytest.mark.parametrize("model_type", ["qwen3", "bloom", "gemma2", "smollm3", "mpnet"])
def test_w0_lesson_sums_heads_to_the_models_own_output(built, model_type):
    """The lesson's sum_i z_i @ w0[i] + b0 equals the attention block output the model itself
    computed, with the q/k norms, ALiBi, soft-cap, NoPE layers and relative-position bias each
    model has."""
    from toolkit.lessons.w0 import explain_w0

    for layer in (0, 1):
        lesson = explain_w0(str(built(model_type)), layer=layer)
        assert lesson.sum_vs_model_max_abs_diff <= 1e-4


def test_softmax_lesson_uses_the_q_k_norms(built):
    from toolkit.lessons.softmax import explain_softmax

    lesson = explain_softmax(str(built("qwen3")), layer=1, head=4)
    assert lesson.max_abs_diff_vs_model <= 1e-5  # probabilities <= 1: float32 rounding ~1e-7


@pytest.mark.parametrize(
    ("model_type", "feature"),
    [("bloom", "ALiBi"), ("gemma2", "soft-cap"), ("mpnet", "relative-position bias")],
)
def test_softmax_lesson_refuses_scores_it_does_not_show(built, model_type, feature):
    from click.testing import CliRunner

    from toolkit.cli import main

    result = CliRunner().invoke(main, ["explain", "softmax", str(built(model_type))])
    assert result.exit_code == 1
    assert feature in result.output and len(result.output.strip().splitlines()) == 1


def test_qkv_lesson_refuses_embeddings_narrower_than_the_hidden_states(built):
    """ALBERT's factorised embeddings (16 wide, d_model 48) cannot score its hidden states: the
    lesson's tied-embedding loss does not apply, said in one line."""
    from click.testing import CliRunner

    from toolkit.cli import main

    result = CliRunner().invoke(main, ["explain", "qkv", str(built("albert"))])
    assert result.exit_code == 1
    assert "which are 16 wide" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_explain_all_notes_a_lesson_that_does_not_apply_and_goes_on(built):
    from click.testing import CliRunner

    from toolkit.cli import main

    argv = ["explain", "all", str(built("bloom")), "--skip", "pretrained", "--skip", "lora"]
    result = CliRunner().invoke(main, [*argv, "--json"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    lessons = {line["lesson"]: line for line in map(json.loads, lines)}
    assert lessons["softmax"]["applies"] is False and "ALiBi" in lessons["softmax"]["reason"]
    assert lessons["w0"]["sum_vs_model_max_abs_diff"] <= 1e-4  # the others ran in full
    assert lessons["qkv"]["update_max_abs_diff"] <= 1e-6
    shown = CliRunner().invoke(main, argv).output
    skipped = [line for line in shown.splitlines() if "Skipped:" in line]
    assert len(skipped) == 1 and "ALiBi" in skipped[0]
    # the report's sentence is the error's, and in Chinese a Chinese one
    softmax = lessons["softmax"]
    assert say("en", softmax["key"], **softmax["values"]) == softmax["reason"]
    chinese = CliRunner().invoke(main, [*argv, "--lang", "zh"]).output
    skipped = [line for line in chinese.splitlines() if "已跳过" in line]
    assert len(skipped) == 1 and "ALiBi" in skipped[0] and "bloom" in skipped[0]
    assert "does not apply" not in chinese


def test_every_skip_reason_matches_its_error_in_english(built):
    """The qkv lesson's refusal on ALBERT and the softmax lesson's on Gemma 2 and MPNet: the
    English sentence of the report is the one-line error, word for word."""
    from toolkit.errors import LessonDoesNotApply
    from toolkit.lessons.qkv import explain_qkv
    from toolkit.lessons.softmax import explain_softmax

    cases = ((explain_qkv, "albert"), (explain_softmax, "gemma2"), (explain_softmax, "mpnet"))
    for lesson, model_type in cases:
        with pytest.raises(LessonDoesNotApply) as raised:
            lesson(str(built(model_type)))
        error = raised.value
        assert error.key and say("en", error.key, **error.values) == str(error)
        assert say("zh", error.key, **error.values) != str(error)


def test_lessons_on_a_multi_query_model_speak_of_one_key_value_head(built):
    """GPT-BigCode keeps one key/value head: the lessons say multi-query, not groups of 6, and
    the qkv lesson's single wk/wv head carries the whole matrix's gradient (relative 1e-12:
    float64 sums of the same squares)."""
    from toolkit.lessons.qkv import explain_qkv
    from toolkit.lessons.w0 import explain_w0
    from toolkit.render.lessons import present_qkv, present_w0
    from toolkit.render.report import Paragraph

    folder = str(built("gpt_bigcode"))
    qkv = explain_qkv(folder)
    for lesson, present in ((explain_w0(folder), present_w0), (qkv, present_qkv)):
        for lang in ("en", "zh"):
            texts = " ".join(b.text for b in present(lesson, lang) if isinstance(b, Paragraph))
            assert ("multi-query" if lang == "en" else "多查询注意力") in texts
            assert "grouped-query" not in texts and "分组查询" not in texts
    for layer in qkv.layers:
        for role in ("wk", "wv"):
            (head,) = layer.grad_norm_per_head[role]
            assert head == pytest.approx(layer.grad_norm[role], rel=1e-12)


def test_a_file_extracted_by_convention_opens_again(tmp_path):
    folder = _unregistered("arcee", tmp_path / "arcee")
    out = tmp_path / "arcee.safetensors"
    extract(str(folder), out)
    saved, original = load_attention(str(out)), load_attention(str(folder))
    assert saved.family.name == "arcee" and saved.family.by_convention
    assert saved.positions() == original.positions()
    np.testing.assert_array_equal(saved.layer(1).wk, original.layer(1).wk)


# --- fused q/k/v in bfloat16: extract is a bit-exact copy, inspect's norms are the slices' ------


def _weight_slices(weight: torch.Tensor, kind: str, h: int, h_kv: int, d_head: int) -> dict:
    """role -> [heads, ...] rows of a fused projection's weight [out, ...] (or bias [out]) that
    each head's q, k or v is computed from, sliced by torch from the model's own parameter."""
    rest = weight.shape[1:]
    if kind == "blocks":
        q, k, v = weight.split([h * d_head, h_kv * d_head, h_kv * d_head])
        return {
            "q": q.view(h, d_head, *rest),
            "k": k.view(h_kv, d_head, *rest),
            "v": v.view(h_kv, d_head, *rest),
        }
    group = h // h_kv  # "groups": rows [h_kv, group + 2, d_head]
    grouped = weight.view(h_kv, group + 2, d_head, *rest)
    return {
        "q": grouped[:, :group].reshape(h, d_head, *rest),
        "k": grouped[:, group],
        "v": grouped[:, group + 1],
    }


@pytest.mark.parametrize("model_type", ["gpt_neox", "bloom", "phi3", "falcon:grouped"])
def test_fused_bf16_heads_are_the_models_own_slices_bit_for_bit(built, model_type, tmp_path):
    """A fused-qkv checkpoint in bfloat16 (odd shapes: 6 heads of 8, or 6 over 2 key/value
    heads): each per-head block `extract` writes equals, bit for bit, the slice of the model's
    own bfloat16 weight, and `inspect`'s per-head norms are those slices' norms (torch, float64).
    Norm tolerance 1e-12 relative: float64 sums of at most 400 squares in another order."""
    from safetensors.torch import load_file
    from transformers import AutoModel

    from toolkit import inspect_model

    kind, block, qkv, o = MODELS[model_type][1]
    folder = tmp_path / "bf16"
    AutoModel.from_pretrained(built(model_type)).to(torch.bfloat16).save_pretrained(folder)
    model = AutoModel.from_pretrained(folder, dtype=torch.bfloat16)
    out = tmp_path / "heads.safetensors"
    assert extract(str(folder), out)["dtype"] == "bfloat16"
    tensors = load_file(out)
    summary = inspect_model(str(folder))
    d = load_attention(str(folder)).dims
    for index in range(d.n_layers):
        attention = model.get_submodule(block.format(index))
        fused = attention.get_submodule(qkv)
        weights = _weight_slices(fused.weight, kind, d.n_heads, d.n_kv_heads, d.d_head)
        expected = {"w" + r: w.transpose(1, 2) for r, w in weights.items()}  # [h, d_model, d_head]
        dense = attention.get_submodule(o).weight  # [d_model, h * d_head]
        expected["w0"] = dense.T.reshape(d.n_heads, d.d_head, d.d_model)
        if fused.bias is not None:
            biases = _weight_slices(fused.bias, kind, d.n_heads, d.n_kv_heads, d.d_head)
            expected.update({"b" + r: b for r, b in biases.items()})
        for role, theirs in expected.items():
            ours = tensors[f"layers.{index}.{role}"]
            assert ours.dtype == torch.bfloat16 and torch.equal(ours, theirs), role
        layer = summary.layers[index]
        for role in ("wq", "wk", "wv", "w0"):
            norms = expected[role].double().flatten(1).norm(dim=1)
            got = torch.tensor(getattr(layer, role).head_fro, dtype=torch.float64)
            # half-precision heads: exact float32 squares, float32 pairwise sums per contiguous
            # run (< ~20 float32 epsilons = 1.2e-6 relative for positive terms), float64 after
            assert torch.allclose(got, norms, rtol=2e-6, atol=0), role
