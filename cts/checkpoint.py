"""Checkpoints: written atomically, self-describing (weights + the config to rebuild)."""

from __future__ import annotations

import dataclasses
import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cts.data.io import disk_full_error, temp_file
from cts.geometry import check_num_shared, num_superpatches
from cts.inference import EvalGeometry
from cts.models import PolicyNet, Segmenter, SegmenterConfig

# What a file that is no checkpoint at all (or a damaged copy) needs: another file.
NOT_A_CHECKPOINT = (
    "not a file torch.save wrote, or a damaged copy: give a cts checkpoint (cts "
    "train_segmenter, cts import_checkpoint) or an original Segmenter/CTS checkpoint.pth"
)


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
        return _torch_load(path, map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if found is None and not trust:
            raise ValueError(_unsafe_reason(path, error)) from error
        if not trust:
            raise UntrustedCheckpointError(
                f"checkpoint {path} holds Python objects beyond tensors and plain values "
                f"({found.group(1)}); "
                "refusing to unpickle it, which could run code: pass --trust-checkpoint "
                "(Python: trust=True) only if you trust where the file comes from"
            ) from error
    except Exception as error:  # torch raises several types for a damaged file
        raise ValueError(_unreadable(path, error)) from error
    try:
        return _torch_load(path, map_location, weights_only=False)
    except Exception as error:
        raise ValueError(_unreadable(path, error)) from error


def _torch_load(path: Path, map_location: str | torch.device, weights_only: bool) -> Any:
    """torch.load without its warnings (a pickle protocol it did not write, ...): the
    errors say what matters, in one line."""
    with warnings.catch_warnings(), torch.serialization.safe_globals(_numpy_globals()):
        warnings.simplefilter("ignore")
        return torch.load(path, map_location=map_location, weights_only=weights_only)


def _unsafe_reason(path: Path, error: pickle.UnpicklingError) -> str:
    """torch's safe reader refused the file for another reason than a named object: a
    pickle it cannot read (another writer than torch.save, a newer protocol) or junk."""
    detail = re.search(r"WeightsUnpickler error: \s*(.+?)\s*$", str(error), re.MULTILINE)
    found = detail.group(1) if detail else _reason(error)
    with open(path, "rb") as f:
        start = f.read(2)
    if not (start[:1] == pickle.PROTO and start[1:] and 2 <= start[1] <= pickle.HIGHEST_PROTOCOL):
        return f"checkpoint {path} cannot be read: {found}; {NOT_A_CHECKPOINT}"
    return (
        f"checkpoint {path} is a pickle the safe reader cannot read ({found}): unpickling "
        "it fully could run code: pass --trust-checkpoint (Python: trust=True) only if you "
        "trust where the file comes from"
    )


def _unreadable(path: Path, error: Exception) -> str:
    return f"checkpoint {path} cannot be read: {_reason(error)}; {NOT_A_CHECKPOINT}"


def _reason(error: Exception) -> str:
    """The first sentence of ``error``, with its type where the text alone says little (a
    KeyError's bare number)."""
    lines = str(error).strip().splitlines()
    text = lines[0].split(". ")[0].rstrip(".") if lines else ""
    if len(text) < 20 or isinstance(error, KeyError):
        return f"{type(error).__name__} {text}".strip()
    return text


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel or compiled wrapper."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def segmenter_payload(
    model: Segmenter, eval_geometry: EvalGeometry | None = None, **extra: Any
) -> dict[str, Any]:
    """What a Segmenter checkpoint holds: its config and weights, the sizes of the evaluation
    it was scored with when known (``cts predict`` and the served model window images the
    same way) and ``extra`` (the training history, an import's source)."""
    model = unwrap(model)
    payload = {"kind": "cts.segmenter", "config": model.config.to_dict()}
    if eval_geometry is not None:
        payload["eval_geometry"] = dataclasses.asdict(eval_geometry)
    return {**payload, "model": model.state_dict(), **extra}


def stored_eval_geometry(payload: Any) -> EvalGeometry | None:
    """The evaluation sizes a :func:`segmenter_payload` stores; None in checkpoints written
    before they were stored and in imports."""
    stored = payload.get("eval_geometry") if isinstance(payload, dict) else None
    return None if stored is None else EvalGeometry(**stored)


def set_num_tokens_shared(model: Segmenter, num_tokens_shared: int, where: str) -> None:
    """Make ``model`` share ``num_tokens_shared`` superpatches, checked against its crop and
    policy (``where`` names the checkpoint in the error)."""
    crop = model.config.crop_size
    check_num_shared(num_tokens_shared, num_superpatches(crop, model.patch_size), f"crop {crop}")
    if model.config.policy == "none" and num_tokens_shared:
        raise ValueError(
            f"{where} was built with policy none: it cannot share tokens (K must be 0)"
        )
    model.num_tokens_shared = num_tokens_shared


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
