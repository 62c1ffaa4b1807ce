"""MLflow from the command line: the UI address of the project's store, the kept records."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cts.cli.common import ParamsOption, SetOption, interrupted, quiet_mlflow, report_error


def ui(
    base: Annotated[
        str, typer.Option(help="Where `mlflow ui` (or the tracking server) serves the UI.")
    ] = "http://127.0.0.1:5000",
    experiment: Annotated[str, typer.Option(help="MLflow experiment.")] = "cts",
    params: ParamsOption = Path("params.yaml"),
    set_: SetOption = None,
) -> None:
    """Print the MLflow UI address of the runs table of the store the stages log to."""
    try:
        from cts.tracking import ui_url
        from cts_stages.mlflow_context import project_tracking_uri
        from cts_stages.params import load_params

        values = load_params(params, set_ or (), keys=("mlflow_tracking_uri",), stage="ui")
        url = ui_url(base, experiment, project_tracking_uri(values["mlflow_tracking_uri"]))
    except Exception as error:
        report_error("ui", error)
    typer.echo(url)


def replay() -> None:
    """Log the MLflow records stages kept while their tracking server did not answer."""
    quiet_mlflow()  # a kept model is logged as the stage would have
    try:
        from cts.tracking import kept_stage_runs, replay_spool
        from cts_stages.mlflow_context import repo_root

        root = repo_root()
        logged = replay_spool(root=root)
        left = kept_stage_runs(root)
    except KeyboardInterrupt as error:
        interrupted("replay", error)
    except Exception as error:
        report_error("replay", error)
    typer.echo(f"mlflow: logged {logged} kept record(s); {len(left)} stage run(s) still kept")


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
    app.command("ui")(ui)
    app.command("replay")(replay)
