"""CTS on timm's ViT families: class, register and distillation tokens, patch 14, average and
attention-pool heads, pre-norm, rotary positions; and the families that are refused.

Every model has one or two blocks and a 4x4 patch grid (2x2 superpatches), so the module
stays fast; the reference is always timm's own forward of the same weights.
"""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cts.models import Segmenter, build_segmenter
from cts.models.rope import rope_table
from cts.models.vit import CTSViTEncoder, check_vit_backbone, create_vit
from cts.sharing import plan_layout, select_shared

timm = importlib.import_module("timm")  # after cts: its import-time torchvision workaround

REPO = Path(__file__).resolve().parents[1]

# name -> what it covers. Each is built with depth 1 and a 4 x 4 patch grid.
ARCHITECTURES = {
    "deit_tiny_patch16_224": "DeiT: class token",
    "deit_tiny_distilled_patch16_224": "distilled DeiT: class + distillation token",
    "vit_tiny_patch16_224": "augreg ViT",
    "deit3_small_patch16_224": "DeiT-III: no position embedding on the class token",
    "vit_little_patch16_reg4_gap_256": "4 registers, no class token, average-pool head",
    "vit_medium_patch16_gap_256": "no class token at all (was: torch.cat([]))",
    "vit_small_patch14_reg4_dinov2": "DINOv2: patch 14, class token + 4 registers",
    "vit_base_patch16_siglip_224": "SigLIP: no class token, attention-pool head",
    "vit_base_patch16_clip_224": "CLIP: pre-norm",
    "vit_pwee_patch16_reg1_gap_256": "parallel attention + MLP blocks (was: no block.attn)",
    "eva02_tiny_patch14_224": "EVA-02: patch 14, absolute + rotary positions",
    "vit_small_patch16_rope_224": "rotary only, xy grid",
    "vit_small_patch16_rope_mixed_224": "rotary with learned per-block frequencies",
    "vit_medium_patch16_rope_reg1_gap_256": "rotary, 1 register, no class token",
    "vit_small_patch16_dinov3": "DINOv3: rotary on centred coordinates, 4 registers",
}
# name -> what the one-line refusal says.
REFUSED = {
    "vit_base_r50_s16_384": "hybrid ViT",
    "vit_relpos_small_patch16_224": "relative position bias",
    "beit_base_patch16_224": "relative position bias",
    "samvit_base_patch16": "windowed attention",
}
# The pooling head timm builds for classification; the segmentation ViT drops it.
HEAD_KEYS = ("fc_norm.", "attn_pool.")


def _patch(name: str) -> int:
    return 14 if "patch14" in name else 16


def _encoder(name: str, depth: int = 1, **overrides) -> CTSViTEncoder:
    torch.manual_seed(0)
    overrides.setdefault("img_size", 4 * _patch(name))
    return CTSViTEncoder(create_vit(name, depth=depth, **overrides))


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_without_sharing_the_encoder_is_timms_forward_features(name):
    """K = 0 equals timm's own model (built as timm builds it, same weights) within 1e-5, and
    so does the shared path given a layout that shares nothing."""
    encoder = _encoder(name).eval()
    crop = 4 * encoder.patch_size
    reference = timm.create_model(name, num_classes=0, depth=1, img_size=crop).eval()
    missing, unexpected = reference.load_state_dict(encoder.vit.state_dict(), strict=False)
    assert not unexpected and all(k.startswith(HEAD_KEYS) for k in missing), missing
    images = torch.randn(2, 3, crop, crop)
    nothing_shared = plan_layout(select_shared(torch.rand(2, 4), 0), (4, 4))
    with torch.no_grad():
        expected = reference.forward_features(images)[:, reference.num_prefix_tokens :]
        torch.testing.assert_close(encoder(images), expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(encoder(images, nothing_shared), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_segmenter_shares_tokens_in_training_and_inference(name):
    patch = _patch(name)
    crop = 4 * patch
    torch.manual_seed(0)
    model = build_segmenter(  # the encoder is under test: the cheapest decoder and policy
        backbone=name,
        num_classes=3,
        crop_size=crop,
        depth=1,
        num_tokens_shared=2,
        policy="random",
        decoder="linear",
    )
    images = torch.randn(2, 3, crop, crop)
    model.eval()
    with torch.no_grad():
        out = model(images)
        plain = model(images, num_tokens_shared=0)
    assert out.num_tokens == 16 - 3 * 2 and plain.num_tokens == 16
    assert out.logits.shape == plain.logits.shape == (2, 3, crop, crop)
    assert out.shared.shape == (2, 2, 2) and out.shared.flatten(1).sum(1).tolist() == [2, 2]
    assert torch.isfinite(out.logits).all()
    model.train()
    loss = F.cross_entropy(model(images).logits, torch.randint(0, 3, (2, crop, crop)))
    loss.backward()
    # Every encoder parameter is used (DistributedDataParallel refuses unused ones).
    unused = [n for n, p in model.encoder.named_parameters() if p.grad is None]
    assert not unused


def test_images_of_other_sizes_are_resampled_as_timm_does():
    """dynamic_img_size: a padded 100 x 75 image (8 x 6 patches) on a 56 px /14 model."""
    encoder = _encoder("vit_small_patch14_reg4_dinov2").eval()
    reference = timm.create_model(
        "vit_small_patch14_reg4_dinov2", num_classes=0, depth=1, img_size=56, dynamic_img_size=True
    ).eval()
    reference.load_state_dict(encoder.vit.state_dict())
    images = torch.randn(1, 3, 112, 84)
    with torch.no_grad():
        expected = reference.forward_features(images)[:, 5:]
        torch.testing.assert_close(encoder(images), expected, rtol=0, atol=1e-5)
        layout = plan_layout(select_shared(torch.rand(1, 12), 0), (8, 6))
        torch.testing.assert_close(encoder(images, layout), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name, reason", list(REFUSED.items()))
def test_unservable_families_are_refused_in_one_line_before_any_work(name, reason, monkeypatch):
    create = timm.create_model

    def meta_only(*args, **kwargs):  # the check may build on the meta device, nothing else
        assert torch.empty(0).device.type == "meta", "a model was built for real"
        return create(*args, **kwargs)

    monkeypatch.setattr(timm, "create_model", meta_only)
    for build in (check_vit_backbone, lambda n: build_segmenter(backbone=n, num_classes=3)):
        with pytest.raises(ValueError, match=f"^backbone '{name}' cannot share tokens: {reason}"):
            build(name)
    with pytest.raises(ValueError) as error:
        check_vit_backbone(name)
    assert "\n" not in str(error.value)


def test_params_validation_refuses_a_hybrid_backbone():
    from cts_stages.params import ParamError, load_params

    with pytest.raises(ParamError, match="--set backbone: .*vit_base_r50_s16_384.*hybrid ViT"):
        load_params(
            REPO / "configs" / "ade20k.yaml", ["backbone=vit_base_r50_s16_384"], ["backbone"]
        )


def test_a_rotary_backbone_compiles_to_one_graph_with_and_without_sharing():
    """What cts throughput's CUDA graphs need: one whole graph per K, traced once and
    reused (a backend that counts the graphs dynamo hands it; fullgraph: a graph break
    raises), including the rotary table of patches and centres."""
    torch.manual_seed(0)
    model = build_segmenter(
        backbone="eva02_tiny_patch14_224",
        num_classes=3,
        crop_size=56,
        depth=1,
        num_tokens_shared=2,
        policy_feature_stride=16,
        policy_input_scale=0.5,
    ).eval()
    images = torch.randn(2, 3, 56, 56)
    graphs = []

    def counting(graph: torch.fx.GraphModule, example_inputs):
        graphs.append(graph)
        return graph.forward

    torch.compiler.reset()
    compiled = torch.compile(model.predict, backend=counting, fullgraph=True, dynamic=False)
    with torch.inference_mode():
        for k in (2, 0, 2, 0):
            assert torch.equal(compiled(images, k), model.predict(images, k))
    torch.compiler.reset()
    assert len(graphs) == 2  # one per K, no recompilation on the second call


# --- rotary positions -------------------------------------------------------------------------

ROPES = [
    "eva02_tiny_patch14_224",  # RotaryEmbeddingCat, index grid rescaled to a 16 x 16 reference
    "vit_small_patch16_rope_224",  # RotaryEmbeddingCat, xy indexing
    "vit_small_patch16_rope_mixed_224",  # RotaryEmbeddingMixed, learned frequencies
    "vit_small_patch16_dinov3",  # RotaryEmbeddingDinoV3, centred normalised coordinates
]


# Rotary embeddings whose coordinates timm rescales to a reference grid (EVA-02 and
# vit_*_rope_*_gap_256: 16 x 16; DINOv3: [-1, 1]): on a 4 x 4 grid neighbouring patches'
# angles differ by up to 4 rad, and a centre's angle cannot be read off its patches'.
RESCALED_ROPES = (
    "eva02_tiny_patch14_224",
    "vit_medium_patch16_rope_reg1_gap_256",
    "vit_small_patch16_dinov3",
)


def _angles(table: torch.Tensor) -> torch.Tensor:
    """``(..., M, D)`` concatenated [sin, cos] -> the ``(..., M, D/2)`` angles."""
    sin, cos = table.chunk(2, dim=-1)
    return torch.atan2(sin, cos)


def _centre_angles(patch_angles: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``(..., N, D/2)`` angles of a patch grid -> ``(..., S, D/2)`` at the superpatch centres.

    An angle is linear in the coordinates, so the centre's is the mean of its four patches'
    (unwrapped against the top-left one: neighbours here differ by less than pi)."""
    h, w = grid
    quads = patch_angles.unflatten(-2, (h // 2, 2, w // 2, 2))  # (..., hs, 2, ws, 2, D/2)
    top_left = quads[..., :, :1, :, :1, :]
    offsets = torch.remainder(quads - top_left + math.pi, 2 * math.pi) - math.pi
    centre = top_left + offsets.mean(dim=(-4, -2), keepdim=True)
    return centre.flatten(-5, -2)


@pytest.mark.parametrize("name", ROPES)
def test_shared_tokens_rotate_at_their_superpatch_centre(name):
    rope = _encoder(name).rope.eval()
    grid = (16, 16)  # neighbouring patches' angles differ by less than pi (EVA-02: 1 rad)
    with torch.no_grad():
        table = rope_table(rope, grid)
        timm_patches = rope.get_embed(shape=grid)  # timm's own embedding of the patches
    n = grid[0] * grid[1]
    torch.testing.assert_close(table[..., :n, :], timm_patches, rtol=0, atol=1e-6)
    centres = _centre_angles(_angles(timm_patches), grid)
    sin, cos = table[..., n:, :].chunk(2, dim=-1)
    torch.testing.assert_close(sin, centres.sin(), rtol=0, atol=1e-5)
    torch.testing.assert_close(cos, centres.cos(), rtol=0, atol=1e-5)


def test_coordinate_augmentation_moves_patches_and_centres_by_one_draw():
    rope = _encoder("vit_small_patch16_dinov3", rope_shift_coords=1.0, rope_jitter_coords=1.5).rope
    grid, n = (16, 16), 256
    rope.eval()
    plain = rope_table(rope, grid)
    rope.train()
    torch.manual_seed(3)
    table = rope_table(rope, grid)
    assert not torch.allclose(table[:n], plain[:n], atol=1e-3)  # the draw moved the patches
    centres = _centre_angles(_angles(table[:n]), grid)  # ... and the centres with them
    sin, cos = table[n:].chunk(2, dim=-1)
    torch.testing.assert_close(sin, centres.sin(), rtol=0, atol=1e-5)
    torch.testing.assert_close(cos, centres.cos(), rtol=0, atol=1e-5)


def _kept_and_shared(shared: list[int], grid: tuple[int, int]) -> list[int]:
    """The spec's order (cts/sharing.py), by hand: the patches of no shared superpatch in
    raster order, then the shared superpatches in the order given (their index in the
    superpatch grid, offset by N to tell them apart)."""
    h, w = grid
    covered = {
        (2 * (s // (w // 2)) + dy) * w + 2 * (s % (w // 2)) + dx
        for s in shared
        for dy in (0, 1)
        for dx in (0, 1)
    }
    return [i for i in range(h * w) if i not in covered] + [h * w + s for s in shared]


def _prefix_and_positions(vit) -> tuple[torch.Tensor, torch.Tensor | int]:
    """timm's prefix tokens ``(1, P, C)`` in its order (class, distillation, registers) with
    their position where timm adds one, and the patches' positions ``(1, N, C)`` (0: none),
    read off the parameters (the model's own grid: nothing resampled)."""
    tokens = [getattr(vit, k, None) for k in ("cls_token", "dist_token", "reg_token")]
    none = vit.patch_embed.proj.weight.new_zeros(1, 0, vit.embed_dim)
    prefix = torch.cat([none, *(t for t in tokens if t is not None)], 1)
    assert prefix.shape[1] == vit.num_prefix_tokens
    if vit.pos_embed is None:
        return prefix, 0
    if vit.no_embed_class:
        return prefix, vit.pos_embed
    count = prefix.shape[1]
    return prefix + vit.pos_embed[:, :count], vit.pos_embed[:, count:]


def _position_sensitive(vit) -> None:
    """Weights under which positions and prefix tokens show in the output: timm's init
    leaves attention near uniform (logits of std ~0.15), so a rotation changes the output
    by less than 1e-5, and layer scale (DINOv2: 1e-5) hides the blocks altogether. Layer
    scale 1, queries and keys 4x: logits of std ~2."""
    with torch.no_grad():
        for name, param in vit.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf.startswith("gamma"):
                param.fill_(1.0)
            elif name.endswith(("qkv.weight", "q_proj.weight", "k_proj.weight", "in_proj.weight")):
                param.mul_(4.0)


def _shared_reference(vit, images: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
    """The shared sequence built by hand and run through timm's own modules, ``(B, N - 3K,
    C)``: a patch token is timm's patch embedding of its pixels plus its position; a shared
    token is the embedding of its superpatch's pixels downsampled 2x (bilinear, as the
    authors) plus the mean of its four patches' positions, and rotates at its centre."""
    batch, grid = images.shape[0], tuple(vit.patch_embed.dynamic_feat_size(images.shape[-2:]))
    n = grid[0] * grid[1]
    patches = vit.patch_embed(images).reshape(batch, n, -1)
    half = F.interpolate(images, scale_factor=0.5, mode="bilinear", align_corners=False)
    superpatches = vit.patch_embed(half).reshape(batch, n // 4, -1)
    prefix, pos = _prefix_and_positions(vit)
    if torch.is_tensor(pos):
        quads = pos.reshape(1, grid[0] // 2, 2, grid[1] // 2, 2, -1)
        superpatches = superpatches + quads.mean((2, 4)).flatten(1, 2)
        patches = patches + pos
    rows = [_kept_and_shared(shared[b].tolist(), grid) for b in range(batch)]
    every = torch.cat([patches, superpatches], 1)
    sequence = torch.stack([every[b, rows[b]] for b in range(batch)])
    x = torch.cat([prefix.expand(batch, -1, -1), sequence], 1)
    x = vit.norm_pre(x)
    rope = getattr(vit, "rope", None)
    if rope is None:
        return vit.norm(vit.blocks(x))[:, prefix.shape[1] :]
    patch_rope = rope.get_embed(shape=grid)  # (N, D) or (depth, heads, N, D)
    centres = _centre_angles(_angles(patch_rope), grid)
    table = torch.cat([patch_rope, torch.cat([centres.sin(), centres.cos()], -1)], -2)
    for i, block in enumerate(vit.blocks):
        block_table = table[i] if table.dim() == 4 else table.unsqueeze(0)
        x = block(x, rope=torch.stack([block_table[:, rows[b]] for b in range(batch)]))
    return vit.norm(x)[:, prefix.shape[1] :]


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_shared_sequence_is_timms_modules_on_a_hand_built_sequence(name):
    """K > 0 for every family against timm's own patch embedding, blocks and norms fed a
    sequence built by hand from the spec (not from cts.sharing or the encoder's embedding):
    a wrong shared position, a prefix token mishandled, a lost norm_pre or a token out of
    order changes the output. The same reference with K = 0 is timm's forward_features.
    The centres' rotary angles follow from timm's patches' (:func:`_centre_angles`), on a grid
    where neighbouring patches' differ by less than pi (16 x 16 where timm rescales)."""
    side = 16 if name in RESCALED_ROPES else 4
    encoder = _encoder(name, depth=2, img_size=side * _patch(name)).eval()
    _position_sensitive(encoder.vit)
    grid, s = (side, side), side * side // 4
    images = torch.randn(2, 3, side * _patch(name), side * _patch(name))
    shared = torch.stack([torch.randperm(s)[: s // 2] for _ in range(2)])  # K = S / 2
    with torch.no_grad():
        out = encoder(images, plan_layout(shared, grid))
        expected = _shared_reference(encoder.vit, images, shared)
        plain = encoder.vit.forward_features(images)[:, encoder.num_prefix_tokens :]
        torch.testing.assert_close(
            _shared_reference(encoder.vit, images, shared[:, :0]), plain, rtol=0, atol=1e-5
        )
    assert out.shape == (2, side * side - 3 * (s // 2), encoder.embed_dim)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-4)  # outputs of std 1


# --- the policy grid --------------------------------------------------------------------------


def test_policy_net_reads_28_px_superpatches_on_their_own_grid():
    """A /14 ViT at 112 px has 4 x 4 superpatches of 28 px: the policy net sees the image
    resized so that each spans 32 px (128 px), and its stride-32 cells are the superpatches
    (before: 32 px cells of the 112 px image, drifting 4 px per cell off the superpatches)."""
    from cts.models import PolicyNet

    torch.manual_seed(0)
    policy = PolicyNet().eval()
    images = torch.randn(2, 3, 112, 112)
    resized = F.interpolate(images, size=(128, 128), mode="bilinear", align_corners=False)
    with torch.no_grad():
        logits = policy(images, (4, 4))
        cells = policy(resized)  # no grid: its own stride-32 feature grid, no resampling
    assert cells.shape == logits.shape == (2, 2, 4, 4)
    torch.testing.assert_close(logits, cells, rtol=0, atol=0)
    model = build_segmenter(
        backbone="vit_small_patch14_reg4_dinov2",
        num_classes=3,
        crop_size=112,
        depth=1,
        num_tokens_shared=4,
    ).eval()
    model.policy_net.load_state_dict(policy.state_dict())
    with torch.no_grad():
        scores = model._share_scores(images, None, (4, 4))
    torch.testing.assert_close(scores, (cells[:, 1] - cells[:, 0]).flatten(1))


# --- weights from a local file ----------------------------------------------------------------

# One per family; each file is a timm classification state dict (head, pooling head and all).
WEIGHT_FAMILIES = [
    "deit_tiny_distilled_patch16_224",
    "vit_small_patch14_reg4_dinov2",
    "vit_base_patch16_siglip_224",
    "eva02_tiny_patch14_224",
    "vit_small_patch16_rope_mixed_224",
    "vit_small_patch16_dinov3",
]


def _timm_state(name: str, crop: int, blocks: int = 1) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return timm.create_model(name, depth=blocks, img_size=crop, num_classes=5).state_dict()


def _load(name: str, path, crop: int):
    model = build_segmenter(
        backbone=name, num_classes=3, crop_size=crop, depth=1, policy="none", pretrained_path=path
    )
    return model.encoder.vit.state_dict()


@pytest.mark.parametrize("name", WEIGHT_FAMILIES)
def test_pretrained_path_loads_every_family_from_timms_layout(name, tmp_path):
    import safetensors.torch

    crop = 4 * _patch(name)
    state = _timm_state(name, crop)
    path = tmp_path / "weights.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, path)
    loaded = _load(name, str(path), crop)
    assert set(loaded) <= set(state)  # the head and pooling head are the file's extra keys
    for key, value in loaded.items():
        assert torch.equal(value, state[key]), key


def test_dinov2_weights_load_from_the_original_release_layout(tmp_path):
    """facebookresearch/dinov2 with registers: register_tokens, the class token's position in
    pos_embed, a mask token; timm moves the class position into the class token."""
    name, crop = "vit_small_patch14_reg4_dinov2", 56
    state = _timm_state(name, crop)
    original = {k: v for k, v in state.items() if not k.startswith("head")}
    class_pos = torch.randn(1, 1, 384)
    original["register_tokens"] = original.pop("reg_token")
    original["cls_token"] = original["cls_token"] - class_pos
    original["pos_embed"] = torch.cat([class_pos, original["pos_embed"]], 1)
    original["mask_token"] = torch.zeros(1, 384)
    torch.save(original, tmp_path / "dinov2.pth")
    loaded = _load(name, tmp_path / "dinov2.pth", crop)
    for key, value in loaded.items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=1e-6, msg=key)


def test_eva02_and_dinov3_weights_load_from_their_original_layouts(tmp_path):
    """EVA-02 (baaivision: mlp.w12 / mlp.w3, rotary buffers saved) and DINOv3 (Meta:
    storage_tokens, ls1/ls2, rotary periods, mask token), as timm converts them."""
    eva_state = _timm_state("eva02_tiny_patch14_224", 56)
    eva = {
        k.replace("mlp.fc1", "mlp.w12").replace("mlp.fc2", "mlp.w3"): v
        for k, v in eva_state.items()
    }
    eva["rope.freqs_cos"] = torch.randn(16, 32)
    dino_state = _timm_state("vit_small_patch16_dinov3", 64)
    dino = {
        k.replace("reg_token", "storage_tokens")
        .replace("gamma_1", "ls1.gamma")
        .replace("gamma_2", "ls2.gamma"): v
        for k, v in dino_state.items()
    }
    dino.update({"rope_embed.periods": torch.ones(16), "mask_token": torch.zeros(1, 384)})
    for name, crop, original, state in (
        ("eva02_tiny_patch14_224", 56, eva, eva_state),
        ("vit_small_patch16_dinov3", 64, dino, dino_state),
    ):
        torch.save(original, tmp_path / f"{name}.pth")
        loaded = _load(name, tmp_path / f"{name}.pth", crop)
        for key, value in loaded.items():
            assert torch.equal(value, state[key]), f"{name}: {key}"


# --- the modern-backbone config and throughput rows -------------------------------------------


def test_dinov2_config_shares_30_percent_of_its_tokens_on_the_superpatch_grid():
    from cts_stages.common import segmenter_config
    from cts_stages.params import CHECKS, load_params

    params = load_params(REPO / "configs" / "ade20k_dinov2_s14.yaml")
    assert set(params) == set(CHECKS)
    assert (params["backbone"], params["crop_size"], params["num_tokens_shared"]) == (
        "vit_small_patch14_reg4_dinov2",
        504,
        130,
    )
    assert params["eval_window"] % 28 == 0 and max(params["sweep_tokens_shared"]) <= 18 * 18
    n, k = (504 // 14) ** 2, params["num_tokens_shared"]
    assert (n, n - 3 * k, round(100 * 3 * k / n, 1)) == (1296, 906, 30.1)
    config = segmenter_config({**params, "pretrained": False}, num_classes=150)
    with torch.device("meta"):  # the model the pipeline builds, without weights or memory
        model = Segmenter(config).eval()
        with torch.no_grad():
            out = model(torch.empty(1, 3, 504, 504))
    assert model.patch_size == 14 and model.encoder.vit.num_prefix_tokens == 5
    assert out.num_tokens == 906 and out.shared.shape == (1, 18, 18)


def test_throughput_rows_take_any_supported_backbone():
    from cts.throughput.rows import select_rows

    rows = select_rows(
        ["vit_small_patch14_reg4_dinov2", "vit_ti_512", "eva02_tiny_patch14_224@448"]
    )
    assert [(r.key, r.crop_size, r.num_tokens_shared, r.num_classes) for r in rows] == [
        ("vit_ti_512", 512, 103, 150),
        ("vit_small_patch14_reg4_dinov2", 504, 130, 150),  # 1296 -> 906 tokens
        ("eva02_tiny_patch14_224@448", 448, 103, 150),  # 1024 -> 715 tokens
    ]
    with pytest.raises(ValueError, match="multiple of 28"):
        select_rows(["vit_small_patch14_reg4_dinov2@512"])
    with pytest.raises(ValueError, match="cannot share tokens: hybrid ViT"):
        select_rows(["vit_base_r50_s16_384"])
    with pytest.raises(ValueError, match="unknown row 'vit_h_1024'.*NAME@CROP"):
        select_rows(["vit_h_1024"])


def test_throughput_command_measures_a_rotary_backbone_row(tmp_path):
    import json

    from typer.testing import CliRunner

    from cts.cli import app

    args = ["--depth", "1", "--batch-size", "1", "--warmup", "0", "--repeats", "1"]
    row = "vit_small_patch16_rope_224@64"
    result = CliRunner().invoke(
        app, ["throughput", "-r", row, "--precision", "fp32", *args, "--out", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    (record,) = json.loads((tmp_path / "throughput.json").read_text())["rows"]
    assert (record["key"], record["tokens_no_sharing"], record["tokens"]) == (row, 16, 16 - 3 * 2)
    assert record["ims_per_sec"] > 0 and record["ims_per_sec_no_sharing"] > 0
