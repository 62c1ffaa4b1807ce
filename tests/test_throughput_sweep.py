"""The K of the sweep stage: the swept values and the trained K, checked against the
trained crop; one K for a model without a policy."""

import pytest
import torch

from cts.models import build_segmenter
from cts.throughput.sweep import sweep_ks


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
