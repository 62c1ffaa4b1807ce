"""Stage `sweep`: the trained model's accuracy-vs-speed curve over K, without retraining.

At every K of ``sweep_tokens_shared`` (plus the model's own K): single-scale val mIoU by the
evaluation of `eval_ss` (so the model's own K gives eval_ss's mIoU), and im/s, GFLOPs and
tokens timed and counted as the `benchmark` stage does (all K in turns, one process).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd

from cts.benchmark import measure_sweep
from cts.checkpoint import load_segmenter
from cts.data.io import write_bytes_atomic
from cts.engine import resolve_device
from cts.sharing import check_num_shared
from cts.tracking import active_run, log_artifact, log_json_metrics
from stages.benchmark import validation_batch
from stages.common import (
    PLOTS,
    SEGMENTER_CHECKPOINT,
    require,
    write_csv,
)
from stages.evaluation import evaluate_model, validation_set
from stages.mlflow_context import stage_run

PARAMS = (
    "data_root",
    "backbone",
    "crop_size",
    "sweep_tokens_shared",
    "base_size",
    "eval_window",
    "eval_stride",
    "bench_batch_size",
    "bench_repeats",
    "bench_compile",
    "device",
    "precision",
    "num_workers",
    "mlflow_tracking_uri",
)
COLUMNS = ("num_tokens_shared", "tokens", "mIoU", "ims_per_sec", "gflops")
CSV = PLOTS / "k_sweep.csv"
PICTURE = PLOTS / "k_sweep.png"


def sweep_ks(values: Sequence[int], own_k: int) -> list[int]:
    """The K to measure, ascending: the swept values and the model's own (none: no sweep)."""
    return sorted({*values, own_k}) if values else []


def token_formula(table: pd.DataFrame) -> str:
    """The tokens of a forward as a formula of K, from a non-empty sweep table: a shared
    superpatch (2x2 patches) is one token instead of four."""
    num_patches = int(table["tokens"].iloc[0] + 3 * table["num_tokens_shared"].iloc[0])
    return f"tokens = {num_patches} − 3·K   (a shared superpatch of 2×2 patches: 1 token, not 4)"


def plot_curve(table: pd.DataFrame, own_k: int, title: str) -> bytes:
    """PNG of mIoU against im/s, each point labelled with its K (the model's own K marked)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4), dpi=120)
    if len(table):
        axes.plot(table["ims_per_sec"], table["mIoU"], "o-", color="tab:blue")
        # Short labels centred above their points: neighbouring K can sit less than an im/s
        # apart, where two-line labels beside the points overprinted each other.
        for row in table.itertuples():
            axes.annotate(
                f"K={row.num_tokens_shared}",
                (row.ims_per_sec, row.mIoU),
                textcoords="offset points",
                xytext=(0, 8),
                ha="center",
                va="bottom",
                fontsize=7,
            )
        title = f"{title}\n{token_formula(table)}"
        axes.margins(x=0.08, y=0.15)  # room for the labels inside the frame
        own = table[table["num_tokens_shared"] == own_k]
        axes.plot(own["ims_per_sec"], own["mIoU"], "*", color="tab:red", ms=14, label="trained K")
        axes.legend(loc="best", fontsize=8)
    else:
        axes.text(0.5, 0.5, "no K sweep: sweep_tokens_shared is empty", ha="center")
    axes.set_xlabel("images / s (benchmark batch)")
    axes.set_ylabel("single-scale val mIoU (%)")
    axes.set_title(title, fontsize=9)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def run(params: dict[str, Any]) -> None:
    device = resolve_device(params["device"])
    model = load_segmenter(require(SEGMENTER_CHECKPOINT, "train_segmenter"), device).to(device)
    own_k = model.num_tokens_shared
    ks = sweep_ks(params["sweep_tokens_shared"], own_k)
    side = model.config.crop_size // (2 * model.patch_size)
    for k in ks:  # the trained crop decides, before any work
        check_num_shared(k, side * side, f"crop_size {model.config.crop_size}")
    if model.config.policy == "none" and ks:
        ks = [0]  # without a policy every K is the plain Segmenter
    with stage_run("sweep", params):
        records = []
        if ks:
            images = validation_batch(params, model, params["bench_batch_size"]).to(device)
            records = measure_sweep(
                model,
                images,
                ks,
                precision=params["precision"],
                compile_mode=params["bench_compile"],
                warmup=2,
                repeats=params["bench_repeats"],
                what=f"{model.config.backbone} (bench_batch_size {images.shape[0]})",
                batch_option="bench_batch_size",
                compile_option="bench_compile",
            )
            dataset = validation_set(params, model)
            for record in records:
                metric = evaluate_model(
                    params, model, dataset, (1.0,), False, record["num_tokens_shared"]
                )
                record["mIoU"] = metric.compute()["mIoU"]
                log_json_metrics(
                    {key: record[key] for key in COLUMNS[1:]}, step=record["num_tokens_shared"]
                )
        table = pd.DataFrame(records, columns=list(COLUMNS))
        write_csv(CSV, table)
        title = (
            f"{model.config.backbone}, trained with K={own_k}: "
            f"{params['precision']}, batch {params['bench_batch_size']}"
        )
        write_bytes_atomic(PICTURE, plot_curve(table, own_k, title))
        if active_run() is not None:
            log_artifact(str(CSV))
            log_artifact(str(PICTURE))
    if not ks:
        print("sweep: skipped (sweep_tokens_shared is empty)")
        return
    for row in table.itertuples():
        print(
            f"sweep K={row.num_tokens_shared:>4} ({row.tokens} tokens): mIoU {row.mIoU:.2f}  "
            f"{row.ims_per_sec:.2f} im/s  {row.gflops:.2f} GFLOPs"
        )
