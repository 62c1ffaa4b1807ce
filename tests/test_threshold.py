"""K per image: with a sharing threshold each image shares the superpatches its policy is sure
of, and its prediction never depends on the rest of its batch."""

import pytest
import torch

from cts.models import build_segmenter
from cts.sharing import threshold_num_shared

TINY = dict(backbone="vit_tiny_patch16_384", num_classes=5, depth=2, drop_path_rate=0.0)


def _labels() -> torch.Tensor:
    """Three 128 px label maps (16 superpatches of 32 px): one class; the left half one
    class and the right half per-pixel noise; noise everywhere."""
    noise = torch.randint(0, 5, (3, 128, 128), generator=torch.Generator().manual_seed(0))
    labels = noise.clone()
    labels[0] = 1
    labels[1, :, :64] = 2
    return labels


def test_threshold_k_counts_the_sure_superpatches_of_each_image_rounded_down():
    probs = torch.tensor([[0.9, 0.8, 0.2, 0.7], [0.1, 0.2, 0.3, 0.4], [1.0, 1.0, 1.0, 1.0]])
    scores = torch.logit(probs)  # log-odds, as the policy gives them
    assert threshold_num_shared(scores, 0.5).tolist() == [3, 0, 4]
    assert threshold_num_shared(scores, 0.5, step=2).tolist() == [2, 0, 4]


def test_an_image_gets_the_same_labels_alone_and_in_a_mixed_batch():
    torch.manual_seed(0)
    model = build_segmenter(**TINY, crop_size=128, policy="oracle", num_tokens_shared=4).eval()
    images, labels = torch.randn(3, 3, 128, 128), _labels()
    with torch.no_grad():
        batch = model(images, labels, share_threshold=0.75)
        alone = [
            model(images[i : i + 1], labels[i : i + 1], share_threshold=0.75) for i in range(3)
        ]
    # uniform superpatches: all 16, the left half's 8, none
    assert batch.shared.flatten(1).sum(1).tolist() == [16, 8, 0]
    assert batch.num_tokens == pytest.approx(64 - 3 * (16 + 8 + 0) / 3)
    for i, out in enumerate(alone):
        assert torch.equal(out.shared[0], batch.shared[i])
        torch.testing.assert_close(out.logits[0], batch.logits[i], atol=1e-5, rtol=1e-5)
        assert torch.equal(out.logits[0].argmax(0), batch.logits[i].argmax(0))


def test_an_explicit_k_overrides_the_configured_threshold_and_k_zero_is_the_plain_model():
    torch.manual_seed(0)
    model = build_segmenter(
        **TINY, crop_size=128, policy="oracle", num_tokens_shared=4, share_threshold=0.75
    ).eval()
    images, labels = torch.randn(3, 3, 128, 128), _labels()
    with torch.no_grad():
        assert model(images, labels).shared.flatten(1).sum(1).tolist() == [16, 8, 0]
        assert model(images, labels, num_tokens_shared=4).num_tokens == 64 - 12
        plain = model(images, labels, num_tokens_shared=0)
        none = model(images, labels, share_threshold=0.999)  # only the uniform ones: 1.0
    assert plain.num_tokens == 64
    assert none.shared.flatten(1).sum(1).tolist() == [16, 8, 0]


@pytest.mark.parametrize("threshold", [0.0, 1.0, 1.5, -0.2])
def test_a_threshold_outside_0_1_is_refused_in_one_line(threshold):
    with pytest.raises(ValueError, match=rf"share_threshold={threshold}: allowed a number in"):
        build_segmenter(
            **TINY, crop_size=128, policy="oracle", num_tokens_shared=4, share_threshold=threshold
        )
    model = build_segmenter(**TINY, crop_size=128, policy="oracle", num_tokens_shared=4)
    with pytest.raises(ValueError, match="allowed a number in \\(0, 1\\)"):
        model(
            torch.randn(1, 3, 128, 128), torch.zeros(1, 128, 128).long(), share_threshold=threshold
        )


def test_onnx_export_of_a_threshold_model_needs_a_fixed_k():
    from cts.export import export_k

    model = build_segmenter(
        **TINY, crop_size=128, policy="policy_net", num_tokens_shared=4, share_threshold=0.8
    )
    with pytest.raises(ValueError, match="K per image.*export with --num-tokens-shared K"):
        export_k(model, None)
    assert export_k(model, 2) == 2
