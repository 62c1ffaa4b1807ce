"""Stage `sweep`: the trained model's accuracy-vs-speed curves, without retraining.

At every K of ``sweep_tokens_shared`` (plus the model's own K): single-scale val mIoU by the
evaluation of `eval_ss` (so the model's own K gives eval_ss's mIoU), and im/s, GFLOPs and
tokens timed and counted as the `benchmark` stage does (all K in turns, one process). At
every threshold of ``sweep_share_thresholds``, the same with K per image (eager, mean tokens
and GFLOPs per image). At every ``r`` of ``sweep_tome_r``, the same weights with ToMe instead
of sharing, and at every threshold of ``sweep_algm_thresholds`` with ALGM (eager, no
retraining unless the model was trained so; tokens are the mean over the encoder's blocks and,
for ALGM, the batch's images).
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from cts.checkpoint import load_segmenter
from cts.data.io import write_bytes_atomic
from cts.engine import resolve_device
from cts.models.segmenter import merging_name, merging_setting
from cts.throughput.inputs import validation_batch
from cts.throughput.measure import measure_merges, measure_sweep, measure_thresholds
from cts.throughput.sweep import (
    check_algm_thresholds,
    check_thresholds,
    check_tome_rs,
    plot_curve,
    sweep_ks,
)
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
    "sweep_share_thresholds",
    "sweep_tome_r",
    "sweep_algm_thresholds",
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
SETTINGS = ("num_tokens_shared", "share_threshold", "tome_r", "algm_threshold")
MEASURES = ("tokens", "mIoU", "ims_per_sec", "gflops")
COLUMNS = SETTINGS + MEASURES  # the CSV's, in order
# MLflow metric prefix and step of each kind of row (a fixed-K row: none, step K).
ROW_KINDS = {
    "share_threshold": ("threshold_", 100),
    "tome_r": ("tome_", 1),
    "algm_threshold": ("algm_", 100),
}
CSV = PLOTS / "k_sweep.csv"
PICTURE = PLOTS / "k_sweep.png"


def _measure(params: dict[str, Any], model, ks: list[int], thresholds: list[float], merges) -> list:
    """Speed and cost records: one per K, then one per threshold, one per ToMe r and one per
    ALGM threshold (``merges``: setting -> values; the same batch)."""
    images = validation_batch(params["data_root"], model, params["bench_batch_size"])
    images = images.to(next(model.parameters()).device)
    records = []
    if ks:
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
    timing = (params["precision"], 2, params["bench_repeats"])
    records += measure_thresholds(model, images, thresholds, *timing)
    for setting, values in merges.items():
        records += measure_merges(model, images, setting, values, *timing)
    return records


def _log(record: dict[str, Any]) -> None:
    """MLflow: a fixed-K row's metrics stepped by K, a threshold row's (``threshold_*``) by
    100 x threshold, a ToMe row's (``tome_*``) by r, an ALGM row's (``algm_*``) by 100 x t."""
    values = {key: record[key] for key in MEASURES}
    for column, (prefix, scale) in ROW_KINDS.items():
        if record.get(column) is not None:
            values = {f"{prefix}{key}": value for key, value in values.items()}
            log_json_metrics(values, step=round(scale * record[column]))
            return
    log_json_metrics(values, step=record["num_tokens_shared"])


def _table(records: list[dict[str, Any]]) -> pd.DataFrame:
    """The records as the CSV's table: a fixed-K row's K and tokens as integers (``103``, not
    ``103.0``), a threshold row's as the means they are."""
    table = pd.DataFrame(records, columns=list(COLUMNS))
    fixed = table["share_threshold"].isna() & table["tome_r"].isna()
    fixed &= table["algm_threshold"].isna()
    table["tome_r"] = pd.Series(
        [None if r != r else int(r) for r in table["tome_r"]], index=table.index, dtype=object
    )
    for column in ("num_tokens_shared", "tokens"):
        values = [int(v) if f else v for v, f in zip(table[column], fixed, strict=True)]
        table[column] = pd.Series(values, index=table.index, dtype=object)
    return table


def run(params: dict[str, Any]) -> None:
    device = resolve_device(params["device"])
    model = load_segmenter(require(SEGMENTER_CHECKPOINT, "train_segmenter"), device).to(device)
    own_k = model.num_tokens_shared
    ks = sweep_ks(params["sweep_tokens_shared"], model)  # the trained crop decides, first
    policy = model.config.policy != "none"
    thresholds = check_thresholds(params["sweep_share_thresholds"]) if policy else []
    merges = {
        "tome_r": check_tome_rs(params["sweep_tome_r"], model),
        "algm_threshold": check_algm_thresholds(params["sweep_algm_thresholds"], model),
    }
    with stage_run("sweep", params):
        wanted = ks or thresholds or any(merges.values())
        records = _measure(params, model, ks, thresholds, merges) if wanted else []
        dataset = validation_set(params, model) if records else None
        for record in records:
            threshold = record.get("share_threshold")
            fixed_k = None if threshold is not None else record["num_tokens_shared"]
            merging = {key: record[key] for key in merges if record.get(key) is not None}
            metric = evaluate_model(
                params,
                model,
                dataset,
                (1.0,),
                False,
                fixed_k,
                share_threshold=threshold,
                **(merging or {"tome_r": 0}),  # a K or threshold row merges nothing
            )
            record["mIoU"] = metric.compute()["mIoU"]
            _log(record)
        table = _table(records)
        write_csv(CSV, table)
        title = (
            f"{model.config.backbone}, trained with {merging_name(model.config) or f'K={own_k}'}"
            f": {params['precision']}, batch {params['bench_batch_size']}"
        )
        write_bytes_atomic(PICTURE, plot_curve(table, own_k, title, merging_setting(model.config)))
        if active_run() is not None:
            log_artifact(str(CSV))
            log_artifact(str(PICTURE))
    if not records:
        print(
            "sweep: skipped (sweep_tokens_shared, sweep_share_thresholds, sweep_tome_r, "
            "sweep_algm_thresholds empty)"
        )
        return
    for row in table.itertuples():
        setting = f"K={int(row.num_tokens_shared):>4}"
        if row.share_threshold == row.share_threshold:  # not NaN: a threshold row
            setting = f"t={row.share_threshold:g} (mean K {row.num_tokens_shared:.1f})"
        elif row.tome_r is not None:
            setting = f"ToMe r={row.tome_r}"
        elif row.algm_threshold == row.algm_threshold:
            setting = f"ALGM t={row.algm_threshold:g}"
        print(
            f"sweep {setting} ({row.tokens:.0f} tokens): mIoU {row.mIoU:.2f}  "
            f"{row.ims_per_sec:.2f} im/s  {row.gflops:.2f} GFLOPs"
        )
