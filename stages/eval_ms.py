"""Stage `eval_ms`: multi-scale + horizontal-flip sliding-window evaluation."""

from __future__ import annotations

from typing import Any

from cts_stages.evaluation import run_evaluation
from cts_stages.launch import LAUNCH_PARAMS

PARAMS = (
    "data_root",
    "ms_scales",
    "base_size",
    "eval_window",
    "eval_stride",
    "device",
    "precision",
    "num_workers",
    "mlflow_tracking_uri",
    *LAUNCH_PARAMS,
)


def run(params: dict[str, Any]) -> None:
    run_evaluation(params, "eval_ms", scales=params["ms_scales"], flip=True)
