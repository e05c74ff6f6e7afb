"""The standard tensors equal what the model's own projection modules compute."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from toolkit import load_attention

pytestmark = pytest.mark.numerics  # CI reruns these under other CPU kernels


def _heads(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[batch, tokens, h*d_head] -> [batch, h, tokens, d_head]"""
    b, n, width = t.shape
    return t.view(b, n, n_heads, width // n_heads).transpose(1, 2)


def _standard_projection(layer, role, x):
    t = layer.as_torch()
    return torch.einsum("btd,hde->bhte", x, t["w" + role]) + t["b" + role][None, :, None, :]


def _bert_modules(model, index):
    block = model.encoder.layer[index].attention
    return {"q": block.self.query, "k": block.self.key, "v": block.self.value}, block.output.dense


def _gpt2_modules(model, index):
    block = model.h[index].attn
    d_model = block.c_proj.weight.shape[0]

    def part(i):
        return lambda x: block.c_attn(x)[..., i * d_model : (i + 1) * d_model]

    return {"q": part(0), "k": part(1), "v": part(2)}, block.c_proj


@pytest.mark.parametrize(
    ("fixture", "modules"),
    [
        ("tiny_bert", _bert_modules),
        ("tiny_gpt2", _gpt2_modules),
        ("tiny_gpt2_unscaled", _gpt2_modules),
        ("minilm", _bert_modules),
    ],
)
def test_per_head_qkv_and_w0_match_the_models_own_modules(request, fixture, modules):
    from transformers import AutoModel

    path = request.getfixturevalue(fixture)
    model = AutoModel.from_pretrained(path).eval()
    attention = load_attention(str(path))
    d = attention.dims
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, d.d_model, generator=generator)
    z = torch.randn(2, d.n_heads, 5, d.d_head, generator=generator)
    with torch.no_grad():
        for index in attention.layer_indices:
            layer = attention.layer(index)
            projections, output = modules(model, index)
            # float32 products of d_model terms in two orders; values of size ~1 (random x,
            # small weights): rounding ~1e-7, so atol 1e-5 has a wide margin
            for role, module in projections.items():
                expected = _heads(module(x), d.n_heads)
                assert torch.allclose(_standard_projection(layer, role, x), expected, atol=1e-5)
            concat = z.transpose(1, 2).reshape(2, 5, d.n_heads * d.d_head)
            t = layer.as_torch()
            per_head_sum = torch.einsum("bhte,hed->btd", z, t["w0"]) + t["b0"]
            assert torch.allclose(per_head_sum, output(concat), atol=1e-5)


def test_shapes_follow_the_standard_layout(tiny_bert):
    attention = load_attention(str(tiny_bert))
    layer = attention.layer(1)
    h, d_model, d_head = 3, 48, 16
    assert (attention.dims.n_heads, attention.dims.d_model, attention.dims.d_head) == (
        h,
        d_model,
        d_head,
    )
    assert layer.wq.shape == layer.wk.shape == layer.wv.shape == (h, d_model, d_head)
    assert layer.w0.shape == (h, d_head, d_model)
    assert layer.bq.shape == (h, d_head) and layer.b0.shape == (d_model,)


@pytest.mark.parametrize(
    ("base", "task"), [("tiny_bert", "tiny_bert_classifier"), ("tiny_gpt2", "tiny_gpt2_lm_scaled")]
)
def test_task_model_prefixes_are_found(request, base, task):
    from safetensors import safe_open

    path = request.getfixturevalue(task)
    attention = load_attention(str(path))
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        prefixed = [k for k in f.keys() if k.startswith(("bert.", "transformer."))]
    assert prefixed, "the task model should store prefixed names"
    assert attention.prefix in {"bert.", "transformer."}
    assert attention.layer(0).wq.shape[0] == attention.dims.n_heads


def test_sharded_checkpoint_reads_the_same_tensors(tiny_gpt2, tmp_path):
    from transformers import AutoModel

    AutoModel.from_pretrained(tiny_gpt2).save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    whole, sharded = load_attention(str(tiny_gpt2)), load_attention(str(tmp_path))
    for index in whole.layer_indices:
        for role, tensor in whole.layer(index).tensors().items():
            assert (sharded.layer(index).tensors()[role] == tensor).all()


def test_attention_parameter_count_matches_the_modules(tiny_bert):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tiny_bert)
    expected = sum(
        p.numel()
        for name, p in model.named_parameters()
        if ".attention.self." in name or ".attention.output.dense." in name
    )
    attention = load_attention(str(tiny_bert))
    assert attention.attention_parameters() == expected
    assert attention.total_parameters() == sum(p.numel() for p in model.parameters()) + sum(
        b.numel() for name, b in model.named_buffers() if name in attention.checkpoint.names()
    )


def test_in_memory_model_gives_the_same_tensors_as_its_checkpoint(tiny_bert_classifier):
    from transformers import AutoModelForSequenceClassification

    from toolkit.attention import attention_from_state_dict

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_classifier)
    live = attention_from_state_dict(model.state_dict(), model.config.to_dict())
    saved = load_attention(str(tiny_bert_classifier))
    for role, tensor in saved.layer(1).tensors().items():
        assert (live.layer(1).tensors()[role] == tensor).all()


def test_in_memory_tensors_are_snapshots_not_views(tiny_gpt2):
    """GPT-2's w0 needs no transpose: it must still not follow later in-place updates."""
    import torch
    from transformers import AutoModel

    from toolkit.attention import attention_from_state_dict

    model = AutoModel.from_pretrained(tiny_gpt2)
    snapshot = attention_from_state_dict(model.state_dict(), model.config.to_dict()).layer(0)
    before = snapshot.w0.copy(), snapshot.b0.copy()
    with torch.no_grad():
        model.h[0].attn.c_proj.weight.add_(1.0)
        model.h[0].attn.c_proj.bias.add_(1.0)
    # exact: a snapshot is a copy, untouched by the model's later in-place changes
    np.testing.assert_array_equal(snapshot.w0, before[0])
    np.testing.assert_array_equal(snapshot.b0, before[1])


def test_a_tracking_snapshot_reads_its_own_copy_without_copying_again(tiny_gpt2):
    """`snapshot_source` clones the parameters once (the training thread's only work for a
    snapshot); the writer then reads that clone in place (no second copy per tensor), and the
    model's later in-place updates reach neither."""
    import torch
    from transformers import AutoModel

    from toolkit.attention import attention_from_state_dict
    from toolkit.training.tracking import snapshot_source

    model = AutoModel.from_pretrained(tiny_gpt2)
    config = model.config.to_dict()
    live = attention_from_state_dict(model.state_dict(), config)
    source = snapshot_source(live, model.state_dict(), config, "step 1")
    name = live.prefix + live.family.layer_names(0, config)["w0"]
    clone = source.checkpoint._state_dict[name]
    assert np.shares_memory(source.checkpoint.get(name), clone.numpy())
    assert not np.shares_memory(live.checkpoint.get(name), model.state_dict()[name].numpy())
    before = source.layer(0).w0.copy()
    with torch.no_grad():
        model.h[0].attn.c_proj.weight.add_(1.0)
    np.testing.assert_array_equal(source.layer(0).w0, before)
    np.testing.assert_array_equal(live.layer(0).w0, before + np.float32(1.0))


# --- extract keeps a half-precision checkpoint's storage ---------------------------------------


@pytest.fixture(scope="module")
def bf16_models(tiny_llama, tiny_bert, tmp_path_factory):
    """The tiny Llama (no biases, grouped-query) and BERT (biases) saved in bfloat16 and float16."""
    from transformers import AutoModel

    folders = {}
    for name, source in (("llama", tiny_llama), ("bert", tiny_bert)):
        for dtype in (torch.bfloat16, torch.float16):
            folder = tmp_path_factory.mktemp(f"{name}-{str(dtype).split('.')[1]}")
            AutoModel.from_pretrained(source).to(dtype).save_pretrained(folder)
            folders[name, dtype] = folder
    return folders


def _file_dtypes(path) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        return {str(handle.get_slice(name).get_dtype()) for name in handle.keys()}


@pytest.fixture(params=["direct", "mapped"])
def write_route(request, monkeypatch):
    """Extract's two ways to the disk: direct I/O from its layout buffers, or (where the file
    system has no direct I/O) the new file's mapped pages. Yields the direct route's answers."""
    from toolkit import safetensors_format

    answers = []
    if request.param == "mapped":
        monkeypatch.setattr(safetensors_format, "write_direct", lambda *args, **kwargs: False)
    else:
        direct = safetensors_format.write_direct
        monkeypatch.setattr(
            safetensors_format,
            "write_direct",
            lambda *args, **kwargs: answers.append(direct(*args, **kwargs)) or answers[-1],
        )
    yield answers
    if request.param == "direct" and not all(answers):
        pytest.skip("this file system has no direct I/O: the mapped route wrote the file")


@pytest.mark.parametrize("name", ["llama", "bert"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_extract_keeps_half_storage_bit_for_bit(name, dtype, bf16_models, tmp_path, write_route):
    """Default extract of a bf16/f16 checkpoint writes that dtype, each per-head block equal bit
    for bit to the slice of the model's own weight (read by safetensors/torch, not the toolkit);
    --dtype float32 writes float32 of the same values. By either route to the disk."""
    from safetensors.torch import load_file
    from transformers import AutoModel

    from toolkit.analysis.summary import extract

    folder = bf16_models[name, dtype]
    kept, widened = tmp_path / "kept.safetensors", tmp_path / "f32.safetensors"
    result = extract(str(folder), kept)
    assert result["dtype"] == {torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]
    assert _file_dtypes(kept) == {{torch.bfloat16: "BF16", torch.float16: "F16"}[dtype]}
    assert extract(str(folder), widened, dtype="float32")["bytes"] == 2 * result["bytes"]
    assert _file_dtypes(widened) == {"F32"}

    model = AutoModel.from_pretrained(folder, dtype=dtype)
    tensors, wide = load_file(kept), load_file(widened)
    for index in range(model.config.num_hidden_layers):
        if name == "llama":
            attention = model.layers[index].self_attn
            q, k = attention.q_proj.weight, attention.k_proj.weight
        else:
            attention = model.encoder.layer[index].attention.self
            q, k = attention.query.weight, attention.key.weight
        heads, kv_heads = (
            model.config.num_attention_heads,
            getattr(model.config, "num_key_value_heads", model.config.num_attention_heads),
        )
        # nn.Linear weight [h * d_head, d_model]: head i's x @ W block is rows i's transpose
        expected_q = q.view(heads, -1, q.shape[1]).transpose(1, 2)
        expected_k = k.view(kv_heads, -1, k.shape[1]).transpose(1, 2)
        assert tensors[f"layers.{index}.wq"].dtype == dtype
        assert torch.equal(tensors[f"layers.{index}.wq"], expected_q)
        assert torch.equal(tensors[f"layers.{index}.wk"], expected_k)
        assert torch.equal(wide[f"layers.{index}.wq"], expected_q.float())
    # read back by the toolkit: the same float32 values from either file
    for index in load_attention(str(kept)).layer_indices:
        a, b = load_attention(str(kept)).layer(index), load_attention(str(widened)).layer(index)
        for role, tensor in a.tensors().items():
            assert tensor.dtype == np.float32 and np.array_equal(tensor, b.tensors()[role])


def test_extract_of_float32_checkpoints_stays_float32(tiny_gpt2, tmp_path):
    from toolkit.analysis.summary import extract

    out = tmp_path / "out.safetensors"
    assert extract(str(tiny_gpt2), out)["dtype"] == "float32"
    assert _file_dtypes(out) == {"F32"}


def test_extract_onto_a_full_disk_is_one_line_and_leaves_nothing(tmp_path):
    """The file is reserved (posix_fallocate) before it is mapped: no space is one clean line,
    exit 1, no partial file. A file-size limit (RLIMIT_FSIZE, its signal ignored) stands in
    for a full disk."""
    import resource
    import signal
    import subprocess
    import sys

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    out = tmp_path / "x.safetensors"
    done = subprocess.run(
        [sys.executable, "-m", "toolkit", "extract", "minilm", "-o", str(out)],
        capture_output=True,
        text=True,
        preexec_fn=small_files,
    )
    assert done.returncode == 1
    assert done.stderr.startswith(f"error: cannot write {out}") and done.stderr.count("\n") == 1
    assert list(tmp_path.iterdir()) == []
