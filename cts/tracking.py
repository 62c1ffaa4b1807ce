"""MLflow tracking: one parent run per pipeline execution, one nested child run per stage.

Every pipeline stage is its own process, so the stages of one execution find their
common parent run through a "pipeline key" tag:

- inside `dvc exp run`, the experiment name DVC exports to stage commands (DVC_EXP_NAME);
- otherwise the git HEAD commit plus a hash of the params: a plain `dvc repro` after a
  params change gets a new parent, which is seeded with the results of the upstream
  stages it did not rerun (`upstream_metrics`), so that every parent holds every result.

Final stage results are logged on the child and, prefixed (`eval_ss.mIoU`), on the parent,
so that comparing parents in the MLflow UI shows all params next to all results.

The default store is `sqlite:///<repo root>/mlruns.db` with artifacts in
`<repo root>/mlartifacts`, where the repo root is that of the original repository even
when DVC runs the stage in a copy under `.dvc/tmp/exps/` (`dvc exp run --temp/--queue`).
"""

import hashlib
import json
import logging
import os
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

_DVC_EXPS_DIR = "/.dvc/tmp/exps/"
_KEY_TAG = "cts.pipeline_key"
_KIND_TAG = "cts.run_kind"
_STAGE_TAG = "cts.stage"
_PARENT_TAG = "mlflow.parentRunId"


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


def _quiet_mlflow() -> None:
    # The sqlite store announces its schema creation and every alembic migration at INFO.
    for name in ("alembic", "mlflow.store.db.utils"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _experiment_id(client: MlflowClient, name: str, uri: str) -> str:
    # MLflow would put artifacts under the cwd, which for `dvc exp run --temp` is deleted.
    if experiment := client.get_experiment_by_name(name):
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=_artifact_location(uri))
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
    `mlflow.log_*` calls inside the body go to it. An exception marks both runs FAILED
    and propagates. In a multi-process run only rank 0 logs: the other ranks get None.
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

    parent_id = _find_parent(client, experiment_id, key)
    with mlflow.start_run(
        run_id=parent_id,
        experiment_id=experiment_id,
        run_name=key,
        tags={_KEY_TAG: key, _KIND_TAG: "pipeline"},
    ):
        if parent_id is None:
            mlflow.log_params(flat_params)
            for path in map(Path, upstream_metrics):
                if path.is_file():
                    mlflow.log_metrics(_scalars(_read_json(path), f"{path.stem}."))
        with mlflow.start_run(
            experiment_id=experiment_id,
            run_name=stage,
            nested=True,
            tags={_KEY_TAG: key, _KIND_TAG: "stage", _STAGE_TAG: stage},
        ) as child:
            mlflow.log_params(flat_params)
            yield child


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
