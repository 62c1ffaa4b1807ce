"""cts.adaptive_merging and cts.models.algm against tue-mps/algm-segmenter's own code, once.

    git clone https://github.com/tue-mps/algm-segmenter /tmp/algm   # 674eaa2 was checked
    pip install einops                                             # their code imports it
    python scripts/algm_fidelity.py /tmp/algm

Their ``algm/algm/local_merge.py`` and ``global_merge.py`` are imported from the checkout
(their package ``__init__`` is skipped: it imports their Segmenter). One image per call: their
code takes a batch's merge count as the minimum over its images, ours each image's own, and
the two agree on one image. Prints the largest difference of each check; exit 1 above 1e-5.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import timm
import torch

from cts.adaptive_merging import apply_plan, global_plan
from cts.models.algm import _local, algm_features


def _load(root: Path, name: str) -> types.ModuleType:
    path = root / "algm" / "algm" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"algm_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _with_similar_windows(x: torch.Tensor, grid: int, share: float) -> torch.Tensor:
    """``x`` ``(1, 1 + N, C)`` with about ``share`` of its 2x2 windows made near-uniform."""
    patches = x[:, 1:].reshape(1, grid // 2, 2, grid // 2, 2, -1)
    chosen = torch.rand(grid // 2, grid // 2) < share
    noise = 0.05 * torch.randn_like(patches)
    flat = patches[:, :, :1, :, :1] + noise
    patches = torch.where(chosen[None, :, None, :, None, None], flat, patches)
    return torch.cat([x[:, :1], patches.reshape(1, grid * grid, -1)], dim=1)


def check_local(local, cases: int = 100) -> float:
    """conditional_pooling + merge_wavg against the local plan: tokens, order and sizes."""
    worst, reordered = 0.0, 0
    for case in range(cases):
        torch.manual_seed(case)
        grid = 2 * int(torch.randint(1, 9, ()))
        x = _with_similar_windows(torch.randn(1, 1 + grid * grid, 16), grid, case / cases)
        threshold = float(torch.rand(()) * 0.9 + 0.05)
        merge = local.conditional_pooling(x, threshold, (2, 2))
        theirs, their_size = local.merge_wavg(merge, x)
        plan = _local(x, threshold, (grid, grid), 1)
        ours, our_size = apply_plan(x, torch.ones(*x.shape[:2], 1), plan)
        if ours.shape != theirs.shape:
            raise SystemExit(f"local case {case}: {tuple(ours.shape)} != {tuple(theirs.shape)}")
        if (ours - theirs).abs().max() > 1e-5:  # two windows of (near-)equal similarity
            ours, theirs = _by_rows(ours), _by_rows(theirs)  # may swap places: same set?
            reordered += 1
        worst = max(worst, (ours - theirs).abs().max().item(), (our_size - their_size).abs().max())
    print(f"  local: {reordered} of {cases} cases order two windows of near-equal similarity apart")
    return float(worst)


def _by_rows(x: torch.Tensor) -> torch.Tensor:
    """The rows of ``x`` ``(1, T, C)`` sorted by their first feature."""
    return x[:, x[0, :, 0].argsort()]


def check_global(merging, cases: int = 100) -> float:
    """turbo_matching + merge_wavg against the global plan, sizes not all one."""
    worst = 0.0
    for case in range(cases):
        torch.manual_seed(1000 + case)
        tokens, layer = int(torch.randint(4, 120, ())), int(torch.randint(2, 13, ()))
        x = torch.randn(1, tokens, 16)
        if case % 2:
            x[:, 2::3] = x[:, 1::3][:, : x[:, 2::3].shape[1]] + 0.1 * torch.randn(1, 1, 16)
        size = torch.randint(1, 5, (1, tokens, 1)).float()
        merge = merging.turbo_matching(x, layer, torch.zeros(1, tokens, tokens), True, False)
        theirs, their_size = _their_wavg(merge, x, size)
        valid = torch.ones(1, tokens, dtype=torch.bool)
        ours, our_size = apply_plan(x, size, global_plan(x, valid, layer, 1))
        if ours.shape != theirs.shape:
            raise SystemExit(f"global case {case}: {tuple(ours.shape)} != {tuple(theirs.shape)}")
        worst = max(worst, (ours - theirs).abs().max().item(), (our_size - their_size).abs().max())
    return float(worst)


def _their_wavg(merge, x: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Their ``merge_wavg`` (local_merge.py), which the global merge also goes through."""
    return merge(x * size, mode="sum") / merge(size, mode="sum"), merge(size, mode="sum")


def _their_features(vit, images, layers, threshold, local, merging):
    """Their ``TurboBlock`` / ``TurboVisionTransformer`` forward (``trace_source=True``) on
    timm's blocks, unfused attention: merged tokens without the class token and, per patch,
    its token (their decoder's ``source[:, 1:, 1:].argmax(dim=1)``)."""
    x = vit.norm_pre(vit._pos_embed(vit.patch_embed(images)))
    size = source = None
    for number, block in enumerate(vit.blocks, start=1):
        if number not in layers:
            x = block(x)
            continue
        x = x + block.drop_path1(block.ls1(block.attn(block.norm1(x))))
        if source is None:
            merge = local.conditional_pooling(x, threshold, (2, 2))
        else:
            merge = merging.turbo_matching(x, number, source, True, False)
        source = local.merge_source(merge, x, source)
        x, size = local.merge_wavg(merge, x, size)
        x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    return vit.norm(x)[:, 1:], source[:, 1:, 1:].argmax(dim=1)


def check_model(local, merging) -> float:
    """Their patched ViT against algm_features, same weights; sources must be equal."""
    worst = 0.0
    for name, layers in (("vit_tiny_patch16_384", (1, 5)), ("vit_small_patch16_224", (2, 4, 7))):
        torch.manual_seed(0)
        vit = timm.create_model(name, img_size=128, num_classes=0).eval()
        images = _smooth_images()
        for threshold in (0.5, 0.8, 0.9, 0.95):
            with torch.no_grad():
                ours = algm_features(vit, images, layers, threshold)
                for block in vit.blocks:
                    block.attn.fused_attn = False
                theirs, their_sources = _their_features(
                    vit, images, layers, threshold, local, merging
                )
                for block in vit.blocks:
                    block.attn.fused_attn = True
            if not torch.equal(ours.sources, their_sources):
                raise SystemExit(f"{name} threshold {threshold}: sources differ")
            worst = max(worst, (ours.tokens - theirs).abs().max().item())
            print(f"  {name} layers {layers} threshold {threshold}: {ours.tokens.shape[1]} tokens")
    return worst


def _smooth_images() -> torch.Tensor:
    """One 128x128 image with flat regions (where windows merge) and texture."""
    image = torch.zeros(1, 3, 128, 128)
    image[:, 0, :64] = 1.0
    image[:, 1, 64:, 64:] = -1.0
    image[:, :, 96:] += 0.5 * torch.randn(1, 3, 32, 128)
    return image


def main(root: Path) -> int:
    if not torch.cuda.is_available():  # their local merge moves its threshold with .cuda()
        torch.Tensor.cuda = lambda self, device=None, **_: self.to(device or "cpu")
    local, merging = _load(root, "local_merge"), _load(root, "global_merge")
    checks = {
        "local merge (100 cases)": lambda: check_local(local),
        "global merge (100 cases)": lambda: check_global(merging),
        "patched ViT (2 backbones x 4 thresholds)": lambda: check_model(local, merging),
    }
    failed = False
    for what, check in checks.items():
        worst = check()
        failed |= worst > 1e-5
        print(f"{what}: max difference {worst:.2e}")
    return int(failed)


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
