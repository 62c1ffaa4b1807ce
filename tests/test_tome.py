"""Token merging (ToMe): facebookresearch/ToMe's bipartite soft matching, written here as
loops over one image (tome/merge.py at af95e4b: `bipartite_soft_matching`, `merge_wavg`,
`merge_source`), against cts.merging; and the Segmenter's ToMe mode end to end."""

from __future__ import annotations

import pytest
import torch

from cts.merging import (
    bipartite_matching,
    check_merge_count,
    merge_weighted,
    track_sources,
)
from cts.models import build_segmenter
from cts.models.tome import merged_token_counts


def tome_reference(metric, x, size, r: int, num_prefix: int):
    """ToMe on one image ``(T, C)``: the A (even) tokens' best B (odd) match by cosine, the
    ``r`` best edges merged as size-weighted averages; output ``[prefix, unmerged A, B]``,
    unmerged A in edge order (sorted by index when there is a prefix). Also returns, per
    input token, its output row."""
    tokens = metric.shape[0]
    r = min(r, (tokens - num_prefix) // 2)
    if r <= 0:
        return x, size, list(range(tokens))
    unit = metric / metric.norm(dim=-1, keepdim=True)
    a_tokens, b_tokens = list(range(0, tokens, 2)), list(range(1, tokens, 2))
    edges = []  # (score, A token, B token)
    for a in a_tokens:
        if a < num_prefix:
            edges.append((-float("inf"), a, None))
            continue
        score, b = max((float(unit[a] @ unit[b]), b) for b in b_tokens if b >= num_prefix)
        edges.append((score, a, b))
    edges.sort(key=lambda edge: -edge[0])
    merged, unmerged = edges[:r], [edge[1] for edge in edges[r:]]
    if num_prefix:
        unmerged.sort()
    prefix = list(range(num_prefix))
    rows = (
        prefix + [a for a in unmerged if a >= num_prefix] + [b for b in b_tokens if b >= num_prefix]
    )
    groups = {row: [row] for row in rows}
    for _, a, b in merged:
        groups[b].append(a)
    out_x = torch.stack([sum(x[t] * size[t] for t in groups[row]) for row in rows])
    out_size = torch.stack([sum(size[t] for t in groups[row]) for row in rows])
    owner = {t: i for i, row in enumerate(rows) for t in groups[row]}
    return out_x / out_size, out_size, [owner[t] for t in range(tokens)]


@pytest.mark.parametrize("num_prefix", [0, 1, 2, 5])
@pytest.mark.parametrize("r", [0, 1, 4, 9, 40])
def test_merge_is_tomes_bipartite_soft_matching(num_prefix, r):
    torch.manual_seed(100 * num_prefix + r)
    batch, tokens = 3, 21
    metric, x = torch.randn(batch, tokens, 8), torch.randn(batch, tokens, 5)
    size = torch.rand(batch, tokens, 1) + 0.5
    matching = bipartite_matching(metric, r, num_prefix)
    if matching is None:
        assert r == 0
        return
    out_x, out_size = merge_weighted(x, size, matching)
    sources = track_sources(torch.arange(tokens).expand(batch, -1), matching, tokens)
    for i in range(batch):
        ref_x, ref_size, owner = tome_reference(metric[i], x[i], size[i], r, num_prefix)
        torch.testing.assert_close(out_x[i], ref_x, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out_size[i], ref_size, rtol=1e-5, atol=1e-6)
        assert sources[i].tolist() == owner
    torch.testing.assert_close(out_x[:, :num_prefix], x[:, :num_prefix])  # alone, in order
    assert out_size.sum(1).allclose(size.sum(1))  # every token's weight is somewhere


def test_sources_follow_a_token_through_several_merges():
    """Restoring through the tracked sources gives each original token the merged token that
    holds it, after every block's merge."""
    torch.manual_seed(0)
    x = torch.randn(2, 17, 4)
    sources, size, current = torch.arange(17).expand(2, -1), None, x
    members = [[{t} for t in range(17)] for _ in range(2)]
    for r in (3, 3, 2):
        matching = bipartite_matching(torch.randn(2, current.shape[1], 6), r, 1)
        index = track_sources(
            torch.arange(current.shape[1]).expand(2, -1), matching, len(members[0])
        )
        merged = [[set() for _ in range(current.shape[1] - r)] for _ in range(2)]
        for i in range(2):
            for t, row in enumerate(index[i].tolist()):
                merged[i][row] |= members[i][t]
        members = merged
        sources = track_sources(sources, matching, current.shape[1])
        current, size = merge_weighted(current, size, matching)
    for i in range(2):
        assert [next(r for r, m in enumerate(members[i]) if t in m) for t in range(17)] == sources[
            i
        ].tolist()
    assert size.sum().item() == 34 and size[:, 0].eq(1).all()  # the prefix token stayed alone


def test_merge_counts_and_their_errors():
    assert merged_token_counts(1024, 8, 12) == [1024 - 8 * i for i in range(12)]
    assert merged_token_counts(10, 4, 3) == [10, 6, 3]  # capped at half of what remains
    check_merge_count(85, 1024, 12)
    with pytest.raises(ValueError, match=r"tome_r=86 is out of range for x: allowed 0..85"):
        check_merge_count(86, 1024, 12, "x")
    with pytest.raises(ValueError, match=r"tome_r=-1 is out of range"):
        check_merge_count(-1, 1024, 12)


def _tiny(**config):
    torch.manual_seed(0)
    settings = dict(backbone="vit_tiny_patch16_384", num_classes=5, crop_size=64, depth=2)
    settings.update(config)
    return build_segmenter(**settings, drop_path_rate=0.0, dropout=0.0).eval()


def test_segmenter_merges_per_image_and_restores_every_patch():
    model = _tiny(policy="none", tome_r=4)
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        out = model(images)
        alone = model(images[1:2])
        plain = model(images, tome_r=0)
        reference = _tiny(policy="none")(images)
    assert out.logits.shape == (3, 5, 64, 64) and out.num_tokens == (16 + 12) / 2
    assert not out.shared.any()
    torch.testing.assert_close(alone.logits[0], out.logits[1], rtol=1e-5, atol=1e-5)
    assert torch.equal(plain.logits, reference.logits) and plain.num_tokens == 16
    assert not torch.allclose(out.logits, plain.logits)


def test_a_trained_cts_model_takes_tome_for_one_call_and_bad_settings_are_one_line():
    model = _tiny(policy="policy_net", num_tokens_shared=2)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64), tome_r=3).num_tokens == (16 + 13) / 2
        with pytest.raises(ValueError, match="tome_r=8 is out of range for image size 64x64"):
            model(torch.randn(1, 3, 64, 64), tome_r=8)
    with pytest.raises(ValueError, match="one token reduction at a time"):
        _tiny(policy="policy_net", tome_r=2)
    with pytest.raises(ValueError, match="cannot merge tokens: Eva blocks take rotary"):
        _tiny(policy="none", tome_r=2, backbone="vit_small_patch16_rope_224")


def test_tome_compiles_to_one_graph_and_a_plain_forward_keeps_no_keys():
    # A key hook registered per call failed Dynamo ("setattr() on unsupported type"), so
    # `cts throughput --tome-r` could only time ToMe eager.
    model = _tiny(policy="none", tome_r=4)
    images = torch.randn(2, 3, 64, 64)
    torch.compiler.reset()
    compiled = torch.compile(model.predict, backend="eager", fullgraph=True, dynamic=False)
    with torch.inference_mode():
        for r in (4, 0):
            assert torch.equal(compiled(images, 0, tome_r=r), model.predict(images, 0, tome_r=r))
        model(images, tome_r=0)
    torch.compiler.reset()
    # The hooks hold no block's keys between forwards, with ToMe or without.
    assert all(reader.keys is None and not reader.wanted for reader in model._key_readers)
    assert len(model._key_readers) == 2
