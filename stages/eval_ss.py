"""Stage `eval_ss`: single-scale sliding-window evaluation."""

from __future__ import annotations

from typing import Any

from cts_stages.evaluation import run_evaluation
from cts_stages.launch import LAUNCH_PARAMS

PARAMS = (
    "data_root",
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
    run_evaluation(params, "eval_ss", scales=(1.0,), flip=False)
