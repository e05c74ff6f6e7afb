"""Our map-free safetensors reader and streaming writer agree with the safetensors library."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from toolkit.safetensors_format import FormatError, read_header, read_tensor, write_stream


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
