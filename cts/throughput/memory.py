"""Memory: the peak a forward needs, and out-of-memory errors as one line that names the
largest batch that fits."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from cts.engine import autocast
from cts.models import Segmenter
from cts.throughput.compilation import release_compiled
from cts.throughput.devices import device_name, synchronize


class BenchmarkOutOfMemoryError(RuntimeError):
    """A batch does not fit on the device; the message names the largest that does."""


def prewarm_peak_memory_mib(
    calls: dict[Any, Callable[[], object]], device: torch.device, prewarm: int
) -> dict[Any, float | None]:
    """Run each call ``prewarm`` times, one after the other, and return for each the memory
    it needs on its own in MiB: what was allocated before any ran (weights, inputs) plus the
    high-water mark of its own runs above what was allocated when they began. CUDA-graph
    replays allocate nothing, so the first runs (compile, warm-up, recording) are where the
    working memory shows. None on CPU."""
    peaks: dict[Any, float | None] = {}
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    for key, call in calls.items():
        if device.type == "cuda":
            synchronize(device)
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(prewarm):
            call()
        if device.type == "cuda":
            synchronize(device)
            peaks[key] = (base + torch.cuda.max_memory_allocated(device) - before) / 2**20
        else:
            peaks[key] = None
    return peaks


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def largest_fitting_batch(fits: Callable[[int], bool], too_large: int) -> int:
    """Largest batch in ``[1, too_large)`` for which ``fits`` holds (0: none), assuming that
    whatever fits a batch fits every smaller one."""
    low, high = 0, too_large  # fits(low) holds (or low == 0), fits(high) does not
    while high - low > 1:
        middle = (low + high) // 2
        if fits(middle):
            low = middle
        else:
            high = middle
    return low


def check_batch_fits(
    run_batch: Callable[[int], object],
    batch_size: int,
    device: torch.device,
    what: str,
    batch_option: str = "--batch-size",
) -> None:
    """Run one batch; if the device runs out of memory, raise one clear error that names the
    largest batch that fits instead of a CUDA traceback."""

    def fits(batch: int) -> bool:
        try:
            run_batch(batch)
            synchronize(device)
            return True
        except RuntimeError as error:  # torch.OutOfMemoryError is one
            if not is_out_of_memory(error):
                raise
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return False

    if fits(batch_size):
        return
    largest = largest_fitting_batch(fits, batch_size)
    memory = ""
    if device.type == "cuda":
        memory = f" ({torch.cuda.get_device_properties(device).total_memory / 2**30:.0f} GiB)"
    hint = (
        f"the largest batch that fits is {largest}: set {batch_option} {largest}"
        if largest
        else "not even a batch of 1 fits"
    )
    raise BenchmarkOutOfMemoryError(
        f"out of memory: batch {batch_size} of {what} does not fit on "
        f"{device_name(device)}{memory}; {hint}"
    )


def ensure_batch_fits(
    model: Segmenter, images: Tensor, precision: str, what: str, batch_option: str
) -> None:
    """One eager forward without sharing (the larger of the two); on out-of-memory, a clear
    error naming the largest batch that fits. Eager is the conservative test: it writes the
    upsampled scores that a compiled forward never materialises."""
    device = images.device
    with torch.inference_mode(), autocast(device, precision):
        check_batch_fits(
            lambda b: model.predict(images[:b], 0),
            images.shape[0],
            device,
            f"{what} ({images.shape[-2]}x{images.shape[-1]}, {precision})",
            batch_option,
        )


@contextmanager
def out_of_memory_as_error(what: str, advice: str, device: torch.device) -> Iterator[None]:
    """Turn a device out-of-memory error in the block into one clear line."""
    failed = False
    try:
        yield
    except RuntimeError as error:  # torch.OutOfMemoryError is one
        if not is_out_of_memory(error):
            raise
        failed = True
    if failed:  # outside the handler: the traceback's tensors are freed first
        release_compiled(device)
        raise BenchmarkOutOfMemoryError(
            f"out of memory while {what} on {device_name(device)}: {advice}"
        )
