"""Pretrained backbones from local files, the Hugging Face cache, and the offline error."""

from __future__ import annotations

import importlib

import pytest
import safetensors.torch
import torch
from huggingface_hub import constants

from cts.checkpoint import load_segmenter, save_checkpoint, segmenter_payload
from cts.models import PolicyNet, build_segmenter
from cts.models import pretrained as weights
from cts.models.pretrained import PretrainedWeightsUnavailable

timm = importlib.import_module("timm")  # after cts: its import-time torchvision workaround

VIT = "vit_tiny_patch16_384"
SMALL = dict(backbone=VIT, num_classes=3, crop_size=64, depth=2, policy="none")


@pytest.fixture(scope="module")
def vit_file(tmp_path_factory):
    """A timm ViT-Ti state dict (3 blocks, 384 px position grid, ImageNet head), random."""
    torch.manual_seed(0)
    vit = timm.create_model(VIT, depth=3)
    path = tmp_path_factory.mktemp("weights") / "vit_tiny.pth"
    torch.save(vit.state_dict(), path)
    return path, vit.state_dict()


def test_pretrained_path_loads_the_vit_and_resamples_position_embedding(vit_file, tmp_path):
    path, state = vit_file
    sfile = tmp_path / "vit_tiny.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, sfile)
    for file in (path, sfile):
        with pytest.warns(UserWarning, match="loaded the first 2 of its 3 transformer blocks"):
            model = build_segmenter(**SMALL, pretrained_path=str(file))
        vit = model.encoder.vit
        assert torch.equal(vit.blocks[1].attn.qkv.weight, state["blocks.1.attn.qkv.weight"])
        assert torch.equal(vit.cls_token, state["cls_token"])
        assert vit.pos_embed.shape == (1, 1 + 4 * 4, 192)  # 384 px grid resampled to 64 px


def test_full_depth_loads_without_a_warning_and_checkpoints_do_not_need_the_file(
    vit_file, tmp_path, recwarn
):
    path, state = vit_file
    model = build_segmenter(**{**SMALL, "depth": 3}, pretrained_path=str(path))
    assert not [w for w in recwarn if "transformer blocks" in str(w.message)]
    assert torch.equal(model.encoder.vit.blocks[2].mlp.fc2.bias, state["blocks.2.mlp.fc2.bias"])
    saved = save_checkpoint(tmp_path / "m.pt", segmenter_payload(model))
    moved = tmp_path / "gone.pth"
    moved.write_bytes(path.read_bytes())
    model.config.pretrained_path = str(moved)
    save_checkpoint(saved, segmenter_payload(model))
    moved.unlink()
    reloaded = load_segmenter(saved)  # weights come from the checkpoint, not the file
    assert torch.equal(reloaded.encoder.vit.pos_embed, model.encoder.vit.pos_embed)


def test_policy_pretrained_path_loads_efficientnet_lite0(tmp_path):
    torch.manual_seed(1)
    full = timm.create_model("efficientnet_lite0")  # classification model: head is dropped
    path = tmp_path / "effnet.pth"
    torch.save(full.state_dict(), path)
    policy = PolicyNet(pretrained_path=path, feature_stride=16)
    assert torch.equal(policy.backbone.conv_stem.weight, full.conv_stem.weight)
    assert torch.equal(
        policy.backbone.blocks[3][0].bn1.running_var, full.blocks[3][0].bn1.running_var
    )
    model = build_segmenter(
        **{**SMALL, "policy": "policy_net", "num_tokens_shared": 1},
        policy_pretrained_path=str(path),
    )
    assert torch.equal(model.policy_net.backbone.conv_stem.weight, full.conv_stem.weight)


def test_a_file_that_does_not_fit_is_an_error_naming_keys(tmp_path):
    path = tmp_path / "effnet.pth"
    torch.save(timm.create_model("efficientnet_lite0").state_dict(), path)
    with pytest.raises(ValueError, match=r"does not fit backbone vit_tiny.*missing \d+: "):
        build_segmenter(**SMALL, pretrained_path=str(path))
    vit_path = tmp_path / "vit.pth"
    torch.save(timm.create_model(VIT, depth=1).state_dict(), vit_path)
    with pytest.raises(ValueError, match=r"missing \d+: blocks\.1\."):
        build_segmenter(**SMALL, pretrained_path=str(vit_path))
    with pytest.raises(ValueError, match=r"does not fit efficientnet_lite0.*missing"):
        PolicyNet(pretrained_path=vit_path)


def test_missing_files_fail_before_anything_is_built(tmp_path, monkeypatch):
    def no_build(*args, **kwargs):
        raise AssertionError("a model was built before the check")

    monkeypatch.setattr(timm, "create_model", no_build)
    with pytest.raises(FileNotFoundError, match="pretrained_path .*nope.pth not found"):
        build_segmenter(**SMALL, pretrained_path=str(tmp_path / "nope.pth"))
    with pytest.raises(FileNotFoundError, match="policy_pretrained_path"):
        build_segmenter(
            **{**SMALL, "policy": "policy_net", "num_tokens_shared": 1},
            policy_pretrained_path=str(tmp_path / "nope.pth"),
        )


def test_offline_without_cache_is_one_error_naming_both_ways(tmp_path, monkeypatch):
    def no_build(*args, **kwargs):
        raise AssertionError("a model was built before the check")

    monkeypatch.setattr(timm, "create_model", no_build)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # never touches the network
    weights._hub_reachable.cache_clear()
    with pytest.raises(PretrainedWeightsUnavailable) as error:
        build_segmenter(
            **{**SMALL, "policy": "policy_net", "num_tokens_shared": 1}, pretrained=True
        )
    weights._hub_reachable.cache_clear()
    message = str(error.value)
    for part in (
        VIT,
        "efficientnet_lite0",
        "pretrained_path / policy_pretrained_path",
        "HF_HOME",
        "pretrained: false",
        str(tmp_path / "empty-cache"),
    ):
        assert part in message, part
    # with the ViT given as a file, only the policy net's weights are asked for
    with pytest.raises(PretrainedWeightsUnavailable, match="^pretrained weights for efficientnet"):
        build_segmenter(
            **{**SMALL, "policy": "policy_net", "num_tokens_shared": 1},
            pretrained=True,
            pretrained_path=__file__,
        )
    weights._hub_reachable.cache_clear()


def _fill_cache(cache, repo: str, state: dict) -> None:
    """Lay a file out as huggingface_hub's cache does: refs/main -> snapshots/<hash>/."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    commit = "0" * 40
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    safetensors.torch.save_file(
        {k: v.contiguous() for k, v in state.items()}, snapshot / "model.safetensors"
    )


def test_hub_weights_from_the_cache_load_offline_and_a_depth_override_says_so(
    vit_file, tmp_path, monkeypatch
):
    _, state = vit_file
    repo = timm.get_pretrained_cfg(VIT).hf_hub_id
    _fill_cache(tmp_path / "hub", repo, state)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    weights._hub_reachable.cache_clear()
    with pytest.warns(UserWarning, match="loaded the first 2 of its 12 pretrained"):
        model = build_segmenter(**SMALL, pretrained=True)
    weights._hub_reachable.cache_clear()
    assert torch.equal(model.encoder.vit.blocks[1].norm1.weight, state["blocks.1.norm1.weight"])
