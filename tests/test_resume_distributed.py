"""Exact resume with 2 processes (gloo on CPU): both are SIGKILLed after a checkpoint, the
rerun continues from it, and the final weights are bit-identical to an uninterrupted run."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import Points as EnginePoints
from helpers import free_port, points_count, points_loss
from torch import nn

from cts.data.loader import build_loader
from cts.engine import (
    DistributedContext,
    TrainLoop,
    TrainState,
    batches_from,
    poly_schedule,
    resume,
    seed_everything,
    split_batch,
)

pytestmark = pytest.mark.e2e

ITERATIONS = 6
ACCUM = 2
GLOBAL_BATCH = 4  # 1 point per process and micro-batch


class Points(EnginePoints):
    """Ten points: 5 per process and epoch, so with 2 accumulation steps of 1 point the third
    step takes the last micro-batch of one epoch and the first of the next."""

    def __len__(self) -> int:
        return 10


def _worker(rank: int, port: int, folder: str, kill_at: int | None) -> None:
    """One process of the run: train (or resume) to ITERATIONS; with ``kill_at``, SIGKILL
    itself at that loss evaluation (the same one in every process, after a checkpoint)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        context = DistributedContext(rank, 2)
        seed_everything(rank)  # each process its own dropout stream, as the stages do
        model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.2), nn.Linear(8, 2))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        schedule = poly_schedule(ITERATIONS, warmup=2)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        ddp = nn.parallel.DistributedDataParallel(model)
        micro = split_batch(GLOBAL_BATCH, 2, ACCUM)
        loader = build_loader(Points(), micro, True, 0, seed=0, drop_last=True, distributed=True)
        path = Path(folder) / "last.pt"
        state = resume(path, ddp, optimizer, scheduler, "f") or TrainState()
        calls = {"n": 0}

        def loss_fn(net: nn.Module, batch: dict) -> torch.Tensor:
            calls["n"] += 1
            if kill_at is not None and calls["n"] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return points_loss(net, batch)

        loop = TrainLoop(
            model=ddp,
            optimizer=optimizer,
            scheduler=scheduler,
            loss_fn=loss_fn,
            count_fn=points_count,
            iterations=ITERATIONS,
            device=torch.device("cpu"),
            grad_accum_steps=ACCUM,
            checkpoint_path=path,
            checkpoint_every=2,
            fingerprint="f",
            log_every=1,
            context=context,
        )
        loop.run(state, batches_from(loader, state.iteration, ACCUM))
        if rank == 0:
            torch.save(model.state_dict(), Path(folder) / "final.pt")
    finally:
        dist.destroy_process_group()


def _run(folder: Path, kill_at: int | None = None) -> None:
    mp.spawn(_worker, args=(free_port(), str(folder), kill_at), nprocs=2, join=True)


def test_two_processes_resume_after_sigkill_bit_identical(tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    full.mkdir()
    cut.mkdir()
    _run(full)
    # Loss evaluation 9 is the first micro-batch of iteration 5: after the step-4 checkpoint.
    with pytest.raises(mp.ProcessExitedException):
        _run(cut, kill_at=9)
    assert torch.load(cut / "last.pt", weights_only=True)["iteration"] == 4
    assert not (cut / "final.pt").exists()
    _run(cut)
    reference = torch.load(full / "final.pt", weights_only=True)
    resumed = torch.load(cut / "final.pt", weights_only=True)
    differ = [key for key, value in reference.items() if not torch.equal(resumed[key], value)]
    assert differ == []
