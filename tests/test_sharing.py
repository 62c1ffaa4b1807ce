import pytest
import torch
import torch.nn.functional as F

from cts.geometry import check_num_shared
from cts.sharing import (
    IGNORE_INDEX,
    downsample_superpatches,
    plan_layout,
    policy_targets,
    select_shared,
    share_tokens,
    shared_mask,
    training_num_shared,
    unshare_tokens,
)

P = 4  # patch size for hand-made maps: superpatches are 8x8 pixels


def _label_map(rows: list[list[int]]) -> torch.Tensor:
    """Expand a grid of per-superpatch values to a (1, H, W) label map."""
    grid = torch.tensor(rows)
    return grid.repeat_interleave(2 * P, 0).repeat_interleave(2 * P, 1)[None]


def test_policy_targets_uniform_mixed_and_all_ignore():
    labels = _label_map([[3, 3, 3], [3, 5, 3], [3, 3, IGNORE_INDEX]])
    labels[0, 8, 9] = 7  # the centre superpatch (rows 8-15, cols 8-15) gets a second class
    targets = policy_targets(labels, P)
    expected = torch.tensor([[1, 1, 1], [1, 0, 1], [1, 1, 1]])
    assert torch.equal(targets[0], expected)


def test_policy_targets_one_class_plus_ignore_border_vs_interior():
    labels = _label_map([[2] * 4] * 4)
    labels[0, 0, 0:3] = IGNORE_INDEX  # top-left superpatch: border
    labels[0, 9, 9] = IGNORE_INDEX  # superpatch (1, 1): interior
    labels[0, 30, 31] = IGNORE_INDEX  # bottom-right superpatch: border
    labels[0, 17, 8] = 4  # superpatch (2, 1): two classes
    labels[0, 18, 8] = IGNORE_INDEX  # ... plus ignore: still not uniform
    targets = policy_targets(labels, P)[0]
    assert targets[0, 0] == IGNORE_INDEX
    assert targets[3, 3] == IGNORE_INDEX
    assert targets[1, 1] == 0
    assert targets[2, 1] == 0
    assert targets[0, 1] == 1 and targets[2, 2] == 1


def test_policy_targets_rejects_sizes_off_the_superpatch_grid():
    with pytest.raises(ValueError, match="multiple of the superpatch size"):
        policy_targets(torch.zeros(1, 12, 16, dtype=torch.long), P)


def _constant_superpatch_images(batch: int, grid: tuple[int, int], p: int) -> torch.Tensor:
    values = torch.randn(batch, 3, grid[0] // 2, grid[1] // 2)
    return values.repeat_interleave(2 * p, -2).repeat_interleave(2 * p, -1)


def test_share_unshare_round_trip_on_constant_superpatches():
    """Embedding a 2x-downsampled constant superpatch equals embedding any of its patches."""
    torch.manual_seed(0)
    p, grid = 16, (8, 6)
    embed = torch.nn.Conv2d(3, 32, kernel_size=p, stride=p)
    images = _constant_superpatch_images(3, grid, p)
    with torch.no_grad():
        patches = embed(images).flatten(2).transpose(1, 2)  # (B, N, C)
        superpatches = embed(downsample_superpatches(images)).flatten(2).transpose(1, 2)
    num_super = grid[0] * grid[1] // 4
    k = 5
    shared_idx = select_shared(torch.rand(3, num_super), k)
    layout = plan_layout(shared_idx, grid)
    tokens = share_tokens(patches, superpatches, layout)
    assert tokens.shape == (3, grid[0] * grid[1] - 3 * k, 32)
    restored = unshare_tokens(tokens, layout)
    torch.testing.assert_close(restored, patches, atol=1e-5, rtol=1e-5)


def test_every_image_gets_n_minus_3k_tokens_and_its_own_selection():
    torch.manual_seed(1)
    grid, k = (32, 32), 103
    scores = torch.rand(4, 256)
    shared_idx = select_shared(scores, k)
    layout = plan_layout(shared_idx, grid)
    tokens = share_tokens(torch.randn(4, 1024, 8), torch.randn(4, 256, 8), layout)
    assert tokens.shape[1] == 1024 - 3 * k == 715
    masks = shared_mask(shared_idx, (16, 16))
    assert masks.flatten(1).sum(1).tolist() == [k] * 4
    assert not torch.equal(masks[0], masks[1])
    # Selection honours the scores: every shared superpatch outranks every other one.
    for scores_i, mask_i in zip(scores, masks.flatten(1), strict=True):
        assert scores_i[mask_i].min() > scores_i[~mask_i].max()


def test_kept_patches_keep_raster_order_and_cover_the_grid_once():
    grid = (4, 6)
    shared_idx = torch.tensor([[0, 4], [5, 2]])
    layout = plan_layout(shared_idx, grid)
    for kept in layout.kept_patches:
        assert torch.all(kept[1:] > kept[:-1])
    values = torch.arange(24.0).view(1, 24, 1).expand(2, -1, -1)
    superpatch_values = F.avg_pool2d(values.view(2, 1, 4, 6), 2).flatten(1).unsqueeze(-1)
    restored = unshare_tokens(share_tokens(values, superpatch_values, layout), layout)
    # Not-shared patches come back unchanged, shared ones as their superpatch's mean.
    assert torch.equal(restored[0, 2], values[0, 2])
    assert restored[0, 0, 0] == restored[0, 7, 0] == (0 + 1 + 6 + 7) / 4


def test_gradients_flow_to_shared_superpatch_tokens_only():
    grid = (4, 4)
    patches = torch.randn(1, 16, 3, requires_grad=True)
    superpatches = torch.randn(1, 4, 3, requires_grad=True)
    layout = plan_layout(torch.tensor([[2]]), grid)
    unshare_tokens(share_tokens(patches, superpatches, layout), layout).sum().backward()
    assert superpatches.grad[0, 2].abs().sum() > 0
    assert superpatches.grad[0, [0, 1, 3]].abs().sum() == 0
    assert patches.grad[0, [8, 9, 12, 13]].abs().sum() == 0  # covered by the shared token


def test_num_shared_range_is_checked():
    with pytest.raises(ValueError, match=r"allowed 0\.\.256"):
        check_num_shared(257, 256, "crop_size 512")
    with pytest.raises(ValueError, match="out of range"):
        select_shared(torch.rand(2, 4), -1)


def test_ops_compile_into_one_graph_without_host_sync():
    """fullgraph=True fails on any graph break, e.g. .item() or a data-dependent shape."""

    def roundtrip(scores, patches, superpatches):
        layout = plan_layout(select_shared(scores, 3), (4, 4))
        return unshare_tokens(share_tokens(patches, superpatches, layout), layout)

    compiled = torch.compile(roundtrip, fullgraph=True, backend="eager")
    args = (torch.rand(2, 4), torch.randn(2, 16, 8), torch.randn(2, 4, 8))
    torch.testing.assert_close(compiled(*args), roundtrip(*args))


def test_training_k_is_zero_or_k_drawn_by_seed_and_step_alone():
    draws = [training_num_shared(103, 0.25, 0, step) for step in range(400)]
    assert set(draws) == {0, 103}
    assert 0.15 < draws.count(0) / len(draws) < 0.35
    assert draws != [training_num_shared(103, 0.25, 1, step) for step in range(400)]
    assert {training_num_shared(103, 0.0, 0, step) for step in range(50)} == {103}
    assert {training_num_shared(103, 1.0, 0, step) for step in range(50)} == {0}


def test_a_k_range_draws_every_k_in_it_by_seed_and_step_and_keeps_the_unshared_steps():
    draws = [training_num_shared((52, 205), 0.25, 0, step) for step in range(3000)]
    assert draws == [training_num_shared((52, 205), 0.25, 0, step) for step in range(3000)]
    assert set(draws) == {0, *range(52, 206)}
    fixed = [training_num_shared(103, 0.25, 0, step) for step in range(3000)]
    assert [k == 0 for k in draws] == [k == 0 for k in fixed]  # the same steps go unshared
    assert {training_num_shared((7, 7), 0.0, 3, step) for step in range(50)} == {7}
