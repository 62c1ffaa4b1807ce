"""Importing original Segmenter / CTS-Segmenter checkpoints.

The checkpoints are made here in the original layout (random weights, a small config,
saved as their training saves them, variant.yml written with yaml.dump as theirs is). The
reference output comes from an independent re-implementation of the ORIGINAL forward with
plain torch ops on the original state dict (their ViT, mask transformer and, for CTS,
scale-1 / scale-2 token grouping); it never touches this project's model.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import yaml
from typer.testing import CliRunner

import cts
from cts.checkpoint import load_checkpoint, load_segmenter
from cts.cli import app

WIDTH, HEADS, LAYERS, PATCH, IMAGE, CLASSES = 192, 3, 2, 16, 128, 5
GRID = IMAGE // PATCH
K = 5  # superpatches sharing a token (of 16)
runner = CliRunner()


# ---------------------------------------------------------------- original-layout weights
def _original_state(decoder: str = "mask_transformer", cts_policy: bool = False, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}

    def rand(*shape, scale):
        return torch.randn(*shape, generator=gen) * scale

    def linear(name, fan_in, fan_out):
        state[f"{name}.weight"] = rand(fan_out, fan_in, scale=fan_in**-0.5)
        state[f"{name}.bias"] = rand(fan_out, scale=0.1)

    def norm(name, dim):
        state[f"{name}.weight"] = 1 + rand(dim, scale=0.2)
        state[f"{name}.bias"] = rand(dim, scale=0.2)

    def block(name, dim):
        norm(f"{name}.norm1", dim)
        linear(f"{name}.attn.qkv", dim, 3 * dim)
        linear(f"{name}.attn.proj", dim, dim)
        norm(f"{name}.norm2", dim)
        linear(f"{name}.mlp.fc1", dim, 4 * dim)
        linear(f"{name}.mlp.fc2", 4 * dim, dim)

    state["encoder.cls_token"] = rand(1, 1, WIDTH, scale=0.5)
    state["encoder.pos_embed"] = rand(1, GRID * GRID + 1, WIDTH, scale=0.5)
    state["encoder.patch_embed.proj.weight"] = rand(WIDTH, 3, PATCH, PATCH, scale=(3 * 256) ** -0.5)
    state["encoder.patch_embed.proj.bias"] = rand(WIDTH, scale=0.1)
    for i in range(LAYERS):
        block(f"encoder.blocks.{i}", WIDTH)
    norm("encoder.norm", WIDTH)
    linear("encoder.head", WIDTH, 1000)  # their ViT keeps an ImageNet head
    if decoder == "mask_transformer":
        linear("decoder.proj_dec", WIDTH, WIDTH)
        for i in range(2):
            block(f"decoder.blocks.{i}", WIDTH)
        state["decoder.cls_emb"] = rand(1, CLASSES, WIDTH, scale=0.5)
        state["decoder.proj_patch"] = rand(WIDTH, WIDTH, scale=WIDTH**-0.5)
        state["decoder.proj_classes"] = rand(WIDTH, WIDTH, scale=WIDTH**-0.5)
        norm("decoder.decoder_norm", WIDTH)
        norm("decoder.mask_norm", CLASSES)
    else:
        linear("decoder.head", WIDTH, CLASSES)
    if cts_policy:  # their PolicyNet: timm efficientnet_lite0 features_only + 1x1 conv head
        import timm

        # timm initialises from the global generator: seeded here, or the weights (and
        # whether the test is meaningful) would depend on the tests run before it.
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            backbone = timm.create_model("efficientnet_lite0", features_only=True)
        for key, value in backbone.state_dict().items():
            if value.is_floating_point():
                value = value + rand(*value.shape, scale=0.05)
                if key.endswith("running_var"):
                    value = value.abs() + 0.5
            state[f"policy_net.backbone.{key}"] = value
        # Small enough that no softmax saturates to 1.0: the original sorts probabilities,
        # and saturated ones would tie in an order neither implementation defines.
        state["policy_net.head.weight"] = rand(2, 320, 1, 1, scale=0.02)
        state["policy_net.head.bias"] = rand(2, scale=0.1)
    return state


def _variant(decoder: str = "mask_transformer", cts_policy: bool = False, **net) -> dict:
    decoder_cfg = {"name": decoder}
    if decoder == "mask_transformer":
        decoder_cfg.update(drop_path_rate=0.0, dropout=0.1, n_layers=2)
    net_kwargs = dict(
        image_size=(IMAGE, IMAGE),
        patch_size=PATCH,
        d_model=WIDTH,
        n_heads=HEADS,
        n_layers=LAYERS,
        normalization="vit",
        distilled=False,
        backbone="vit_tiny_patch16_384",
        dropout=0.0,
        drop_path_rate=0.1,
        decoder=decoder_cfg,
        n_cls=CLASSES,
    )
    if cts_policy:
        net_kwargs.update(
            policy_method="policy_net",
            policy_schedule=(GRID * GRID - 4 * K, K),
            policynet_ckpt="/somewhere/policynet.pth",
        )
    net_kwargs.update(net)
    return dict(
        world_batch_size=8,
        version="normal",
        resume=True,
        dataset_kwargs=dict(
            dataset="ade20k",
            image_size=IMAGE,
            crop_size=IMAGE,
            batch_size=8,
            normalization="vit",
            split="train",
            num_workers=10,
        ),
        algorithm_kwargs=dict(batch_size=8, start_epoch=0, num_epochs=64, eval_freq=2),
        optimizer_kwargs=dict(opt="sgd", lr=0.001, weight_decay=0.0, momentum=0.9),
        net_kwargs=net_kwargs,
        amp=False,
        log_dir="seg_tiny_mask",
        inference_kwargs=dict(im_size=IMAGE, window_size=IMAGE, window_stride=IMAGE),
    )


def _write_original(folder, state, variant):
    folder.mkdir(parents=True, exist_ok=True)
    snapshot = dict(model=state, optimizer={"state": {}}, n_cls=CLASSES, lr_scheduler={}, epoch=3)
    torch.save(snapshot, folder / "checkpoint.pth")
    (folder / "variant.yml").write_text(yaml.dump(variant))  # tuples -> !!python/tuple
    return folder


@pytest.fixture(scope="module")
def segmenter_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("orig") / "seg_tiny_mask"
    return _write_original(folder, _original_state(), _variant())


@pytest.fixture(scope="module")
def cts_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("orig") / "cts_tiny_mask"
    return _write_original(folder, _original_state(cts_policy=True), _variant(cts_policy=True))


# ---------------------------------------------------------- the original forward, re-derived
def _ln(x, state, name):
    return F.layer_norm(x, x.shape[-1:], state[f"{name}.weight"], state[f"{name}.bias"], 1e-5)


def _lin(x, state, name):
    return x @ state[f"{name}.weight"].T + state[f"{name}.bias"]


def _block(x, state, name, heads):
    b, n, c = x.shape
    y = _ln(x, state, f"{name}.norm1")
    qkv = _lin(y, state, f"{name}.attn.qkv").reshape(b, n, 3, heads, c // heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    attn = ((q @ k.transpose(-2, -1)) * (c // heads) ** -0.5).softmax(-1)
    x = x + _lin((attn @ v).transpose(1, 2).reshape(b, n, c), state, f"{name}.attn.proj")
    y = _lin(
        F.gelu(_lin(_ln(x, state, f"{name}.norm2"), state, f"{name}.mlp.fc1")),
        state,
        f"{name}.mlp.fc2",
    )
    return x + y


def _original_policy_grouping(state, images, k):
    """Their policy net on the image, softmax, descending sort, first K: (B, hs, ws) bool."""
    import timm

    backbone = timm.create_model("efficientnet_lite0", pretrained=False, features_only=True)
    prefix = "policy_net.backbone."
    backbone.load_state_dict(
        {n[len(prefix) :]: v for n, v in state.items() if n.startswith(prefix)}
    )
    with torch.no_grad():
        logits = F.conv2d(
            backbone.eval()(images)[-1],
            state["policy_net.head.weight"],
            state["policy_net.head.bias"],
        )
    scores = logits.softmax(1)[:, 1].flatten(1)
    ranked = torch.sort(scores, dim=1, descending=True)
    assert (ranked.values[:, k - 1] - ranked.values[:, k] > 1e-4).all(), "the K-th ties"
    order = ranked.indices[:, :k]
    grouped = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, order, True)
    return grouped.view(images.shape[0], *logits.shape[-2:])


def _original_forward(state, images, grouped=None):
    """Segmenter (CTS) forward: scale-1 tokens of ungrouped patches, then scale-2 tokens of
    grouped 2x2 superpatches (bilinear 0.5 of image and position grid), ViT, decoder,
    scale-2 scores copied back to their 4 patches, bilinear upsampling."""
    b, _, h, w = images.shape
    gh, gw = h // PATCH, w // PATCH
    if grouped is None:
        grouped = torch.zeros(b, gh // 2, gw // 2, dtype=torch.bool)
    fine = ~grouped.repeat_interleave(2, 1).repeat_interleave(2, 2)
    weight, bias = state["encoder.patch_embed.proj.weight"], state["encoder.patch_embed.proj.bias"]

    def embed(x):
        return F.conv2d(x, weight, bias, stride=PATCH).flatten(2).transpose(1, 2)

    pos = state["encoder.pos_embed"]
    pos_grid = pos[0, 1:].reshape(1, gh, gw, -1).permute(0, 3, 1, 2)
    half = dict(scale_factor=0.5, mode="bilinear", align_corners=False)
    fine_tokens = embed(images) + pos_grid.flatten(2).transpose(1, 2)
    coarse_pos = F.interpolate(pos_grid, **half).flatten(2).transpose(1, 2)
    coarse_tokens = embed(F.interpolate(images, **half)) + coarse_pos
    seqs = [
        torch.cat([fine_tokens[i][fine[i].flatten()], coarse_tokens[i][grouped[i].flatten()]])
        for i in range(b)
    ]
    x = torch.stack(seqs)
    x = torch.cat([(state["encoder.cls_token"] + pos[:, :1]).expand(b, -1, -1), x], 1)
    for i in range(LAYERS):
        x = _block(x, state, f"encoder.blocks.{i}", HEADS)
    x = _ln(x, state, "encoder.norm")[:, 1:]

    if "decoder.cls_emb" in state:
        x = _lin(x, state, "decoder.proj_dec")
        x = torch.cat([x, state["decoder.cls_emb"].expand(b, -1, -1)], 1)
        for i in range(2):
            x = _block(x, state, f"decoder.blocks.{i}", WIDTH // 64)
        x = _ln(x, state, "decoder.decoder_norm")
        patches = x[:, :-CLASSES] @ state["decoder.proj_patch"]
        classes = x[:, -CLASSES:] @ state["decoder.proj_classes"]
        patches = patches / patches.norm(dim=-1, keepdim=True)
        classes = classes / classes.norm(dim=-1, keepdim=True)
        scores = _ln(patches @ classes.transpose(1, 2), state, "decoder.mask_norm")
    else:
        scores = _lin(x, state, "decoder.head")

    grid = torch.zeros(b, CLASSES, gh, gw)
    for i in range(b):
        n_fine = int(fine[i].sum())
        grid[i].flatten(1)[:, fine[i].flatten()] = scores[i, :n_fine].T
        coarse = torch.zeros(CLASSES, gh // 2, gw // 2)
        coarse.flatten(1)[:, grouped[i].flatten()] = scores[i, n_fine:].T
        up = coarse.repeat_interleave(2, 1).repeat_interleave(2, 2)
        grid[i] = torch.where(fine[i], grid[i], up)
    return F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)


def _images(n=2, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, IMAGE, IMAGE, generator=generator).clamp(-1, 1)


def _state_of(folder):
    return torch.load(folder / "checkpoint.pth", weights_only=True)["model"]


# ---------------------------------------------------------------------------------- tests
def test_segmenter_import_matches_the_original_forward(segmenter_dir):
    model = cts.load_model(segmenter_dir)
    assert not model.training and model.config.policy == "none"
    images = _images()
    with torch.no_grad():
        out = model(images)
        reference = _original_forward(_state_of(segmenter_dir), images)
    assert out[0] is out.logits and out.logits.shape == (2, CLASSES, IMAGE, IMAGE)
    assert out.num_tokens == GRID * GRID
    torch.testing.assert_close(out.logits, reference, atol=1e-4, rtol=0)


def test_cts_import_matches_the_original_with_its_policy_net(cts_dir):
    model = cts.load_model(cts_dir / "variant.yml")
    assert model.config.policy == "policy_net" and model.num_tokens_shared == K
    images = _images()
    state = _state_of(cts_dir)
    grouped = _original_policy_grouping(state, images, K)
    with torch.no_grad():
        out = model(images)
        reference = _original_forward(state, images, grouped)
    assert torch.equal(out.shared, grouped)
    assert out.num_tokens == GRID * GRID - 3 * K
    torch.testing.assert_close(out.logits, reference, atol=1e-4, rtol=0)


def test_cts_import_with_sharing_off_matches_the_original_without_grouping(cts_dir):
    model = cts.load_model(cts_dir / "checkpoint.pth", num_tokens_shared=0)
    images = _images(1, seed=2)
    with torch.no_grad():
        out = model(images)
    assert not out.shared.any() and out.num_tokens == GRID * GRID
    reference = _original_forward(_state_of(cts_dir), images)
    torch.testing.assert_close(out.logits, reference, atol=1e-4, rtol=0)


def test_linear_decoder_imports(tmp_path):
    folder = _write_original(tmp_path / "lin", _original_state("linear"), _variant("linear"))
    model = cts.load_model(folder)
    images = _images(1)
    with torch.no_grad():
        logits = model(images).logits
    torch.testing.assert_close(
        logits, _original_forward(_state_of(folder), images), atol=1e-4, rtol=0
    )


def test_cli_import_writes_a_checkpoint_the_pipeline_loads(cts_dir, tmp_path):
    out = tmp_path / "checkpoints" / "segmenter.pt"
    result = runner.invoke(app, ["import_checkpoint", str(cts_dir), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "tue-mps/cts-segmenter" in result.output and "K 5" in result.output
    payload = load_checkpoint(out)
    assert payload["kind"] == "cts.segmenter"
    assert payload["source"]["layout"] == "tue-mps/cts-segmenter"
    assert payload["source"]["dropped_keys"] == ["encoder.head.weight", "encoder.head.bias"]
    model = load_segmenter(out)
    config = model.config
    assert (config.backbone, config.depth, config.num_classes, config.crop_size) == (
        "vit_tiny_patch16_384",
        LAYERS,
        CLASSES,
        IMAGE,
    )
    assert config.mean == config.std == (0.5, 0.5, 0.5)
    images = _images(1)
    with torch.no_grad():
        torch.testing.assert_close(model(images).logits, cts.load_model(out)(images).logits)

    # no sharing, inference only: the same weights with K = 0
    plain = tmp_path / "plain.pt"
    result = runner.invoke(
        app,
        [
            "import_checkpoint",
            str(cts_dir / "checkpoint.pth"),
            "-o",
            str(plain),
            "--policy",
            "none",
        ],
    )
    assert result.exit_code == 0, result.output
    plain_model = load_segmenter(plain)
    assert plain_model.policy_net is None and plain_model.num_tokens_shared == 0


def _cli_error(*args):
    result = runner.invoke(app, ["import_checkpoint", *map(str, args)])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: import_checkpoint:"), result.output
    return lines[0]


def test_unknown_layout_lists_expected_and_found_keys(tmp_path):
    folder = tmp_path / "other"
    folder.mkdir()
    torch.save(
        {"model": {"backbone.conv1.weight": torch.zeros(1), "fc.bias": torch.zeros(1)}},
        folder / "checkpoint.pth",
    )
    (folder / "variant.yml").write_text(yaml.dump(_variant()))
    message = _cli_error(folder)
    assert "unknown checkpoint layout" in message
    assert "encoder.patch_embed.proj.weight" in message and "decoder.cls_emb" in message
    assert "backbone.conv1.weight" in message


def test_class_count_and_backbone_mismatches_are_named(tmp_path):
    state = _original_state()
    message = _cli_error(_write_original(tmp_path / "a", state, _variant(n_cls=7)))
    assert "class count mismatch" in message and "7" in message and "5 classes" in message
    message = _cli_error(_write_original(tmp_path / "b", state, _variant(d_model=384, n_heads=6)))
    assert "backbone mismatch" in message and "384" in message
    message = _cli_error(_write_original(tmp_path / "c", state, _variant(n_heads=4)))
    assert "backbone mismatch" in message and "4 heads" in message


def test_missing_and_unexpected_keys_are_reported_not_partially_loaded(tmp_path):
    state = _original_state()
    del state["decoder.blocks.1.mlp.fc2.bias"]
    state["decoder.extra_scale"] = torch.ones(1)
    message = _cli_error(_write_original(tmp_path / "a", state, _variant()))
    assert "missing keys (1): decoder.blocks.1.mlp.fc2.bias" in message
    assert "unexpected keys (1): decoder.extra_scale" in message


def test_policy_net_needs_one_in_the_checkpoint_and_variant_is_required(segmenter_dir, tmp_path):
    message = _cli_error(segmenter_dir, "--policy", "policy_net")
    assert "holds no policy network" in message and "--policy none" in message
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "checkpoint.pth").write_bytes((segmenter_dir / "checkpoint.pth").read_bytes())
    assert "variant.yml" in _cli_error(lone / "checkpoint.pth")
    assert "num_tokens_shared=99 is out of range" in _cli_error(
        segmenter_dir, "--policy", "random", "-k", "99"
    )


def test_import_cts_stays_light():
    code = (
        "import sys, cts; print(sorted(m for m in ('timm', 'cts.import_checkpoint', 'cts.models') "
        "if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
