"""copy_into: the blocked copy of transposed views gives numpy's own copy, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from toolkit.layout import copy_into


def _views(rng: np.random.Generator, dtype) -> list[tuple[str, np.ndarray]]:
    """Views shaped like the per-head splits of Linear and Conv1D weights, odd sizes included."""

    def matrix(rows, columns):
        bits = rng.integers(0, 2**16, size=(rows, columns), dtype=np.uint16)
        return bits.view(np.float16).astype(dtype) if dtype != np.uint16 else bits

    # Heads not a power of two, d_head not 64. The views that are copied in blocks: rows of
    # d_model values (a multiple of 2 KB in every dtype here) and of h * d_head (over 4 KB).
    h, h_kv, d_head, d_model = 7, 3, 300, 1024
    q = matrix(h * d_head, d_model)  # nn.Linear [out, in]
    k = matrix(h_kv * d_head, d_model)
    o = matrix(d_model, h * d_head)
    fused = matrix(d_model // 2, 3 * d_model)  # Conv1D [in, out]
    return [
        ("wq of a Linear", q.reshape(h, d_head, d_model).transpose(0, 2, 1)),
        ("wk of a GQA Linear", k.reshape(h_kv, d_head, d_model).transpose(0, 2, 1)),
        ("w0 of a Linear", o.T.reshape(h, d_head, d_model)),
        ("transposed matrix", q.T),
        ("transposed with a step", q[::2].T),
        ("reversed rows", q.T[::-1]),
        ("reversed columns", q[::-1].T),
        ("a size-1 axis", q.T[None]),
        ("single row", q[:1].T.T),
        ("columns fewer than a block", q[:5].T),
        ("columns not a multiple of a block", q[:13].T),
        ("part of each row", q[:, :100].T),
        ("Conv1D split (rows contiguous)", fused[:, :d_model].reshape(d_model // 2, 16, 64)),
        ("contiguous", q),
        ("one dimension", q[:, 5]),
    ]


@pytest.mark.parametrize("dtype", [np.uint16, np.float16, np.float32, np.float64])
def test_copy_into_equals_numpys_copy_bit_for_bit(dtype):
    rng = np.random.default_rng(3)
    for label, view in _views(rng, dtype):
        expected = np.empty(view.shape, dtype)
        np.copyto(expected, view)
        got = np.full(view.shape, 7, dtype)  # not zeros: every element must be written
        copy_into(got, view)
        assert got.tobytes() == expected.tobytes(), label


def test_copy_into_casts_like_copyto_when_dtypes_differ():
    rng = np.random.default_rng(4)
    view = rng.standard_normal((40, 30)).T  # float64, transposed
    got = np.empty(view.shape, np.float32)
    copy_into(got, view)
    assert np.array_equal(got, view.astype(np.float32))


def test_copy_into_rejects_a_shape_numpy_rejects():
    with pytest.raises(ValueError):
        copy_into(np.empty((3, 4)), np.zeros((4, 3)))


def test_the_views_above_exercise_both_block_routes(monkeypatch):
    """The bit-for-bit test covers the blocked copies, not only numpy's: per head (wq, wk: one
    block copy per head) and whole matrix (w0: one for all heads)."""
    import toolkit.layout as layout

    calls = []
    copy_blocks = layout._copy_blocks
    monkeypatch.setattr(
        layout, "_copy_blocks", lambda out, view: (calls.append(view.shape), copy_blocks(out, view))
    )
    views = dict(_views(np.random.default_rng(3), np.float32))
    for label, heads in (("wq of a Linear", 7), ("wk of a GQA Linear", 3), ("w0 of a Linear", 1)):
        calls.clear()
        copy_into(np.empty(views[label].shape, np.float32), views[label])
        assert len(calls) == heads, label
