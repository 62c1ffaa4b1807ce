"""Checkpoints: written atomically, self-describing (weights + the config to rebuild)."""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cts.data.io import disk_full_error, temp_file
from cts.models import PolicyNet, Segmenter, SegmenterConfig


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """torch.save to a temporary file in the same folder, then rename: never half-written.

    Out of space: a :class:`cts.data.io.DiskFullError` naming the path, the size needed and
    the space free, instead of torch's zip-writer message; the previous file is kept.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file(path)
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except Exception as error:
        full = disk_full_error(path, _tensor_bytes(payload), error, tmp, "the checkpoint")
        Path(tmp).unlink(missing_ok=True)
        if full is not None:
            raise full from error
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _tensor_bytes(value: Any) -> int:
    """Bytes of the tensors in ``value`` (nested dicts, lists, tuples): about the size of
    its checkpoint, which is mostly tensor data."""
    if isinstance(value, torch.Tensor):
        return value.untyped_storage().nbytes()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, list | tuple):
        return sum(_tensor_bytes(v) for v in value)
    return 0


class UntrustedCheckpointError(ValueError):
    """A checkpoint holds objects that only a full (code-running) unpickle can rebuild."""


def _numpy_globals() -> list:
    """numpy scalars and arrays of plain dtypes, which old training scripts leave in their
    snapshots (an epoch counter as ``np.int64``, a scheduler's ``np.float64``)."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    plain = {type(np.dtype(code)) for code in "?bBhHiIlLqQefdgFDGSUV"}
    return [core.multiarray.scalar, core.multiarray._reconstruct, np.ndarray, np.dtype, *plain]


def load_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device = "cpu", trust: bool = False
) -> Any:
    """``torch.load`` restricted to tensors, plain containers and numpy values.

    Unpickling other objects can run any code the file contains, so a checkpoint that needs
    more is refused unless ``trust`` is set (the CLI's ``--trust-checkpoint``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    if path.stat().st_size == 0:
        raise ValueError(f"checkpoint {path} is empty (0 bytes): an interrupted copy or save?")
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if found is None:
            raise ValueError(f"checkpoint {path} cannot be read: {_reason(error)}") from error
        if not trust:
            raise UntrustedCheckpointError(
                f"checkpoint {path} holds Python objects beyond tensors and plain values "
                f"({found.group(1)}); "
                "refusing to unpickle it, which could run code: pass --trust-checkpoint "
                "(Python: trust=True) only if you trust where the file comes from"
            ) from error
    except Exception as error:  # torch raises several types for a damaged file
        raise ValueError(f"checkpoint {path} cannot be read: {_reason(error)}") from error
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as error:
        raise ValueError(f"checkpoint {path} cannot be read: {_reason(error)}") from error


def _reason(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


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
