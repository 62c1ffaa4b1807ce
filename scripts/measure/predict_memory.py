"""Peak memory (RSS) and wall time of `cts predict` on one large JPEG, on the CPU.

    python scripts/measure/predict_memory.py [--side 6000] [--checkpoint checkpoints/segmenter.pt]
                                        [--limit-mib 2048]

Writes a ``side x side`` JPEG of a synthetic scene (the pipeline's generator, one scene
upscaled), runs ``cts predict`` on it in a child process with ``--device cpu`` and prints the
child's peak resident set size (``getrusage(RUSAGE_CHILDREN)``: the whole process, torch's
own libraries included) and its wall time. Without ``--checkpoint`` a randomly initialised
model of the default pipeline's shape (ViT-Ti, 4 blocks, 12 classes, crop 512) is saved and
used. Exits 1 when the peak is above ``--limit-mib``.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from cts.checkpoint import save_checkpoint, segmenter_payload
from cts.data.io import write_image
from cts.data.synthetic import render_scene
from cts.models import build_segmenter

CTS = Path(sys.executable).parent / "cts"


def large_photo(path: Path, side: int) -> Path:
    """A ``side x side`` JPEG: a 512 x 512 synthetic scene upscaled (smooth, as photos are)."""
    scene = render_scene(512, 12, np.random.default_rng(0))[0]
    write_image(path, cv2.resize(scene, (side, side), interpolation=cv2.INTER_CUBIC))
    return path


def random_checkpoint(path: Path) -> Path:
    torch.manual_seed(0)
    model = build_segmenter(
        backbone="vit_tiny_patch16_384", depth=4, num_classes=12, decoder="linear"
    )
    return save_checkpoint(path, segmenter_payload(model))


def measure(image: Path, checkpoint: Path, out: Path) -> tuple[float, float]:
    """Peak RSS (MiB) and wall time (s) of one ``cts predict`` child process."""
    command = [str(CTS), "predict", str(image), "-m", str(checkpoint), "-o", str(out)]
    start = time.perf_counter()
    subprocess.run([*command, "--device", "cpu"], check=True, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=6000)
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--limit-mib", type=float, default=2048)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        image = large_photo(folder / "photo.jpg", args.side)
        checkpoint = args.checkpoint or random_checkpoint(folder / "model.pt")
        peak, seconds = measure(image, checkpoint, folder / "out")
    within = peak <= args.limit_mib
    print(
        f"cts predict, {args.side}x{args.side} JPEG on cpu (torch {torch.__version__}): "
        f"peak RSS {peak:.0f} MiB ({'within' if within else 'ABOVE'} {args.limit_mib:.0f}), "
        f"{seconds:.1f} s"
    )
    sys.exit(0 if within else 1)


if __name__ == "__main__":
    main()
