"""`cts`: one command per pipeline stage (what dvc.yaml runs), thin over `stages/`."""

from __future__ import annotations

import importlib
import os
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer

from cts.processes import Terminated, raise_terminated

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


def _fail(message: str, code: int = 1) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _interrupted(command: str, error: KeyboardInterrupt, hint: str = "") -> None:
    """One line; exit status 143 after SIGTERM (128 + 15, what the sender expects), else 1."""
    if isinstance(error, Terminated):
        _fail(f"{command} terminated (SIGTERM){hint}", 128 + signal.SIGTERM)
    _fail(f"{command} interrupted{hint}")


def _run(stage: str, params_file: Path, overrides: list[str] | None, **kwargs) -> None:
    """Validate the stage's params before any work, then run it; errors are one line."""
    try:
        from stages.launch import first_process, run_stage
        from stages.params import load_params

        module = importlib.import_module(f"stages.{stage}")
        params = load_params(params_file, overrides or (), keys=module.PARAMS, stage=stage)
        if first_process(stage, params):
            from stages.common import clean_leftovers

            clean_leftovers(params)
        run_stage(stage, params, **kwargs)
    except KeyboardInterrupt as error:
        _interrupted(stage, error, "; run it again to resume")
    except Exception as error:
        _report_error(stage, error)


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


@app.command("sweep")
def sweep(params: ParamsOption = Path("params.yaml"), set_: SetOption = None) -> None:
    """Accuracy vs speed over K of the trained model: mIoU, im/s, GFLOPs, tokens per K."""
    _run("sweep", params, set_)


def _report_error(command: str, error: Exception) -> None:
    """One line for the user, as the stages do; CTS_DEBUG=1 shows the traceback."""
    if os.environ.get("CTS_DEBUG"):
        raise error
    text = str(error) or type(error).__name__
    if not isinstance(error, ValueError | FileNotFoundError | RuntimeError | OSError):
        text = f"{type(error).__name__}: {text}"
    _fail(f"{command}: {text}")


@app.command("config")
def config(
    name: Annotated[
        str | None,
        typer.Argument(help="A setting of the paper's table, e.g. ade20k-vit-s (see --list)."),
    ] = None,
    list_: Annotated[
        bool, typer.Option("--list", help="List the settings: crop, K, tokens N -> N-3K.")
    ] = False,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", help="Write the params file here (atomically) instead of stdout."
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="With --out: replace an existing file.")
    ] = False,
    dvc_args: Annotated[
        bool,
        typer.Option(
            "--dvc-args",
            help="Print `-S key=value` for every param instead, for `dvc exp run`: "
            "args=$(cts config NAME --dvc-args) && dvc exp run --queue $args",
        ),
    ] = False,
) -> None:
    """The params file of one of the paper's six settings (stdout, --out FILE or --dvc-args)."""
    from stages import config as config_stage

    try:
        text = config_stage.command_output(name, list_, out, force, dvc_args)
    except config_stage.UsageError as error:
        _fail(f"config: {error}", 2)
    except Exception as error:
        _report_error("config", error)
    typer.echo(text, nl=False)


# `cts throughput`'s options with a long help; short metavars keep its --help readable at 80
# columns.
RowsOption = Annotated[
    list[str] | None,
    typer.Option(
        "--row",
        "-r",
        metavar="ROW",
        help="Rows to measure (repeatable): vit_ti_512, vit_s_512, vit_b_512, vit_l_640, "
        "vit_s_768, or any supported timm backbone as NAME or NAME@CROP (ADE20K classes, "
        "K for 30% fewer tokens). Default: the paper's five.",
    ),
]
CompileOption = Annotated[
    str,
    typer.Option(
        "--compile",
        metavar="MODE",
        help="auto (GPU: reduce-overhead, i.e. Inductor + CUDA graphs; CPU: none) | none "
        "| default | reduce-overhead | max-autotune | max-autotune-no-cudagraphs.",
    ),
]
PolicyOption = Annotated[
    list[str] | None,
    typer.Option(
        "--policy",
        metavar="NAME",
        help="Policy net setting(s), each row measured with each (repeatable): paper "
        "(full-resolution input, stride-32 features), half (half-size input, stride 16; "
        "the default), quarter (quarter-size input, stride 8: the pipeline's default).",
    ),
]


@app.command("throughput")
def throughput(
    rows: RowsOption = None,
    batch_size: Annotated[
        int | None,
        typer.Option(metavar="N", help="Images per forward (default: 32 on a GPU, 2 on CPU)."),
    ] = None,
    precision: Annotated[
        list[str] | None,
        typer.Option(metavar="P", help="fp32 and/or bf16 (repeatable; default: both)."),
    ] = None,
    allow_fp32_fallback: Annotated[
        bool,
        typer.Option(
            "--allow-fp32-fallback", help="Measure fp32 only when the device has no bf16."
        ),
    ] = False,
    compile_mode: CompileOption = "auto",
    policy: PolicyOption = None,
    paper_policy: Annotated[
        bool,
        typer.Option(
            "--paper-policy", help="Same as --policy paper (added to any --policy given)."
        ),
    ] = False,
    depth: Annotated[
        int | None,
        typer.Option(
            metavar="N", help="Encoder blocks (default: the backbone's; for smoke tests)."
        ),
    ] = None,
    warmup: Annotated[
        int | None, typer.Option(metavar="N", help="Untimed runs (default: GPU 5, CPU 1).")
    ] = None,
    repeats: Annotated[
        int | None,
        typer.Option(metavar="N", help="Timed runs, median reported (default: GPU 20, CPU 3)."),
    ] = None,
    device: Annotated[str, typer.Option(metavar="DEVICE", help="auto | cpu | cuda.")] = "auto",
    out: Annotated[
        Path,
        typer.Option(
            "--out", "-o", metavar="DIR", help="Folder for throughput.json and throughput.md."
        ),
    ] = Path("reports/throughput"),
) -> None:
    """The paper's throughput table with random weights: no sharing vs CTS, fp32 and bf16."""
    try:
        from cts.throughput.table import measure_table

        table, json_path, md_path = measure_table(
            out,
            rows,
            device,
            batch_size,
            precision,
            allow_fp32_fallback,
            compile_mode,
            warmup,
            repeats,
            policies=(["paper"] if paper_policy else []) + list(policy or []),
            depth=depth,
            echo=typer.echo,
            warn=lambda line: typer.secho(line, fg=typer.colors.YELLOW, err=True),
        )
    except KeyboardInterrupt as error:
        _interrupted("throughput", error)
    except Exception as error:
        _report_error("throughput", error)
    typer.echo(table)
    typer.echo(f"written: {json_path}, {md_path}")


@app.command("import_checkpoint")
def import_checkpoint(
    path: Annotated[
        Path,
        typer.Argument(help="Original checkpoint.pth, its folder, or the variant.yml beside it."),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="cts checkpoint to write.")] = Path(
        "checkpoints/imported.pt"
    ),
    num_tokens_shared: Annotated[
        int | None,
        typer.Option(
            "--num-tokens-shared",
            "-k",
            help="K superpatches sharing a token (default: the CTS checkpoint's; 0 without).",
        ),
    ] = None,
    policy: Annotated[
        str | None,
        typer.Option(
            help="none | policy_net | random | oracle (default: policy_net when the "
            "checkpoint holds one, else none)."
        ),
    ] = None,
    trust_checkpoint: TrustOption = False,
) -> None:
    """Convert a rstrudel/segmenter or tue-mps/cts-segmenter checkpoint to cts's format."""
    try:
        from cts.import_checkpoint import import_to_file, summary

        written, model, source = import_to_file(
            path, out, num_tokens_shared, policy, trust=trust_checkpoint
        )
    except KeyboardInterrupt as error:
        _interrupted("import_checkpoint", error)
    except Exception as error:
        _report_error("import_checkpoint", error)
    typer.echo(summary(written, model, source))


# The name before commands took dvc.yaml's underscores; kept for existing scripts.
app.command("import-checkpoint", hidden=True)(import_checkpoint)


@app.command("predict")
def predict(
    inputs: Annotated[
        Path, typer.Argument(help="An image, or a folder of .jpg/.png images (recursive).")
    ],
    model: Annotated[
        Path,
        typer.Option(
            "--model", "-m", help="cts checkpoint, or an original Segmenter/CTS checkpoint."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the pictures.")],
    num_tokens_shared: Annotated[
        int | None,
        typer.Option("--num-tokens-shared", "-k", help="K (default: the checkpoint's)."),
    ] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    short_side: Annotated[
        int | None, typer.Option(help="Resize images to this short side (default: the crop).")
    ] = None,
    stride: Annotated[
        int | None, typer.Option(help="Sliding-window stride (default: the crop).")
    ] = None,
    classes: Annotated[
        Path | None,
        typer.Option(
            help="Class names for the legends: a dataset folder (its classes.txt) or a text "
            "file, one name per line (default: class 0, class 1, ...)."
        ),
    ] = None,
    trust_checkpoint: TrustOption = False,
) -> None:
    """Segment images: label ids, colours, overlay and the shared superpatches per image."""
    try:
        from cts.data.info import read_class_names
        from cts.engine import resolve_device
        from cts.import_checkpoint import load_model
        from cts.predict import Predictor, find_images, predict_images

        find_images(inputs)  # a missing input fails before the model loads
        names = None if classes is None else read_class_names(classes)
        target = resolve_device(device)
        predictor = Predictor(
            load_model(model, target, num_tokens_shared, trust=trust_checkpoint),
            target,
            num_tokens_shared,
            short_side,
            stride,
            class_names=names,
        )
        report = predict_images(predictor, inputs, out)
    except KeyboardInterrupt as error:
        _interrupted("predict", error)
    except Exception as error:
        _report_error("predict", error)
    for image, reason in report.skipped:
        typer.secho(f"skipped {image}: {reason}", fg=typer.colors.YELLOW, err=True)
    skipped = f", skipped {len(report.skipped)} unreadable" if report.skipped else ""
    typer.echo(f"predicted {len(report.written)} image(s) into {out}{skipped}")
    if not report.written:
        _fail("predict: no image could be read")


@app.command("export")
def export(
    model: Annotated[
        Path,
        typer.Option(
            "--model", "-m", help="cts checkpoint, or an original Segmenter/CTS checkpoint."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="ONNX file to write.")] = Path(
        "model.onnx"
    ),
    num_tokens_shared: Annotated[
        int | None,
        typer.Option("--num-tokens-shared", "-k", help="K (default: the checkpoint's)."),
    ] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset (18 or later).")] = 18,
    scores: Annotated[
        bool, typer.Option(help="Add a second output: the class scores (B, n_cls, crop, crop).")
    ] = False,
) -> None:
    """Export the whole inference (policy net to labels) as one ONNX graph at the crop size."""
    try:
        from cts.export import export_onnx
        from cts.import_checkpoint import load_model

        segmenter = load_model(model, "cpu", num_tokens_shared)
        written = export_onnx(segmenter, out, num_tokens_shared, opset, scores)
    except KeyboardInterrupt:
        _fail("export interrupted")
    except Exception as error:
        _report_error("export", error)
    crop = segmenter.config.crop_size
    k = segmenter.num_tokens_shared if num_tokens_shared is None else num_tokens_shared
    typer.echo(
        f"exported {segmenter.config.backbone} (K {k}, opset {opset}): images float32 "
        f"(B, 3, {crop}, {crop}) -> labels int64 (B, {crop}, {crop}): {written}"
    )


# `\\[` keeps rich from reading `[cluster]` as markup (it would print `pip install -e '.'`).
kfp_app = typer.Typer(
    help="Kubeflow Pipelines (KFP v2): the pipeline of dvc.yaml, one task per stage "
    "(needs the `cluster` extra: pip install -e '.\\[cluster]').",
    no_args_is_help=True,
)
app.add_typer(kfp_app, name="kfp")
DvcYamlOption = Annotated[
    Path, typer.Option("--dvc-yaml", help="The DVC pipeline to translate.", show_default=True)
]


@kfp_app.command("compile")
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
        from stages.kfp_pipeline import compile_pipeline

        plan = compile_pipeline(dvc_yaml, params, out, set_ or (), image, accelerator, gpus)
    except KeyboardInterrupt as error:
        _interrupted("kfp compile", error)
    except Exception as error:
        _report_error("kfp compile", error)
    order = " -> ".join(stage.name for stage in plan.stages)
    typer.echo(f"written: {out} ({order}; {len(plan.params)} parameters)")


@kfp_app.command("run_local")
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
        from stages.kfp_pipeline import run_local

        placed = run_local(dvc_yaml, params, out, set_ or ())
    except KeyboardInterrupt as error:
        _interrupted("kfp run_local", error)
    except Exception as error:
        _report_error("kfp run_local", error)
    typer.echo(f"written: {len(placed)} outputs in {out}")


kfp_app.command("run-local", hidden=True)(kfp_run_local)  # the former name, for scripts


@app.command("ui")
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
        from stages.mlflow_context import project_tracking_uri
        from stages.params import load_params

        values = load_params(params, set_ or (), keys=("mlflow_tracking_uri",), stage="ui")
        url = ui_url(base, experiment, project_tracking_uri(values["mlflow_tracking_uri"]))
    except Exception as error:
        _report_error("ui", error)
    typer.echo(url)


@app.command("replay")
def replay() -> None:
    """Log the MLflow records stages kept while their tracking server did not answer."""
    try:
        from cts.tracking import kept_stage_runs, replay_spool
        from stages.mlflow_context import repo_root

        root = repo_root()
        logged = replay_spool(root=root)
        left = kept_stage_runs(root)
    except KeyboardInterrupt as error:
        _interrupted("replay", error)
    except Exception as error:
        _report_error("replay", error)
    typer.echo(f"mlflow: logged {logged} kept record(s); {len(left)} stage run(s) still kept")


def main() -> None:
    # The pipeline layer lives next to params.yaml; make it importable from the repository.
    sys.path.insert(0, os.getcwd())
    signal.signal(signal.SIGTERM, raise_terminated)
    app()


if __name__ == "__main__":
    main()
