"""The eager upsampling + argmax step alone: F.interpolate + argmax against upsample_argmax.

    python scripts/measure/upsample_argmax.py [--threads 1] [--batch 4] [--repeats 15]

Times, in turns within one process (median of ``--repeats``), the previous eager step of
:meth:`Segmenter.predict` (the fp32 scores upsampled to full resolution, then ``argmax(1)``)
and :func:`cts.models.upsample.upsample_argmax` on class scores laid out as the decoder
gives them (classes innermost), ``(B, C, 32, 32) -> (B, 512, 512)``:

- ``trained-like``: what a trained model gives on synthetic scenes, the log of each class's
  share of the 16x16 patch plus noise (confident inside regions, mixed at boundaries), for
  12 classes (the pipeline's) and 150 (ADE20K);
- ``random ViT-Ti``: the scores of a randomly initialised ViT-Ti row of `cts throughput`
  (150 classes, mask transformer, 12 blocks), with K = 103 and K = 0.

Also prints the share of pixels whose labels agree. With one thread the clock is the
thread's CPU time (the work done, not the waiting for a core on a shared machine).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from cts.data.synthetic import render_scene
from cts.models.upsample import upsample_argmax
from cts.throughput.rows import PAPER_TABLE
from cts.throughput.table import TableSettings, build_row_model


def previous(scores: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The eager step before upsample_argmax: full-resolution fp32 scores, then argmax."""
    upsampled = F.interpolate(scores.float(), size=size, mode="bilinear", align_corners=False)
    return upsampled.argmax(1)


def trained_like(batch: int, classes: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    labels = torch.stack(
        [torch.from_numpy(render_scene(512, 12, rng)[1].astype(np.int64)) for _ in range(batch)]
    )
    labels = torch.where(labels < classes, labels, 0)
    share = F.avg_pool2d(F.one_hot(labels, classes).permute(0, 3, 1, 2).float(), 16)
    noise = torch.randn(share.shape, generator=torch.Generator().manual_seed(seed))
    scores = 4 * torch.log(share + 0.02) + 0.3 * noise
    return scores.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # classes innermost


def random_row_scores(batch: int, k: int) -> torch.Tensor:
    row = next(r for r in PAPER_TABLE if r.key == "vit_ti_512")
    model = build_row_model(row, TableSettings(batch_size=batch), torch.device("cpu"))
    images = torch.randn(batch, 3, 512, 512, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        return model._token_scores(images, None, k)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    one_thread = torch.get_num_threads() == 1
    clock = time.thread_time if one_thread else time.perf_counter
    cases = {
        "trained-like, 12 classes": trained_like(args.batch, 12),
        "trained-like, 150 classes": trained_like(args.batch, 150),
        "random ViT-Ti, 150 classes, K=103": random_row_scores(args.batch, 103),
        "random ViT-Ti, 150 classes, K=0": random_row_scores(args.batch, 0),
    }
    print(
        f"torch={torch.__version__} threads={torch.get_num_threads()} "
        f"clock={'thread CPU time' if one_thread else 'wall'} batch={args.batch} 512x512; "
        f"median of {args.repeats}, ms per batch"
    )
    size = (512, 512)
    calls = {"previous": previous, "upsample_argmax": upsample_argmax}
    with torch.inference_mode():
        for name, scores in cases.items():
            agree = (previous(scores, size) == upsample_argmax(scores, size)).float().mean()
            times = {key: [] for key in calls}
            for i in range(args.repeats + 1):  # the first round is a warm-up
                order = list(calls) if i % 2 == 0 else list(reversed(calls))
                for key in order:
                    start = clock()
                    calls[key](scores, size)
                    if i:
                        times[key].append(clock() - start)
            old, new = (statistics.median(times[key]) * 1e3 for key in calls)
            print(
                f"{name:36s} previous {old:8.1f}  upsample_argmax {new:7.1f}  "
                f"ratio {new / old:.3f}  labels equal {100 * agree:.4f}%"
            )


if __name__ == "__main__":
    main()
