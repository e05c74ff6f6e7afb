"""Our map-free safetensors reader and streaming writer agree with the safetensors library."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from toolkit.safetensors_format import (
    DIRECT_BLOCK,
    BlockBuffers,
    FormatError,
    mapped_tensor,
    read_header,
    read_tensor,
    write_direct,
    write_stream,
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_read_tensor_matches_the_library_for_each_float_dtype(tmp_path, dtype):
    generator = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(3, 5, generator=generator).to(dtype), "b": torch.randn(7).to(dtype)}
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path), metadata={"k": "v"})
    header = read_header(path)
    assert header.metadata == {"k": "v"}
    for name, tensor in tensors.items():
        ours = read_tensor(path, header.tensors[name])
        assert ours.dtype == np.float32
        np.testing.assert_array_equal(ours, tensor.float().numpy())


def test_written_stream_reads_back_with_the_library(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"x.w": rng.standard_normal((2, 3, 4)), "x.b": rng.standard_normal(5)}
    path = tmp_path / "s.safetensors"
    # a transposed (non-contiguous) float64 view must come out as contiguous float32 values
    items = [("x.w", arrays["x.w"].transpose(0, 2, 1).transpose(0, 2, 1)), ("x.b", arrays["x.b"])]
    write_stream(path, {"x.w": (2, 3, 4), "x.b": (5,)}, items, {"format": "test"})
    with safe_open(str(path), "np") as f:
        assert f.metadata() == {"format": "test"}
        for name, array in arrays.items():
            np.testing.assert_array_equal(f.get_tensor(name), array.astype(np.float32))


def test_stream_out_of_order_is_refused(tmp_path):
    with pytest.raises(ValueError, match="out of order"):
        write_stream(
            tmp_path / "s", {"a": (2,), "b": (2,)}, [("b", np.zeros(2)), ("a", np.zeros(2))], {}
        )


def test_truncated_file_is_detected(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file({"a": torch.zeros(100)}, str(path))
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(FormatError, match="truncated"):
        read_header(path)


def test_header_length_past_the_end_is_detected(tmp_path):
    path = tmp_path / "t.safetensors"
    path.write_bytes((10**9).to_bytes(8, "little") + b"{}")
    with pytest.raises(FormatError, match="exceeds"):
        read_header(path)


def _direct_case():
    """Tensors whose byte ranges end off the 4096-byte blocks (odd float32 shapes, 2-byte
    halves), in three groups, and the same values written by the mapped route."""
    rng = np.random.default_rng(1)
    shapes = {
        "layers.0.w": (33, 65),
        "layers.0.b": (7,),
        "layers.1.w": (1024, 3),
        "layers.1.b": (1,),
        "layers.2.w": (5, 5, 41),
    }
    groups = [["layers.0.w", "layers.0.b"], ["layers.1.w", "layers.1.b"], ["layers.2.w"]]
    values = {name: rng.standard_normal(shape).astype(np.float16) for name, shape in shapes.items()}
    return shapes, groups, values


@pytest.mark.parametrize("threads", [1, 2])
def test_direct_write_reads_back_with_the_library_whatever_the_block_boundaries(tmp_path, threads):
    shapes, groups, values = _direct_case()
    buffers = BlockBuffers()
    laid_out = []

    def lay_out(group, views):
        laid_out.append(group)
        for name, view in views.items():
            view[...] = values[name]

    for path in (tmp_path / "a.safetensors", tmp_path / "b.safetensors"):  # buffers reused
        if not write_direct(path, shapes, {"k": "v"}, "F16", groups, lay_out, threads, buffers):
            pytest.skip(f"{tmp_path}'s file system has no direct I/O")
        header = read_header(path)
        data_start = min(info.start for info in header.tensors.values())
        assert data_start % DIRECT_BLOCK == 0
        # no padding left after the last tensor: the file is exactly header + data
        assert path.stat().st_size == max(info.end for info in header.tensors.values())
        with safe_open(str(path), "np") as f:
            assert f.metadata() == {"k": "v"}
            for name, value in values.items():
                np.testing.assert_array_equal(f.get_tensor(name), value)
    assert sorted(laid_out) == [0, 0, 1, 1, 2, 2]


def test_direct_write_refuses_groups_out_of_order(tmp_path):
    shapes, groups, _ = _direct_case()
    with pytest.raises(ValueError, match="in order"):
        write_direct(tmp_path / "x", shapes, {}, "F16", groups[::-1], lambda g, v: None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_a_mapped_tensor_is_the_stored_tensor_read_only(tmp_path, dtype):
    generator = torch.Generator().manual_seed(0)
    # 3 x 5000 float32 is 60,000 bytes: "b" starts past a page, off a page boundary
    tensors = {"a": torch.randn(3, 5000, generator=generator).to(dtype), "b": torch.randn(7)}
    tensors["b"] = tensors["b"].to(dtype)
    tensors["empty"] = torch.zeros(0, 4).to(dtype)
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path))
    header = read_header(path)
    for name, tensor in tensors.items():
        mapped = mapped_tensor(path, header.tensors[name])
        assert mapped.shape == tuple(tensor.shape) and not mapped.flags.writeable
        stored = tensor.view(torch.uint16) if dtype == torch.bfloat16 else tensor
        np.testing.assert_array_equal(mapped, stored.numpy())
