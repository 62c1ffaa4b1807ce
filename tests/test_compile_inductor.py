"""What the docs promise of Inductor (docs/speed.md, docs/results.md): compiled, the
upsampling fuses into the argmax and the full-resolution scores are never written.

Checked on CPU Inductor, in the code it generates: no buffer is as large as the
``(B, n_cls, H, W)`` scores. (The first compile takes ~30 s on two loaded cores, a cached
one a few seconds.)
"""

from __future__ import annotations

import math
import os
import re
import shutil

import pytest
import torch
import torch.nn.functional as F

from cts.models.upsample import upsample_argmax

pytestmark = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "g++")) is None,
    reason="Inductor on CPU needs a C++ compiler",
)


def allocations(code: str) -> list[tuple[int, ...]]:
    """Shapes of the buffers the generated code allocates (``empty_strided_cpu((shape),
    (stride), dtype)``)."""
    shapes = re.findall(r"empty_strided_cpu\(\(([^)]*)\)", code)
    return [tuple(int(x) for x in shape.split(",") if x.strip()) for shape in shapes]


def test_inductor_never_writes_the_full_resolution_scores():
    from torch._inductor.utils import run_and_get_code

    scores = torch.randn(2, 5, 6, 7, generator=torch.Generator().manual_seed(0))
    full_scores = 2 * 5 * 96 * 112
    torch.compiler.reset()
    compiled = torch.compile(lambda s: upsample_argmax(s, (96, 112), (90, 100)), fullgraph=True)
    labels, codes = run_and_get_code(compiled, scores)
    torch.compiler.reset()
    expected = F.interpolate(scores, size=(96, 112), mode="bilinear").argmax(1)[:, :90, :100]
    assert torch.equal(labels, expected)
    shapes = allocations("\n".join(codes))
    assert shapes, codes  # the labels at least
    assert max(math.prod(s) for s in shapes) < full_scores / 2, shapes
