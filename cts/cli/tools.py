"""The tools around the pipeline: the paper's params files, throughput, imported weights,
prediction and ONNX export."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cts.cli.common import TrustOption, fail, interrupted, report_error

# One argument a line, read into an array: `$(...)` unquoted would split and glob them (a list
# value, `[0.5,2.0]`, is a glob pattern). `\\[` keeps rich from reading `[@]` as markup.
DVC_ARGS_BASH = (
    'out=$(cts config NAME --dvc-args) && mapfile -t args <<< "$out" && '
    'dvc exp run --queue "${args\\[@]}"'
)


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
            help="Print instead the `dvc exp run` arguments that set every param, one a "
            "line (--set-param=key=value). In bash: " + DVC_ARGS_BASH + " (zsh: docs/paper.md).",
        ),
    ] = False,
) -> None:
    """The params file of one of the paper's six settings (stdout, --out FILE or --dvc-args)."""
    from cts_stages import config as config_stage

    try:
        text = config_stage.command_output(name, list_, out, force, dvc_args)
    except config_stage.UsageError as error:
        fail(f"config: {error}", 2)
    except Exception as error:
        report_error("config", error)
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
TomeROption = Annotated[
    list[int] | None,
    typer.Option(
        "--tome-r",
        metavar="R",
        help="Also time each row with ToMe merging R tokens in every block, nothing shared, "
        "on the same weights (repeatable; a second table).",
    ),
]

# `cts predict` and `cts export`: the sharing setting of a checkpoint, overridden.
NumSharedOption = Annotated[
    int | None, typer.Option("--num-tokens-shared", "-k", help="K (default: the checkpoint's).")
]
ShareThresholdOption = Annotated[
    float | None,
    typer.Option(
        "--share-threshold",
        "-t",
        help="K per image instead of one K: share the superpatches the policy scores at least "
        "this, in (0, 1).",
    ),
]


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
    tome_r: TomeROption = None,
    device: Annotated[str, typer.Option(metavar="DEVICE", help="auto | cpu | cuda.")] = "auto",
    out: Annotated[
        Path,
        typer.Option(
            "--out", "-o", metavar="DIR", help="Folder for throughput.json and throughput.md."
        ),
    ] = Path("reports/throughput"),
) -> None:
    """The paper's throughput table with random weights: no sharing vs CTS (and ToMe with
    --tome-r), fp32 and bf16."""
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
            tome_rs=tome_r or (),
            echo=typer.echo,
            warn=lambda line: typer.secho(line, fg=typer.colors.YELLOW, err=True),
        )
    except KeyboardInterrupt as error:
        interrupted("throughput", error)
    except Exception as error:
        report_error("throughput", error)
    typer.echo(table)
    typer.echo(f"written: {json_path}, {md_path}")


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
        interrupted("import_checkpoint", error)
    except Exception as error:
        report_error("import_checkpoint", error)
    typer.echo(summary(written, model, source))


def predict(
    inputs: Annotated[
        Path,
        typer.Argument(
            help="An image, or a folder of .jpg/.png images (recursive, symlinked folders too)."
        ),
    ],
    model: Annotated[
        Path,
        typer.Option(
            "--model", "-m", help="cts checkpoint, or an original Segmenter/CTS checkpoint."
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out", "-o", help="Folder for the pictures: NAME_labels.png, ... per image NAME."
        ),
    ],
    num_tokens_shared: NumSharedOption = None,
    share_threshold: ShareThresholdOption = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    short_side: Annotated[
        int | None,
        typer.Option(
            help="Resize images to this short side (default: the evaluation's, which the "
            "checkpoint stores; the crop for one that does not)."
        ),
    ] = None,
    stride: Annotated[
        int | None,
        typer.Option(help="Sliding-window stride (default: the evaluation's, else the crop)."),
    ] = None,
    classes: Annotated[
        Path | None,
        typer.Option(
            help="Class names for the legends: a dataset folder (its classes.txt) or a text "
            "file, one name per line (default: class 0, class 1, ...)."
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Overwrite pictures that exist in --out.")
    ] = False,
    trust_checkpoint: TrustOption = False,
) -> None:
    """Segment images: label ids, colours, overlay and the shared superpatches per image."""
    try:
        from cts.data.info import read_class_names
        from cts.engine import resolve_device
        from cts.predict import load_predictor, plan_outputs, predict_images

        plan_outputs(inputs, out, force)  # a missing input or a taken --out: before the model
        names = None if classes is None else read_class_names(classes)
        predictor = load_predictor(
            model,
            resolve_device(device),
            num_tokens_shared,
            short_side,
            stride,
            names,
            trust_checkpoint,
            warn=lambda line: typer.secho(line, fg=typer.colors.YELLOW, err=True),
            share_threshold=share_threshold,
        )
        report = predict_images(predictor, inputs, out, force=force)
    except KeyboardInterrupt as error:
        interrupted("predict", error)
    except Exception as error:
        report_error("predict", error)
    for image, reason in report.skipped:
        typer.secho(f"skipped {image}: {reason}", fg=typer.colors.YELLOW, err=True)
    skipped = f", skipped {len(report.skipped)} unreadable" if report.skipped else ""
    typer.echo(f"predicted {len(report.written)} image(s) into {out}{skipped}")
    if not report.written:
        fail("predict: no image could be read")


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
    num_tokens_shared: NumSharedOption = None,
    opset: Annotated[int, typer.Option(help="ONNX opset (18 or later).")] = 18,
    scores: Annotated[
        bool, typer.Option(help="Add a second output: the class scores (B, n_cls, crop, crop).")
    ] = False,
) -> None:
    """Export the whole inference (policy net to labels) as one ONNX graph at the crop size.

    The graph takes crop-sized images only: the resize to the evaluation's scale and the
    sliding windows of `cts predict` are not in it (the command prints how to do them).
    """
    try:
        from cts.export import export_onnx, tiling_hint
        from cts.import_checkpoint import load_model_and_geometry

        segmenter, geometry = load_model_and_geometry(model, "cpu", num_tokens_shared)
        written = export_onnx(segmenter, out, num_tokens_shared, opset, scores)
    except KeyboardInterrupt:
        fail("export interrupted")
    except Exception as error:
        report_error("export", error)
    crop = segmenter.config.crop_size
    k = segmenter.num_tokens_shared if num_tokens_shared is None else num_tokens_shared
    typer.echo(
        f"exported {segmenter.config.backbone} (K {k}, opset {opset}): images float32 "
        f"(B, 3, {crop}, {crop}) -> labels int64 (B, {crop}, {crop}): {written}"
    )
    typer.echo(tiling_hint(crop, geometry))


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
    app.command("config")(config)
    app.command("throughput")(throughput)
    app.command("import_checkpoint")(import_checkpoint)
    app.command("predict")(predict)
    app.command("export")(export)
    # The name before commands took dvc.yaml's underscores; kept for existing scripts.
    app.command("import-checkpoint", hidden=True)(import_checkpoint)
