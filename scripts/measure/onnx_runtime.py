"""onnxruntime vs PyTorch eager on the CPU, CTS and K = 0, same process, same images.

    python scripts/measure/onnx_runtime.py [--backbone vit_tiny_patch16_384] [--depth 4] [--batch 4]

Builds the default pipeline's model with random weights (ViT-Ti/16, 4 blocks, crop 512,
12 classes, linear decoder, policy net on a quarter-size input at stride 8, K = 103),
exports it with K and with K = 0 (`cts.export.export_onnx`), and times `Segmenter.predict`
against the exported graphs on the same synthetic scenes, in turns. Prints one markdown row
per K.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from cts.data.synthetic import render_scene
from cts.export import benchmark_onnx, export_onnx
from cts.models import build_segmenter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="vit_tiny_patch16_384")
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--crop", type=int, default=512)
    parser.add_argument("--classes", type=int, default=12)
    parser.add_argument("--decoder", default="linear")
    parser.add_argument("--k", type=int, default=103)
    parser.add_argument("--policy-stride", type=int, default=8)
    parser.add_argument("--policy-scale", type=float, default=0.25)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = build_segmenter(
        backbone=args.backbone,
        depth=args.depth,
        num_classes=args.classes,
        crop_size=args.crop,
        num_tokens_shared=args.k,
        policy="policy_net",
        decoder=args.decoder,
        policy_feature_stride=args.policy_stride,
        policy_input_scale=args.policy_scale,
    ).eval()
    rng = np.random.default_rng(0)
    rgb = np.stack([render_scene(args.crop, args.classes, rng)[0] for _ in range(args.batch)])
    images = torch.from_numpy(rgb).permute(0, 3, 1, 2).float() / 255
    images = (images - 0.5) / 0.5  # the ViT augreg normalisation of the config
    with tempfile.TemporaryDirectory() as folder:
        exported = {k: export_onnx(model, Path(folder) / f"k{k}.onnx", k) for k in (args.k, 0)}
        records = benchmark_onnx(model, exported, images, args.warmup, args.repeats)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
        f"{args.backbone} depth {args.depth}, crop {args.crop}, median of {args.repeats}"
    )
    print("| K | im/s PyTorch eager | im/s onnxruntime | speed-up | labels equal |")
    print("|--:|--:|--:|--:|--:|")
    for r in records:
        print(
            f"| {r['num_tokens_shared']} | {r['ims_per_sec_torch']:.2f} | "
            f"{r['ims_per_sec_onnxruntime']:.2f} | {r['speedup']:.2f}x | "
            f"{100 * r['label_agreement']:.2f}% |"
        )


if __name__ == "__main__":
    main()
