"""Confusion-matrix segmentation metrics (mIoU, pixel and mean accuracy), as mmseg computes them.

The matrix lives on the device of the predictions so that evaluation never syncs with the
host until `compute()`; rows are ground-truth classes, columns predicted classes.
"""

import pandas as pd
import torch
import torch.distributed as dist
from torch import Tensor


class SegmentationMetric:
    """Accumulates a (C, C) confusion matrix over batches of label maps.

    Args:
        num_classes: number of classes C; valid labels are 0..C-1.
        ignore_index: label value excluded from every statistic.
        device: where the matrix starts; it follows the device of the first `update`.
    """

    def __init__(
        self, num_classes: int, ignore_index: int = 255, device: torch.device | str = "cpu"
    ) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self._confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    @property
    def confusion(self) -> Tensor:
        """(C, C) int64 counts, confusion[gt, pred]."""
        return self._confusion

    def update(self, pred: Tensor, target: Tensor) -> None:
        """Adds a batch: pred (B, H, W) int64 class ids, target (B, H, W) int64 labels."""
        self._confusion = self._confusion.to(pred.device)
        valid = target != self.ignore_index
        # gt * C + pred enumerates the matrix row-major, so one bincount fills it.
        index = target[valid].long() * self.num_classes + pred[valid]
        counts = torch.bincount(index, minlength=self.num_classes**2)
        # bincount's length already depends on the largest index, so this check costs no sync.
        if counts.numel() > self.num_classes**2:
            found = int(target[valid].max())
            raise ValueError(
                f"label {found} is outside the classes 0..{self.num_classes - 1} and is not the "
                f"ignore value {self.ignore_index}: check the dataset's classes.txt and label_map"
            )
        self._confusion += counts.view(self.num_classes, self.num_classes)

    def reduce_distributed(self) -> None:
        """Sums the matrix over processes; call once, after the last `update`."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self._confusion, op=dist.ReduceOp.SUM)

    def per_class_iou(self) -> list[float]:
        """IoU of each class in percent; nan for classes absent from both gt and prediction."""
        return _per_class(self._confusion)[0].tolist()

    def per_class_acc(self) -> list[float]:
        """Accuracy (recall) of each class in percent; nan for classes absent from the gt."""
        return _per_class(self._confusion)[1].tolist()

    def compute(self) -> dict[str, float]:
        """mIoU, pixel_acc and mean_acc in percent; absent classes are left out of the means."""
        iou, acc = _per_class(self._confusion)
        total = self._confusion.sum()
        pixel_acc = self._confusion.diagonal().sum() / total * 100 if total else torch.nan
        return {
            "mIoU": float(iou.nanmean()),
            "pixel_acc": float(pixel_acc),
            "mean_acc": float(acc.nanmean()),
        }


def _per_class(confusion: Tensor) -> tuple[Tensor, Tensor]:
    """Per-class IoU and accuracy in percent (float64, nan where undefined) of a (C, C) matrix."""
    confusion = confusion.double()
    true_pos = confusion.diagonal()
    gt = confusion.sum(1)
    union = gt + confusion.sum(0) - true_pos
    # 0 / 0 gives nan, which is what marks a class as absent for the nan-means.
    return true_pos / union * 100, true_pos / gt * 100


def per_class_table(metric: SegmentationMetric, class_names: list[str]) -> pd.DataFrame:
    """One row per class: class, iou and acc in percent, gt_pixels."""
    iou, acc = _per_class(metric.confusion)
    return pd.DataFrame(
        {
            "class": class_names,
            "iou": iou.cpu().numpy(),
            "acc": acc.cpu().numpy(),
            "gt_pixels": metric.confusion.sum(1).cpu().numpy(),
        }
    )


class PolicyMetric:
    """Accuracy of the policy network and precision of its top-K choice.

    Precision@K is the share of the K superpatches with the highest sharing score that are
    truly uniform (target 1); accuracy counts every superpatch whose target is not ignore.
    """

    def __init__(self, ks: list[int], ignore_index: int = 255) -> None:
        self.ks = sorted(set(ks))
        self.ignore_index = ignore_index
        self.correct = 0
        self.counted = 0
        self.hits = dict.fromkeys(self.ks, 0)
        self.images = 0

    def update(self, scores: Tensor, targets: Tensor) -> None:
        """scores: ``(B, S)`` log-odds of uniform; targets: ``(B, S)`` in {0, 1, ignore}."""
        valid = targets != self.ignore_index
        predicted = (scores > 0).long()
        self.correct += int(((predicted == targets) & valid).sum())
        self.counted += int(valid.sum())
        order = scores.argsort(dim=1, descending=True)
        uniform_in_order = (targets.gather(1, order) == 1).long().cumsum(1)
        for k in self.ks:
            if k > 0:
                self.hits[k] += int(uniform_in_order[:, k - 1].sum())
        self.images += scores.shape[0]

    def accuracy(self) -> float:
        return 100.0 * self.correct / max(self.counted, 1)

    def precision(self, k: int) -> float:
        return 100.0 * self.hits[k] / max(k * self.images, 1) if k > 0 else float("nan")
