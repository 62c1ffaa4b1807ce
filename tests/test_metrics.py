import math

import pytest
import torch
import torch.distributed as dist

import cts  # noqa: F401  (applies the torchvision import fix)
from cts.metrics import PolicyMetric, SegmentationMetric, per_class_table

# Two 2x3 maps; the 255 pixel is predicted as class 2 and must not count anywhere.
TARGET = torch.tensor([[[0, 0, 1], [1, 2, 255]]])
PRED = torch.tensor([[[0, 1, 1], [1, 0, 2]]])


def test_hand_computed_values():
    metric = SegmentationMetric(3)
    metric.update(PRED, TARGET)
    # valid (gt, pred) pairs: (0,0) (0,1) (1,1) (1,1) (2,0)
    assert metric.confusion.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    # IoU: 1/(2+2-1), 2/(2+3-2), 0/(1+0-0); acc: 1/2, 2/2, 0/1; pixel acc 3/5
    assert metric.per_class_iou() == pytest.approx([100 / 3, 200 / 3, 0.0])
    assert metric.per_class_acc() == pytest.approx([50.0, 100.0, 0.0])
    assert metric.compute() == pytest.approx({"mIoU": 100 / 3, "pixel_acc": 60.0, "mean_acc": 50.0})


def test_updates_accumulate_like_one_batch():
    a, b = SegmentationMetric(3), SegmentationMetric(3)
    a.update(PRED, TARGET)
    a.update(PRED.flip(-1), TARGET.flip(-1))
    b.update(torch.cat([PRED, PRED.flip(-1)]), torch.cat([TARGET, TARGET.flip(-1)]))
    assert torch.equal(a.confusion, b.confusion)
    assert a.confusion.sum() == 10


def test_ignore_only_batch_leaves_matrix_empty():
    metric = SegmentationMetric(3)
    metric.update(torch.ones(2, 4, 4, dtype=torch.int64), torch.full((2, 4, 4), 255))
    assert metric.confusion.sum() == 0
    assert all(math.isnan(v) for v in metric.compute().values())


def test_absent_classes_are_excluded_from_means():
    metric = SegmentationMetric(4)  # class 3 never appears: nan, left out of every mean
    metric.update(PRED, TARGET)
    iou = metric.per_class_iou()
    assert math.isnan(iou[3]) and iou[:3] == pytest.approx([100 / 3, 200 / 3, 0.0])
    assert metric.compute() == pytest.approx({"mIoU": 100 / 3, "pixel_acc": 60.0, "mean_acc": 50.0})


def test_predicted_but_absent_from_gt_counts_as_zero_iou():
    metric = SegmentationMetric(3)
    metric.update(torch.tensor([[0, 1]]), torch.tensor([[0, 0]]))
    iou, acc = metric.per_class_iou(), metric.per_class_acc()
    assert iou[:2] == pytest.approx([50.0, 0.0]) and math.isnan(iou[2])
    assert acc[0] == pytest.approx(50.0) and math.isnan(acc[1]) and math.isnan(acc[2])
    assert metric.compute() == pytest.approx({"mIoU": 25.0, "pixel_acc": 50.0, "mean_acc": 50.0})


def test_uint8_labels():
    metric = SegmentationMetric(3)
    metric.update(PRED, TARGET.to(torch.uint8))
    assert metric.confusion.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]


def _reduce_on_rank(rank: int, store: str, out: str) -> None:
    """One of two gloo processes: scores its own half of the data, then reduces."""
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=2)
    try:
        metric = SegmentationMetric(3)
        if rank == 0:
            metric.update(PRED, TARGET)
        else:
            metric.update(PRED.flip(-1), TARGET.flip(-1))
        metric.reduce_distributed()
        torch.save(metric.confusion, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_reduce_distributed_sums_the_processes_matrices(tmp_path):
    alone = SegmentationMetric(3)
    alone.update(PRED, TARGET)
    alone.reduce_distributed()  # not initialised: no-op
    assert alone.confusion.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]

    both = SegmentationMetric(3)
    both.update(torch.cat([PRED, PRED.flip(-1)]), torch.cat([TARGET, TARGET.flip(-1)]))
    store, out = f"file://{tmp_path / 'store'}", str(tmp_path / "confusion")
    # fork: the children need no second import of torch (seconds each on a busy machine)
    torch.multiprocessing.start_processes(
        _reduce_on_rank, args=(store, out), nprocs=2, start_method="fork"
    )
    for rank in (0, 1):  # each process holds the sum, as if it had scored all the data
        assert torch.equal(torch.load(f"{out}.{rank}"), both.confusion)


def test_per_class_table():
    metric = SegmentationMetric(3)
    metric.update(PRED, TARGET)
    table = per_class_table(metric, ["wall", "floor", "sky"])
    assert list(table.columns) == ["class", "iou", "acc", "gt_pixels"]
    assert table["class"].tolist() == ["wall", "floor", "sky"]
    assert table["gt_pixels"].tolist() == [2, 2, 1]
    assert table["iou"].tolist() == pytest.approx([100 / 3, 200 / 3, 0.0])


def test_label_outside_the_classes_is_one_clear_error():
    metric = SegmentationMetric(num_classes=3, ignore_index=255)
    target = torch.tensor([[0, 1, 7, 255]])
    with pytest.raises(ValueError, match=r"label 7 is outside the classes 0..2 and is not the ign"):
        metric.update(torch.tensor([[0, 1, 2, 0]]), target)
    assert metric.confusion.sum() == 0  # the bad batch left no counts


def test_policy_metric_reads_log_odds_and_ranks_past_saturation():
    metric = PolicyMetric([1, 2])
    # Log-odds 27 and 20 are both probability 1.0 in fp32; only the first is truly uniform.
    metric.update(torch.tensor([[20.0, 27.0, -3.0, 2.0]]), torch.tensor([[0, 1, 0, 255]]))
    assert metric.accuracy() == pytest.approx(100 * 2 / 3)  # > 0 is uniform; 255 not counted
    assert metric.precision(1) == 100.0 and metric.precision(2) == 50.0
