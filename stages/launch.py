"""Running a stage in one process or, from the launch params, in several (cts.launch).

The launch params (`nproc_per_node`, `nnodes`, `node_rank`, `master_addr`, `master_port`,
`rendezvous_timeout`, `num_threads`) say how a stage runs, not what it computes: they are in
no stage's dvc.yaml params and not in the resume fingerprint.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

import torch
import torch.distributed as dist

from cts.launch import (
    LaunchSettings,
    launch,
    launched_externally,
    resolve_nproc_per_node,
    threads_per_process,
)

LAUNCH_PARAMS = (
    "nproc_per_node",
    "nnodes",
    "node_rank",
    "master_addr",
    "master_port",
    "rendezvous_timeout",
    "num_threads",
)
# Stages whose work is split over processes; the others always run in one.
DISTRIBUTED_STAGES = ("train_policy", "train_segmenter", "eval_ss", "eval_ms")


def launch_settings(params: dict[str, Any]) -> LaunchSettings:
    nproc_per_node = resolve_nproc_per_node(params["nproc_per_node"], params["device"])
    return LaunchSettings(
        nproc_per_node=nproc_per_node,
        nnodes=params["nnodes"],
        node_rank=params["node_rank"],
        master_addr=params["master_addr"],
        master_port=params["master_port"],
        timeout=params["rendezvous_timeout"],
        threads=threads_per_process(params["num_threads"], nproc_per_node),
    )


def run_stage(stage: str, params: dict[str, Any], **kwargs: Any) -> None:
    """Runs the stage here, or launches its workers when the params ask for more than one."""
    module = importlib.import_module(f"stages.{stage}")
    if stage not in DISTRIBUTED_STAGES:
        module.run(params, **kwargs)
        return
    if launched_externally():  # a worker of an outer torchrun, one of LOCAL_WORLD_SIZE
        processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(threads_per_process(params["num_threads"], processes))
        module.run(params, **kwargs)
        return
    settings = launch_settings(params)
    if settings.world_size == 1:
        torch.set_num_threads(settings.threads)
        module.run(params, **kwargs)
        return
    if hasattr(module, "per_process_batch"):
        module.per_process_batch(params, settings.world_size)  # a bad split fails here, once
    launch(settings, _worker, stage, params, kwargs)


def _worker(stage: str, params: dict[str, Any], kwargs: dict[str, Any]) -> None:
    importlib.import_module(f"stages.{stage}").run(params, **kwargs)
    if dist.is_initialized():
        dist.destroy_process_group()
