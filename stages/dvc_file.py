"""The one reader of dvc.yaml: its stages in file order, each with its command, params and
paths as dvc.yaml writes them (``${data_root}`` unresolved), and the stages upstream of one.

Both the MLflow seeding of a stage (`stages/mlflow_context.py`) and the Kubeflow pipeline
(`stages/kfp_pipeline.py`) read dvc.yaml through :func:`read_dvc_yaml`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

DVC_YAML = Path(__file__).resolve().parents[1] / "dvc.yaml"
# dvc.yaml features this reader does not interpret: refused rather than misread.
_UNSUPPORTED = ("foreach", "matrix", "do", "wdir", "vars")


class DvcYamlError(ValueError):
    """dvc.yaml is not a pipeline this reader understands; the message names file and stage."""


@dataclass(frozen=True)
class DvcStage:
    """One dvc.yaml stage; paths as dvc.yaml writes them (``${data_root}`` unresolved)."""

    name: str
    cmd: Any  # as written: a command, or a list of them
    params: tuple[str, ...]
    deps: tuple[str, ...]
    outs: tuple[str, ...]
    metrics: tuple[str, ...]
    plots: tuple[str, ...]

    @property
    def writes(self) -> tuple[str, ...]:
        return (*self.outs, *self.metrics, *self.plots)


def _paths(where: str, entries: Any) -> tuple[str, ...]:
    """dvc.yaml's ``- path`` or ``- path: {options}`` entries."""
    if entries is None:
        return ()
    if not isinstance(entries, list):
        raise DvcYamlError(f"{where}: expected a list of paths")
    paths = []
    for entry in entries:
        if isinstance(entry, dict) and len(entry) == 1:
            entry = next(iter(entry))
        if not isinstance(entry, str) or not entry:
            raise DvcYamlError(f"{where}: {entry!r} is not a path")
        paths.append(entry)
    return tuple(paths)


def _stage(dvc_yaml: Path, name: Any, body: Any) -> DvcStage:
    where = f"{dvc_yaml}: stage {name!r}"
    if not isinstance(body, dict):
        raise DvcYamlError(f"{where}: expected a mapping")
    unsupported = [key for key in _UNSUPPORTED if key in body]
    if unsupported:
        raise DvcYamlError(f"{where}: {unsupported[0]!r} is not supported")
    params = body.get("params") or []
    if not isinstance(params, list) or not all(isinstance(p, str) for p in params):
        raise DvcYamlError(f"{where}: params must be a list of names from the params file")
    return DvcStage(
        name=str(name),
        cmd=body.get("cmd"),
        params=tuple(params),
        deps=_paths(f"{where} deps", body.get("deps")),
        outs=_paths(f"{where} outs", body.get("outs")),
        metrics=_paths(f"{where} metrics", body.get("metrics")),
        plots=_paths(f"{where} plots", body.get("plots")),
    )


def read_dvc_yaml(dvc_yaml: Path = DVC_YAML) -> list[DvcStage]:
    """The stages of ``dvc_yaml`` in file order. A file that is not a pipeline of plain
    stages (templating constructs, params that are not names) is a one-line DvcYamlError."""
    if not dvc_yaml.is_file():
        raise FileNotFoundError(f"{dvc_yaml} not found")
    try:
        spec = yaml.safe_load(dvc_yaml.read_text())
    except yaml.YAMLError as error:
        raise DvcYamlError(f"{dvc_yaml} is not valid YAML: {str(error).splitlines()[0]}") from error
    if not isinstance(spec, dict) or not isinstance(spec.get("stages"), dict) or not spec["stages"]:
        raise DvcYamlError(f"{dvc_yaml}: expected a mapping with a non-empty 'stages' mapping")
    if "vars" in spec:
        raise DvcYamlError(f"{dvc_yaml}: 'vars' is not supported (paths may use the params)")
    return [_stage(dvc_yaml, name, body) for name, body in spec["stages"].items()]


def _produces(out: str, dep: str) -> bool:
    return dep == out or dep.startswith(f"{out}/") or out.startswith(f"{dep}/")


def upstream_stages(stage: str, dvc_yaml: Path = DVC_YAML) -> list[str]:
    """The stages whose outputs `stage` reads, directly or not, in dvc.yaml's order.

    Paths are compared as dvc.yaml writes them (`${data_root}` on both sides), so no
    params are needed.
    """
    stages = {read.name: read for read in read_dvc_yaml(dvc_yaml)}
    if stage not in stages:
        raise KeyError(f"{dvc_yaml}: no stage {stage!r}")
    found: set[str] = set()
    pending = [stage]
    while pending:
        deps = stages[pending.pop()].deps
        for name, other in stages.items():
            if name not in found and any(_produces(o, d) for o in other.writes for d in deps):
                found.add(name)
                pending.append(name)
    return [name for name in stages if name in found]
