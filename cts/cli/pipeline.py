"""The pipeline's stages, one command each (what dvc.yaml runs)."""

from __future__ import annotations

from pathlib import Path

import typer

from cts.cli.common import ParamsOption, ResumeOption, SetOption, run_stage_command


def download(params: ParamsOption = Path("params.yaml"), set_: SetOption = None) -> None:
    """Fetch and prepare the dataset (the embedded synthetic one is generated)."""
    run_stage_command("download", params, set_)


def preprocess(params: ParamsOption = Path("params.yaml"), set_: SetOption = None) -> None:
    """Validate the dataset; write manifest, statistics and policy targets."""
    run_stage_command("preprocess", params, set_)


def train_policy(
    params: ParamsOption = Path("params.yaml"), set_: SetOption = None, resume: ResumeOption = True
) -> None:
    """Train the policy network that picks the superpatches to share."""
    run_stage_command("train_policy", params, set_, resume_training=resume)


def train_segmenter(
    params: ParamsOption = Path("params.yaml"), set_: SetOption = None, resume: ResumeOption = True
) -> None:
    """Train Segmenter with CTS, the trained policy network frozen."""
    run_stage_command("train_segmenter", params, set_, resume_training=resume)


def eval_ss(params: ParamsOption = Path("params.yaml"), set_: SetOption = None) -> None:
    """Single-scale sliding-window evaluation: mIoU, pixel and mean accuracy."""
    run_stage_command("eval_ss", params, set_)


def eval_ms(params: ParamsOption = Path("params.yaml"), set_: SetOption = None) -> None:
    """Multi-scale + flip sliding-window evaluation."""
    run_stage_command("eval_ms", params, set_)


def benchmark(params: ParamsOption = Path("params.yaml"), set_: SetOption = None) -> None:
    """Throughput, GFLOPs, tokens and memory with sharing and with sharing off."""
    run_stage_command("benchmark", params, set_)


def sweep(params: ParamsOption = Path("params.yaml"), set_: SetOption = None) -> None:
    """Accuracy vs speed over K of the trained model: mIoU, im/s, GFLOPs, tokens per K."""
    run_stage_command("sweep", params, set_)


# In dvc.yaml's order; each is registered under its function's name.
STAGES = (
    download,
    preprocess,
    train_policy,
    train_segmenter,
    eval_ss,
    eval_ms,
    benchmark,
    sweep,
)


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
    for command in STAGES:
        app.command(command.__name__)(command)


def stage_flags() -> dict[str, list[str]]:
    """Each stage command's name -> the flags it takes beyond the params options, sorted
    (``train_segmenter``: ``--no-resume``, ``--resume``): what a stage's own command line may
    hold besides ``--params`` and ``--set``. Read from the commands as typer builds them."""
    app = typer.Typer()
    register(app)
    commands = typer.main.get_command(app).commands
    return {
        name: sorted(
            flag
            for param in command.params
            if getattr(param, "is_flag", False)
            for flag in (*param.opts, *param.secondary_opts)
        )
        for name, command in commands.items()
    }
