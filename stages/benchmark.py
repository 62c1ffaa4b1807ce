"""Stage `benchmark`: the trained model with its token reduction (CTS sharing, or ToMe or
ALGM merging where it was trained so) and without, same process.

The timing machinery is the one of `cts throughput` (:mod:`cts.throughput`: the paper's
table, random weights); here it runs on the trained weights and on validation images, so
that the bf16/fp32 label agreement is measured on real content.
"""

from __future__ import annotations

from typing import Any

from cts.checkpoint import load_segmenter
from cts.engine import resolve_device, resolve_precision
from cts.models.segmenter import merging_name
from cts.throughput.devices import runtime
from cts.throughput.inputs import validation_batch
from cts.throughput.measure import measure_merging, measure_model
from cts.tracking import log_metrics_file
from cts_stages.common import (
    METRICS,
    SEGMENTER_CHECKPOINT,
    STAGE_SETTINGS,
    require,
    write_json,
)
from cts_stages.mlflow_context import stage_run

PARAMS = (
    "data_root",
    "bench_batch_size",
    "bench_repeats",
    "bench_compile",
    "device",
    "precision",
    "mlflow_tracking_uri",
)


def run(params: dict[str, Any]) -> None:
    device = resolve_device(params["device"])
    model = load_segmenter(require(SEGMENTER_CHECKPOINT, "train_segmenter"), device).to(device)
    images = validation_batch(params["data_root"], model, params["bench_batch_size"]).to(device)
    precision = resolve_precision(device, params["precision"])
    with stage_run("benchmark", params):
        if merging_name(model.config):  # trained merging: its setting against no merging
            record = measure_merging(model, images, precision, 2, params["bench_repeats"])
        else:
            (record,) = measure_model(
                model,
                images,
                model.num_tokens_shared,
                precisions=[precision],
                compile_mode=params["bench_compile"],
                warmup=2,
                repeats=params["bench_repeats"],
                what=f"{model.config.backbone} (bench_batch_size {images.shape[0]})",
                batch_option="bench_batch_size",
                compile_option="bench_compile",
            )
        results = {**record, **runtime(device)}
        write_json(METRICS / "benchmark.json", results)
        log_metrics_file(METRICS / "benchmark.json", settings=STAGE_SETTINGS["benchmark"])
    agreement = results["bf16_fp32_agreement"]
    print(
        f"benchmark on {results['device']}: {results['ims_per_sec']:.2f} im/s with "
        f"{merging_name(model.config) or 'sharing'} ({results['tokens']} tokens), "
        f"{results['ims_per_sec_no_sharing']:.2f} im/s without "
        f"({results['tokens_no_sharing']} tokens): speed-up {results['speedup']:.2f}x"
        + ("" if agreement is None else f"; bf16 labels = fp32 labels on {100 * agreement:.2f}%")
    )
