"""Running a stage in one process or, from the launch params, in several (cts.launch).

The launch params (`nproc_per_node`, `nnodes`, `node_rank`, `master_addr`, `master_port`,
`rendezvous_timeout`) say how a stage runs, not what it computes: they are in no stage's
dvc.yaml params and not in the resume fingerprint.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch.distributed as dist

from cts.launch import LaunchSettings, launch, launched_externally, resolve_nproc_per_node

LAUNCH_PARAMS = (
    "nproc_per_node",
    "nnodes",
    "node_rank",
    "master_addr",
    "master_port",
    "rendezvous_timeout",
)
# Stages whose work is split over processes; the others always run in one.
DISTRIBUTED_STAGES = ("train_policy", "train_segmenter", "eval_ss", "eval_ms")


def launch_settings(params: dict[str, Any]) -> LaunchSettings:
    return LaunchSettings(
        nproc_per_node=resolve_nproc_per_node(params["nproc_per_node"], params["device"]),
        nnodes=params["nnodes"],
        node_rank=params["node_rank"],
        master_addr=params["master_addr"],
        master_port=params["master_port"],
        timeout=params["rendezvous_timeout"],
    )


def run_stage(stage: str, params: dict[str, Any], **kwargs: Any) -> None:
    """Runs the stage here, or launches its workers when the params ask for more than one."""
    module = importlib.import_module(f"stages.{stage}")
    if stage not in DISTRIBUTED_STAGES or launched_externally():
        module.run(params, **kwargs)
        return
    settings = launch_settings(params)
    if settings.world_size == 1:
        module.run(params, **kwargs)
        return
    if hasattr(module, "per_process_batch"):
        module.per_process_batch(params, settings.world_size)  # a bad split fails here, once
    launch(settings, _worker, stage, params, kwargs)


def _worker(stage: str, params: dict[str, Any], kwargs: dict[str, Any]) -> None:
    importlib.import_module(f"stages.{stage}").run(params, **kwargs)
    if dist.is_initialized():
        dist.destroy_process_group()
