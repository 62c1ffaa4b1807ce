"""What one Kubeflow Pipelines task does in its container: run a stage's `cts` command.

A dvc.yaml stage reads and writes paths relative to the repository (`${data_root}`,
`checkpoints/policy.pt`, `metrics/eval_ss.json`); a Kubeflow task gets its inputs and
writes its outputs at paths Kubeflow chooses. The task builds a work folder laid out like
the repository: each input artifact linked at its dvc.yaml path, a params file of the
pipeline parameters it receives; it runs the stage's command there and moves every out,
metrics and plots file of the stage to its output artifact. Nothing here imports kfp: the
artifacts are the objects the KFP executor hands to the component function (``.path``,
and ``.log_metric`` on metrics).

`stages/kfp_pipeline.py` writes the component functions that call :func:`run_task`.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from cts.tracking import scalar_metrics
from stages.mlflow_context import PIPELINE_RUN_ENV
from stages.params import ParamError, parse_override

_VARIABLE = re.compile(r"\$\{([^}]*)\}")


def template_variables(template: str) -> list[str]:
    """The params a dvc.yaml path interpolates: ``${data_root}/x`` -> ``['data_root']``."""
    return [name.strip() for name in _VARIABLE.findall(template)]


def interpolate(template: str, params: Mapping[str, Any]) -> PurePosixPath:
    """The path a dvc.yaml entry names for these params (``${data_root}`` -> its value)."""
    return PurePosixPath(_VARIABLE.sub(lambda m: str(params[m.group(1).strip()]), template))


def resolve_path(template: str, params: Mapping[str, Any]) -> PurePosixPath:
    """:func:`interpolate`, checked to stay inside the repository: the task places the
    path in its own work folder.

    Raises ParamError for an absolute path or one that leaves the repository with ``..``.
    """
    path = interpolate(template, params)
    if path.is_absolute() or ".." in path.parts or not path.parts:
        shown = f"{template!r} (= {str(path)!r})" if "${" in template else repr(template)
        raise ParamError(
            f"dvc.yaml path {shown}: a Kubeflow artifact must be a path inside the "
            "repository (relative, without '..')"
        )
    return path


def parse_values(texts: Mapping[str, str]) -> dict[str, Any]:
    """Pipeline parameters are YAML text, as ``--set key=value``: ``'103'`` -> 103."""
    return dict(parse_override(f"{key}={text}") for key, text in texts.items())


def run_task(
    argv: Sequence[str],
    params: Mapping[str, str],
    inputs: Mapping[str, Any],
    outputs: Mapping[str, Any],
    metrics: Mapping[str, Any],
    pipeline_run: str = "",
) -> None:
    """Run ``argv`` (``['cts', '<stage>', ...]``) in a work folder laid out like the
    repository and hand its results to Kubeflow.

    Args:
        argv: the stage's dvc.yaml command, split; ``cts`` runs as this Python's ``cts.cli``.
        params: param name -> YAML text; written as the params file the command reads.
        inputs: dvc.yaml path (may hold ``${param}``) -> input artifact, linked there.
        outputs: dvc.yaml path -> output artifact; the command's out is moved to its path.
        metrics: dvc.yaml path of a JSON metrics file -> output Metrics artifact; the file
            is moved there and its numbers are logged on it (the Kubeflow UI shows them).
        pipeline_run: the pipeline job's name, the MLflow parent of the stage's run
            (``CTS_PIPELINE_RUN``): the tasks of one pipeline run share one parent.
    """
    values = parse_values(params)
    placed = {template: resolve_path(template, values) for template in inputs}
    written = {template: resolve_path(template, values) for template in [*outputs, *metrics]}
    command = " ".join(argv)
    work = Path(tempfile.mkdtemp(prefix="cts-task-"))
    try:
        for template, artifact in inputs.items():
            link = work / placed[template]
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(Path(artifact.path).resolve())
        (work / "params.yaml").write_text(yaml.safe_dump(values, sort_keys=False))
        cli = [sys.executable, "-m", "cts.cli", *argv[1:], "--params", "params.yaml"]
        env = {**os.environ, PIPELINE_RUN_ENV: pipeline_run} if pipeline_run else None
        status = subprocess.run(cli, cwd=work, env=env).returncode
        if status != 0:
            raise RuntimeError(f"`{command}` failed with exit status {status}")
        for template, artifact in {**outputs, **metrics}.items():
            result = work / written[template]
            if not result.exists():
                raise FileNotFoundError(
                    f"`{command}` did not write {written[template]}, which its dvc.yaml stage lists"
                )
            if template in metrics and result.suffix == ".json":
                data = json.loads(result.read_text())
                numbers = scalar_metrics(data if isinstance(data, Mapping) else {})
                for name, value in numbers.items():
                    if math.isfinite(value):  # finite numbers only
                        artifact.log_metric(name, value)
            Path(artifact.path).parent.mkdir(parents=True, exist_ok=True)
            shutil.move(result, artifact.path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
