"""MLflow tracking: one parent run per pipeline execution, one nested child run per stage.

Every pipeline stage is its own process, so the stages of one execution find their
common parent run through a "pipeline key" tag:

- inside `dvc exp run`, the experiment name DVC exports to stage commands (DVC_EXP_NAME);
- otherwise the git HEAD commit plus a hash of the params: a plain `dvc repro` after a
  params change gets a new parent, which is seeded with the results of the upstream
  stages it did not rerun (`upstream_metrics`), so that every parent holds every result.

Final stage results are logged on the child and, prefixed (`eval_ss.mIoU`), on the parent,
so that comparing parents in the MLflow UI shows all params next to all results.

Run states stay truthful when a stage dies: an exception marks the stage run FAILED, an
interrupt (Ctrl-C, SIGTERM) KILLED, and the parent takes the state of the latest stage but is
never set RUNNING again once it has ended. A SIGKILLed stage cannot end its runs, so every
run records its process (`cts.process`: host, pid, start time) and the next stage of the
experiment closes the RUNNING runs whose process is gone as FAILED. Finding or creating
the parent holds a file lock, so stages starting at once share one parent.

The default store is `sqlite:///<repo root>/mlruns.db` with artifacts in
`<repo root>/mlartifacts`, where the repo root is that of the original repository even
when DVC runs the stage in a copy under `.dvc/tmp/exps/` (`dvc exp run --temp/--queue`).
"""

import fcntl
import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from cts.processes import pid_alive, process_start

_DVC_EXPS_DIR = "/.dvc/tmp/exps/"
_KEY_TAG = "cts.pipeline_key"
_KIND_TAG = "cts.run_kind"
_STAGE_TAG = "cts.stage"
_PARENT_TAG = "mlflow.parentRunId"
_PROCESS_TAG = "cts.process"
# The MLflow UI (3.x) opens an experiment of this kind in its model-training view (runs
# table); without the tag it guesses, and an empty experiment opens in the GenAI overview.
_EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
_EXPERIMENT_KIND = (_EXPERIMENT_KIND_TAG, "custom_model_development")


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


def tracking_uri(explicit: str | None = None, start: Path | None = None) -> str:
    """`explicit`, else $MLFLOW_TRACKING_URI, else the repository's `sqlite:///.../mlruns.db`."""
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI")
    return uri or f"sqlite:///{repo_root(start) / 'mlruns.db'}"


def _artifact_location(uri: str) -> str | None:
    """Artifacts of a sqlite store go next to its database file; servers choose their own."""
    if not uri.startswith("sqlite:///"):
        return None
    database = Path(uri.removeprefix("sqlite:///")).resolve()
    return (database.parent / "mlartifacts").as_uri()


def _git_head(root: Path) -> str | None:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return result.stdout.strip()


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts to one level, keys joined with '.'."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _scalars(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a (nested) metrics dict; lists and strings are not metrics."""
    return {
        f"{prefix}{key}": float(value)
        for key, value in _flatten(metrics).items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }


def pipeline_key(params: Mapping[str, Any], start: Path | None = None) -> str:
    """The DVC experiment name under `dvc exp run`, else `<git HEAD>-<params hash>`."""
    if name := os.environ.get("DVC_EXP_NAME"):
        return name
    digest = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode())
    return f"{(_git_head(repo_root(start)) or 'nogit')[:12]}-{digest.hexdigest()[:12]}"


def parent_run_name(params: Mapping[str, Any], key: str) -> str:
    """The DVC experiment name under `dvc exp run` (as `dvc exp show` lists it); otherwise
    a name a person can tell apart in the runs table: backbone, depth, K, short commit and
    params digest (``vit_tiny_patch16_384 d4 K=103 21da977-77fd33``)."""
    if os.environ.get("DVC_EXP_NAME"):
        return key
    backbone = params.get("backbone", "model")
    depth = f" d{params['depth']}" if params.get("depth") else ""
    k = 0 if params.get("policy") == "none" else params.get("num_tokens_shared", "?")
    commit, _, digest = key.partition("-")
    return f"{backbone}{depth} K={k} {commit[:7]}-{digest[:6]}"


def _quiet_mlflow() -> None:
    # The sqlite store announces its schema creation and every alembic migration at INFO.
    for name in ("alembic", "mlflow.store.db.utils"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _experiment_id(client: MlflowClient, name: str, uri: str) -> str:
    # MLflow would put artifacts under the cwd, which for `dvc exp run --temp` is deleted.
    if experiment := client.get_experiment_by_name(name):
        if _EXPERIMENT_KIND_TAG not in experiment.tags:
            client.set_experiment_tag(experiment.experiment_id, *_EXPERIMENT_KIND)
        return experiment.experiment_id
    try:
        return client.create_experiment(
            name, artifact_location=_artifact_location(uri), tags=dict([_EXPERIMENT_KIND])
        )
    except MlflowException:  # created concurrently by another stage process
        return client.get_experiment_by_name(name).experiment_id


def _find_parent(client: MlflowClient, experiment_id: str, key: str) -> str | None:
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{_KEY_TAG}` = '{key}' and tags.`{_KIND_TAG}` = 'pipeline'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def _read_json(path: Path) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def _this_process() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{process_start(os.getpid())}"


def _is_alive(process: str) -> bool:
    """Whether the process a `cts.process` tag names still runs (another host's: assumed)."""
    try:
        host, pid, start = process.rsplit(":", 2)
        pid = int(pid)
    except ValueError:
        return True
    if host != socket.gethostname():
        return True
    return pid_alive(pid) and process_start(pid) == start


def close_stale_runs(client: MlflowClient, experiment_id: str) -> list[str]:
    """Mark FAILED the RUNNING runs whose process is gone (SIGKILL, power loss), whatever
    their pipeline key; returns their ids. Runs without a process tag or of another host
    are left: nothing tells whether they still run."""
    running = client.search_runs(
        [experiment_id],
        filter_string=f"attributes.status = 'RUNNING' and tags.`{_PROCESS_TAG}` != ''",
        max_results=10_000,
    )
    stale = [
        run.info.run_id
        for run in running
        if _PROCESS_TAG in run.data.tags and not _is_alive(run.data.tags[_PROCESS_TAG])
    ]
    for run_id in stale:
        client.set_terminated(run_id, "FAILED")
    if stale:
        print(
            f"mlflow: marked {len(stale)} run(s) of a killed earlier execution FAILED",
            file=sys.stderr,
        )
    return stale


@contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """An exclusive lock per tracking store among this machine's processes (flock: released
    by the kernel when the holder dies, so a killed stage never leaves it held)."""
    if uri.startswith("sqlite:///"):
        database = Path(uri.removeprefix("sqlite:///")).resolve()
        path = database.parent / f".{database.name}.lock"
    else:
        digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
        path = Path(tempfile.gettempdir()) / f"cts-mlflow-{digest}.lock"
    fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _end_parent(client: MlflowClient, parent_id: str, status: str) -> None:
    """The parent takes the latest stage's state; an ended parent is never set RUNNING."""
    if status == "FINISHED" and client.get_run(parent_id).info.status == "FINISHED":
        return
    client.set_terminated(parent_id, status)


@contextmanager
def stage_run(
    stage: str,
    params: Mapping[str, Any],
    experiment: str = "cts",
    uri: str | None = None,
    upstream_metrics: Sequence[str | Path] = (),
) -> Iterator[mlflow.ActiveRun | None]:
    """Runs the body inside a child run named `stage` of this pipeline's parent run.

    `params` must be the whole params file (the same dict in every stage): it is logged,
    flattened, on the child and, when the parent is created, on the parent, and it keys
    the parent outside DVC experiments. A newly created parent also receives the scalar
    values of the existing `upstream_metrics` JSON files, prefixed with the file stem
    (`policy.json` -> `policy.accuracy`). The child is the active run, so plain
    `mlflow.log_*` calls inside the body go to it. An exception marks both runs FAILED,
    an interrupt (KeyboardInterrupt, which SIGTERM raises in `cts`) KILLED; it propagates.
    In a multi-process run only rank 0 logs: the other ranks get None.
    """
    if int(os.environ.get("RANK", 0)) != 0:
        yield None
        return
    _quiet_mlflow()
    uri = tracking_uri(uri)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    experiment_id = _experiment_id(client, experiment, uri)
    key = pipeline_key(params)
    flat_params = _flatten(params)
    process = {_PROCESS_TAG: _this_process()}

    with _store_lock(uri):
        close_stale_runs(client, experiment_id)
        parent_id = _find_parent(client, experiment_id, key)
        if parent_id is None:
            tags = {_KEY_TAG: key, _KIND_TAG: "pipeline", **process}
            name = parent_run_name(params, key)
            parent_id = client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
            mlflow.log_params(flat_params, run_id=parent_id)
            for path in map(Path, upstream_metrics):
                if path.is_file():
                    mlflow.log_metrics(
                        _scalars(_read_json(path), f"{path.stem}."), run_id=parent_id
                    )
    child = mlflow.start_run(
        experiment_id=experiment_id,
        run_name=stage,
        parent_run_id=parent_id,
        tags={_KEY_TAG: key, _KIND_TAG: "stage", _STAGE_TAG: stage, **process},
    )
    status = "FAILED"
    try:
        mlflow.log_params(flat_params)
        yield child
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        mlflow.end_run(status)
        _end_parent(client, parent_id, status)


def log_json_metrics(
    metrics: Mapping[str, Any], step: int | None = None, prefix: str | None = None
) -> None:
    """Logs the numeric leaves of `metrics` (nested keys joined with '.') on the stage run.

    With a `step` they are a training curve and stay on the stage run. Without, they are
    the stage's results and also go on the pipeline parent, prefixed with `prefix` (default:
    the stage name) and a dot. Outside `stage_run` nothing is logged, so stages also run
    untracked.
    """
    if (active := mlflow.active_run()) is None:
        return
    scalars = _scalars(metrics)
    mlflow.log_metrics(scalars, step=step)
    if step is None:
        tags = MlflowClient().get_run(active.info.run_id).data.tags
        prefix = prefix or tags[_STAGE_TAG]
        mlflow.log_metrics(_scalars(scalars, f"{prefix}."), run_id=tags[_PARENT_TAG])


def log_metrics_file(path: str | Path) -> None:
    """Logs a stage's metrics JSON as its results (parent prefix: the file stem) and artifact.

    The stem is the prefix `stage_run` uses when it seeds a new parent from the same file,
    so a result keeps its name whichever run logged it.
    """
    if mlflow.active_run() is None:
        return
    path = Path(path)
    log_json_metrics(_read_json(path), prefix=path.stem)
    mlflow.log_artifact(str(path))
