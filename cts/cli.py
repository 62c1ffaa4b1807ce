"""`cts`: one command per pipeline stage (what dvc.yaml runs), thin over `stages/`."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    help="Content-aware Token Sharing for Segmenter: the pipeline's stages.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

ParamsOption = Annotated[
    Path, typer.Option("--params", "-p", help="Parameters file.", show_default=True)
]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", "-S", help="Override a parameter: key=value (repeatable)."),
]
ResumeOption = Annotated[
    bool,
    typer.Option(help="Resume from this stage's last checkpoint when its settings match."),
]


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


def _run(stage: str, params_file: Path, overrides: list[str] | None, **kwargs) -> None:
    """Validate the stage's params before any work, then run it; errors are one line."""
    try:
        from stages.params import load_params

        module = importlib.import_module(f"stages.{stage}")
        params = load_params(params_file, overrides or (), keys=module.PARAMS)
        module.run(params, **kwargs)
    except KeyboardInterrupt:
        _fail(f"{stage} interrupted; run it again to resume")
    except Exception as error:  # the user gets one line; CTS_DEBUG=1 shows the traceback
        if os.environ.get("CTS_DEBUG"):
            raise
        text = str(error) or type(error).__name__
        if not isinstance(error, ValueError | FileNotFoundError | RuntimeError | OSError):
            text = f"{type(error).__name__}: {text}"
        _fail(f"{stage}: {text}")


@app.command("download")
def download(params: ParamsOption = Path("params.yaml"), set_: SetOption = None) -> None:
    """Fetch and prepare the dataset (the embedded synthetic one is generated)."""
    _run("download", params, set_)


@app.command("preprocess")
def preprocess(params: ParamsOption = Path("params.yaml"), set_: SetOption = None) -> None:
    """Validate the dataset; write manifest, statistics and policy targets."""
    _run("preprocess", params, set_)


@app.command("train_policy")
def train_policy(
    params: ParamsOption = Path("params.yaml"), set_: SetOption = None, resume: ResumeOption = True
) -> None:
    """Train the policy network that picks the superpatches to share."""
    _run("train_policy", params, set_, resume_training=resume)


@app.command("train_segmenter")
def train_segmenter(
    params: ParamsOption = Path("params.yaml"), set_: SetOption = None, resume: ResumeOption = True
) -> None:
    """Train Segmenter with CTS, the trained policy network frozen."""
    _run("train_segmenter", params, set_, resume_training=resume)


@app.command("eval_ss")
def eval_ss(params: ParamsOption = Path("params.yaml"), set_: SetOption = None) -> None:
    """Single-scale sliding-window evaluation: mIoU, pixel and mean accuracy."""
    _run("eval_ss", params, set_)


@app.command("eval_ms")
def eval_ms(params: ParamsOption = Path("params.yaml"), set_: SetOption = None) -> None:
    """Multi-scale + flip sliding-window evaluation."""
    _run("eval_ms", params, set_)


@app.command("benchmark")
def benchmark(params: ParamsOption = Path("params.yaml"), set_: SetOption = None) -> None:
    """Throughput, GFLOPs, tokens and memory with sharing and with sharing off."""
    _run("benchmark", params, set_)


def main() -> None:
    # The pipeline layer lives next to params.yaml; make it importable from the repository.
    sys.path.insert(0, os.getcwd())
    app()


if __name__ == "__main__":
    main()
