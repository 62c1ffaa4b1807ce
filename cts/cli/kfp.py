"""`cts kfp`: the pipeline of dvc.yaml as a Kubeflow pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cts.cli.common import ParamsOption, SetOption, interrupted, report_error

# `\\[` keeps rich from reading `[cluster]` as markup (it would print `pip install -e '.'`).
app = typer.Typer(
    help="Kubeflow Pipelines (KFP v2): the pipeline of dvc.yaml, one task per stage "
    "(needs the `cluster` extra: pip install -e '.\\[cluster]').",
    no_args_is_help=True,
)
DvcYamlOption = Annotated[
    Path, typer.Option("--dvc-yaml", help="The DVC pipeline to translate.", show_default=True)
]


@app.command("compile")
def kfp_compile(
    out: Annotated[Path, typer.Option("--out", "-o", help="IR YAML to write (atomically).")] = Path(
        "pipeline.yaml"
    ),
    dvc_yaml: DvcYamlOption = Path("dvc.yaml"),
    params: ParamsOption = Path("params.yaml"),
    set_: SetOption = None,
    image: Annotated[
        str, typer.Option(help="Container image with cts and its `cluster` extra installed.")
    ] = "cts:latest",
    gpus: Annotated[
        int, typer.Option(help="Accelerators per task of a stage that reads `device`; 0: none.")
    ] = 1,
    accelerator: Annotated[str, typer.Option(help="Accelerator type.")] = "nvidia.com/gpu",
) -> None:
    """Write the Kubeflow pipeline (IR YAML) of dvc.yaml; the params give its defaults."""
    try:
        from cts_stages.kfp_pipeline import compile_pipeline

        plan = compile_pipeline(dvc_yaml, params, out, set_ or (), image, accelerator, gpus)
    except KeyboardInterrupt as error:
        interrupted("kfp compile", error)
    except Exception as error:
        report_error("kfp compile", error)
    order = " -> ".join(stage.name for stage in plan.stages)
    typer.echo(f"written: {out} ({order}; {len(plan.params)} parameters)")


@app.command("run_local")
def kfp_run_local(
    out: Annotated[
        Path,
        typer.Option("--out", "-o", help="New folder for the outputs, laid out as the repository."),
    ],
    dvc_yaml: DvcYamlOption = Path("dvc.yaml"),
    params: ParamsOption = Path("params.yaml"),
    set_: SetOption = None,
) -> None:
    """Run the Kubeflow pipeline here with KFP's local subprocess runner (no cluster)."""
    try:
        from cts_stages.kfp_pipeline import run_local

        placed = run_local(dvc_yaml, params, out, set_ or ())
    except KeyboardInterrupt as error:
        interrupted("kfp run_local", error)
    except Exception as error:
        report_error("kfp run_local", error)
    typer.echo(f"written: {len(placed)} outputs in {out}")


app.command("run-local", hidden=True)(kfp_run_local)  # the former name, for scripts
