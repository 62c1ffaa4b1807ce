"""ALGM: tue-mps/algm-segmenter's local and global merges, written here as loops over one image
(algm/algm/local_merge.py `conditional_pooling`, global_merge.py `turbo_matching`, `merge_wavg`
at 674eaa2), against cts.adaptive_merging on padded batches; and the Segmenter's ALGM mode
(per image: an image's labels do not depend on its batch)."""

from __future__ import annotations

import pytest
import torch

from cts.adaptive_merging import apply_plan, global_plan, valid_tokens
from cts.models import build_segmenter
from cts.models.algm import _local


def _cosine(u: torch.Tensor, v: torch.Tensor) -> float:
    return float(u @ v / (u.norm() * v.norm()))


def local_reference(x: torch.Tensor, threshold: float, grid: int) -> torch.Tensor:
    """ALGM's local merge of one image ``(1 + N, C)``: every 2x2 window whose six patch pairs'
    mean cosine reaches ``threshold`` becomes its mean; ``[class, merged windows most similar
    first, other patches in raster order]``."""
    windows, similarity = [], []
    for row in range(0, grid, 2):
        for col in range(0, grid, 2):
            members = [1 + (row + i) * grid + col + j for i in (0, 1) for j in (0, 1)]
            pairs = [(a, b) for a in members for b in members if a < b]
            windows.append(members)
            similarity.append(sum(_cosine(x[a], x[b]) for a, b in pairs) / len(pairs))
    merged = sorted(
        (w for w in range(len(windows)) if similarity[w] >= threshold), key=lambda w: -similarity[w]
    )
    alone = sorted(t for w in range(len(windows)) if w not in merged for t in windows[w])
    rows = [x[0]] + [x[windows[w]].mean(0) for w in merged] + [x[t] for t in alone]
    return torch.stack(rows)


def global_reference(x: torch.Tensor, size: torch.Tensor, layer: int) -> torch.Tensor:
    """ALGM's global merge of one image ``(T, C)`` with a class token: each even (A) token's
    best odd (B) match by cosine; the A tokens whose match scores at least ``mean + std /
    layer`` (over the A tokens but the class token, unbiased std) merge into it, size-weighted;
    ``[class, kept A, B]``."""
    tokens = x.shape[0]
    best = {
        a: max((_cosine(x[a], x[b]), b) for b in range(1, tokens, 2)) for a in range(2, tokens, 2)
    }
    scores = torch.tensor([best[a][0] for a in best])
    threshold = scores.mean() + scores.std() / layer
    merges = {a for a in best if best[a][0] >= threshold}
    groups = {t: [t] for t in range(1, tokens, 2)}
    for a in merges:
        groups[best[a][1]].append(a)
    rows = [[0]] + [[a] for a in best if a not in merges] + list(groups.values())
    return torch.stack([sum(x[t] * size[t] for t in r) / sum(size[t] for t in r) for r in rows])


def _similar_windows(batch: int, grid: int, channels: int = 8) -> torch.Tensor:
    """``(B, 1 + N, C)`` tokens in which image ``i`` has about ``i / B`` near-flat windows."""
    x = torch.randn(batch, 1 + grid * grid, channels)
    for i in range(batch):
        patches = x[i, 1:].reshape(grid // 2, 2, grid // 2, 2, channels)
        flat = torch.rand(grid // 2, grid // 2) < (i + 0.5) / batch
        near = patches[:, :1, :, :1] + 0.1 * torch.randn_like(patches)
        patches = torch.where(flat[:, None, :, None, None], near, patches)
        x[i, 1:] = patches.reshape(-1, channels)
    return x


@pytest.mark.parametrize("threshold", [0.3, 0.9, 0.99])
def test_local_merge_is_algms_per_image_on_a_padded_batch(threshold):
    torch.manual_seed(int(100 * threshold))
    grid, x = 6, _similar_windows(4, 6)
    plan = _local(x, threshold, (grid, grid), 1)
    merged, size = apply_plan(x, torch.ones(*x.shape[:2], 1), plan)
    valid = valid_tokens(plan)
    for i in range(4):
        reference = local_reference(x[i], threshold, grid)
        assert int(plan.lengths[i]) == reference.shape[0]
        torch.testing.assert_close(merged[i, : reference.shape[0]], reference)
        assert (
            merged[i, reference.shape[0] :].eq(0).all() and not valid[i, reference.shape[0] :].any()
        )
    assert size.sum().item() == 4 * (1 + grid * grid)  # every patch is in one token
    assert len(set(plan.lengths.tolist())) > 1  # the images kept different numbers


@pytest.mark.parametrize("near_copies", [False, True])
@pytest.mark.parametrize("layer", [1, 2, 5, 11])
def test_global_merge_is_algms_per_image_and_ignores_padding(layer, near_copies):
    torch.manual_seed(layer)
    lengths = [9, 120, 61]
    x, size = torch.randn(3, 120, 8), torch.randint(1, 5, (3, 120, 1)).float()
    if near_copies:
        x[:, 3::4] = x[:, 1::4][:, : x[:, 3::4].shape[1]] + 0.05 * torch.randn(3, 1, 8)
    valid = torch.arange(120)[None, :] < torch.tensor(lengths)[:, None]
    plan = global_plan(x, valid, layer, 1)
    merged, merged_size = apply_plan(x, size * valid[..., None], plan)
    for i, length in enumerate(lengths):
        reference = global_reference(x[i, :length], size[i, :length], layer)
        assert int(plan.lengths[i]) == reference.shape[0]
        torch.testing.assert_close(merged[i, : reference.shape[0]], reference)
        assert merged_size[i].sum() == size[i, :length].sum()  # padding joined nothing
    assert plan.lengths.sum() < sum(lengths)


def _tiny(**config):
    torch.manual_seed(0)
    settings = dict(backbone="vit_tiny_patch16_384", num_classes=5, crop_size=64, depth=4)
    settings.update(config)
    return build_segmenter(**settings, drop_path_rate=0.0, dropout=0.0).eval()


def _scenes() -> torch.Tensor:
    """Three 64x64 images: flat halves, noise, and a mix, so each keeps its own count."""
    images = torch.randn(3, 3, 64, 64)
    images[0] = 0.0
    images[0, 0, :32] = 1.0
    images[2, :, :40] = 0.5
    return images


def test_an_images_labels_do_not_depend_on_its_batch():
    model = _tiny(policy="none", algm_threshold=0.5, algm_layers=(1, 3))
    images = _scenes()
    with torch.no_grad():
        batch = model(images)
        alone = [model(images[i : i + 1]) for i in range(3)]
    assert len({out.num_tokens for out in alone}) == 3  # different token counts: padded
    assert batch.num_tokens == pytest.approx(sum(out.num_tokens for out in alone) / 3)
    assert batch.num_tokens < 16 and not batch.shared.any()
    for i, out in enumerate(alone):
        assert torch.equal(out.logits.argmax(1), batch.logits[i : i + 1].argmax(1))
        torch.testing.assert_close(out.logits, batch.logits[i : i + 1], rtol=1e-4, atol=1e-4)


def test_threshold_zero_is_the_plain_segmenter_and_merging_trains():
    model = _tiny(policy="none", algm_threshold=0.5, algm_layers=(1, 3))
    images = _scenes()
    with torch.no_grad():
        plain = model(images, algm_threshold=0)
        reference = _tiny(policy="none", num_tokens_shared=0)(images)
    assert torch.equal(plain.logits, reference.logits) and plain.num_tokens == 16
    model.train()
    out = model(images)
    out.logits.logsumexp(1).mean().backward()
    assert model.encoder.vit.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_bad_algm_settings_are_one_line():
    with pytest.raises(ValueError, match=r"algm_layers=\[1, 5\]: allowed increasing block"):
        _tiny(policy="none", algm_threshold=0.9, algm_layers=(1, 5))  # depth 4
    with pytest.raises(ValueError, match=r"algm_layers=\[3, 2\]"):
        _tiny(policy="none", algm_threshold=0.9, algm_layers=(3, 2))
    with pytest.raises(ValueError, match=r"algm_threshold=1.5: allowed \(0, 1\]"):
        _tiny(policy="none", algm_threshold=1.5, algm_layers=(1, 3))
    with pytest.raises(ValueError, match="one token reduction at a time"):
        _tiny(policy="policy_net", num_tokens_shared=2, algm_threshold=0.9, algm_layers=(1, 3))
    with pytest.raises(ValueError, match="cannot merge tokens: Eva blocks take rotary"):
        _tiny(
            policy="none",
            algm_threshold=0.9,
            algm_layers=(1, 3),
            backbone="vit_small_patch16_rope_224",
        )
    model = _tiny(policy="policy_net", num_tokens_shared=2, algm_layers=(1, 3))
    with pytest.raises(ValueError, match=r"algm_threshold=-0.5: allowed"), torch.no_grad():
        model(torch.randn(1, 3, 64, 64), algm_threshold=-0.5)
