"""Stage `download`: fetch and prepare the dataset named in params (synthetic: generate it)."""

from __future__ import annotations

from typing import Any

from cts.data import prepare_dataset
from cts_stages.mlflow_context import stage_run

PARAMS = (
    "dataset",
    "data_root",
    "dataset_source",
    "dataset_mirror",
    "synthetic_num_train",
    "synthetic_num_val",
    "synthetic_num_classes",
    "synthetic_image_size",
    "seed",
    "mlflow_tracking_uri",
)


def run(params: dict[str, Any]) -> None:
    generation = {}
    if params["dataset"] == "synthetic":
        generation = dict(
            num_train=params["synthetic_num_train"],
            num_val=params["synthetic_num_val"],
            num_classes=params["synthetic_num_classes"],
            image_size=params["synthetic_image_size"],
            seed=params["seed"],
        )
    with stage_run("download", params):
        info = prepare_dataset(
            params["dataset"],
            params["data_root"],
            source=params["dataset_source"],
            mirror=params["dataset_mirror"],
            **generation,
        )
    print(f"{info.name}: {info.num_classes} classes in {params['data_root']}")
