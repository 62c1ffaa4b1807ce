"""What the training stages share: device and process group, seed, resume, tracking, clean-up.

A training stage calls :func:`start_training`, builds its model, data and
:class:`cts.engine.TrainLoop`, and hands the loop to :func:`train`, which resumes it from a
checkpoint of the same settings, runs it inside the stage's MLflow run and, on the main
process, lets the stage write its outputs before the resume checkpoints are removed.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cts.engine import (
    DistributedContext,
    TrainLoop,
    TrainState,
    init_distributed,
    resolve_device,
    resume,
    seed_everything,
    wrap_distributed,
)
from cts_stages.common import RESUME_DIR, remove_resume_checkpoints
from cts_stages.fingerprint import fingerprint
from cts_stages.mlflow_context import stage_run


@dataclass(frozen=True)
class Session:
    """Where a training stage runs: its device, its process in the group, when it started
    (``time.time()``: resume checkpoints older than that are a finished run's to remove)."""

    device: torch.device
    context: DistributedContext
    started: float

    def distributed(self, model: nn.Module) -> nn.Module:
        """``model`` under DDP over the process group (itself in a one-process run)."""
        return wrap_distributed(model, self.context, self.device)


def start_training(params: dict[str, Any]) -> Session:
    """Resolve the ``device``, join the process group torchrun describes and seed."""
    started = time.time()
    device = resolve_device(params["device"])
    context = init_distributed(device)
    # Distinct dropout/drop-path streams per process; DDP copies rank 0's initial weights.
    seed_everything(params["seed"] + context.rank)
    return Session(device, context, started)


def train(
    stage: str,
    params: dict[str, Any],
    keys: Iterable[str],
    session: Session,
    loop: TrainLoop,
    batches: Callable[[int], Iterator[dict]],
    finish: Callable[[TrainState, float], str],
    resume_training: bool = True,
) -> None:
    """Run ``loop`` for ``stage`` (``train_<name>``), checkpointed to
    ``checkpoints/resume/<name>-<fingerprint of the keys' params>.pt``, resumed from it when
    ``resume_training`` and it exists, inside the stage's MLflow run.

    ``batches(iteration)`` is the stream of micro-batches after ``iteration`` optimizer
    steps. On the main process, ``finish(state, seconds)`` (the training's wall time of this
    run) writes the outputs inside the MLflow run and returns the line printed once the
    resume checkpoints are removed; the other processes return after training.
    """
    name = stage.removeprefix("train_")
    key = fingerprint(params, keys)
    resume_path = RESUME_DIR / f"{name}-{key}.pt"
    loop = dataclasses.replace(loop, checkpoint_path=resume_path, fingerprint=key)
    state = None
    if resume_training:
        state = resume(resume_path, loop.model, loop.optimizer, loop.scheduler, key)
    state = state or TrainState()
    if state.iteration and session.context.is_main:
        print(f"resuming {name} training at iteration {state.iteration} from {resume_path}")

    with stage_run(stage, params):
        started = time.perf_counter()
        state = loop.run(state, batches(state.iteration))
        if not session.context.is_main:
            return
        summary = finish(state, time.perf_counter() - started)
    resume_path.unlink(missing_ok=True)
    remove_resume_checkpoints(name, session.started)
    print(summary)
