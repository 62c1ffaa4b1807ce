"""Checkpoints: written atomically, self-describing (weights + the config to rebuild)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cts.models import PolicyNet, Segmenter, SegmenterConfig


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """torch.save to a temporary file in the same folder, then rename: never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as error:  # torch raises several types for a damaged file
        raise ValueError(f"checkpoint {path} cannot be read: {error}") from error


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel or compiled wrapper."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def segmenter_payload(model: Segmenter, **extra: Any) -> dict[str, Any]:
    model = unwrap(model)
    return {
        "kind": "cts.segmenter",
        "config": model.config.to_dict(),
        "model": model.state_dict(),
        **extra,
    }


def load_segmenter(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Segmenter:
    """Rebuild a Segmenter from a checkpoint written by :func:`segmenter_payload`, eval mode."""
    return segmenter_from_payload(load_checkpoint(path, map_location), path)


def segmenter_from_payload(payload: dict, path: str | os.PathLike = "checkpoint") -> Segmenter:
    """The Segmenter a :func:`segmenter_payload` dict describes, weights loaded, eval mode."""
    if not isinstance(payload, dict) or payload.get("kind") != "cts.segmenter":
        keys = sorted(payload)[:6] if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"checkpoint {path} is not a cts Segmenter checkpoint (keys: {keys})")
    # The weights are in the checkpoint: no hub download, no pretrained files needed.
    config = dict(
        payload["config"], pretrained=False, pretrained_path=None, policy_pretrained_path=None
    )
    model = Segmenter(SegmenterConfig(**config))
    model.load_state_dict(payload["model"])
    return model.eval()


def policy_payload(model: PolicyNet, **extra: Any) -> dict[str, Any]:
    model = unwrap(model)
    config = {"feature_stride": model.feature_stride, "input_scale": model.input_scale}
    return {"kind": "cts.policy", "config": config, "model": model.state_dict(), **extra}


def load_policy_weights(model: PolicyNet, path: str | os.PathLike) -> None:
    """Load a trained policy net into ``model``; its feature level and input scale must match."""
    payload = load_checkpoint(path)
    if payload.get("kind") != "cts.policy":
        raise ValueError(f"checkpoint {path} is not a cts policy-network checkpoint")
    expected = {"feature_stride": model.feature_stride, "input_scale": model.input_scale}
    if payload["config"] != expected:
        raise ValueError(
            f"policy checkpoint {path} was trained with {payload['config']}, "
            f"the model expects {expected}"
        )
    model.load_state_dict(payload["model"])
