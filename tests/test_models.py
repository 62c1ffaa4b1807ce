import pytest
import torch

from cts.models import PAPER_BACKBONES, build_segmenter
from cts.sharing import downsample_superpatches, plan_layout, select_shared, share_tokens

TINY = dict(backbone="vit_tiny_patch16_384", num_classes=5, depth=2, drop_path_rate=0.0)


def _pair(crop: int = 128, k: int = 0, **kwargs):
    torch.manual_seed(0)
    shared = build_segmenter(**TINY, crop_size=crop, num_tokens_shared=k, **kwargs).eval()
    plain = build_segmenter(**TINY, crop_size=crop, policy="none").eval()
    plain.load_state_dict(shared.state_dict(), strict=False)
    return shared, plain


@pytest.mark.parametrize("policy", ["policy_net", "random", "oracle"])
def test_k_zero_gives_exactly_the_logits_of_policy_none(policy):
    shared, plain = _pair(k=0, policy=policy)
    images = torch.randn(2, 3, 128, 128)
    labels = torch.randint(0, 5, (2, 128, 128))
    with torch.no_grad():
        out = shared(images, labels)
        ref = plain(images)
    assert torch.equal(out.logits, ref.logits)
    assert out.num_tokens == ref.num_tokens == 64
    assert not out.shared.any()


def test_shared_sequence_embeds_each_kept_patch_and_downsampled_superpatch():
    """Gathering pixels before the embedding gives the tokens of embedding every patch and
    every 2x-downsampled superpatch with the patch convolution, then gathering."""
    torch.manual_seed(0)
    encoder = build_segmenter(**TINY, crop_size=128, policy="none").encoder
    images = torch.randn(2, 3, 128, 128)
    grid = (8, 8)
    layout = plan_layout(select_shared(torch.rand(2, 16), 5), grid)
    pos = encoder._patch_pos_embed(grid)
    superpatch_pos = torch.nn.functional.avg_pool2d(pos.permute(0, 3, 1, 2), 2)
    with torch.no_grad():
        tokens = encoder._shared_tokens(images, pos, layout)
        patches = encoder._embed(images) + pos.flatten(1, 2)
        superpatches = encoder._embed(downsample_superpatches(images))
        superpatches = superpatches + superpatch_pos.flatten(2).transpose(1, 2)
    assert tokens.shape == (2, 64 - 3 * 5, encoder.embed_dim)
    torch.testing.assert_close(tokens, share_tokens(patches, superpatches, layout))


def test_vit_tiny_512_with_k_103_processes_715_tokens():
    model = build_segmenter(
        backbone="vit_tiny_patch16_384",
        num_classes=150,
        crop_size=512,
        num_tokens_shared=103,
        policy="policy_net",
        depth=1,
    ).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 512, 512))
    assert out.num_tokens == 715
    assert out.logits.shape == (2, 150, 512, 512)
    assert out.shared.shape == (2, 16, 16)
    assert out.shared.flatten(1).sum(1).tolist() == [103, 103]


@pytest.mark.parametrize(
    "backbone, crop, width",
    [
        (name, 640 if "large" in name else 512, w)
        for name, w in zip(PAPER_BACKBONES, (192, 384, 768, 1024), strict=True)
    ],
)
def test_paper_backbones_build_at_their_crop_sizes(backbone, crop, width):
    # The meta device builds the real module graph and propagates shapes without the memory.
    with torch.device("meta"):
        model = build_segmenter(
            backbone=backbone,
            num_classes=150,
            crop_size=crop,
            num_tokens_shared=crop * crop // 1024 * 30 // 100 + 1,
            policy="random",
        )
        out = model(torch.empty(2, 3, crop, crop))
    assert model.encoder.embed_dim == width
    assert model.encoder.num_heads == width // 64
    assert out.logits.shape == (2, 150, crop, crop)


def test_oracle_shares_the_uniform_superpatches():
    model = build_segmenter(**TINY, crop_size=128, num_tokens_shared=4, policy="oracle").eval()
    labels = torch.zeros(1, 128, 128, dtype=torch.long)
    labels[:, :, 32:] = torch.arange(96).view(1, 1, 96) % 3  # only column 0 is uniform
    with torch.no_grad():
        out = model(torch.randn(1, 3, 128, 128), labels)
    assert out.shared[0, :, 0].all() and out.shared[0].sum() == 4


def test_gradients_reach_encoder_and_decoder_but_not_policy():
    torch.manual_seed(0)
    model = build_segmenter(**TINY, crop_size=128, num_tokens_shared=10, policy="policy_net")
    model.train()
    assert not model.policy_net.training
    images, labels = torch.randn(2, 3, 128, 128), torch.randint(0, 5, (2, 128, 128))
    out = model(images)
    torch.nn.functional.cross_entropy(out.logits, labels).backward()
    encoder_grad = model.encoder.vit.patch_embed.proj.weight.grad
    assert encoder_grad is not None and encoder_grad.abs().sum() > 0
    assert model.encoder.vit.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert model.decoder.cls_emb.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.policy_net.parameters())


def test_images_not_multiple_of_32_are_zero_padded_bottom_right_and_cropped_back():
    torch.manual_seed(0)
    model = build_segmenter(**TINY, crop_size=128, num_tokens_shared=8, policy="policy_net")
    model.eval()
    image = torch.randn(1, 3, 100, 75)
    padded = torch.nn.functional.pad(image, (0, 96 - 75, 0, 128 - 100))  # next multiples of 32
    with torch.no_grad():
        out = model(image)
        full = model(padded)
    assert out.logits.shape == (1, 5, 100, 75)
    assert out.shared.shape == (1, 4, 3) and torch.equal(out.shared, full.shared)
    assert out.num_tokens == full.num_tokens == 8 * 6 - 3 * 8
    # The same scores as the image padded by hand, the padding's rows and columns cut off.
    torch.testing.assert_close(out.logits, full.logits[..., :100, :75])


@pytest.mark.parametrize("patch_size, crop", [(8, 128), (14, 112)])
def test_other_patch_sizes_use_2x2_patch_superpatches(patch_size, crop):
    model = build_segmenter(
        **TINY, crop_size=crop, patch_size=patch_size, num_tokens_shared=5, policy="policy_net"
    ).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, crop, crop))
    side = crop // (2 * patch_size)
    assert out.shared.shape == (2, side, side)
    assert out.num_tokens == (crop // patch_size) ** 2 - 3 * 5
    assert out.logits.shape == (2, 5, crop, crop)


def test_bad_num_tokens_shared_names_the_range():
    with pytest.raises(ValueError, match=r"allowed 0\.\.256.*superpatches"):
        build_segmenter(**TINY, crop_size=512, num_tokens_shared=300)
    with pytest.raises(ValueError, match=r"allowed 0\.\.16"):
        build_segmenter(**TINY, crop_size=128, num_tokens_shared=-1)


def test_unknown_backbone_lists_supported_names():
    with pytest.raises(
        ValueError, match="unknown backbone 'vit_huge_nonsense'.*vit_small_patch16_384"
    ):
        build_segmenter(backbone="vit_huge_nonsense", num_classes=3)


def test_bf16_autocast_forward_stays_within_bf16_rounding_of_fp32():
    torch.manual_seed(0)
    model = build_segmenter(**TINY, crop_size=128, num_tokens_shared=6, policy="policy_net").eval()
    images = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        ref = model(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(images)
    assert torch.equal(out.shared, ref.shared)
    # bf16 keeps 8 significant bits (0.4%); two blocks and a decoder stay within 5% of the
    # largest logit at every pixel (measured: 2%), where a wrong region would be far off.
    bound = 0.05 * ref.logits.abs().max().item()
    torch.testing.assert_close(out.logits.float(), ref.logits, atol=bound, rtol=0)
    # So no label flips where fp32's best class leads the second by more than 2 x bound,
    # which holds for most pixels (the check is not empty).
    best, second = ref.logits.topk(2, dim=1).values.unbind(1)
    clear = best - second > 2 * bound
    assert clear.float().mean() > 0.5
    assert torch.equal(out.logits.argmax(1)[clear], ref.logits.argmax(1)[clear])


@pytest.mark.parametrize("stride, blocks", [(8, 3), (16, 5), (32, 7)])
def test_policy_net_runs_only_the_stages_its_feature_level_needs(stride, blocks):
    import timm

    from cts.models import PolicyNet

    torch.manual_seed(0)
    level = {8: 2, 16: 3, 32: 4}[stride]
    full = timm.create_model("efficientnet_lite0", features_only=True, out_indices=(level,)).eval()
    policy = PolicyNet(feature_stride=stride).eval()
    assert len(policy.backbone.blocks) == blocks
    # A state dict with every stage (written before they were dropped) still loads.
    state = {f"backbone.{k}": v for k, v in full.state_dict().items()}
    state.update({f"head.{k}": v for k, v in policy.head.state_dict().items()})
    policy.load_state_dict(state)
    images = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(
            policy.backbone(images)[-1], full(images)[-1], rtol=1e-4, atol=1e-4
        )


def test_scores_without_upsampling_are_the_patch_grid_of_the_logits():
    torch.manual_seed(0)
    model = build_segmenter(**TINY, crop_size=128, num_tokens_shared=4, policy="random").eval()
    images = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        torch.manual_seed(1)
        scores = model(images, upsample=False)
        torch.manual_seed(1)
        full = model(images)
    assert scores.logits.shape == (2, 5, 8, 8) and scores.num_tokens == full.num_tokens
    assert torch.equal(scores.shared, full.shared)
    upsampled = torch.nn.functional.interpolate(scores.logits, size=(128, 128), mode="bilinear")
    torch.testing.assert_close(upsampled, full.logits)


def test_a_confident_policy_shares_the_superpatches_it_is_most_sure_of():
    """Margins (uniform minus not-uniform logit) of 27..20 on superpatches 0..7: in fp32 their
    softmax is exactly 1.0 for all eight, yet the policy is surest of 0, 1 and 2."""
    model = build_segmenter(**TINY, crop_size=128, num_tokens_shared=3).eval()
    margins = torch.cat([27.0 - torch.arange(8.0), -1.0 - torch.arange(8.0)]).view(1, 4, 4)
    logits = torch.stack([torch.zeros_like(margins), margins], dim=1)  # (1, 2, 4, 4)
    assert (logits.softmax(1)[:, 1, :2] == 1.0).all()
    model.policy_net.forward = lambda images, grid=None: logits.expand(images.shape[0], -1, -1, -1)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 128, 128))
        sure = model(torch.randn(1, 3, 128, 128), share_threshold=0.5)
    assert out.shared.flatten(1).nonzero()[:, 1].tolist() == [0, 1, 2, 0, 1, 2]
    assert sure.shared.flatten(1).nonzero()[:, 1].tolist() == list(range(8))
