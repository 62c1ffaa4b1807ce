"""Stage `sweep`: the trained model's accuracy-vs-speed curve over K, without retraining.

At every K of ``sweep_tokens_shared`` (plus the model's own K): single-scale val mIoU by the
evaluation of `eval_ss` (so the model's own K gives eval_ss's mIoU), and im/s, GFLOPs and
tokens timed and counted as the `benchmark` stage does (all K in turns, one process).
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from cts.checkpoint import load_segmenter
from cts.data.io import write_bytes_atomic
from cts.engine import resolve_device
from cts.throughput.inputs import validation_batch
from cts.throughput.measure import measure_sweep
from cts.throughput.sweep import plot_curve, sweep_ks
from cts.tracking import active_run, log_artifact, log_json_metrics
from cts_stages.common import (
    PLOTS,
    SEGMENTER_CHECKPOINT,
    require,
    write_csv,
)
from cts_stages.evaluation import evaluate_model, validation_set
from cts_stages.mlflow_context import stage_run

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


def run(params: dict[str, Any]) -> None:
    device = resolve_device(params["device"])
    model = load_segmenter(require(SEGMENTER_CHECKPOINT, "train_segmenter"), device).to(device)
    own_k = model.num_tokens_shared
    ks = sweep_ks(params["sweep_tokens_shared"], model)  # the trained crop decides, first
    with stage_run("sweep", params):
        records = []
        if ks:
            batch = validation_batch(params["data_root"], model, params["bench_batch_size"])
            images = batch.to(device)
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
