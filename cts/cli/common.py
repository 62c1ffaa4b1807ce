"""What every command shares: the params options, one-line errors and running a stage."""

from __future__ import annotations

import importlib
import importlib.util
import os
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer

from cts.processes import Terminated

ParamsOption = Annotated[
    Path, typer.Option("--params", "-p", help="Parameters file.", show_default=True)
]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", "-S", help="Override a parameter: key=value (repeatable)."),
]
TrustOption = Annotated[
    bool,
    typer.Option(
        "--trust-checkpoint",
        help="DANGEROUS: unpickle any Python object the checkpoint holds, which can run "
        "code it contains. Only for files from a source you trust; by default only tensors "
        "and plain values are read.",
    ),
]
ResumeOption = Annotated[
    bool,
    typer.Option(help="Resume from this stage's last checkpoint when its settings match."),
]


def fail(message: str, code: int = 1) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def interrupted(command: str, error: KeyboardInterrupt, hint: str = "") -> None:
    """One line; exit status 143 after SIGTERM (128 + 15, what the sender expects), else 1."""
    if isinstance(error, Terminated):
        fail(f"{command} terminated (SIGTERM){hint}", 128 + signal.SIGTERM)
    fail(f"{command} interrupted{hint}")


def quiet_mlflow() -> None:
    """No MLflow progress bar in this process and its workers: logging a model copies its
    checkpoint through MLflow's artifact download, whose "Downloading artifacts" bar is noise
    in a stage's log (each redraw a line in a file). MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=true
    in the environment keeps it."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def use_checkout_stages(root: Path) -> None:
    """Run the stages of the cts checkout in ``root`` when it is one: a DVC experiment's
    temporary copy or a Kubeflow task's copy runs its own stages/ (as ``cts_stages``), not
    those of the checkout `cts` was installed from. A folder that is not a cts checkout (a DVC
    project with a stages/ folder of its own) is left alone."""
    init = root / "stages" / "__init__.py"
    if "cts_stages" in sys.modules or not (root / "cts" / "__init__.py").is_file():
        return
    if not init.is_file():
        return
    spec = importlib.util.spec_from_file_location(
        "cts_stages", init, submodule_search_locations=[str(init.parent)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["cts_stages"] = module
    spec.loader.exec_module(module)


def run_stage_command(stage: str, params_file: Path, overrides: list[str] | None, **kwargs) -> None:
    """Validate the stage's params before any work, then run it; errors are one line."""
    quiet_mlflow()
    try:
        from cts_stages.launch import first_process, run_stage
        from cts_stages.params import load_params

        module = importlib.import_module(f"cts_stages.{stage}")
        params = load_params(params_file, overrides or (), keys=module.PARAMS, stage=stage)
        if first_process(stage, params):
            from cts_stages.common import clean_leftovers

            clean_leftovers(params)
        run_stage(stage, params, **kwargs)
    except KeyboardInterrupt as error:
        interrupted(stage, error, "; run it again to resume")
    except Exception as error:
        report_error(stage, error)


def report_error(command: str, error: Exception) -> None:
    """One line for the user, as the stages do; CTS_DEBUG=1 shows the traceback."""
    if os.environ.get("CTS_DEBUG"):
        raise error
    text = str(error) or type(error).__name__
    if not isinstance(error, ValueError | FileNotFoundError | RuntimeError | OSError):
        text = f"{type(error).__name__}: {text}"
    fail(f"{command}: {text}")
