"""Throughput, compute and memory of a Segmenter, with and without token sharing."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from cts.engine import autocast
from cts.models import Segmenter


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# torch's counter knows the CUDA attention kernels but not the CPU one.
_EXTRA_FLOP_FORMULAS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
}


def count_gmacs(model: Segmenter, image_size: int, num_tokens_shared: int) -> float:
    """Multiply-accumulates per image in G (the paper's "GFLOPs"), forward pass."""
    device = next(model.parameters()).device
    images = torch.zeros(1, 3, image_size, image_size, device=device)
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOP_FORMULAS) as c:
        model(images, num_tokens_shared=num_tokens_shared)
    return c.get_total_flops() / 2 / 1e9


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Throughput:
    ims_per_sec: float
    seconds_per_batch: float
    tokens: int
    peak_memory_mb: float | None


def _timed_forward(model: nn.Module, images: torch.Tensor, k: int) -> tuple[float, int]:
    device = images.device
    _synchronize(device)
    start = time.perf_counter()
    out = model(images, num_tokens_shared=k)
    _synchronize(device)
    return time.perf_counter() - start, int(out.num_tokens)


def _peak_memory_mb(model: nn.Module, images: torch.Tensor, k: int) -> float | None:
    """The CUDA allocator's high-water mark over one forward; None on CPU."""
    device = images.device
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    model(images, num_tokens_shared=k)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def measure_throughput(
    model: nn.Module,
    batch_size: int,
    image_size: int,
    ks: tuple[int, ...],
    precision: str = "fp32",
    warmup: int = 3,
    repeats: int = 10,
) -> dict[int, Throughput]:
    """Median forward time of a batch of random images for each K (policy net included).

    The settings are timed in turns, repeat after repeat, so that a change in the machine's
    load during the measurement affects them alike and their ratio stays fair.
    """
    device = next(model.parameters()).device
    images = torch.randn(batch_size, 3, image_size, image_size, device=device)
    model.eval()
    times: dict[int, list[float]] = {k: [] for k in ks}
    tokens: dict[int, int] = {}
    with torch.inference_mode(), autocast(device, precision):
        for i in range(warmup + repeats):
            for k in ks:
                seconds, tokens[k] = _timed_forward(model, images, k)
                if i >= warmup:
                    times[k].append(seconds)
        peaks = {k: _peak_memory_mb(model, images, k) for k in ks}
    results = {}
    for k in ks:
        seconds = statistics.median(times[k])
        results[k] = Throughput(batch_size / seconds, seconds, tokens[k], peaks[k])
    return results


def compare_sharing(
    model: Segmenter,
    batch_size: int,
    image_size: int,
    num_tokens_shared: int,
    precision: str = "fp32",
    warmup: int = 3,
    repeats: int = 10,
) -> dict[str, float | int | str | None]:
    """The same weights with K shared tokens and with sharing off, measured in turns."""
    measured = measure_throughput(
        model, batch_size, image_size, (num_tokens_shared, 0), precision, warmup, repeats
    )
    shared, plain = measured[num_tokens_shared], measured[0]
    device = next(model.parameters()).device
    return {
        "ims_per_sec": shared.ims_per_sec,
        "ims_per_sec_no_sharing": plain.ims_per_sec,
        "speedup": shared.ims_per_sec / plain.ims_per_sec,
        "tokens": shared.tokens,
        "tokens_no_sharing": plain.tokens,
        "gflops": count_gmacs(model, image_size, num_tokens_shared),
        "gflops_no_sharing": count_gmacs(model, image_size, 0),
        "peak_memory_mb": shared.peak_memory_mb,
        "peak_memory_mb_no_sharing": plain.peak_memory_mb,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "batch_size": batch_size,
        "precision": precision,
        "image_size": image_size,
        "num_tokens_shared": num_tokens_shared,
        "torch": torch.__version__,
    }


__all__ = ["Throughput", "compare_sharing", "count_gmacs", "measure_throughput"]
