"""Running a stage in one process or, from the launch params, in several (cts.launch).

The launch params (`nproc_per_node`, `nnodes`, `node_rank`, `master_addr`, `master_port`,
`rendezvous_timeout`, `num_threads`) say how a stage runs, not what it computes: they are in
no stage's dvc.yaml params and not in the resume fingerprint.

Under a scheduler that started the job's processes (SLURM's ``srun``, a Kubeflow training
job: :mod:`cts.cluster`), ``auto`` in `nnodes`, `node_rank` and `master_addr` (and a null
`master_port`) takes the scheduler's value; a value set in the params wins for the
rendezvous address and port, and must agree with the scheduler for the node count and index.
A process that is its node's only worker (one task per GPU, or one process per node) runs the
stage itself as that worker; otherwise it launches the node's workers, as torchrun would.
A stage that is not distributed runs on the job's first process only: the others skip it.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from cts.cluster import Placement, Tasks, scheduler_placement
from cts.launch import (
    DEFAULT_MASTER_PORT,
    LaunchSettings,
    launch,
    launched_externally,
    resolve_host,
    resolve_nproc_per_node,
    serve_store,
    threads_per_process,
)
from cts.processes import STOP_SIGNALS, stop_once
from cts_stages.params import ParamError

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
# Node 0's address on one machine, where no scheduler names one.
LOCALHOST = "127.0.0.1"


def _node(params: dict[str, Any], key: str, placement: Placement | None) -> int:
    """``nnodes`` or ``node_rank``: the param, else the scheduler's, else one machine's."""
    value = params[key]
    if placement is None:
        return {"nnodes": 1, "node_rank": 0}[key] if value == "auto" else value
    theirs = getattr(placement, key)
    if value not in ("auto", theirs):
        raise ParamError(
            f"{key}={value}: {placement.scheduler} runs this process with {key} {theirs} "
            f"({placement.origin[key]}): set {key} to auto or {theirs}"
        )
    return theirs


def _master_addr(params: dict[str, Any], placement: Placement | None) -> str:
    """The param, else node 0 of the scheduler's nodes (which must resolve), else this machine."""
    if params["master_addr"] != "auto":
        return params["master_addr"]
    if placement is None:
        return LOCALHOST
    if placement.scheduler == "SLURM":
        # Kubeflow's names are services that may appear in DNS only once their pods run:
        # torch waits for them. SLURM's nodes are known before the job starts.
        hint = ": set master_addr to node 0's address"
        resolve_host(placement.master_addr, placement.origin["master_addr"], hint)
    return placement.master_addr


def _processes(params: dict[str, Any], placement: Placement | None) -> int:
    """Processes on this node: the param (``auto``: the scheduler's count, else one per GPU);
    1 where the scheduler started one task per worker."""
    value = params["nproc_per_node"]
    if placement is not None and placement.tasks is not None:
        if value not in ("auto", 1):
            raise ParamError(
                f"nproc_per_node={value}: SLURM started {placement.tasks.local_world_size} "
                f"tasks on this node ({placement.origin['tasks']}), each one process: set "
                "nproc_per_node to auto or 1, or run one task per node"
            )
        return 1
    theirs = placement.nproc_per_node if placement is not None else None
    if isinstance(theirs, int):
        if value not in ("auto", theirs):
            raise ParamError(
                f"nproc_per_node={value}: {placement.scheduler} runs {theirs} per node "
                f"({placement.origin['nproc_per_node']}): set nproc_per_node to auto or {theirs}"
            )
        value = theirs
    return resolve_nproc_per_node(value, params["device"])


def launch_plan(
    params: dict[str, Any], env: Mapping[str, str] = os.environ
) -> tuple[LaunchSettings, Tasks | None]:
    """This node's launch settings, and the worker this process is when it runs the stage
    itself under a scheduler (None: it launches the node's processes, or runs alone).

    The params, with ``auto`` from the scheduler's environment ``env``; a contradiction
    between them, or a scheduler's variable that cannot be read, is one line.
    """
    placement = scheduler_placement(env)
    nproc_per_node = _processes(params, placement)
    settings = LaunchSettings(
        nproc_per_node=nproc_per_node,
        nnodes=_node(params, "nnodes", placement),
        node_rank=_node(params, "node_rank", placement),
        master_addr=_master_addr(params, placement),
        master_port=params["master_port"] or getattr(placement, "master_port", None),
        timeout=params["rendezvous_timeout"],
        threads=threads_per_process(params["num_threads"], nproc_per_node),
    )
    if settings.node_rank >= settings.nnodes:
        raise ParamError(
            f"node_rank={settings.node_rank}: allowed 0..{settings.nnodes - 1} for "
            f"nnodes={settings.nnodes}"
        )
    if placement is None:
        return settings, None
    if placement.tasks is not None:
        return settings, placement.tasks
    if nproc_per_node == 1:
        return settings, Tasks(settings.node_rank, settings.nnodes, 0, 1)
    return settings, None


def other_process(env: Mapping[str, str] = os.environ) -> str | None:
    """Where this process is in its job (``SLURM node 1 of 2``), unless it is the job's first
    process (node 0, task or rank 0) or alone: None."""
    if all(key in env for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):  # under torchrun
        rank = int(env["RANK"])
        return f"rank {rank} of torchrun's {env['WORLD_SIZE']}" if rank else None
    placement = scheduler_placement(env)
    if placement is None:
        return None
    task = placement.tasks.rank if placement.tasks is not None else 0
    if placement.node_rank == 0 and task == 0:
        return None
    where = f"{placement.scheduler} node {placement.node_rank} of {placement.nnodes}"
    return where + (f", task {task}" if placement.tasks is not None else "")


def first_process(stage: str, params: dict[str, Any]) -> bool:
    """Whether this process is the job's first (rank 0, or node 0 before it launches): the
    one that cleans up after killed runs, and the one that runs a stage that is not
    distributed. Another node's live processes look dead from here, so on a file system the
    nodes share only one may clean up."""
    if stage not in DISTRIBUTED_STAGES or launched_externally():
        return other_process() is None
    settings, worker = launch_plan(params)
    return (worker.rank if worker is not None else settings.node_rank) == 0


def _outside_step_note(stage: str, settings: LaunchSettings, env: Mapping[str, str]) -> None:
    """One line when a distributed stage runs on one node of a SLURM job of several outside
    a job step (the batch script itself, an salloc shell): srun would run it on all."""
    nodes = env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or ""
    stepless = "SLURM_STEP_ID" not in env and "SLURM_STEPID" not in env
    if settings.nnodes == 1 and stepless and nodes.isdigit() and int(nodes) > 1:
        print(
            f"note: {stage} runs on this node only: SLURM job {env.get('SLURM_JOB_ID', '?')} "
            f"has {nodes} nodes, but this is no job step (SLURM_STEP_ID is not set); start "
            "it with srun to use them all",
            file=sys.stderr,
        )


def run_stage(stage: str, params: dict[str, Any], **kwargs: Any) -> None:
    """Runs the stage here, or launches its workers when the params ask for more than one."""
    module = importlib.import_module(f"cts_stages.{stage}")
    if stage not in DISTRIBUTED_STAGES:
        # Once per job: on every node it would do the same work and race on the outputs.
        if (where := other_process()) is not None:
            print(f"{stage}: runs on the job's first process only; this is {where}: skipped")
            return
        module.run(params, **kwargs)
        return
    if launched_externally():  # a worker of an outer torchrun, one of LOCAL_WORLD_SIZE
        processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(threads_per_process(params["num_threads"], processes))
        module.run(params, **kwargs)
        return
    settings, worker = launch_plan(params)
    _outside_step_note(stage, settings, os.environ)
    if worker is not None and worker.world_size > 1:
        _run_as_worker(module, params, settings, worker, kwargs)
        return
    if settings.world_size == 1:
        torch.set_num_threads(settings.threads)
        module.run(params, **kwargs)
        return
    if hasattr(module, "per_process_batch"):
        module.per_process_batch(params, settings.world_size)  # a bad split fails here, once
    launch(settings, _worker, stage, params, kwargs)


def _run_as_worker(
    module, params: dict[str, Any], settings: LaunchSettings, worker: Tasks, kwargs: dict
) -> None:
    """The stage in this process, as worker ``worker.rank`` of a job a scheduler started:
    the environment torchrun would give it, and its handling of stop signals."""
    if hasattr(module, "per_process_batch"):
        module.per_process_batch(params, worker.world_size)
    os.environ.update(
        RANK=str(worker.rank),
        WORLD_SIZE=str(worker.world_size),
        LOCAL_RANK=str(worker.local_rank),
        LOCAL_WORLD_SIZE=str(worker.local_world_size),
        GROUP_RANK=str(settings.node_rank),
        MASTER_ADDR=settings.master_addr,
        MASTER_PORT=str(settings.master_port or DEFAULT_MASTER_PORT),
    )
    torch.set_num_threads(threads_per_process(params["num_threads"], worker.local_world_size))
    # SLURM signals every task at a time limit, and srun passes its own signal on: the
    # second must not cut short the first's cleanup (the MLflow runs ended KILLED).
    for each in STOP_SIGNALS:
        signal.signal(each, stop_once)
    # Rank 0's env:// rendezvous would serve its store on every interface.
    store = None
    if worker.rank == 0:
        port = int(os.environ["MASTER_PORT"])
        store = serve_store(settings.master_addr, port, settings.nnodes, settings.timeout)
    module.run(params, **kwargs)
    if dist.is_initialized():
        dist.destroy_process_group()
    del store


def _worker(stage: str, params: dict[str, Any], kwargs: dict[str, Any]) -> None:
    importlib.import_module(f"cts_stages.{stage}").run(params, **kwargs)
    if dist.is_initialized():
        dist.destroy_process_group()
