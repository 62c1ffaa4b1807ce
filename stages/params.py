"""params.yaml: loading, command-line overrides and validation, before any work starts."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

PARAMS_FILE = Path("params.yaml")


class ParamError(ValueError):
    """A parameter is missing or has a value outside what is allowed."""


def _choice(*allowed: Any) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        return None if value in allowed else f"allowed: {', '.join(map(str, allowed))}"

    return check


def _integer(low: int | None = None, high: int | None = None, optional: bool = False):
    def check(value: Any) -> str | None:
        if value is None and optional:
            return None
        ok = isinstance(value, int) and not isinstance(value, bool)
        ok = ok and (low is None or value >= low) and (high is None or value <= high)
        if ok:
            return None
        bounds = f">= {low}" if high is None else f"{low}..{high}"
        return f"allowed: an integer {bounds}" + (" or null" if optional else "")

    return check


def _number(low: float, high: float | None = None, low_open: bool = False):
    def check(value: Any) -> str | None:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        ok = ok and (value > low if low_open else value >= low)
        ok = ok and (high is None or value <= high)
        return (
            None
            if ok
            else f"allowed: a number {'>' if low_open else '>='} {low}"
            + (f" and <= {high}" if high is not None else "")
        )

    return check


def _text(optional: bool = False):
    def check(value: Any) -> str | None:
        if (value is None and optional) or (isinstance(value, str) and value):
            return None
        return "allowed: a non-empty string" + (" or null" if optional else "")

    return check


def _boolean(value: Any) -> str | None:
    return None if isinstance(value, bool) else "allowed: true, false"


def _scales(value: Any) -> str | None:
    if (
        isinstance(value, list)
        and value
        and all(isinstance(v, int | float) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        return None
    return "allowed: a non-empty list of positive numbers, e.g. [0.5, 1.0, 1.5]"


def _scale_range(value: Any) -> str | None:
    if (
        isinstance(value, list)
        and len(value) == 2
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
        and 0 < value[0] <= value[1]
    ):
        return None
    return "allowed: [low, high] with 0 < low <= high, e.g. [0.5, 2.0]"


DATASETS = ("synthetic", "ade20k", "cityscapes", "pascal_context", "folder")

CHECKS: dict[str, Callable[[Any], str | None]] = {
    "dataset": _choice(*DATASETS),
    "data_root": _text(),
    "dataset_source": _text(optional=True),
    "dataset_mirror": _text(optional=True),
    "synthetic_num_train": _integer(1),
    "synthetic_num_val": _integer(1),
    "synthetic_num_classes": _integer(2, 254),
    "synthetic_image_size": _integer(64),
    "backbone": _text(),
    "depth": _integer(1, optional=True),
    "pretrained": _boolean,
    "pretrained_path": _text(optional=True),
    "policy_pretrained_path": _text(optional=True),
    "crop_size": _integer(32),
    "num_tokens_shared": _integer(0),
    "policy": _choice("none", "policy_net", "oracle", "random"),
    "decoder": _choice("mask_transformer", "linear"),
    "drop_path_rate": _number(0.0, 1.0),
    "policy_feature_stride": _choice(8, 16, 32),
    "policy_input_scale": _number(0.0, 1.0, low_open=True),
    "policy_iterations": _integer(1),
    "policy_batch_size": _integer(1),
    "policy_lr": _number(0.0, low_open=True),
    "policy_weight_decay": _number(0.0),
    "optimizer": _choice("sgd", "adamw"),
    "loss_stride": _integer(1),
    "class_weight_power": _number(0.0, 1.0),
    "train_scale_range": _scale_range,
    "photometric": _boolean,
    "iterations": _integer(1),
    "batch_size": _integer(1),
    "grad_accum_steps": _integer(1),
    "lr": _number(0.0, low_open=True),
    "weight_decay": _number(0.0),
    "warmup_iterations": _integer(0),
    "eval_every": _integer(0),
    "checkpoint_every": _integer(0),
    "ms_scales": _scales,
    "bench_batch_size": _integer(1),
    "bench_repeats": _integer(1),
    "bench_compile": _choice(
        "auto", "none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"
    ),
    "device": _choice("auto", "cpu", "cuda"),
    "precision": _choice("auto", "fp32", "bf16", "fp16"),
    "train_precision": _choice("auto", "fp32", "bf16", "fp16"),
    "seed": _integer(0),
    "num_workers": _integer(0),
    "mlflow_tracking_uri": _text(optional=True),
}


def patch_size_of(backbone: str) -> int:
    """Patch size from a timm name (``vit_small_patch16_384`` -> 16); 16 when not named."""
    match = re.search(r"patch(\d+)", backbone)
    return int(match.group(1)) if match else 16


def _check_geometry(params: dict[str, Any]) -> None:
    superpatch = 2 * patch_size_of(params["backbone"])
    crop = params["crop_size"]
    if crop % superpatch:
        raise ParamError(
            f"crop_size={crop}: allowed multiples of {superpatch} (2 x the backbone's patch size)"
        )
    num_superpatches = (crop // superpatch) ** 2
    k = params["num_tokens_shared"]
    if k > num_superpatches:
        raise ParamError(
            f"num_tokens_shared={k}: allowed 0..{num_superpatches} for crop_size {crop} "
            f"({num_superpatches} superpatches of {superpatch}x{superpatch} px)"
        )


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` with the value read as YAML (``k=103``, ``policy=none``, ``depth=null``)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ParamError(f"override {text!r}: expected key=value")
    parsed = yaml.safe_load(value)
    if isinstance(parsed, str):
        # YAML 1.1 reads "3e-4" (no dot) as a string; the user meant a number.
        try:
            parsed = float(parsed)
        except ValueError:
            pass
    return key.strip(), parsed


def load_params(
    path: str | Path = PARAMS_FILE, overrides: Sequence[str] = (), keys: Iterable[str] = ()
) -> dict[str, Any]:
    """Read params.yaml, apply ``key=value`` overrides, validate ``keys`` (all when empty)."""
    path = Path(path)
    if not path.is_file():
        raise ParamError(f"{path} not found: run from the repository root or pass --params")
    try:
        params = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ParamError(f"{path} is not valid YAML: {error}".splitlines()[0]) from error
    if not isinstance(params, dict):
        raise ParamError(f"{path}: expected a mapping of key: value")
    for override in overrides:
        key, value = parse_override(override)
        if key not in CHECKS:
            raise ParamError(f"unknown parameter {key!r}: allowed: {', '.join(CHECKS)}")
        params[key] = value
    validate(params, keys or CHECKS, source=str(path))
    return params


def validate(params: dict[str, Any], keys: Iterable[str], source: str = "params") -> None:
    keys = list(keys)
    for key in keys:
        if key not in params:
            raise ParamError(f"{source}: parameter {key!r} is missing")
        problem = CHECKS[key](params[key])
        if problem:
            raise ParamError(f"{source}: {key}={params[key]!r}: {problem}")
    if {"crop_size", "num_tokens_shared", "backbone"} <= set(keys):
        _check_geometry(params)
