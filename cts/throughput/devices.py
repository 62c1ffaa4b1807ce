"""Devices and precisions: what a measurement runs on, and what it records about it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

BENCH_PRECISIONS = ("fp32", "bf16")


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels (nothing to wait for on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bf16_supported(device: torch.device) -> bool:
    """CPU autocast always has bf16 (emulated where the processor lacks it)."""
    return device.type != "cuda" or torch.cuda.is_bf16_supported()


def resolve_precisions(
    precisions: Sequence[str], device: torch.device, allow_fp32_fallback: bool
) -> tuple[str, ...]:
    """The precisions to measure; bf16 without device support is an error unless allowed."""
    unknown = [p for p in precisions if p not in BENCH_PRECISIONS]
    if unknown or not precisions:
        raise ValueError(f"precision {unknown or '(none)'}: allowed {', '.join(BENCH_PRECISIONS)}")
    if "bf16" not in precisions or bf16_supported(device):
        return tuple(dict.fromkeys(precisions))
    if not allow_fp32_fallback:
        raise ValueError(
            f"bf16 is not supported on {device_name(device)}: measure fp32 only "
            "(--precision fp32) or allow the fallback (--allow-fp32-fallback)"
        )
    return ("fp32",)


def runtime(device: torch.device) -> dict[str, Any]:
    """Device, torch version, and what "fp32" means there: whether TF32 is allowed for
    matmuls / cuDNN convolutions."""
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32) and device.type == "cuda",
    }
