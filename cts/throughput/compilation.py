"""Compilation policy: which compile mode, and ``predict`` / the policy net compiled with it."""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from cts.geometry import superpatch_size
from cts.models import Segmenter

COMPILE_MODES = (
    "auto",
    "none",
    "default",
    "reduce-overhead",
    "max-autotune",
    "max-autotune-no-cudagraphs",
)
# Untimed calls per K before timing a compiled forward: compile, warm up, record the graph.
COMPILED_PREWARM = 3

Predict = Callable[[Tensor, int], Tensor]


def resolve_compile_mode(mode: str, device: torch.device) -> str:
    """``auto``: Inductor + CUDA graphs (``reduce-overhead``) on a GPU, eager on CPU."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode {mode!r}: allowed {', '.join(COMPILE_MODES)}")
    if mode == "auto":
        return "reduce-overhead" if device.type == "cuda" else "none"
    return mode


def uses_cuda_graphs(compile_mode: str) -> bool:
    return compile_mode != "none" and bool(
        torch._inductor.list_mode_options(compile_mode).get("triton.cudagraphs", False)
    )


def inference_fn(model: Segmenter, compile_mode: str) -> Predict:
    """``(images, K) -> labels``: the model's :meth:`Segmenter.predict`, compiled or not.

    Compiled as one graph (``fullgraph``: a graph break is an error, not a slower number)
    with static shapes, so that each K and batch size gets its own graph, which CUDA graphs
    replay as one launch. With CUDA graphs, the labels returned are overwritten by the next
    call: clone them to keep them.
    """
    return _compiled(model.predict, compile_mode)


def _compiled(fn: Callable[..., Tensor], compile_mode: str) -> Callable[..., Tensor]:
    """``fn`` compiled as one graph with static shapes (``none``: as it is)."""
    if compile_mode == "none":
        return fn
    compiled = torch.compile(fn, mode=compile_mode, dynamic=False, fullgraph=True)
    if not uses_cuda_graphs(compile_mode):
        return compiled

    def run(*args: Any) -> Tensor:
        # Each call is a new inference step: the graph may reuse the last call's outputs.
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(*args)

    return run


def policy_fn(model: Segmenter, compile_mode: str) -> Callable[[Tensor], Tensor] | None:
    """``images -> (B, S)`` share scores of the model's policy net alone (its input resize
    included; not the top-K selection), compiled as :func:`inference_fn`; None without a
    policy net."""
    if model.policy_net is None:
        return None
    superpatch = superpatch_size(model.patch_size)

    def scores(images: Tensor) -> Tensor:
        # Rounded up, as predict pads the images to whole superpatches.
        grid = (-(-images.shape[-2] // superpatch), -(-images.shape[-1] // superpatch))
        return model.policy_net.share_scores(images, grid)

    return _compiled(scores, compile_mode)


def release_compiled(device: torch.device) -> None:
    """Drop compiled graphs and their CUDA-graph memory pools (and the allocator's cache)."""
    torch.compiler.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
