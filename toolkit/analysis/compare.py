"""`compare`: how two models' Wq/Wk/Wv/W0 differ, per layer, head and matrix: the run (which
layers are compared with which, in this process or in worker processes).

Two modes:

- elementwise (same family and dimensions, e.g. a checkpoint and its fine-tuned child): for every
  layer, head and matrix, ||ΔW||_F, ||ΔW||_F / ||W_a||_F and the cosine of the flattened weights;
  per layer and full matrix the spectrum of ΔW = W_b - W_a (stable rank, effective rank, share of
  ||ΔW||_F^2 in the top-k singular values) and the LoRA measures (Hu et al. 2021, section 7);
  per head the change of the QK and OV circuits.
- structural (different families or sizes): element-wise differences between unrelated bases mean
  nothing, so each model is described on its own (normalised spectra, ranks, norms, spread of the
  per-head norms, QK/OV circuit spectra) and layers are set side by side at matched relative depth.

Both read one layer of each model at a time; in elementwise mode layers are computed in parallel
by one-thread worker processes (one per usable core or requested thread, at most
MAX_LAYER_WORKERS; in this process for small jobs). numpy and scipy only: no torch import (2.5 s
of start-up). The results are in `toolkit.analysis.comparison`, the linear algebra in
`toolkit.analysis.spectra`; the names other modules use from either are importable from here.
"""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from toolkit.analysis.comparison import (
    CIRCUITS,
    ELEMENTWISE,
    STRUCTURAL,
    Comparison,
    LayerChange,
    LayerPair,
    LayerProfile,
    ModelInfo,
    mean_defined,
)
from toolkit.analysis.intruders import DEFAULT_EPSILON, DEFAULT_K, check_intruder_settings
from toolkit.analysis.spectra import (
    delta_spectrum,
    layer_change,
    layer_profile,
    right_singular_basis,
    singular_directions,
    top_singular_vectors,
)
from toolkit.attention import AttentionModel, load_attention
from toolkit.errors import ToolkitError
from toolkit.threads import worker_count

__all__ = [  # the names other modules and scripts import from toolkit.analysis.compare
    "CIRCUITS",
    "ELEMENTWISE",
    "STRUCTURAL",
    "Comparison",
    "compare",
    "delta_spectrum",
    "layer_change",
    "layer_profile",
    "mean_defined",
    "right_singular_basis",
    "singular_directions",
    "top_singular_vectors",
]


def compare(
    a: str | Path | AttentionModel,
    b: str | Path | AttentionModel,
    *,
    revision_a: str | None = None,
    revision_b: str | None = None,
    allow_pickle: bool = False,
    rank: int = 8,
    top_k: int = 8,
    layers: Sequence[int] | None = None,
    progress: bool = False,
    intruder_k: int = DEFAULT_K,
    intruder_epsilon: float = DEFAULT_EPSILON,
) -> Comparison:
    """Compare the attention weights of model `a` (the reference) with those of model `b`.

    `a` and `b` are model specs (as `load_attention` takes) or opened `AttentionModel`s.
    `rank`: the r of the LoRA measures; `top_k`: how many singular values the energy share
    counts and how many heads the summary ranks. `layers`: indices in `a` (default all); in
    structural mode each is paired with `b`'s layer at the nearest relative depth.
    `progress`: show a progress bar over layers on stderr. `intruder_k`, `intruder_epsilon`:
    the intruder-dimension count of each matrix (see `toolkit.analysis.intruders`).
    """
    if rank < 1 or top_k < 1:
        raise ToolkitError(f"rank and top_k must be at least 1 (got rank {rank}, top_k {top_k})")
    check_intruder_settings(intruder_k, intruder_epsilon)
    model_a = _open(a, revision_a, allow_pickle)
    model_b = _open(b, revision_b, allow_pickle)
    info_a, info_b = _info(model_a), _info(model_b)
    note = _structural_reason(info_a, info_b)
    result = Comparison(
        a=info_a,
        b=info_b,
        mode=STRUCTURAL if note else ELEMENTWISE,
        note=note,
        rank=rank,
        top_k=top_k,
    )
    selected = model_a.select_layers(layers)
    if note is None:
        if (
            not layers
        ):  # a `toolkit extract` file may hold only some layers: compare those both have
            selected = [i for i in selected if i in model_b.layer_indices]
        missing = [i for i in selected if i not in model_b.layer_indices]
        if missing or not selected:
            raise ToolkitError(
                f"layer {missing[0] if missing else 'none'} of {info_a.name} is not in "
                f"{info_b.name}: choose layers both hold with --layer"
            )
        work = _decomposition_work(model_a, len(selected))
        settings = (rank, top_k, intruder_k, intruder_epsilon)
        with _layer_workers(work, model_a, model_b) as (pool, workers, workers_read):
            pending: deque[Future[LayerChange]] = deque()
            for index in _track(selected, progress, "comparing layers"):
                if workers_read:
                    pending.append(pool.submit(_forked_layer_change, index, index, *settings))
                else:  # read here, in order
                    layer_a, layer_b = model_a.layer(index), model_b.layer(index)
                    pending.append(pool.submit(layer_change, layer_a, layer_b, *settings))
                if len(pending) > workers:  # at most one layer pair waits for a worker
                    result.layers.append(pending.popleft().result())
            result.layers.extend(future.result() for future in pending)
        return result
    profile_b: LayerProfile | None = None
    for index in _track(selected, progress, "profiling layers"):
        index_b = _matched_layer(index, model_a, model_b)
        if profile_b is None or profile_b.layer != index_b:
            profile_b = layer_profile(model_b.layer(index_b), _relative_depth(index_b, model_b))
        result.pairs.append(
            LayerPair(
                a=layer_profile(model_a.layer(index), _relative_depth(index, model_a)), b=profile_b
            )
        )
    return result


def _open(
    model: str | Path | AttentionModel, revision: str | None, allow_pickle: bool
) -> AttentionModel:
    if isinstance(model, AttentionModel):
        return model
    return load_attention(model, revision=revision, allow_pickle=allow_pickle)


def _info(model: AttentionModel) -> ModelInfo:
    d = model.dims
    return ModelInfo(
        str(model.name), model.family.name, d.n_layers, d.n_heads, d.d_model, d.d_head, d.n_kv_heads
    )


def _structural_reason(a: ModelInfo, b: ModelInfo) -> str | None:
    """Why element-wise differences would be meaningless, or None when they are meaningful."""
    if a.family != b.family:
        why = f"different families ({a.family} vs {b.family})"
    else:
        differ = [
            f"{name} {getattr(a, name)} vs {getattr(b, name)}"
            for name in ("n_layers", "n_heads", "n_kv_heads", "d_model", "d_head")
            if getattr(a, name) != getattr(b, name)
        ]
        if not differ:
            return None
        why = f"different sizes ({', '.join(differ)})"
    return (
        f"{why}: the weights live in unrelated bases, so element-wise differences mean "
        "nothing; each model is described on its own (normalised spectra, ranks, norms, "
        "spread of per-head norms, QK/OV circuit spectra) at matched relative depth"
    )


def _relative_depth(index: int, model: AttentionModel) -> float:
    return index / (model.dims.n_layers - 1) if model.dims.n_layers > 1 else 0.0


def _matched_layer(index: int, model_a: AttentionModel, model_b: AttentionModel) -> int:
    """b's layer nearest to a's layer `index` in relative depth (among the layers b has)."""
    depth = _relative_depth(index, model_a)
    return min(model_b.layer_indices, key=lambda j: (abs(_relative_depth(j, model_b) - depth), j))


MAX_LAYER_WORKERS = 4  # each holds one layer pair in float64 (~200 MB for gpt2-medium)
# Below this much decomposition work (sum over the matrices compared of d_in * d_out *
# min(d_in, d_out); about a second on one core) layers run in the calling process: starting
# workers would cost more than they save.
PROCESS_WORK = 2e9


def _decomposition_work(model: AttentionModel, layers: int) -> float:
    d = model.dims
    shapes = [(d.d_model, d.n_heads * d.d_head), (d.n_heads * d.d_head, d.d_model)]
    shapes += [(d.d_model, d.n_kv_heads * d.d_head)] * 2
    return layers * sum(rows * cols * min(rows, cols) for rows, cols in shapes)


class _InCaller:
    """An executor that runs each job at once in the calling thread (small comparisons)."""

    def submit(self, function, *args) -> Future:
        future: Future = Future()
        try:
            future.set_result(function(*args))
        except BaseException as error:  # re-raised by future.result(), as a pool's would be
            future.set_exception(error)
        return future


_FORKED_MODELS: tuple[AttentionModel, AttentionModel] | None = None  # a forked worker's models


def _one_thread(models: tuple[AttentionModel, AttentionModel] | None = None) -> None:
    """The BLAS/LAPACK libraries loaded (numpy's, scipy's) on one thread in this process;
    `models`: the two opened models, handed to a forked worker (inherited, not pickled)."""
    import scipy.linalg  # noqa: F401  (loaded first: threadpool_limits sees loaded libraries only)
    from threadpoolctl import threadpool_limits

    global _FORKED_MODELS
    _FORKED_MODELS = models
    threadpool_limits(1)


def _forked_layer_change(index_a: int, index_b: int, *settings) -> LayerChange:
    """`layer_change` of layers read in the worker (each read opens the file anew: no offset is
    shared with other processes)."""
    model_a, model_b = _FORKED_MODELS
    return layer_change(model_a.layer(index_a), model_b.layer(index_b), *settings)


@contextmanager
def _layer_workers(
    work: float, model_a: AttentionModel, model_b: AttentionModel
) -> Iterator[tuple[_InCaller | ProcessPoolExecutor, int, bool]]:
    """Where layers are computed: a pool of one-thread worker processes, as many as
    `toolkit.threads.worker_count` allows (the threads asked for, else the usable cores; at most
    MAX_LAYER_WORKERS), or this process on one thread when one worker is allowed or the job is
    small (`work` < PROCESS_WORK).

    One thread each: the decompositions are LAPACK calls with many memory-bound steps; a BLAS
    thread pool spins at each step's barrier, and on a busy 2-core machine that made a 1024 x
    1024 float64 svdvals 20x slower on 2 threads than on 1. Processes, not threads: scipy's
    LAPACK wrappers hold the GIL, and two threads in one process ran a layer 1.2x faster than
    one, where two processes run it 2x faster (bench/RESULTS.md §2). Workers are forked on
    Linux (cheap: the modules are already loaded) and read their layers themselves; elsewhere
    they are spawned and sent the layers. Yields (pool, workers, whether workers read)."""
    import multiprocessing

    import scipy.linalg  # noqa: F401  (loaded first: threadpool_limits sees loaded libraries only)
    from threadpoolctl import threadpool_limits

    workers = worker_count(MAX_LAYER_WORKERS)
    if workers == 1 or work < PROCESS_WORK:
        with threadpool_limits(1):
            yield _InCaller(), 1, False
        return
    fork = sys.platform.startswith("linux")
    context = multiprocessing.get_context("fork" if fork else "spawn")
    models = (model_a, model_b) if fork else None
    with ProcessPoolExecutor(
        workers, mp_context=context, initializer=_one_thread, initargs=(models,)
    ) as pool:
        pool.submit(int).result()  # start the workers now, before a progress bar's thread runs
        yield pool, workers, fork


def _track(items: list[int], show: bool, description: str):
    if not show:
        return items
    return _tracked(items, description)


def _tracked(items: list[int], description: str):
    from toolkit.progress import transient_progress

    with transient_progress() as progress:
        yield from progress.track(items, description=description)
