"""`cts`: one command per pipeline stage (what dvc.yaml runs), thin over `stages/`, and the
tools around the pipeline. Each module binds one group of commands and holds no logic:

- :mod:`cts.cli.pipeline`: the stages (download, preprocess, ..., sweep);
- :mod:`cts.cli.tools`: config, throughput, import_checkpoint, predict, export;
- :mod:`cts.cli.kfp`: ``cts kfp compile | run_local``;
- :mod:`cts.cli.runs`: ``cts ui`` and ``cts replay`` (MLflow).
"""

from __future__ import annotations

import signal
from pathlib import Path

import typer

from cts.cli import kfp, pipeline, runs, tools
from cts.cli.common import use_checkout_stages
from cts.processes import TERMINATE_SIGNALS, raise_terminated

app = typer.Typer(
    help="Content-aware Token Sharing for Segmenter: the pipeline's stages.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
pipeline.register(app)
tools.register(app)
app.add_typer(kfp.app, name="kfp")
runs.register(app)


def main() -> None:
    use_checkout_stages(Path.cwd())
    for each in TERMINATE_SIGNALS:  # SIGTERM, and SLURM's SIGUSR1 before the time limit
        signal.signal(each, raise_terminated)
    app()


if __name__ == "__main__":
    main()
