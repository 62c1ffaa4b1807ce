"""Training engine: device and precision, distributed setup, resumable training loop."""

from __future__ import annotations

import contextlib
import math
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader

from cts.checkpoint import load_checkpoint, save_checkpoint, unwrap
from cts.processes import DeferredStop
from cts.progress import progress_bar

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without one is an error."""
    if name not in DEVICES:
        raise ValueError(f"device={name!r}: allowed {', '.join(DEVICES)}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device=cuda but no CUDA device is available: use auto or cpu")
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(name)


def fast_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 matrix products natively: a CUDA GPU with bf16, or a
    CPU with AMX or AVX512-BF16 (elsewhere bf16 is emulated and slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def resolve_precision(device: torch.device, precision: str) -> str:
    """``auto``: bf16 where :func:`fast_bf16`, else fp32; any other value as given."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: allowed {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if fast_bf16(device) else "fp32"
    return precision


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed-precision context for ``precision`` (fp32: none; auto: :func:`resolve_precision`)."""
    precision = resolve_precision(device, precision)
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision=fp16 needs a CUDA device: use bf16 or fp32 on CPU")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"precision=bf16 is not supported by {torch.cuda.get_device_name()}")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def prefer_matmul_attention(model: nn.Module, device: torch.device, precision: str) -> None:
    """On a CPU in bf16, switch timm's attention blocks to their explicit matrix-product path:
    at 700 tokens its backward takes about half the time of the fused flash kernel's (whose
    CPU backward is its slowest op), and the forward is faster too. Elsewhere: unchanged."""
    if device.type != "cpu" or resolve_precision(device, precision) != "bf16":
        return
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class DistributedContext:
    rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> DistributedContext:
    """Join the process group torchrun describes in the environment (nccl on GPU, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size <= 1:
        return DistributedContext()
    if not dist.is_initialized():
        cuda = device.type == "cuda"
        dist.init_process_group(
            backend="nccl" if cuda else "gloo", device_id=device if cuda else None
        )
    return DistributedContext(dist.get_rank(), dist.get_world_size())


def split_batch(
    batch_size: int, world_size: int, grad_accum_steps: int = 1, key: str = "batch_size"
) -> int:
    """Per-process micro-batch of a global ``batch_size`` over processes and accumulation steps."""
    parts = world_size * grad_accum_steps
    if batch_size % parts:
        raise ValueError(
            f"{key}={batch_size} is the global batch and must divide evenly over "
            f"{world_size} process(es) x {grad_accum_steps} accumulation step(s); "
            f"use a multiple of {parts}"
        )
    return batch_size // parts


def _all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum over processes, differentiable: the backward sums the gradients over processes.

    torch's functional collectives, which replace ``torch.distributed.nn.functional`` (its
    ``all_reduce`` warns of its deprecation in every process): the same all-reduce of the
    process group, its autograd registered by torch.
    """
    from torch.distributed import _functional_collectives as collectives

    return collectives.all_reduce(tensor, "sum", dist.group.WORLD)


class _GlobalBatchNorm:
    """Mixin for a BatchNorm2d class (torch's or timm's BatchNormAct2d): in training under a
    process group, the batch statistics are those of the global batch, as one process would
    compute them. torch's SyncBatchNorm does this only on GPUs; this one runs on any device
    (gloo on CPU), and the state dict is unchanged (the class is swapped in place)."""

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        dims = [0, 2, 3]
        count = _all_reduce_sum(x.new_tensor([x.numel() / x.shape[1]], dtype=torch.float64))
        stats_dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        xf = x.to(stats_dtype)
        mean = _all_reduce_sum(xf.sum(dims)) / count.to(stats_dtype)
        centered = xf - mean[None, :, None, None]
        # Two passes (mean, then centred squares): as accurate as one process's variance.
        var = _all_reduce_sum(centered.square().sum(dims)) / count.to(stats_dtype)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = self.momentum
                if momentum is None:  # cumulative moving average
                    momentum = 1.0 / float(self.num_batches_tracked)
                unbiased = var * (count / (count - 1).clamp(min=1)).to(stats_dtype)
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), momentum)
                self.running_var.lerp_(unbiased.detach().to(self.running_var.dtype), momentum)
        y = centered * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        y = y.to(x.dtype)
        if hasattr(self, "act"):  # timm's BatchNormAct2d: dropout then activation after the norm
            y = self.act(self.drop(y))
        return y


def sync_batch_norm(model: nn.Module) -> nn.Module:
    """Make every BatchNorm2d of ``model`` normalise by global-batch statistics when trained
    under a process group (see :class:`_GlobalBatchNorm`); in place, returns ``model``."""
    swapped: dict[type, type] = {}
    for module in model.modules():
        cls = type(module)
        if not isinstance(module, nn.BatchNorm2d) or isinstance(module, _GlobalBatchNorm):
            continue
        if cls not in swapped:
            swapped[cls] = type(f"Global{cls.__name__}", (_GlobalBatchNorm, cls), {})
        module.__class__ = swapped[cls]
    return model


def wrap_distributed(model: nn.Module, context: DistributedContext, device: torch.device):
    """DDP over the process group (the model itself in a one-process run)."""
    if not context.enabled:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def poly_schedule(iterations: int, power: float = 0.9, warmup: int = 0) -> Callable[[int], float]:
    """LR factor: linear warm-up, then polynomial decay to 0 at ``iterations``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(iterations - warmup, 1)
        return max(1.0 - progress, 0.0) ** power

    return factor


def segmenter_poly_schedule(
    iterations: int,
    base_lr: float,
    power: float = 0.9,
    warmup: int = 0,
    min_lr: float = 1e-5,
) -> Callable[[int], float]:
    """LR factor (of ``base_lr``) of Segmenter's ``PolynomialLR`` (the authors'
    ``segm/optim/scheduler.py``, stepped after every optimizer step).

    The lr of iteration ``i`` (0-based: ``i`` steps done before it) is
    ``(base_lr - min_lr) * c + min_lr`` with ``c = (1 - i / iterations) ** power`` from
    ``warmup`` on and ``c = i / warmup * (1 - warmup / iterations) ** power`` before; their
    scheduler leaves iteration 0 at ``base_lr`` (also with a warm-up) and holds the lr
    past ``iterations`` (at ``min_lr``).
    """

    def lr(step: int) -> float:
        if step == 0:
            return base_lr
        step = min(step, iterations)
        if step < warmup:
            coef = step / warmup * max(1.0 - warmup / iterations, 0.0) ** power
        else:
            coef = max(1.0 - step / iterations, 0.0) ** power
        return (base_lr - min_lr) * coef + min_lr

    return lambda step: lr(step) / base_lr


def batches_from(
    loader: DataLoader, start_iteration: int = 0, grad_accum_steps: int = 1
) -> Iterator[dict]:
    """Endless (micro-)batches, epoch after epoch, positioned after ``start_iteration``
    optimizer steps of ``grad_accum_steps`` micro-batches each (for resuming).

    The stream is the epochs' batches end to end, so the position is a count of
    micro-batches: a step that takes the last micro-batch of one epoch and the first of the
    next resumes exactly as well.
    """
    per_epoch = len(loader)
    if per_epoch == 0:
        raise ValueError("the training loader yields no batch: fewer samples than batch_size")
    epoch, skip = divmod(start_iteration * grad_accum_steps, per_epoch)
    while True:
        loader.sampler.set_epoch(epoch)
        for index, batch in enumerate(loader):
            if index >= skip:
                yield batch
        epoch, skip = epoch + 1, 0


@dataclass
class TrainState:
    """Where training stands; saved in every checkpoint."""

    iteration: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    # The fp16 GradScaler's state (scale, growth tracker): a resumed run continues at the
    # scale it had reached instead of restarting at 65536 and skipping steps again.
    grad_scaler: dict[str, Any] | None = None
    # The sum and count of the losses since the last logged row: a run stopped between two
    # rows logs the next one as an uninterrupted run does.
    unlogged: tuple[float, int] = (0.0, 0)


def resume(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    fingerprint: str,
) -> TrainState | None:
    """Restore a run from its last checkpoint if it was made with the same settings."""
    if not path.is_file():
        return None
    payload = load_checkpoint(path)
    if payload.get("fingerprint") != fingerprint:
        return None
    unwrap(model).load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    _restore_rng(payload.get("torch_rng_per_rank") or [payload["torch_rng"]])
    _restore_cuda_rng(payload.get("cuda_rng_per_rank"))
    unlogged = tuple(payload.get("unlogged", (0.0, 0)))
    return TrainState(
        payload["iteration"], payload["history"], payload.get("grad_scaler"), unlogged
    )


def _restore_cuda_rng(states: list[Tensor | None] | None) -> None:
    """On a GPU, dropout, drop-path and the random policy draw from the device's generator:
    each process continues the stream of its saved rank (same process count only)."""
    if not states or not torch.cuda.is_available():
        return
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if len(states) == world and states[rank] is not None:
        torch.cuda.set_rng_state(states[rank].cpu())


def _restore_rng(states: list[Tensor]) -> None:
    """Each process continues its own random stream (dropout, drop-path)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if len(states) == world:
        torch.set_rng_state(states[rank])
        return
    # Saved by another process count: the streams cannot continue; keep them distinct.
    torch.set_rng_state(states[0])
    if rank:
        torch.manual_seed(int(torch.randint(2**31, ())) + rank)


@dataclass
class TrainLoop:
    """A resumable, iteration-based loop with gradient accumulation and mixed precision.

    ``loss_fn(model, batch)`` returns the *sum* of the per-element losses (pixels, superpatches)
    of one micro-batch already on device; ``count_fn(batch)`` the number of elements that count
    (ignored ones left out). The loop divides by the count over the whole global batch, all
    micro-batches and processes, so that W processes compute the gradient of one.
    ``evaluate(model)`` (optional, every ``eval_every``) returns metrics for the history.
    ``checkpoint_payload()`` returns what to store besides the training state (config...).
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loss_fn: Callable[[nn.Module, dict], Tensor]
    count_fn: Callable[[dict], Tensor]
    iterations: int
    device: torch.device
    precision: str = "fp32"
    grad_accum_steps: int = 1
    checkpoint_path: Path | None = None
    checkpoint_every: int = 0
    checkpoint_payload: Callable[[], dict[str, Any]] = dict
    fingerprint: str = ""
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None
    eval_every: int = 0
    log_every: int = 10
    on_log: Callable[[int, dict[str, float]], None] | None = None
    context: DistributedContext = field(default_factory=DistributedContext)
    description: str = "train"

    def _save(self, state: TrainState) -> None:
        if self.checkpoint_path is None:
            return
        cuda = self.device.type == "cuda"
        own = (torch.get_rng_state(), torch.cuda.get_rng_state(self.device) if cuda else None)
        states = [own]
        if self.context.enabled:
            states = [None] * self.context.world_size
            dist.all_gather_object(states, own)
        rng_states = [cpu for cpu, _ in states]
        if not self.context.is_main:
            return
        payload = self.checkpoint_payload()
        payload.update(
            model=unwrap(self.model).state_dict(),
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            iteration=state.iteration,
            history=state.history,
            fingerprint=self.fingerprint,
            torch_rng=rng_states[0],
            torch_rng_per_rank=rng_states,
            cuda_rng_per_rank=[device for _, device in states] if cuda else None,
            grad_scaler=self._scaler.state_dict() if self._scaler.is_enabled() else None,
            unlogged=state.unlogged,
        )
        save_checkpoint(self.checkpoint_path, payload)

    def _log(self, state: TrainState, row: dict[str, float]) -> None:
        row = {"step": state.iteration, **row}
        state.history.append(row)
        if self.on_log is not None and self.context.is_main:
            self.on_log(state.iteration, row)

    def _step(self, batches: Iterator[dict]) -> float:
        """One optimizer step over ``grad_accum_steps`` micro-batches; returns the mean loss."""
        scaler_needed = self.precision == "fp16"
        micro_batches = [next(batches) for _ in range(self.grad_accum_steps)]
        count = torch.zeros((), dtype=torch.float64, device=self.device)
        for batch in micro_batches:
            count += self.count_fn(batch).to(self.device, torch.float64)
        if self.context.enabled:
            dist.all_reduce(count)
        # DDP averages the gradients of the W processes: W x (local sum / global count) sums
        # to the gradient of one process over the whole batch, ignored elements included.
        scale = self.context.world_size / count.clamp(min=1)
        total = torch.zeros((), device=self.device)
        for micro, batch in enumerate(micro_batches):
            batch = {
                k: v.to(self.device, non_blocking=True) if isinstance(v, Tensor) else v
                for k, v in batch.items()
            }
            sync = micro == self.grad_accum_steps - 1 or not self.context.enabled
            sync_context = contextlib.nullcontext() if sync else self.model.no_sync()
            with sync_context, autocast(self.device, self.precision):
                loss = self.loss_fn(self.model, batch) * scale
            (self._scaler.scale(loss) if scaler_needed else loss).backward()
            total += loss.detach()
        if self.context.enabled:
            dist.all_reduce(total)
            total /= self.context.world_size
        if scaler_needed:
            self._scaler.step(self.optimizer)
            self._scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        value = total.item()
        if not math.isfinite(value):
            raise FloatingPointError(
                f"training diverged at iteration {self.scheduler.last_epoch}: loss={value}; "
                "lower lr or use precision fp32"
            )
        return value

    def _stop_requested(self, stop: DeferredStop) -> bool:
        """Whether a process of the run received SIGTERM or SIGUSR1: all of them ask after
        every step and agree (the largest signal number), so all stop after the same one."""
        if not self.context.enabled:
            return bool(stop.signum)
        flag = torch.tensor([stop.signum], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        agreed = int(flag.item())
        if agreed:
            stop.request(agreed)
        return bool(agreed)

    def run(self, state: TrainState, batches: Iterator[dict]) -> TrainState:
        """Train from ``state`` to ``iterations``; the last checkpoint holds the end state.

        SIGTERM or SIGUSR1 ends the run after the step in progress (and its validation when
        one is due): the resume checkpoint of that step is written, then the signal goes to
        the handler the process had (a stage raises :class:`~cts.processes.Terminated`).
        """
        # On the loop's device: a CUDA scaler on a CPU-only machine disables itself.
        self._scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        if state.grad_scaler and self._scaler.is_enabled():
            self._scaler.load_state_dict(state.grad_scaler)
        self.model.train()
        with DeferredStop() as stop:
            self._train(state, batches, stop)
            self._save(state)
        return state

    def _train(self, state: TrainState, batches: Iterator[dict], stop: DeferredStop) -> None:
        running, count = state.unlogged
        with progress_bar() as bar:
            task = bar.add_task(
                self.description,
                total=self.iterations,
                completed=state.iteration,
                status="",
                visible=self.context.is_main,
            )
            while state.iteration < self.iterations:
                running += self._step(batches)
                count += 1
                state.iteration += 1
                if state.iteration % self.log_every == 0 or state.iteration == self.iterations:
                    lr = self.optimizer.param_groups[0]["lr"]
                    self._log(state, {"loss": running / count, "lr": lr})
                    status = f"loss {running / count:.4f}"
                    bar.update(task, completed=state.iteration, status=status)
                    running, count = 0.0, 0
                state.unlogged = (running, count)
                if (
                    self.evaluate is not None
                    and self.eval_every
                    and (
                        state.iteration % self.eval_every == 0 or state.iteration == self.iterations
                    )
                ):
                    # Every process scores its share of the validation set with the bare
                    # module (no DDP forward) and the metric is summed over processes.
                    self._log(state, self.evaluate(unwrap(self.model)))
                    self.model.train()
                bar.update(task, completed=state.iteration)
                if self._stop_requested(stop):
                    return  # run() writes the checkpoint of this step
                if self.checkpoint_every and state.iteration % self.checkpoint_every == 0:
                    self._save(state)
