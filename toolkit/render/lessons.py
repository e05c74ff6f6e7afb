"""The lessons' views: each result becomes report blocks (prose in the chosen language, tables,
figures), which `toolkit.render.report` prints or writes as Markdown."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from toolkit.attention import WEIGHT_ROLES
from toolkit.lessons import NotApplicable
from toolkit.lessons.lora import LoraLesson
from toolkit.lessons.pretrained import PretrainedLesson
from toolkit.lessons.qkv import QKV, QkvLesson
from toolkit.lessons.softmax import SoftmaxLesson
from toolkit.lessons.w0 import W0Lesson
from toolkit.render import figures
from toolkit.render.report import Block, Figure, Heading, Paragraph, Table
from toolkit.render.text import say


def _shape(shape: list[int]) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def present_w0(r: W0Lesson, lang: str) -> list[Block]:
    width = r.concat_width
    numbers = {
        "n_heads": r.n_heads,
        "d_head": r.d_head,
        "d_model": r.d_model,
        "width": width,
        "w0_shape": _shape(r.w0_shape),
        "rank": r.w0_rank,
    }
    if width == r.d_model:
        dimension = say(
            lang, "w0.square", **numbers, smax=r.w0_singular_max, smin=r.w0_singular_min
        )
    else:
        dimension = say(lang, "w0.reduces" if width > r.d_model else "w0.expands", **numbers)
    blocks: list[Block] = [
        Heading(say(lang, "w0.title")),
        Paragraph(say(lang, "model_line", model=r.model, family=r.family)),
        Paragraph(
            say(
                lang,
                "w0.shapes",
                layer=r.layer,
                n_heads=r.n_heads,
                tokens=r.tokens,
                z_shape=_shape(r.z_shape),
                concat_shape=_shape(r.concat_shape),
                w0_shape=_shape(r.w0_shape),
                output_shape=_shape(r.output_shape),
            )
        ),
        Paragraph(
            say(
                lang,
                "w0.identity",
                d_head=r.d_head,
                d_model=r.d_model,
                concat_diff=r.concat_vs_sum_max_abs_diff,
                model_diff=r.sum_vs_model_max_abs_diff,
            )
        ),
        Paragraph(say(lang, "w0.why_one", d_model=r.d_model, n_heads=r.n_heads)),
        *_shared_kv(lang, "w0.shared_kv", r.n_heads, r.n_kv_heads),
        Paragraph(dimension),
        Paragraph(
            say(
                lang,
                "w0.experiment",
                layer=r.layer,
                n_inputs=r.inputs["shape"][0],
                reinserted=r.reinserted_max_abs_diff,
                d_head=r.d_head,
                n_heads=r.n_heads,
                w0_shape=_shape(r.w0_shape),
            )
        ),
    ]
    if not any(rep.kind == "identity" for rep in r.replacements):
        blocks.append(Paragraph(say(lang, "w0.no_identity", w0_shape=_shape(r.w0_shape))))
    rows = [
        [
            say(lang, "w0.identity_row")
            if rep.kind == "identity"
            else say(lang, "w0.repeat_row", head=rep.head),
            f"{rep.layer_output_relative_change:.1%}",
            f"{rep.final_output_relative_change:.1%}",
        ]
        for rep in r.replacements
    ]
    blocks.append(
        Table(
            "",
            [
                say(lang, "w0.replacement"),
                say(lang, "w0.layer_change"),
                say(lang, "w0.final_change"),
            ],
            rows,
        )
    )
    blocks.append(
        Paragraph(
            say(
                lang,
                "w0.summary",
                min_layer=r.layer_output_change_range[0],
                max_layer=r.layer_output_change_range[1],
                min_final=r.final_output_change_range[0],
                max_final=r.final_output_change_range[1],
            )
        )
    )
    blocks.append(Figure("w0", say(lang, "w0.figure"), partial(figures.w0_blocks, r)))
    return blocks


def present_softmax(r: SoftmaxLesson, lang: str) -> list[Block]:
    text = r.inputs.get("texts", [" ".join(r.tokens)])[0]
    query_token = r.tokens[r.query]
    steps = (r.raw_scores, r.scores, r.shifted, r.exps, r.probs, r.model_probs)
    rows = [
        [str(key), r.tokens[key], *(f"{step[j]:.4f}" for step in steps)]
        for j, key in enumerate(r.keys)
    ]
    columns = [
        say(lang, f"softmax.{name}")
        for name in ("key", "token", "raw", "scaled", "shifted", "exp", "prob", "model")
    ]
    overflow_rows = [
        [
            f"{case.largest:g}",
            case.dtype,
            str(case.naive_nonfinite),
            say(lang, "softmax.broken")
            if case.naive_max_abs_diff is None
            else f"{case.naive_max_abs_diff:.1e}",
            f"{case.stable_max_abs_diff:.1e}",
        ]
        for case in r.overflow
    ]
    overflow_columns = [
        say(lang, f"softmax.{name}")
        for name in ("largest", "dtype", "naive_nonfinite", "naive_error", "stable_error")
    ]
    leader, second, last = r.leader, r.runner_up, r.least
    return [
        Heading(say(lang, "softmax.title", layer=r.layer, head=r.head)),
        Paragraph(say(lang, "model_line", model=r.model, family=r.family)),
        Paragraph(
            say(
                lang,
                "softmax.intro",
                query=r.query,
                query_token=query_token,
                text=text,
                n_keys=len(r.keys),
                d_head=r.d_head,
                scale=r.scale,
                inv_sqrt=r.textbook_scale,
            )
        ),
        Table("", columns, rows),
        Paragraph(say(lang, "softmax.steps", largest=r.largest, exp_sum=r.exp_sum)),
        Paragraph(say(lang, "softmax.check", diff=r.max_abs_diff_vs_model)),
        Paragraph(
            say(
                lang,
                "softmax.overflow",
                f16=r.exp_overflow_threshold["float16"],
                f32=r.exp_overflow_threshold["float32"],
            )
        ),
        Table("", overflow_columns, overflow_rows),
        Paragraph(
            say(
                lang,
                "softmax.overflow_summary",
                cases=len(r.overflow),
                broken=r.naive_broken,
                stable_ok=r.stable_finite,
            )
        ),
        Paragraph(
            say(
                lang,
                "softmax.race",
                leader=r.tokens[r.keys[leader]],
                leader_score=r.scores[leader],
                leader_prob=r.probs[leader],
                second=r.tokens[r.keys[second]],
                gap=r.score_gap,
                ratio=r.runner_up_share,
                second_prob=r.probs[second],
                last=r.tokens[r.keys[last]],
                last_gap=r.least_gap,
                last_prob=r.probs[last],
            )
        ),
        Figure(
            "softmax",
            say(lang, "softmax.figure", query_token=query_token, layer=r.layer, head=r.head),
            partial(figures.softmax_bars, r),
        ),
    ]


def present_qkv(r: QkvLesson, lang: str) -> list[Block]:
    init_key = "qkv.init" if r.initializer_range is not None else "qkv.init_unknown"
    text = r.inputs.get("texts", ["(random token ids)"])[0]
    stats_rows = [
        [str(layer.layer), role]
        + [
            f"{value:.4f}"
            for value in (
                layer.init[role].std,
                layer.trained[role].std,
                layer.init[role].singular_values[0],
                layer.trained[role].singular_values[0],
                layer.init[role].singular_median,
                layer.trained[role].singular_median,
            )
        ]
        for layer in r.layers
        for role in QKV
    ]
    stats_names = (
        "std_init",
        "std_trained",
        "sv_init",
        "sv_trained",
        "sv_median_init",
        "sv_median_trained",
    )
    stats_columns = [say(lang, "layer"), say(lang, "role")] + [
        say(lang, f"qkv.{name}") for name in stats_names
    ]
    if r.loss_kind == "masked":
        loss = say(
            lang,
            "qkv.loss_masked",
            text=text,
            model=r.model,
            position=r.masked_position,
            token=r.masked_token,
            loss=r.loss,
        )
    else:
        loss = say(lang, "qkv.loss_next", text=text, loss=r.loss)
    grad_rows = [
        [str(layer.layer)] + [f"{layer.grad_norm[role]:.4f}" for role in QKV] for layer in r.layers
    ]
    blocks: list[Block] = [
        Heading(say(lang, "qkv.title")),
        Paragraph(say(lang, "model_line", model=r.model, family=r.family)),
        Paragraph(
            say(
                lang,
                init_key,
                family=r.family,
                std=r.initializer_range,
                seed=r.seed,
                init_std=r.mean_std_init,
                trained_std=r.mean_std_trained,
            )
        ),
        Table("", stats_columns, stats_rows),
        Paragraph(
            say(
                lang,
                f"qkv.spectra_{r.spectra}",
                init_ratio=r.mean_spread_init,
                trained_ratio=r.mean_spread_trained,
            )
        ),
        Figure("qkv", say(lang, "qkv.figure"), partial(figures.qkv_spectra, r)),
        Paragraph(loss),
        Table(say(lang, "qkv.grad_table"), [say(lang, "layer")] + list(QKV), grad_rows),
        *_shared_kv(lang, "qkv.shared_kv", r.n_heads, r.n_kv_heads),
    ]
    for role in QKV:
        heads = len(r.layers[0].grad_norm_per_head[role]) if r.layers else 0  # h_kv for wk, wv
        rows = [
            [str(head)] + [f"{layer.grad_norm_per_head[role][head]:.4f}" for layer in r.layers]
            for head in range(heads)
        ]
        columns = [say(lang, "head")] + [
            f"{say(lang, 'layer')} {layer.layer}" for layer in r.layers
        ]
        blocks.append(Table(say(lang, "qkv.grad_head_table", role=role), columns, rows))
    blocks.append(
        Paragraph(
            say(
                lang,
                "qkv.sgd",
                lr=r.lr,
                loss=r.loss,
                loss_after=r.loss_after_step,
                diff=r.update_max_abs_diff,
                min_rel=r.update_relative_range[0],
                max_rel=r.update_relative_range[1],
            )
        )
    )
    return blocks


def _shared_kv(lang: str, key: str, n_heads: int, n_kv_heads: int | None) -> list[Block]:
    """The grouped-query paragraph, only for models whose heads share keys and values."""
    if n_kv_heads is None or n_kv_heads == n_heads:
        return []
    if n_kv_heads == 1:  # multi-query attention: one key/value head, no groups to speak of
        return [Paragraph(say(lang, key + "_one", n_heads=n_heads))]
    group = n_heads // n_kv_heads
    return [Paragraph(say(lang, key, n_heads=n_heads, n_kv_heads=n_kv_heads, group=group))]


def present_pretrained(r: PretrainedLesson, lang: str) -> list[Block]:
    pretrained, random = r.runs["pretrained"], r.runs["random"]
    metric_rows = [
        [name, f"{pretrained.metrics[name]:.4f}", f"{random.metrics[name]:.4f}"]
        for name in pretrained.metrics
    ]
    metric_rows += [
        [say(lang, "pretrained.train_loss", n=r.loss_window)]
        + [f"{run.last_train_loss:.4f}" for run in (pretrained, random)],
        [say(lang, "pretrained.seconds")] + [f"{run.seconds:.0f}" for run in (pretrained, random)],
    ]
    runs = [say(lang, "pretrained.run_pretrained"), say(lang, "pretrained.run_random")]
    headline = {
        "metric": r.metric,
        "pretrained": pretrained.metrics[r.metric],
        "random": random.metrics[r.metric],
    }
    changes = {
        "pretrained_change": pretrained.mean_change,
        "random_change": random.mean_change,
    }
    moved = say(
        lang,
        f"pretrained.moved_{r.moved_more}_more",
        **changes,
        ratio=r.change_ratio,
        pretrained_norm=pretrained.mean_start_norm,
        random_norm=random.mean_start_norm,
        pretrained_abs=pretrained.mean_moved,
        random_abs=random.mean_moved,
    )
    change_rows = [
        [str(layer), role]
        + [f"{run.layer_change[role][layer]:.2%}" for run in (pretrained, random)]
        + [f"{run.start_norm[role][layer]:.3g}" for run in (pretrained, random)]
        for layer in range(r.n_layers)
        for role in WEIGHT_ROLES
    ]
    change_columns = [say(lang, "layer"), say(lang, "role"), *runs] + [
        say(lang, "pretrained.start_norm", run=run) for run in runs
    ]
    conclusion = (
        say(lang, "pretrained.reuse", **headline, **changes, steps=r.steps)
        if r.verdict == "better"
        else say(lang, "pretrained.unclear", metric=r.metric, steps=r.steps)
    )
    return [
        Heading(say(lang, "pretrained.title")),
        Paragraph(say(lang, "model_line", model=r.model, family=r.family)),
        Paragraph(
            say(
                lang,
                "pretrained.setup",
                model=r.model,
                task=r.task,
                dataset=r.dataset,
                steps=r.steps,
                batch_size=r.batch_size,
                train_samples=r.max_train_samples,
                max_length=r.max_length,
                lr=r.learning_rate,
                seed=r.seed,
                eval_samples=r.max_eval_samples,
            )
        ),
        Table("", [say(lang, "pretrained.quantity", steps=r.steps), *runs], metric_rows),
        Paragraph(say(lang, f"pretrained.metric_{r.verdict}", **headline)),
        Paragraph(
            say(
                lang,
                "pretrained.loss_line",
                pretrained_loss=pretrained.metrics["eval_loss"],
                random_loss=random.metrics["eval_loss"],
            )
        ),
        Table(say(lang, "pretrained.change_table"), change_columns, change_rows),
        Paragraph(moved),
        Paragraph(conclusion),
        Figure(
            "pretrained",
            say(lang, "pretrained.figure"),
            partial(figures.pretrained_runs, r),
        ),
    ]


def present_lora(r: LoraLesson, lang: str) -> list[Block]:
    full, lora = r.runs["full"], r.runs["lora"]
    runs = (full, lora)
    names = [say(lang, "lora.run_full"), say(lang, "lora.run_lora", rank=r.rank)]
    rows = [
        [say(lang, "lora.trainable")] + [f"{run.trainable_parameters:,}" for run in runs],
        [say(lang, "lora.trainable_share")]
        + [f"{run.trainable_parameters / run.total_parameters:.2%}" for run in runs],
        [say(lang, "lora.seconds")] + [f"{run.seconds:.0f}" for run in runs],
        [say(lang, "lora.samples_per_second")]
        + [
            "n/a" if s is None else f"{s:.1f}"
            for s in (run.train_samples_per_second for run in runs)
        ],
        [say(lang, "lora.peak_rss")] + [f"{run.peak_rss_mb:.0f}" for run in runs],
    ]
    rows += [[name] + [f"{run.metrics[name]:.4f}" for run in runs] for name in full.metrics]

    def cell(name: str, role: str, layer: int, digits: str) -> str:
        values = [getattr(run, name)[role][layer] for run in runs]
        return " | ".join("n/a" if v is None else format(v, digits) for v in values)

    matrix_rows = [
        [str(layer), role]
        + [
            cell("delta_rank", role, layer, "d"),
            cell("subspace_similarity_output", role, layer, ".3f"),
            cell("amplification", role, layer, ".2f"),
            cell("intruders", role, layer, "d"),
        ]
        for layer in range(r.n_layers)
        for role in WEIGHT_ROLES
    ]
    matrix_columns = [say(lang, "layer"), say(lang, "role")] + [
        say(lang, key) for key in ("lora.rank", "lora.phi", "lora.amp", "lora.intruders")
    ]

    def heads(run) -> str:
        return ", ".join(
            f"L{h['layer']}H{h['head']} {h['relative_change']:.2%}" for h in run.top_heads
        )

    blocks: list[Block] = [
        Heading(say(lang, "lora.title")),
        Paragraph(say(lang, "model_line", model=r.model, family=r.family)),
        Paragraph(
            say(
                lang,
                "lora.setup",
                model=r.model,
                task=r.task,
                dataset=r.dataset,
                steps=r.steps,
                batch_size=r.batch_size,
                train_samples=r.max_train_samples,
                max_length=r.max_length,
                seed=r.seed,
                eval_samples=r.max_eval_samples,
                full_lr=full.learning_rate,
                lora_lr=lora.learning_rate,
                targets=", ".join(r.targets),
                rank=r.rank,
                alpha=r.alpha,
            )
        ),
        Table("", [say(lang, "lora.quantity", steps=r.steps), *names], rows),
        Paragraph(say(lang, "lora.memory_note", saved=full.peak_rss_mb - lora.peak_rss_mb)),
        Table(
            say(
                lang,
                "lora.matrix_table",
                tolerance=r.rank_tolerance,
                rank=r.rank,
                k=r.intruder_k,
                epsilon=r.intruder_epsilon,
            ),
            matrix_columns,
            matrix_rows,
        ),
        Paragraph(say(lang, "lora.top_heads", full=heads(full), lora=heads(lora))),
    ]
    blocks += [
        Paragraph(
            say(
                lang,
                f"lora.claim.{f.claim}.{'yes' if f.reproduced else 'no'}",
                rank=r.rank,
                metric=r.metric,
                **f.numbers,
            )
        )
        for f in r.findings
    ]
    blocks.append(Figure("lora", say(lang, "lora.figure"), partial(figures.lora_runs, r)))
    return blocks


PRESENTERS: dict[str, Callable[..., list[Block]]] = {
    "w0": present_w0,
    "softmax": present_softmax,
    "qkv": present_qkv,
    "pretrained": present_pretrained,
    "lora": present_lora,
}


def lesson_blocks(results: dict[str, object], lang: str) -> list[Block]:
    """All lessons' blocks, in the order given; one line for a lesson that does not apply."""
    return [block for name, result in results.items() for block in _blocks(name, result, lang)]


def _blocks(name: str, result: object, lang: str) -> list[Block]:
    if isinstance(result, NotApplicable):
        reason = say(lang, result.key, **result.values) if result.key else result.reason
        return [Paragraph(say(lang, "not_applicable", reason=reason))]
    return PRESENTERS[name](result, lang)
