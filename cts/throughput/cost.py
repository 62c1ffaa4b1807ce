"""Compute of one forward: multiply-accumulates and the tokens the encoder processed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from cts.models import Segmenter


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# torch's counter knows the CUDA attention kernels but not the CPU one.
_EXTRA_FLOP_FORMULAS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
}


@dataclass(frozen=True)
class ForwardCost:
    """Multiply-accumulates per image in G (what the paper calls GFLOPs) and the number of
    patch-level tokens the encoder processed (with ToMe, the mean over its blocks)."""

    gmacs: float
    tokens: float


def forward_cost(
    model: Segmenter, image_size: int, num_tokens_shared: int, tome_r: int | None = None
) -> ForwardCost:
    """Count one eager forward of one ``image_size`` square image (``tome_r``: ToMe's ``r``
    for this forward, default the model's own merging)."""
    device = next(model.parameters()).device
    images = torch.zeros(1, 3, image_size, image_size, device=device)
    return batch_cost(model, images, num_tokens_shared=num_tokens_shared, tome_r=tome_r)


def batch_cost(model: Segmenter, images: Tensor, **call: Any) -> ForwardCost:
    """Count one eager forward of ``images`` ``(B, 3, H, W)`` with ``call``'s keywords (for
    a reduction whose tokens depend on the image, as ALGM's): the mean per image."""
    counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOP_FORMULAS)
    with torch.no_grad(), counter:
        out = model(images, **call)
    tokens = out.num_tokens
    tokens = int(tokens) if float(tokens).is_integer() else tokens
    return ForwardCost(counter.get_total_flops() / 2 / 1e9 / images.shape[0], tokens)
