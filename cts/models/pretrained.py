"""Pretrained backbone weights: timm's Hugging Face hub copies (cached) or a local file.

``pretrained: true`` loads ImageNet weights through timm from the Hugging Face hub, which
caches them (``HF_HOME``/``HF_HUB_CACHE``). Machines without internet can instead point
``pretrained_path`` (ViT) and ``policy_pretrained_path`` (efficientnet_lite0) at a local
file: a timm state dict as ``.pth``/``.pt``/``.bin``/``.safetensors``, or for the ViT an
original JAX ``.npz``. :func:`check_hub_weights` runs before a model is built, so an
offline machine gets one error naming every missing weight and both ways out.
"""

from __future__ import annotations

import functools
import os
import re
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".npz")
_HUB_FILES = ("model.safetensors", "pytorch_model.bin")
_OFF = {"1", "true", "yes", "on"}


class PretrainedWeightsUnavailable(RuntimeError):
    """Pretrained weights were asked for, but neither the hub nor its cache can give them."""


def require_weights_file(path: str | os.PathLike, what: str) -> Path:
    """The path as a Path; a clear FileNotFoundError when it is not a file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} not found (a .pth/.safetensors/.npz weights file)")
    return path


def _hub_location(name: str) -> tuple[str | None, str | None]:
    """(hub repo id, revision) of timm's default pretrained weights for ``name``."""
    import timm

    config = timm.get_pretrained_cfg(name)
    if config is None or not config.hf_hub_id:
        return None, None
    repo, _, revision = config.hf_hub_id.partition("@")
    return repo, revision or None


def _cached(name: str) -> bool:
    repo, revision = _hub_location(name)
    if repo is None:
        return False
    from huggingface_hub import try_to_load_from_cache

    return any(
        isinstance(try_to_load_from_cache(repo, file, revision=revision), str)
        for file in _HUB_FILES
    )


def _hub_endpoint() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT") or constants.ENDPOINT


@functools.cache
def _hub_reachable(timeout: float = 5.0) -> bool:
    """Whether the hub answers at all (any HTTP status counts); False when offline mode."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in _OFF:
        return False
    try:
        request = urllib.request.Request(_hub_endpoint(), method="HEAD")
        with urllib.request.urlopen(request, timeout=timeout):
            pass
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):
        return False
    return True


def check_hub_weights(needs: Iterable[tuple[str, str]]) -> None:
    """Raise one :class:`PretrainedWeightsUnavailable` unless every model's hub weights load.

    Args:
        needs: ``(timm model name, name of the setting that gives a local file instead)``
            for each model that will load hub weights. Cached weights need no network;
            otherwise the hub is probed once (a HEAD request, 5 s timeout).
    """
    # Names without a hub copy are left to timm (unknown name, URL-only weights).
    missing = [(n, s) for n, s in needs if _hub_location(n)[0] is not None and not _cached(n)]
    if not missing or _hub_reachable():
        return
    from huggingface_hub import constants

    models = ", ".join(f"{name} (hub {_hub_location(name)[0]})" for name, _ in missing)
    settings = " / ".join(setting for _, setting in missing)
    raise PretrainedWeightsUnavailable(
        f"pretrained weights for {models} are not in the Hugging Face cache "
        f"({constants.HF_HUB_CACHE}) and the hub ({_hub_endpoint()}) cannot be reached: "
        f"set {settings} to a local weights file (.pth/.safetensors/.npz), or fill the cache "
        "on a machine with internet and point HF_HOME at it, or set pretrained: false"
    )


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a torch or safetensors file (also inside 'state_dict'/'model')."""
    from timm.models import load_state_dict

    try:
        return load_state_dict(str(path), use_ema=False)
    except Exception as error:  # torch / safetensors raise several types for a bad file
        raise ValueError(f"weights file {path} cannot be read: {error}") from error


def fit_report(
    own: dict[str, torch.Tensor],
    loaded: dict[str, torch.Tensor],
    shown: int = 5,
    line: str = "{label} {count}: {keys}",
) -> list[str]:
    """Missing keys, unexpected keys and shape mismatches, one ``line`` each, ``shown`` keys."""
    problems = []
    missing = [k for k in own if k not in loaded]
    unexpected = [k for k in loaded if k not in own]
    shapes = [
        f"{k} {tuple(loaded[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in loaded and loaded[k].shape != own[k].shape
    ]
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)):
        if keys:
            more = f" (+{len(keys) - shown} more)" if len(keys) > shown else ""
            listed = f"{', '.join(keys[:shown])}{more}"
            problems.append(line.format(label=label, count=len(keys), keys=listed))
    return problems


_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_NPZ_BLOCK = re.compile(r"encoderblock_(\d+)/")


def _say_depth(path: str, available: int, depth: int) -> None:
    if available > depth:
        warnings.warn(
            f"{path}: loaded the first {depth} of its {available} transformer blocks "
            f"(depth={depth})",
            stacklevel=3,
        )


def load_vit_weights(vit: nn.Module, path: str | os.PathLike, name: str) -> None:
    """Load a local pretrained file into a timm ViT built without weights.

    timm's layout or an original release's that timm converts (:func:`_checkpoint_filter`).
    The position embedding is resampled to the model's grid, the classifier head dropped;
    with fewer blocks than the file (a depth override) the first ``depth`` blocks load and
    a warning says so. Anything else that does not fit is an error listing the keys.
    """
    path = require_weights_file(path, "pretrained_path")
    depth = len(vit.blocks)
    if path.suffix == ".npz":  # original JAX checkpoint: timm's own loader (first blocks)
        import numpy as np

        if not hasattr(vit, "load_pretrained"):
            raise ValueError(
                f"{path}: JAX .npz weights load into timm VisionTransformer models only; "
                f"give {name} a .pth/.safetensors state dict"
            )

        with np.load(path) as npz:
            blocks = {int(m.group(1)) for k in npz.files if (m := _NPZ_BLOCK.search(k))}
        if blocks and max(blocks) + 1 < depth:
            raise ValueError(f"{path} holds {max(blocks) + 1} blocks, the model needs {depth}")
        try:
            vit.load_pretrained(str(path))
        except Exception as error:
            raise ValueError(f"{path} does not fit backbone {name}: {error}") from error
        _say_depth(str(path), max(blocks, default=-1) + 1, depth)
        return
    state = read_state_dict(path)
    file_blocks = max((int(m.group(1)) for k in state if (m := _BLOCK.match(k))), default=-1) + 1
    try:
        state = _checkpoint_filter(vit)(state, vit)
    except Exception as error:
        raise ValueError(f"{path} does not fit backbone {name}: {error}") from error
    own = vit.state_dict()
    state = {
        k: v
        for k, v in state.items()
        if k in own or not (k.split(".")[0] in _HEAD_KEYS or _beyond(k, depth))
    }
    problems = fit_report(own, state)
    if problems:
        raise ValueError(f"{path} does not fit backbone {name}: {'; '.join(problems)}")
    vit.load_state_dict(state)
    _say_depth(str(path), file_blocks, depth)


# Classifier and pooling-head keys: a file may hold them, the segmentation ViT has none.
_HEAD_KEYS = ("head", "head_dist", "fc_norm", "attn_pool")


def _checkpoint_filter(vit: nn.Module):
    """timm's converter of the ViT's family: renames an original release's keys (DINOv2,
    DINOv3, EVA-02, CLIP, DeiT-III layer scale...) to timm's and resamples the position
    and patch embeddings to the model's grid."""
    from timm.models import eva, vision_transformer

    if isinstance(vit, eva.Eva):
        return eva.checkpoint_filter_fn
    return functools.partial(vision_transformer.checkpoint_filter_fn, adapt_layer_scale=True)


def _beyond(key: str, depth: int) -> bool:
    match = _BLOCK.match(key)
    return match is not None and int(match.group(1)) >= depth


def load_backbone_weights(backbone: nn.Module, path: str | os.PathLike, name: str) -> None:
    """Load a timm classification state dict into a ``features_only`` backbone.

    The file's classifier and the stages past the feature level the backbone keeps are
    dropped; every parameter the backbone has must be in the file with the same shape.
    """
    path = require_weights_file(path, "policy_pretrained_path")
    if path.suffix == ".npz":
        raise ValueError(f"{path}: {name} weights must be a .pth/.safetensors state dict")
    state = read_state_dict(path)
    own = backbone.state_dict()
    problems = fit_report(own, {k: v for k, v in state.items() if k in own})
    if problems:
        raise ValueError(f"{path} does not fit {name}: {'; '.join(problems)}")
    backbone.load_state_dict({k: state[k] for k in own})
