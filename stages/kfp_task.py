"""What one Kubeflow Pipelines task does in its container: run a stage's `cts` command.

A dvc.yaml stage reads and writes paths relative to the repository (`${data_root}`,
`checkpoints/policy.pt`, `metrics/eval_ss.json`); a Kubeflow task gets its inputs and
writes its outputs at paths Kubeflow chooses. The task builds a work folder laid out like
the repository: each input artifact linked at its dvc.yaml path, a params file of the
pipeline parameters it receives; it runs the stage's command there and moves every out,
metrics and plots file of the stage to its output artifact. Nothing here imports kfp: the
artifacts are the objects the KFP executor hands to the component function (``.path``,
and ``.log_metric`` on metrics).

A training stage's resume checkpoints (`checkpoints/resume/`) are linked out of the work
folder, which a retry of the task does not see, to :func:`resume_folder`: a retried task
resumes the training where the stopped one left it.

`stages/kfp_pipeline.py` writes the component functions that call :func:`run_task`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

# Light imports only (not cts.tracking, not the stages' common module: mlflow, timm): this
# process only waits for the stage's own `cts` process, in every task of a pipeline run.
from cts.tracking.naming import scalar_metrics
from cts_stages.params import ParamError, parse_override

# The pipeline run's name, which the stage's MLflow run finds its parent by.
PIPELINE_RUN_ENV = "CTS_PIPELINE_RUN"
_VARIABLE = re.compile(r"\$\{([^}]*)\}")
# A folder on a volume that every try of a task mounts, for the training's resume state.
RESUME_ENV = "CTS_RESUME_DIR"


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


def resume_folder(stage: str, outputs: Mapping[str, Any], pipeline_run: str = "") -> Path | None:
    """Where the task of ``stage`` keeps its resume checkpoints, which its retries find.

    ``$CTS_RESUME_DIR/<pipeline_run>/<stage>`` where the variable is set (a volume the pods
    of the task mount); else ``.cts-resume`` beside the task's first output artifact, which
    outlives the try where the pipeline root is a folder that stays (KFP's local runner, a
    bucket mounted as a folder such as Vertex AI's ``/gcs/``). None: a task with no output.
    """
    if root := os.environ.get(RESUME_ENV):
        run = re.sub(r"[^\w.-]", "_", pipeline_run) or "default"
        return Path(root) / run / stage
    if not outputs:
        return None
    return Path(next(iter(outputs.values())).path).parent / ".cts-resume"


def _link_resume_folder(work: Path, folder: Path | None) -> None:
    """The work folder's ``checkpoints/resume`` as a link to ``folder`` (made if absent)."""
    if folder is None:
        return
    folder.mkdir(parents=True, exist_ok=True)
    (work / "checkpoints").mkdir(exist_ok=True)
    (work / "checkpoints" / "resume").symlink_to(folder.resolve(), target_is_directory=True)


def _run_passing_signals(cli: list[str], cwd: Path, env: dict[str, str] | None) -> int:
    """Run ``cli``; SIGTERM and SIGUSR1 to this process (Kubernetes stops a pod by
    signalling its first process only) go on to the stage, which stops cleanly after its
    step. Returns the exit status."""
    child = subprocess.Popen(cli, cwd=cwd, env=env)
    passed = (signal.SIGTERM, signal.SIGUSR1)
    main = threading.current_thread() is threading.main_thread()
    handlers = {each: signal.getsignal(each) for each in passed} if main else {}
    try:
        for each in handlers:
            signal.signal(each, lambda signum, frame: child.send_signal(signum))
        return child.wait()
    finally:
        for each, handler in handlers.items():
            signal.signal(each, handler)
        if child.poll() is None:  # this process is unwinding: the stage goes with it
            child.kill()
            child.wait()


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
    resume = resume_folder(argv[1], outputs, pipeline_run)
    try:
        _link_resume_folder(work, resume)
        for template, artifact in inputs.items():
            link = work / placed[template]
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(Path(artifact.path).resolve())
        (work / "params.yaml").write_text(yaml.safe_dump(values, sort_keys=False))
        cli = [sys.executable, "-m", "cts.cli", *argv[1:], "--params", "params.yaml"]
        env = {**os.environ, PIPELINE_RUN_ENV: pipeline_run} if pipeline_run else None
        status = _run_passing_signals(cli, work, env)
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
        if resume is not None:
            with contextlib.suppress(OSError):
                resume.rmdir()  # a finished training left it empty
