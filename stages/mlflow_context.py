"""What a stage's MLflow runs are keyed, named and seeded with, read where DVC and git keep
it, and handed to `cts.tracking` as plain values:

- the repository root (the original repository's when `dvc exp run --temp/--queue` runs
  the stage in a copy under `.dvc/tmp/exps/`): the default store `<root>/mlruns.db`, its
  artifacts and the spool live there;
- the name of the pipeline execution: ``CTS_PIPELINE_RUN`` when another orchestrator sets it
  (the Kubeflow Pipelines tasks of `cts kfp` set the pipeline job's name: each task holds
  only its own params, so a params hash would give each its own parent), else the DVC
  experiment name that `dvc exp run` exports to stage commands (DVC_EXP_NAME); a plain
  `dvc repro` has none, and the commit plus a params hash keys the parent;
- the params.yaml of the commit the execution started from (DVC's baseline under
  `dvc exp run`, else HEAD): the parent's name lists what differs;
- the metrics files of the stages upstream of the stage in dvc.yaml: the parent is seeded
  with the results this execution reuses.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import mlflow
import yaml

from cts import tracking
from cts_stages.common import STAGE_METRICS, STAGE_SETTINGS
from cts_stages.dvc_file import DVC_YAML, upstream_stages
from cts_stages.kfp_task import PIPELINE_RUN_ENV  # set by a Kubeflow task: its run's name

_DVC_EXPS_DIR = "/.dvc/tmp/exps/"


def repo_root(start: Path | None = None) -> Path:
    """Root of the repository containing `start` (default: cwd).

    A DVC experiment copy under `<root>/.dvc/tmp/exps/` resolves to `<root>` itself. Without
    a `.dvc` or `.git` directory above `start`, `start` is the root.
    """
    path = (start or Path.cwd()).resolve()
    if _DVC_EXPS_DIR in f"{path}/":
        return Path(f"{path}/".split(_DVC_EXPS_DIR)[0])
    for candidate in (path, *path.parents):
        if (candidate / ".dvc").is_dir() or (candidate / ".git").exists():
            return candidate
    return path


def project_tracking_uri(explicit: str | None = None, start: Path | None = None) -> str:
    """The store the stages log to: `explicit` (the `mlflow_tracking_uri` param), else
    $MLFLOW_TRACKING_URI, else the repository's `sqlite:///<root>/mlruns.db`."""
    return tracking.tracking_uri(explicit, repo_root(start))


def pipeline_name() -> str | None:
    """``CTS_PIPELINE_RUN`` when set, else the DVC experiment name under `dvc exp run`."""
    return os.environ.get(PIPELINE_RUN_ENV) or os.environ.get("DVC_EXP_NAME") or None


def committed_params(start: Path | None = None) -> dict[str, Any] | None:
    """The params.yaml of the commit the execution started from (DVC's baseline under
    `dvc exp run`, else HEAD); None outside git or without one."""
    revision = os.environ.get("DVC_EXP_BASELINE_REV") or "HEAD"
    try:
        result = subprocess.run(
            ["git", "show", f"{revision}:params.yaml"],
            cwd=repo_root(start),
            capture_output=True,
            text=True,
            check=True,
        )
        committed = yaml.safe_load(result.stdout)
    except (OSError, subprocess.CalledProcessError, yaml.YAMLError):
        return None
    return committed if isinstance(committed, dict) else None


def upstream_stage_metrics(stage: str, dvc_yaml: Path = DVC_YAML) -> dict[Path, tuple[str, ...]]:
    """The metrics files of the stages upstream of `stage`, each with its settings keys: the
    MLflow parent run is seeded with those that exist. They are the results this execution
    reuses (were one of those stages rerun, it ran before `stage` and rewrote its file); the
    results of `stage` and of the stages after it are logged by them when they run, never
    copied from an earlier execution."""
    names = upstream_stages(stage, dvc_yaml)
    return {STAGE_METRICS[name]: STAGE_SETTINGS[name] for name in names if name in STAGE_METRICS}


def pipeline_context(start: Path | None = None) -> tracking.PipelineContext:
    """The execution the stage running in `start` (default: cwd) belongs to."""
    root = repo_root(start)
    return tracking.PipelineContext(root, pipeline_name(), committed_params(root))


def stage_run(
    stage: str, params: Mapping[str, Any]
) -> AbstractContextManager[mlflow.ActiveRun | None]:
    """:func:`cts.tracking.stage_run` for the pipeline stage `stage` of this repository,
    logging to the `mlflow_tracking_uri` param's store (see `project_tracking_uri`)."""
    return tracking.stage_run(
        stage,
        params,
        uri=params["mlflow_tracking_uri"],
        upstream_metrics=upstream_stage_metrics(stage),
        context=pipeline_context(),
    )
