"""cts.merging and cts.models.tome against facebookresearch/ToMe's own code, once.

    git clone https://github.com/facebookresearch/ToMe /tmp/ToMe   # af95e4b was checked
    python scripts/tome_fidelity.py /tmp/ToMe

Their ``tome/merge.py`` and ``tome/patch/timm.py`` are imported from the checkout (its
``tome/__init__.py`` is skipped: it imports their visualisation's extra dependencies).
Prints the largest difference of each check; exit 1 above 1e-5.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import timm
import torch

from cts.merging import bipartite_matching, merge_weighted, track_sources
from cts.models.tome import key_readers, tome_features


def _load_tome(root: Path) -> types.ModuleType:
    """Their ``tome.merge``, ``tome.utils`` and ``tome.patch.timm`` as a bare package."""
    package = types.ModuleType("tome")
    package.__path__ = [str(root / "tome")]
    sys.modules["tome"] = package
    patch = types.ModuleType("tome.patch")
    patch.__path__ = [str(root / "tome" / "patch")]
    sys.modules["tome.patch"] = patch
    for name, path in (
        ("merge", "merge.py"),
        ("utils", "utils.py"),
        ("patch.timm", "patch/timm.py"),
    ):
        spec = importlib.util.spec_from_file_location(f"tome.{name}", root / "tome" / path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[f"tome.{name}"] = module
        spec.loader.exec_module(module)
    return sys.modules["tome.merge"]


def check_merge(merge_module: types.ModuleType, cases: int = 200) -> float:
    """Random sequences (some with repeated tokens): merged tokens, sizes and sources."""
    torch.manual_seed(0)
    worst = 0.0
    for case in range(cases):
        batch, tokens = int(torch.randint(1, 4, ())), int(torch.randint(4, 80, ()))
        prefix, r = int(torch.randint(0, 3, ())), int(torch.randint(0, tokens, ()))
        metric, x = torch.randn(batch, tokens, 16), torch.randn(batch, tokens, 8)
        if case % 3 == 0:
            metric[:, 1::3] = metric[:, ::3][:, : metric[:, 1::3].shape[1]]
        size = torch.rand(batch, tokens, 1) + 0.5
        merge, _ = merge_module.bipartite_soft_matching(metric, r, prefix >= 1, prefix >= 2)
        theirs, their_size = merge_module.merge_wavg(merge, x, size)
        matching = bipartite_matching(metric, r, prefix)
        if matching is None:
            worst = max(worst, (theirs - x).abs().max().item())
            continue
        ours, our_size = merge_weighted(x, size, matching)
        worst = max(worst, (ours - theirs).abs().max().item())
        worst = max(worst, (our_size - their_size).abs().max().item())
        rows = track_sources(torch.arange(tokens).expand(batch, -1), matching, tokens)
        source = torch.zeros(batch, ours.shape[1], tokens).scatter_(1, rows[:, None], 1.0)
        if not torch.equal(source, merge_module.merge_source(merge, x)):
            raise SystemExit(f"case {case}: sources differ")
    return worst


def check_model(apply_patch, parse_r) -> float:
    """Their patched timm ViT against tome_features, same weights, every patch restored."""
    worst = 0.0
    for name in (
        "vit_tiny_patch16_384",
        "deit_tiny_distilled_patch16_224",
        "vit_small_patch16_224",
    ):
        for r, prop_attn in ((0, True), (3, True), (8, False), (16, True)):
            torch.manual_seed(0)
            ours = timm.create_model(name, num_classes=0, img_size=128, dynamic_img_size=True)
            theirs = timm.create_model(name, num_classes=0, img_size=128, dynamic_img_size=True)
            theirs.load_state_dict(ours.state_dict())
            apply_patch(theirs.eval(), trace_source=True, prop_attn=prop_attn)
            images = torch.randn(2, 3, 128, 128)
            with torch.no_grad():
                theirs._tome_info.update(r=parse_r(len(theirs.blocks), r), size=None, source=None)
                x, source = theirs.forward_features(images), theirs._tome_info["source"]
                rows = (
                    torch.arange(x.shape[1]).expand(2, -1) if source is None else source.argmax(1)
                )
                restored = x.gather(1, rows[..., None].expand(-1, -1, x.shape[-1]))
                mine = tome_features(ours.eval(), key_readers(ours), images, r, prop_attn)
            difference = (mine - restored[:, theirs.num_prefix_tokens :]).abs().max().item()
            print(f"  {name} r={r} prop_attn={prop_attn}: {difference:.1e}")
            worst = max(worst, difference)
    return worst


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "ToMe")
    merge_module = _load_tome(root)
    timm_patch = sys.modules["tome.patch.timm"]
    merge = check_merge(merge_module)
    print(f"merge: max |ours - ToMe| {merge:.1e} over 200 random cases; sources identical")
    model = check_model(timm_patch.apply_patch, sys.modules["tome.utils"].parse_r)
    print(f"model: max |ours - ToMe| {model:.1e}")
    sys.exit(1 if max(merge, model) > 1e-5 else 0)


if __name__ == "__main__":
    main()
