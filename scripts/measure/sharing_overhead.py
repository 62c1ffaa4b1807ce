"""Cost of token sharing + unsharing relative to a whole CTS forward pass (CPU or GPU).

    python scripts/measure/sharing_overhead.py [--backbone vit_tiny_patch16_384] [--batch 2]

Times, with the same inputs, (a) the whole Segmenter forward with K shared tokens and
(b) the sharing machinery alone: layout planning, the superpatch embedding (2x2 downsample +
patch embedding + mean position embedding), share and unshare. Prints medians and the ratio.
"""

from __future__ import annotations

import argparse

import torch

from cts.geometry import num_patches, superpatch_grid, tokens_kept
from cts.models import build_segmenter
from cts.sharing import (
    gather_rows,
    plan_layout,
    select_shared,
    share_tokens,
    unshare_tokens,
)
from cts.throughput.timing import median_seconds_interleaved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="vit_tiny_patch16_384")
    parser.add_argument("--crop", type=int, default=512)
    parser.add_argument("--k", type=int, default=103)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = (
        build_segmenter(
            backbone=args.backbone,
            num_classes=150,
            crop_size=args.crop,
            num_tokens_shared=args.k,
            policy="policy_net",
        )
        .eval()
        .to(device)
    )
    images = torch.randn(args.batch, 3, args.crop, args.crop, device=device)
    encoder = model.encoder
    grid = (args.crop // encoder.patch_size,) * 2
    num_classes = model.config.num_classes
    with torch.no_grad():
        scores = model.policy_net.share_scores(
            images, superpatch_grid(args.crop, args.crop, encoder.patch_size)
        )
        patches = encoder._patch_pixels(images)
        grid_pos = encoder._patch_pos_embed(grid)  # (1, h, w, C)
        pos = grid_pos.flatten(1, 2).expand(args.batch, -1, -1)
        superpatch_pos = torch.nn.functional.avg_pool2d(grid_pos.permute(0, 3, 1, 2), 2)
        superpatch_pos = superpatch_pos.flatten(2).transpose(1, 2).expand(args.batch, -1, -1)
        tokens = tokens_kept(num_patches(args.crop, encoder.patch_size), args.k)
        decoded = torch.randn(args.batch, tokens, num_classes, device=device)

        def sharing_ops() -> None:
            layout = plan_layout(select_shared(scores, args.k), grid)
            # The embedding itself is not counted: the shared sequence needs fewer of them.
            gather_rows(patches, layout.kept_patches)
            encoder._superpatch_pixels(gather_rows(patches, layout.shared_patches))
            share_tokens(pos, superpatch_pos, layout)
            unshare_tokens(decoded, layout)

        forward = median_seconds_interleaved({0: lambda: model(images)}, device, 2, args.repeats)
        sharing = median_seconds_interleaved({0: sharing_ops}, device, 2, args.repeats * 5)
        forward, sharing = forward[0], sharing[0]
    print(
        f"device={device} backbone={args.backbone} crop={args.crop} K={args.k} "
        f"batch={args.batch} torch={torch.__version__}"
    )
    print(f"whole forward (policy net + encoder + decoder + upsampling): {forward * 1e3:.1f} ms")
    print(
        f"sharing + unsharing: {sharing * 1e3:.2f} ms = {100 * sharing / forward:.2f}% "
        f"of the forward"
    )


if __name__ == "__main__":
    main()
