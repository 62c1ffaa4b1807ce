"""Timing: calls timed in turns, so that a change in the machine's load affects them alike."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from cts.engine import autocast
from cts.models import Segmenter
from cts.throughput.compilation import (
    COMPILED_PREWARM,
    inference_fn,
    policy_fn,
    release_compiled,
    resolve_compile_mode,
)
from cts.throughput.devices import synchronize
from cts.throughput.memory import prewarm_peak_memory_mib

POLICY = "policy"  # the key of the policy net's own timing in time_inference's results


def median_seconds_interleaved(
    calls: dict[Any, Callable[[], object]],
    device: torch.device,
    warmup: int,
    repeats: int,
) -> dict[Any, float]:
    """Median wall time of each call. The calls are timed in turns, in alternating order,
    repeat after repeat, so that a change in the machine's load affects them alike."""
    times: dict[Any, list[float]] = {key: [] for key in calls}
    for i in range(warmup + repeats):
        order = list(calls) if i % 2 == 0 else list(reversed(calls))
        for key in order:
            synchronize(device)
            start = time.perf_counter()
            calls[key]()
            synchronize(device)
            if i >= warmup:
                times[key].append(time.perf_counter() - start)
    return {key: statistics.median(values) for key, values in times.items()}


def time_inference(
    model: Segmenter,
    images: Tensor,
    ks: Sequence[int],
    precision: str = "fp32",
    compile_mode: str = "none",
    warmup: int = 3,
    repeats: int = 10,
    time_policy: bool = False,
) -> tuple[dict[int | str, float], dict[int | str, float | None]]:
    """Median seconds per batch and peak memory in MiB (None on CPU) of
    :meth:`Segmenter.predict` at each K, the K timed in turns; with ``time_policy`` (and a
    policy net) also the policy net alone, under the key :data:`POLICY`, in the same turns.

    Compiled forwards get at least :data:`COMPILED_PREWARM` untimed calls per K before
    ``warmup`` more; their graphs are released afterwards.
    """
    compile_mode = resolve_compile_mode(compile_mode, images.device)
    predict = inference_fn(model, compile_mode)
    # K shared and no merging (share_threshold None, tome_r 0), also on a model trained with
    # ToMe; positional: the CUDA-graph wrapper passes no keywords.
    calls: dict[int | str, Callable[[], object]] = {
        k: (lambda k=k: predict(images, k, None, 0)) for k in dict.fromkeys(ks)
    }
    policy = policy_fn(model, compile_mode) if time_policy else None
    if policy is not None:
        calls[POLICY] = lambda: policy(images)
    return time_calls(model, calls, images.device, precision, compile_mode, warmup, repeats)


def time_calls(
    model: Segmenter,
    calls: dict[Any, Callable[[], object]],
    device: torch.device,
    precision: str,
    compile_mode: str,
    warmup: int,
    repeats: int,
) -> tuple[dict[Any, float], dict[Any, float | None]]:
    """Median seconds and peak memory in MiB (None on CPU) of each call, timed in turns
    after one untimed call each (:data:`COMPILED_PREWARM` compiled) and ``warmup`` more;
    compiled graphs released afterwards."""
    prewarm = 1 if compile_mode == "none" else COMPILED_PREWARM
    model.eval()
    try:
        with torch.inference_mode(), autocast(device, precision):
            peaks = prewarm_peak_memory_mib(calls, device, prewarm)
            seconds = median_seconds_interleaved(calls, device, warmup, repeats)
    finally:
        release_compiled(device)
    return seconds, peaks
