"""The settings of the sweep stage: the swept K and the trained K, checked against the
trained crop (one K for a model without a policy); the sharing thresholds, each image with
its own K; ToMe's r on the same weights; the picture of the curves."""

from pathlib import Path

import pandas as pd
import pytest
import torch

from cts.models import build_segmenter
from cts.throughput.cost import batch_cost, forward_cost
from cts.throughput.measure import (
    measure_merges,
    measure_merging,
    measure_sweep,
    measure_thresholds,
)
from cts.throughput.sweep import (
    check_algm_thresholds,
    check_thresholds,
    check_tome_rs,
    plot_curve,
    sweep_ks,
)


def _model(policy: str, k: int):
    torch.manual_seed(0)
    return build_segmenter(
        backbone="vit_tiny_patch16_384",
        num_classes=3,
        crop_size=64,  # 2 x 2 superpatches of 32 pixels
        depth=1,
        policy=policy,
        num_tokens_shared=k,
    )


def test_sweep_adds_the_trained_k_and_sorts():
    model = _model("policy_net", 2)
    assert sweep_ks([4, 0, 4], model) == [0, 2, 4]
    assert sweep_ks([], model) == []  # no sweep


def test_sweep_refuses_a_k_beyond_the_trained_crop_before_any_work():
    with pytest.raises(ValueError, match="out of range for crop_size 64: allowed 0..4"):
        sweep_ks([0, 5], _model("policy_net", 2))


def test_without_a_policy_every_k_is_the_plain_segmenter():
    assert sweep_ks([0, 1, 4], _model("none", 0)) == [0]


def test_a_threshold_row_counts_each_images_own_k_and_its_cost():
    """Two images whose policy is sure of 4 and of 0 superpatches: mean K 2, mean tokens
    16 - 6, GFLOPs the mean of the K=4 and the K=0 forwards."""
    model = _model("policy_net", 2).eval()
    images = torch.randn(2, 3, 64, 64)
    sure = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]]).logit()
    model._share_scores = lambda images, labels, grid: sure[: images.shape[0]]
    (record,) = measure_thresholds(model, images, [0.5], "fp32", warmup=0, repeats=1)
    assert record["share_threshold"] == 0.5 and record["num_tokens_shared"] == 2
    assert record["tokens"] == 16 - 3 * 2
    costs = [forward_cost(model, 64, k).gmacs for k in (4, 0)]
    assert record["gflops"] == pytest.approx(sum(costs) / 2)
    assert record["ims_per_sec"] > 0


def test_thresholds_outside_0_1_are_refused_and_the_rest_sorted():
    assert check_thresholds([0.9, 0.5, 0.9]) == [0.5, 0.9]
    with pytest.raises(ValueError, match="share_threshold=1.0: allowed a number in"):
        check_thresholds([0.5, 1.0])


def test_a_tome_row_counts_the_mean_tokens_per_block_and_its_cost():
    """Two blocks merging 3 of 16 patch tokens: 16 enter the first, 13 the second; the
    forward costs less than the plain one and the labels differ from it."""
    model = build_segmenter(
        backbone="vit_tiny_patch16_384", num_classes=3, crop_size=64, depth=2, policy="none"
    ).eval()
    images = torch.randn(2, 3, 64, 64)
    (record,) = measure_merges(model, images, "tome_r", [3], "fp32", warmup=0, repeats=1)
    assert record["tome_r"] == 3 and record["num_tokens_shared"] == 0
    assert record["tokens"] == (16 + 13) / 2
    assert record["gflops"] < forward_cost(model, 64, 0).gmacs
    assert record["gflops"] == pytest.approx(forward_cost(model, 64, 0, tome_r=3).gmacs)
    assert record["ims_per_sec"] > 0


def test_a_merging_row_of_zero_on_a_sharing_model_shares_nothing():
    """r = 0 is the record's "no reduction" (``num_tokens_shared`` 0): on a CTS model it must
    not fall back to the model's own K."""
    model = _model("policy_net", 2).eval()  # 16 patch tokens; K = 2 would leave 10
    images = torch.randn(2, 3, 64, 64)
    (record,) = measure_merges(model, images, "tome_r", [0], "fp32", warmup=0, repeats=1)
    assert record["num_tokens_shared"] == 0 and record["tokens"] == 16
    assert record["gflops"] == pytest.approx(forward_cost(model, 64, 0).gmacs)


def test_tome_rs_are_checked_against_the_crop_and_depth_before_any_work():
    model = _model("policy_net", 2)  # 16 patch tokens, 1 block: r up to 8
    assert check_tome_rs([8, 2, 2], model) == [2, 8] and check_tome_rs([], model) == []
    with pytest.raises(ValueError, match="tome_r=9 is out of range for crop_size 64"):
        check_tome_rs([9], model)
    rope = build_segmenter(
        backbone="vit_small_patch16_rope_224", num_classes=3, crop_size=64, depth=1, policy="none"
    )
    with pytest.raises(ValueError, match="sweep_tome_r: vit_small_patch16_rope_224 cannot merge"):
        check_tome_rs([2], rope)
    assert check_tome_rs([], rope) == []


def test_the_picture_draws_the_fixed_k_threshold_and_tome_curves():
    table = pd.DataFrame(
        {
            "num_tokens_shared": [0, 2, 1.5, 0],
            "share_threshold": [None, None, 0.8, None],
            "tome_r": [None, None, None, 4],
            "tokens": [16, 10, 11.5, 12],
            "mIoU": [40.0, 38.0, 39.5, 37.0],
            "ims_per_sec": [10.0, 12.0, 11.0, 11.5],
            "gflops": [1.0, 0.8, 0.9, 0.85],
        }
    )
    assert plot_curve(table, 2, "t").startswith(b"\x89PNG")
    assert plot_curve(table.iloc[:2], 2, "t").startswith(b"\x89PNG")
    assert plot_curve(table.drop(columns="tome_r").iloc[:3], 2, "t").startswith(b"\x89PNG")


def test_a_model_trained_with_tome_is_timed_against_itself_without_merging():
    """The benchmark of a ToMe model: its r against r = 0 (the K rows of its sweep, too, merge
    nothing), under the benchmark's keys; the sweep adds its own r."""
    torch.manual_seed(0)
    model = build_segmenter(
        backbone="vit_tiny_patch16_384",
        num_classes=3,
        crop_size=64,
        depth=2,
        policy="none",
        tome_r=3,
    ).eval()
    images = torch.randn(2, 3, 64, 64)
    record = measure_merging(model, images, "fp32", warmup=0, repeats=1)
    assert record["tome_r"] == 3 and record["bf16_fp32_agreement"] is None
    assert (record["tokens"], record["tokens_no_sharing"]) == ((16 + 13) / 2, 16)
    assert record["gflops"] < record["gflops_no_sharing"] == forward_cost(model, 64, 0, 0).gmacs
    assert record["speedup"] == pytest.approx(
        record["ms_per_batch_no_sharing"] / record["ms_per_batch"]
    )
    (plain,) = measure_sweep(model, images, [0], "fp32", "none", 0, 1, "tiny")
    assert plain["tokens"] == 16 and plain["gflops"] == record["gflops_no_sharing"]
    assert check_tome_rs([2], model) == [2, 3] and check_tome_rs([], model) == []


def test_a_model_trained_with_algm_is_timed_against_itself_and_its_sweep_adds_its_threshold():
    """ALGM keeps a number of tokens per image: the record's tokens and GFLOPs are the batch's
    means (a flat image merges, a noisy one does not); without merging, the plain model."""
    torch.manual_seed(0)
    model = build_segmenter(
        backbone="vit_tiny_patch16_384",
        num_classes=3,
        crop_size=64,
        depth=3,
        policy="none",
        algm_threshold=0.5,
        algm_layers=(1, 2),
    ).eval()
    images = torch.randn(2, 3, 64, 64)
    images[0] = 0.3
    record = measure_merging(model, images, "fp32", warmup=0, repeats=1)
    assert record["algm_threshold"] == 0.5 and record["tome_r"] == 0
    alone = [batch_cost(model, images[i : i + 1]) for i in range(2)]
    assert record["tokens"] == pytest.approx(sum(cost.tokens for cost in alone) / 2)
    assert alone[0].tokens < alone[1].tokens <= 16 == record["tokens_no_sharing"]
    assert record["gflops"] < record["gflops_no_sharing"] == forward_cost(model, 64, 0, 0).gmacs
    assert check_algm_thresholds([0.9, 0.7], model) == [0.5, 0.7, 0.9]
    assert check_algm_thresholds([], model) == []
    with pytest.raises(ValueError, match="share_threshold=1.2: allowed"):
        check_algm_thresholds([1.2], model)
    deep = build_segmenter(
        backbone="vit_tiny_patch16_384", num_classes=3, crop_size=64, depth=1, policy="none"
    )
    with pytest.raises(ValueError, match=r"algm_layers=\[1, 5\]: allowed increasing"):
        check_algm_thresholds([0.9], deep)


def test_the_picture_stars_the_setting_a_model_was_trained_with():
    from matplotlib.figure import Figure

    table = pd.DataFrame(
        {
            "num_tokens_shared": [0, 0, 0],
            "algm_threshold": [None, 0.8, 0.9],
            "tokens": [16, 9.5, 12.25],
            "mIoU": [40.0, 38.0, 39.5],
            "ims_per_sec": [10.0, 14.0, 12.0],
            "gflops": [1.0, 0.7, 0.8],
        }
    )
    saved = []
    original = Figure.savefig
    try:
        Figure.savefig = lambda figure, *a, **k: saved.append(figure) or original(figure, *a, **k)
        plot_curve(table, 0, "t", own=("algm_threshold", 0.9))
    finally:
        Figure.savefig = original
    (axes,) = saved[0].axes
    fixed, algm, star = axes.get_lines()
    assert list(algm.get_xdata()) == [14.0, 12.0] and list(star.get_xdata()) == [12.0]
    assert {t.get_text() for t in axes.texts} == {"K=0", "t=0.8 (10)", "t=0.9 (12)"}
    assert axes.get_title() == "t"  # no formula of K: there is no K > 0 row


def test_the_sweep_picture_prints_no_label_over_another_or_outside_the_axes(monkeypatch):
    # The committed run's sweep: twelve points of three curves within 10 im/s and 1 mIoU,
    # where labels at fixed offsets printed over each other (README's first picture).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.text import Text

    saved, savefig = [], Figure.savefig

    def recording_savefig(figure, *args, **kwargs):
        saved.append(figure)
        return savefig(figure, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", recording_savefig)
    table = pd.read_csv(Path(__file__).resolve().parents[1] / "plots" / "k_sweep.csv")
    plot_curve(table, 103, "a title")
    (axes,) = saved[0].axes
    renderer = FigureCanvasAgg(saved[0]).get_renderer()  # closed: its canvas is gone
    frame = axes.get_window_extent(renderer)
    boxes = [Text.get_window_extent(text, renderer) for text in axes.texts]  # leaders aside
    assert len(boxes) == len(table)
    for i, box in enumerate(boxes):
        assert frame.contains(box.x0, box.y0) and frame.contains(box.x1, box.y1)
        assert not any(box.overlaps(other) for other in boxes[i + 1 :]), axes.texts[i]
