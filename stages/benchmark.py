"""Stage `benchmark`: the trained model with sharing and with sharing off, same process."""

from __future__ import annotations

from typing import Any

from cts.benchmark import compare_sharing
from cts.checkpoint import load_segmenter
from cts.engine import resolve_device
from cts.tracking import log_metrics_file, stage_run
from stages.common import METRICS, SEGMENTER_CHECKPOINT, require, write_json

PARAMS = ("bench_batch_size", "bench_repeats", "device", "precision", "mlflow_tracking_uri")


def run(params: dict[str, Any]) -> None:
    device = resolve_device(params["device"])
    model = load_segmenter(require(SEGMENTER_CHECKPOINT, "train_segmenter"), device).to(device)
    with stage_run(
        "benchmark",
        params,
        uri=params["mlflow_tracking_uri"],
        upstream_metrics=[METRICS / "policy.json", METRICS / "train.json"],
    ):
        results = compare_sharing(
            model,
            batch_size=params["bench_batch_size"],
            image_size=model.config.crop_size,
            num_tokens_shared=model.num_tokens_shared,
            precision=params["precision"],
            warmup=2,
            repeats=params["bench_repeats"],
        )
        write_json(METRICS / "benchmark.json", results)
        log_metrics_file(METRICS / "benchmark.json")
    print(
        f"benchmark on {results['device']}: {results['ims_per_sec']:.2f} im/s with sharing "
        f"({results['tokens']} tokens), {results['ims_per_sec_no_sharing']:.2f} im/s without "
        f"({results['tokens_no_sharing']} tokens): speed-up {results['speedup']:.2f}x"
    )
