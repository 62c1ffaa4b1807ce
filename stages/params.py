"""params.yaml: loading, command-line overrides and validation, before any work starts."""

from __future__ import annotations

import difflib
import math
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

PARAMS_FILE = Path("params.yaml")


class ParamError(ValueError):
    """A parameter is missing or has a value outside what is allowed."""


class _Loader(yaml.SafeLoader):
    """Safe YAML that reads ``1e-4`` as a number (YAML 1.1 wants ``1.0e-4``) and refuses
    a key written twice in one mapping (the last would silently win)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r} (first at line {seen[key].line + 1})",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml_error(where: str, error: yaml.YAMLError) -> ParamError:
    """One line that keeps PyYAML's line and column."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    position = f" line {mark.line + 1}, column {mark.column + 1}:" if mark else ""
    return ParamError(f"{where} is not valid YAML:{position} {problem}")


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


def _finite(value: Any) -> bool:
    """A real number: not bool, not inf or nan."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _number(low: float, high: float | None = None, low_open: bool = False):
    def check(value: Any) -> str | None:
        ok = _finite(value)
        ok = ok and (value > low if low_open else value >= low)
        ok = ok and (high is None or value <= high)
        return (
            None
            if ok
            else f"allowed: a finite number {'>' if low_open else '>='} {low}"
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
    if isinstance(value, list) and value and all(_finite(v) and v > 0 for v in value):
        return None
    return "allowed: a non-empty list of positive finite numbers, e.g. [0.5, 1.0, 1.5]"


def _integers(value: Any) -> str | None:
    if isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        return None
    return "allowed: a list of integers (may be empty), e.g. [0, 52, 103]"


def _thresholds(value: Any) -> str | None:
    if isinstance(value, list) and all(_finite(v) and 0 < v < 1 for v in value):
        return None
    return "allowed: a list of numbers in (0, 1) (may be empty), e.g. [0.5, 0.9]"


def _layers(value: Any) -> str | None:
    if (
        isinstance(value, list)
        and value
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)
        and value == sorted(set(value))
    ):
        return None
    return "allowed: a non-empty list of increasing block numbers from 1, e.g. [1, 5]"


def _auto_or(check: Callable[[Any], str | None]) -> Callable[[Any], str | None]:
    def auto_or(value: Any) -> str | None:
        problem = None if value == "auto" else check(value)
        return problem and problem.replace("allowed: ", "allowed: auto or ", 1)

    return auto_or


def _scale_range(value: Any) -> str | None:
    if (
        isinstance(value, list)
        and len(value) == 2
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
        and 0 < value[0] <= value[1]
    ):
        return None
    return "allowed: [low, high] with 0 < low <= high, e.g. [0.5, 2.0]"


def _k_range(value: Any) -> str | None:
    if value is None or (
        isinstance(value, list)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        and 0 <= value[0] <= value[1]
    ):
        return None
    return "allowed: null or [low, high] integers with 0 <= low <= high, e.g. [0, 205]"


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
    "token_reduction": _choice("cts", "tome", "algm", "none"),
    "tome_r": _integer(0),
    "algm_threshold": _number(0.0, 1.0, low_open=True),
    "algm_layers": _layers,
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
    "train_unshared_fraction": _number(0.0, 1.0),
    "train_tokens_shared_range": _k_range,
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
    "base_size": _integer(1, optional=True),
    "eval_window": _integer(1, optional=True),
    "eval_stride": _integer(1, optional=True),
    "sweep_tokens_shared": _integers,
    "sweep_share_thresholds": _thresholds,
    "sweep_tome_r": _integers,
    "sweep_algm_thresholds": _thresholds,
    "bench_batch_size": _integer(1),
    "bench_repeats": _integer(1),
    "bench_compile": _choice(
        "auto", "none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"
    ),
    "device": _choice("auto", "cpu", "cuda"),
    "precision": _choice("auto", "fp32", "bf16", "fp16"),
    "train_precision": _choice("auto", "fp32", "bf16", "fp16"),
    "seed": _integer(0),
    "num_workers": _auto_or(_integer(0)),
    "mlflow_tracking_uri": _text(optional=True),
    "mlflow_registered_model": _text(optional=True),
    "nproc_per_node": _auto_or(_integer(1)),
    "nnodes": _auto_or(_integer(1)),
    "node_rank": _auto_or(_integer(0)),
    "master_addr": _text(),
    "master_port": _integer(1, 65535, optional=True),
    "rendezvous_timeout": _number(0.0, low_open=True),
    "num_threads": _auto_or(_integer(1)),
}


def _backbone_patch_size(params: dict[str, Any], origins: Mapping[str, str], source: str) -> int:
    """Patch size of ``params["backbone"]``; a one-line ParamError naming where the value
    came from when sharing cannot serve it."""
    from cts.models.vit import backbone_patch_size  # timm and torch: only when asked

    try:
        return backbone_patch_size(params["backbone"])
    except ValueError as error:
        origin = origins.get("backbone", source)
        raise ParamError(f"{'--set backbone' if origin == '--set' else origin}: {error}") from error


def _check_geometry(params: dict[str, Any], keys: set[str], patch_size: int) -> None:
    """K (and every K of the sweep) within ``0..S`` of the crop's superpatch grid."""
    # Imported here: the cts package imports torch, which a stage without a backbone
    # (and so without geometry) need not load.
    from cts.geometry import check_num_shared, num_superpatches, superpatch_size

    superpatch, crop = superpatch_size(patch_size), params["crop_size"]
    try:
        superpatches = num_superpatches(crop, patch_size)
    except ValueError as error:
        raise ParamError(
            f"crop_size={crop}: allowed multiples of {superpatch} (2 x the backbone's patch size)"
        ) from error
    allowed = (
        f"allowed 0..{superpatches} for crop_size {crop} "
        f"({superpatches} superpatches of {superpatch}x{superpatch} px)"
    )
    named = []
    if "num_tokens_shared" in keys:  # a Kubeflow task's params hold only its stage's keys
        k = params["num_tokens_shared"]
        named.append((f"num_tokens_shared={k}", k))
    sweep = params["sweep_tokens_shared"] if "sweep_tokens_shared" in keys else ()
    named += [(f"sweep_tokens_shared: K={k} is out of range", k) for k in sweep]
    k_range = params["train_tokens_shared_range"] if "train_tokens_shared_range" in keys else None
    named += [(f"train_tokens_shared_range={k_range}: K={k}", k) for k in k_range or ()]
    for what, k in named:
        try:
            check_num_shared(k, superpatches)
        except ValueError as error:
            raise ParamError(f"{what}: {allowed}") from error


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` with the value read as YAML (``k=103``, ``lr=1e-4``, ``depth=null``)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ParamError(f"--set {text!r}: expected key=value")
    try:
        parsed = yaml.load(value, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as error:
        raise _yaml_error(f"--set {text!r}", error) from error
    return key.strip(), parsed


def _where(origin: str, key: str, value: Any) -> str:
    """``--set key=value`` or ``params.yaml: key=value``: where a bad value came from."""
    return f"--set {key}={value!r}" if origin == "--set" else f"{origin}: {key}={value!r}"


def _unknown(key: str, where: str) -> ParamError:
    close = difflib.get_close_matches(key, CHECKS, n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(CHECKS)}"
    return ParamError(f"{where}: unknown parameter {key!r}: {hint}")


def load_params(
    path: str | Path = PARAMS_FILE,
    overrides: Sequence[str] = (),
    keys: Iterable[str] = (),
    stage: str | None = None,
) -> dict[str, Any]:
    """Read params.yaml, apply ``key=value`` overrides, validate ``keys`` (all when empty).

    Every key of the file must be known (CHECKS); every override is validated, and one the
    stage does not read (not in ``keys``) is reported on stderr as unused.
    """
    path = Path(path)
    if not path.is_file():
        raise ParamError(f"{path} not found: run from the repository root or pass --params")
    try:
        params = yaml.load(path.read_text(), Loader=_Loader) or {}  # noqa: S506
    except yaml.YAMLError as error:
        raise _yaml_error(str(path), error) from error
    if not isinstance(params, dict):
        raise ParamError(f"{path}: expected a mapping of key: value")
    for key in params:
        if key not in CHECKS:
            raise _unknown(str(key), str(path))
    origins = dict.fromkeys(params, str(path))
    keys = list(keys or CHECKS)
    for override in overrides:
        key, value = parse_override(override)
        if key not in CHECKS:
            raise _unknown(key, "--set")
        params[key] = value
        origins[key] = "--set"
        if key not in keys:
            problem = CHECKS[key](value)
            if problem:
                raise ParamError(f"{_where('--set', key, value)}: {problem}")
            where = f"`cts {stage}`" if stage else "this stage"
            print(f"warning: --set {key}: {where} does not read it; unused", file=sys.stderr)
    validate(params, keys, source=str(path), origins=origins)
    return params


def validate(
    params: dict[str, Any],
    keys: Iterable[str],
    source: str = "params",
    origins: Mapping[str, str] | None = None,
) -> None:
    """Check ``keys`` of ``params``; an error names where the value came from (``origins``:
    key -> ``--set`` or the file, default ``source``)."""
    keys = list(keys)
    origins = origins or {}
    for key in keys:
        if key not in params:
            raise ParamError(f"{source}: parameter {key!r} is missing")
        problem = CHECKS[key](params[key])
        if problem:
            raise ParamError(f"{_where(origins.get(key, source), key, params[key])}: {problem}")
    # The backbone is built once, on the meta device: it is valid and has this patch size.
    if "backbone" in keys:
        patch_size = _backbone_patch_size(params, origins, source)
        geometry = {"num_tokens_shared", "sweep_tokens_shared", "train_tokens_shared_range"}
        if "crop_size" in keys and geometry & set(keys):
            _check_geometry(params, set(keys), patch_size)
    window, stride = params.get("eval_window"), params.get("eval_stride")
    if {"eval_window", "eval_stride"} <= set(keys) and window and stride and stride > window:
        raise ParamError(
            f"{_where(origins.get('eval_stride', source), 'eval_stride', stride)}: larger than "
            f"eval_window={window}: pixels between windows would never be scored"
        )
    nodes = params.get("nnodes"), params.get("node_rank")
    if {"nnodes", "node_rank"} <= set(keys) and "auto" not in nodes and nodes[1] >= nodes[0]:
        raise ParamError(
            f"{_where(origins.get('node_rank', source), 'node_rank', params['node_rank'])}: "
            f"allowed 0..{params['nnodes'] - 1} for nnodes={params['nnodes']}"
        )
