"""MLflow tracking: one parent run per pipeline execution, one nested child run per stage.

Every pipeline stage is its own process, so the stages of one execution find their
common parent run through a "pipeline key" tag:

- inside `dvc exp run`, the experiment name DVC exports to stage commands (DVC_EXP_NAME);
- run by another orchestrator, the name of its pipeline run in ``CTS_PIPELINE_RUN`` (the
  Kubeflow Pipelines tasks of `cts kfp` set it to the pipeline job's name: each task holds
  only its own params, so a params hash would give each its own parent);
- otherwise the git HEAD commit plus a hash of the params: a plain `dvc repro` after a
  params change gets a new parent.

A parent holds the results of its own execution only. It is seeded with the results of the
stages upstream of the stage that starts it (`upstream_metrics`: the outputs it reuses); every
other result is logged by its stage when that stage runs, so a parent whose execution fails
midway shows no figures of an earlier execution. A parent is named after what differs from
the committed params.yaml (`dusky-sick K=0`); its description, shown first on its page,
holds the headline figures (`HEADLINE`), and so do the tags and description of the model
version its `train_segmenter` registered.

Results have one name everywhere: `eval_ss.mIoU` on the eval_ss run and on the parent. On the
stage run they are logged at the stage's last step, after its curves. Keys of a results file
that are settings (batch size, iterations) are params of the stage run, not metrics.

A parent reads as one pipeline execution: RUNNING while a stage runs, ended with the end time
of its latest stage, FAILED or KILLED if a stage failed or was interrupted (an exception marks
the stage run FAILED, an interrupt (Ctrl-C, SIGTERM) KILLED). A SIGKILLed stage cannot end its
runs, so every run records its process (`cts.process`: host, pid, start time) and the next
stage of the experiment closes the RUNNING runs whose process is gone as FAILED. Finding or
creating the parent holds a file lock, so stages starting at once share one parent.

The default store is `sqlite:///<repo root>/mlruns.db` with artifacts in
`<repo root>/mlartifacts`, where the repo root is that of the original repository even
when DVC runs the stage in a copy under `.dvc/tmp/exps/` (`dvc exp run --temp/--queue`).

A tracking server (`http(s)://...`) is never a stage's point of failure. MLflow's client
retries a failed request for minutes; inside a stage it retries twice and waits at most
20 s for an answer (a user's own MLFLOW_HTTP_REQUEST_* settings win). A server that does not
answer when the stage starts, or stops answering during it, is reported in one line on
stderr, and the stage goes on to its outputs: what it would have logged (runs, params,
metrics, artifacts, the model) is kept, in order, in `<repo root>/mlflow-spool/` (one JSONL
file per stage execution, copies of its files beside it). The kept records are logged as
soon as the server answers again: during the stage (it asks again every 30 s), when the
next stage starts, or with `python -m cts.tracking`. Each record is logged once: progress
is saved after every record, and a metric already in the run's history is not logged again.
A stage does not fail for an unreachable server, even at its start, because it may have
done its work before it opens its run (the evaluations score the whole set first).
"""

import argparse
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import requests
import yaml
from mlflow.entities import LoggedModelStatus, Metric, Param, Run, RunData, RunInfo
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from cts.processes import pid_alive, process_start

_DVC_EXPS_DIR = "/.dvc/tmp/exps/"
_KEY_TAG = "cts.pipeline_key"
_KIND_TAG = "cts.run_kind"
_STAGE_TAG = "cts.stage"
_PARENT_TAG = "mlflow.parentRunId"
_PROCESS_TAG = "cts.process"
_COMMIT_TAG = "cts.git_commit"
_NOTE_TAG = "mlflow.note.content"  # a run's description in the MLflow UI
# The experiment's kind spares the MLflow 3 UI's "choose the experiment type" prompt. Which
# view an experiment opens in is not the tag's doing: MLflow 3.17 takes it from the sidebar's
# workflow switch (browser local storage, GenAI for a new browser) unless the address carries
# ?workflowType=machine_learning, as `ui_url` does.
_EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
_EXPERIMENT_KIND = (_EXPERIMENT_KIND_TAG, "custom_model_development")
UI_BASE = "http://127.0.0.1:5000"
# Short names of params in run names.
_ALIASES = {"num_tokens_shared": "K"}
# The figures a pipeline execution is judged by: (parent metric, label, format).
HEADLINE = (
    ("eval_ss.mIoU", "eval_ss mIoU", "{:.2f}"),
    ("eval_ms.mIoU", "eval_ms mIoU", "{:.2f}"),
    ("benchmark.speedup", "speed-up", "{:.2f}x"),
    ("benchmark.tokens", "tokens", "{:.0f}"),
)

SPOOL_DIR = "mlflow-spool"
# Reachability: how long a probe of the server waits, and how often a stage that lost its
# server asks again. A probe costs nothing against a refused connection and at most its
# timeout against a silent host.
PROBE_TIMEOUT_SECONDS = 5.0
REPROBE_SECONDS = 30.0
# MLflow's own defaults (7 retries with exponential backoff, 120 s per request) held a stage
# about 9 minutes per call once its server had died.
_HTTP_SETTINGS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}
# For the one call that must go out while the server is known not to answer: MLflow's
# end_run forgets its active run, then tells the server.
_FAIL_FAST = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "3"}


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


# Set by an orchestrator that runs the stages (Kubeflow Pipelines tasks): its run's name.
PIPELINE_RUN_ENV = "CTS_PIPELINE_RUN"


def pipeline_key(params: Mapping[str, Any], start: Path | None = None) -> str:
    """``CTS_PIPELINE_RUN`` when set, the DVC experiment name under `dvc exp run`, else
    `<git HEAD>-<params hash>`."""
    if name := os.environ.get(PIPELINE_RUN_ENV) or os.environ.get("DVC_EXP_NAME"):
        return name
    digest = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode())
    return f"{(_git_head(repo_root(start)) or 'nogit')[:12]}-{digest.hexdigest()[:12]}"


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


def _same(value: Any, other: Any) -> bool:
    """Equal, or the same number written two ways (YAML reads `1e-3` as a string)."""
    if value == other:
        return True
    try:
        return float(value) == float(other)
    except (TypeError, ValueError):
        return False


def _short(value: Any) -> str:
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return text if len(text) <= 24 else f"{text[:23]}…"


def changed_params(params: Mapping[str, Any], committed: Mapping[str, Any]) -> list[str]:
    """`key=value` for each param that differs from `committed`, in the order of `params`
    (num_tokens_shared as K)."""
    return [
        f"{_ALIASES.get(key, key)}={_short(value)}"
        for key, value in params.items()
        if key not in committed or not _same(value, committed[key])
    ]


def parent_run_name(
    params: Mapping[str, Any], key: str, committed: Mapping[str, Any] | None = None
) -> str:
    """Under `dvc exp run`: the DVC experiment name (as `dvc exp show` lists it) and the params
    that differ from `committed` (``dusky-sick K=0``); otherwise backbone, depth, K, short
    commit and params digest (``vit_tiny_patch16_384 d4 K=103 21da977-77fd33``) and the
    other differing params. At most four are listed, then how many more."""
    changes = changed_params(params, committed) if committed is not None else []
    if os.environ.get(PIPELINE_RUN_ENV) or os.environ.get("DVC_EXP_NAME"):
        name = key
    else:
        backbone = params.get("backbone", "model")
        depth = f" d{params['depth']}" if params.get("depth") else ""
        k = 0 if params.get("policy") == "none" else params.get("num_tokens_shared", "?")
        commit, _, digest = key.partition("-")
        name = f"{backbone}{depth} K={k} {commit[:7]}-{digest[:6]}"
        named = ("K=", "backbone=", "depth=", "policy=")
        changes = [change for change in changes if not change.startswith(named)]
    if len(changes) > 4:
        changes = [*changes[:4], f"+{len(changes) - 4} more"]
    return " ".join([name, *changes])


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


def _stage_running(client: MlflowClient, parent: Run) -> bool:
    """Whether a stage run of `parent` runs (its process lives: a SIGKILLed one does not)."""
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=(
            f"tags.`{_PARENT_TAG}` = '{parent.info.run_id}' and attributes.status = 'RUNNING'"
        ),
    )
    return any(_is_alive(child.data.tags.get(_PROCESS_TAG, "")) for child in children)


def _end_parent(
    client: MlflowClient, parent_id: str, status: str, end_time: int | None = None
) -> None:
    """A stage ended: the parent ends with it unless another of its stages still runs; a
    failure or interrupt of a stage that ran alongside this one is kept, and the end time
    never goes back (a kept record may be logged after a later stage's)."""
    parent = client.get_run(parent_id)
    if status == "FINISHED":
        if _stage_running(client, parent):
            return
        if parent.info.status in ("FAILED", "KILLED"):
            status = parent.info.status
    end_time = max(end_time or _now_ms(), parent.info.end_time or 0)
    client.set_terminated(parent_id, status, end_time)


def _remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def unreachable(uri: str, timeout: float = PROBE_TIMEOUT_SECONDS) -> str | None:
    """None when the tracking server at `uri` answers (any HTTP status below 500: an answer
    that asks for credentials is an answer); else why not, in a few words."""
    verify: bool | str = os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() != "true"
    verify = os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or verify
    try:
        response = requests.get(f"{uri.rstrip('/')}/health", timeout=timeout, verify=verify)
    except requests.Timeout:
        return f"no answer within {timeout:g} s"
    except requests.ConnectionError as error:
        text = str(error)
        if "refused" in text.lower():
            return "connection refused"
        if "resolve" in text.lower() or "name or service" in text.lower():
            return "host not found"
        return type(error).__name__
    except requests.RequestException as error:
        return type(error).__name__
    return f"HTTP {response.status_code}" if response.status_code >= 500 else None


@contextmanager
def _environment(values: Mapping[str, str], override: bool) -> Iterator[None]:
    """Sets environment variables for the block (only unset ones unless `override`)."""
    previous = {name: os.environ.get(name) for name in values}
    for name, value in values.items():
        if override or previous[name] is None:
            os.environ[name] = value
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _now_ms() -> int:
    return int(time.time() * 1000)


def _log_batch(
    client: MlflowClient,
    run_id: str,
    metrics: Sequence[Sequence[Any]] = (),
    params: Mapping[str, Any] | None = None,
) -> None:
    """Metrics as (key, value, timestamp ms, step) rows, params as str(value), in one call."""
    client.log_batch(
        run_id,
        metrics=[Metric(key, float(value), int(ts), int(step)) for key, value, ts, step in metrics],
        params=[Param(key, str(value)) for key, value in (params or {}).items()],
    )


def _find_or_create_parent(client: MlflowClient, experiment_id: str, start: Mapping) -> str:
    """The pipeline's parent run (see the module doc), RUNNING from now on, with the upstream
    stages' results it lacks; a new one also gets the params. The caller holds the store lock."""
    upstream = start["upstream"]
    if parent_id := _find_parent(client, experiment_id, start["key"]):
        held = client.get_run(parent_id).data.metrics
        upstream = {key: value for key, value in upstream.items() if key not in held}
        params = None
        # The process that holds it RUNNING: close_stale_runs ends it if that one dies.
        client.set_tag(parent_id, _PROCESS_TAG, _this_process())
        client.update_run(parent_id, "RUNNING")
    else:
        tags = {_KEY_TAG: start["key"], _KIND_TAG: "pipeline", _PROCESS_TAG: _this_process()}
        if start.get("commit"):
            tags[_COMMIT_TAG] = start["commit"]
        parent_id = client.create_run(
            experiment_id, start_time=start["start_time"], tags=tags, run_name=start["parent_name"]
        ).info.run_id
        params = start["params"]
    rows = [(key, value, start["start_time"], 0) for key, value in upstream.items()]
    _log_batch(client, parent_id, rows, params)
    _summarize(client, parent_id)
    return parent_id


def _headline(parent: Run) -> dict[str, str]:
    """What tells pipeline executions apart, as tag name -> value (those known so far)."""
    params, metrics, tags = parent.data.params, parent.data.metrics, parent.data.tags
    found = {}
    if "num_tokens_shared" in params:
        found["K"] = "0" if params.get("policy") == "none" else params["num_tokens_shared"]
    if "benchmark.tokens" in metrics:
        found["tokens"] = f"{metrics['benchmark.tokens']:.0f}"
    for key in ("backbone", "depth"):
        if params.get(key) not in (None, "None"):
            found[key] = params[key]
    for key, _, form in HEADLINE[:3]:
        if key in metrics:
            found[key] = form.format(metrics[key]).removesuffix("x")
    if _COMMIT_TAG in tags:
        found["git_commit"] = tags[_COMMIT_TAG]
    found["pipeline_run"] = parent.info.run_name
    return found


def _summary(headline: Mapping[str, str]) -> str:
    """One line: ``K=103 · 715 tokens · vit_tiny_patch16_384 d4 · eval_ss mIoU 45.59 · ...``."""
    parts = [f"K={headline['K']}"] if "K" in headline else []
    parts += [f"{headline['tokens']} tokens"] if "tokens" in headline else []
    if "backbone" in headline:
        depth = f" d{headline['depth']}" if "depth" in headline else ""
        parts.append(f"{headline['backbone']}{depth}")
    for key, label, form in HEADLINE[:3]:
        if key in headline:
            parts.append(f"{label} {headline[key]}{'x' if form.endswith('x') else ''}")
    if "git_commit" in headline:
        parts.append(f"commit {headline['git_commit'][:7]}")
    parts.append(f"run {headline['pipeline_run']}")
    return " · ".join(parts)


def _summarize(client: MlflowClient, parent_id: str) -> None:
    """The parent's headline as its description (the first thing on its page), and as the
    tags and description of the newest model version one of its stages registered."""
    parent = client.get_run(parent_id)
    headline = _headline(parent)
    text = _summary(headline)
    client.set_tag(parent_id, _NOTE_TAG, text)
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`{_PARENT_TAG}` = '{parent_id}'"
    )
    if not children:
        return
    ids = ", ".join(f"'{child.info.run_id}'" for child in children)
    versions = client.search_model_versions(f"run_id IN ({ids})")
    if not versions:
        return
    newest = max(versions, key=lambda version: version.creation_timestamp)
    for key, value in {**headline, "pipeline_run_id": parent_id}.items():
        client.set_model_version_tag(newest.name, newest.version, key, value)
    client.update_model_version(newest.name, newest.version, description=text)


def _open_kept_runs(client: MlflowClient, uri: str, start: Mapping) -> tuple[str, str]:
    """Creates the runs of a stage that started while its server did not answer, with the
    times, tags and values it had then; returns (child, parent)."""
    experiment_id = _experiment_id(client, start["experiment"], uri)
    with _store_lock(uri):
        parent_id = _find_or_create_parent(client, experiment_id, start)
    tags = {**start["tags"], _PARENT_TAG: parent_id}
    child_id = client.create_run(
        experiment_id, start_time=start["start_time"], tags=tags, run_name=start["stage"]
    ).info.run_id
    _log_batch(client, child_id, params=start["params"])
    return child_id, parent_id


def _apply(client: MlflowClient, record: Mapping[str, Any], folder: Path | None = None) -> Any:
    """Logs one record (see `_Session.send`); file paths are relative to `folder` when the
    record comes from a spool."""

    def local(path: str) -> str:
        return str(folder / path) if folder is not None else path

    op, run_id = record["op"], record["run"]
    if op == "metrics":
        _log_batch(client, run_id, record["metrics"])
    elif op == "params":
        _log_batch(client, run_id, params=record["params"])
    elif op == "summary":
        _summarize(client, run_id)
    elif op == "artifact":
        client.log_artifact(run_id, local(record["path"]), record.get("artifact_path"))
    elif op == "model":
        from cts.serving import log_model_to_run  # torch: only where a model is logged

        return log_model_to_run(
            run_id, local(record["checkpoint"]), record["registered_model_name"], record["name"]
        )
    elif op == "end":
        client.set_terminated(run_id, record["status"], record["end_time"])
    elif op == "end_parent":
        _end_parent(client, run_id, record["status"], record["end_time"])
    else:
        raise ValueError(f"unknown tracking record {op!r}")
    return None


class _Spool:
    """The records one stage execution could not log: `<stamp>-<stage>-<pid>.jsonl` in the
    spool folder, its files copied to `<same name>.files/<n>/<file name>` (the name is what
    the artifact is called). The writer holds an flock on the file while it lives, so a
    replay leaves the file of a running stage alone; the kernel drops it if the writer dies."""

    def __init__(self, folder: Path, uri: str, stage: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        ignore = folder / ".gitignore"
        if not ignore.exists():
            ignore.write_text("# what stages kept while their MLflow server did not answer\n*\n")
        stamp = time.strftime("%Y%m%dT%H%M%S")
        self.path = folder / f"{stamp}-{stage}-{os.getpid()}-{uuid.uuid4().hex[:6]}.jsonl"
        self.files = self.path.with_suffix(".files")
        # Locked and given its header under another name: a replay never sees it unlocked.
        partial = self.path.with_suffix(".partial")
        self._file = open(partial, "a")  # noqa: SIM115 (closed by close())
        fcntl.flock(self._file, fcntl.LOCK_EX)
        self._write({"op": "header", "uri": uri, "stage": stage, "pid": os.getpid()})
        os.replace(partial, self.path)
        self._copies = 0

    def _write(self, record: Mapping[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def keep(self, record: dict[str, Any], files: Sequence[str]) -> None:
        """Appends `record`, its fields named in `files` replaced by copies of those files
        (copies: the stage may replace the originals before the records are logged)."""
        record = dict(record)
        for field in files:
            self._copies += 1
            source = Path(record[field])
            target = self.files / str(self._copies) / source.name
            target.parent.mkdir(parents=True)
            shutil.copy2(source, target)
            record[field] = str(target.relative_to(self.files))
        self._write(record)

    def close(self) -> None:
        self._file.close()


def _progress_path(path: Path) -> Path:
    return path.with_suffix(".done")


def _read_records(path: Path) -> list[dict[str, Any]]:
    """The file's records; a last line cut short by a killed writer is left out."""
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


def _replay_file(client: MlflowClient, uri: str, path: Path) -> tuple[int, dict[str, str]]:
    """Logs the records of one spool file not yet logged; returns how many it logged and the
    ids of the runs it created for the runs the stage could not create (its refs -> ids).
    Progress is saved after each record; a connection error propagates and leaves the rest."""
    records = _read_records(path)[1:]
    progress_file = _progress_path(path)
    progress = {"applied": 0, "runs": {}}
    if progress_file.is_file():
        progress = json.loads(progress_file.read_text())
    runs: dict[str, str] = progress["runs"]
    history: dict[tuple[str, str], set[tuple[int, int, float]]] = {}
    folder = path.with_suffix(".files")
    logged = 0
    for index in range(progress["applied"], len(records)):
        record = dict(records[index])
        record["run"] = runs.get(record["run"], record["run"])
        if record["op"] == "start":
            child_id, parent_id = _open_kept_runs(client, uri, record)
            runs.update({records[index]["run"]: child_id, record["parent"]: parent_id})
        elif record["op"] == "metrics":
            new = []
            for key, value, ts, step in record["metrics"]:
                if (record["run"], key) not in history:
                    history[record["run"], key] = {
                        (m.step, m.timestamp, m.value)
                        for m in client.get_metric_history(record["run"], key)
                    }
                if (step, ts, value) not in history[record["run"], key]:
                    new.append((key, value, ts, step))
            if new:
                _apply(client, {**record, "metrics": new})
        elif record["op"] == "model" and _has_model(client, record["run"], record["name"]):
            pass  # logged before the progress of an earlier replay was saved
        else:
            _apply(client, record, folder)
        logged += 1
        progress["applied"] = index + 1
        temporary = progress_file.with_suffix(".done.tmp")
        temporary.write_text(json.dumps(progress))
        os.replace(temporary, progress_file)
    return logged, runs


def _has_model(client: MlflowClient, run_id: str, name: str) -> bool:
    experiment_id = client.get_run(run_id).info.experiment_id
    found = client.search_logged_models(
        experiment_ids=[experiment_id],
        filter_string=f"source_run_id = '{run_id}' AND name = '{name}'",
    )
    return any(model.status == LoggedModelStatus.READY for model in found)


def _remove_spool(path: Path) -> None:
    shutil.rmtree(path.with_suffix(".files"), ignore_errors=True)
    _progress_path(path).unlink(missing_ok=True)
    path.unlink(missing_ok=True)


def replay_spool(uri: str | None = None, start: Path | None = None) -> int:
    """Logs what stages kept in the spool folder while their server did not answer, to
    `uri`'s server (default: each file's own server); returns how many records it logged.

    Files of stages still running are left; a server that does not answer keeps its files.
    """
    folder = repo_root(start) / SPOOL_DIR
    logged = 0
    with _environment(_HTTP_SETTINGS, override=False):
        for path in sorted(folder.glob("*.jsonl")):
            with open(path) as handle:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # its stage is still running
                records = _read_records(path)
                if not records:
                    continue
                target = records[0]["uri"]
                if (uri is not None and target != uri) or unreachable(target):
                    continue
                mlflow.set_tracking_uri(target)  # the model's logging reads it
                try:
                    logged += _replay_file(MlflowClient(target), target, path)[0]
                except Exception as error:
                    if not unreachable(target):
                        # Not the connection: say so and leave the file; the stage that
                        # replays goes on, and the rest of the file waits for a fix.
                        text = str(error).splitlines()[0] if str(error) else ""
                        print(
                            f"mlflow: could not log the records kept in {path}: "
                            f"{type(error).__name__}: {text}",
                            file=sys.stderr,
                        )
                    continue
                _remove_spool(path)
    return logged


class _Session:
    """The tracking of the stage that runs: logs each record, or keeps it while the server
    does not answer (see the module doc)."""

    def __init__(self, uri: str, stage: str, start: dict[str, Any]) -> None:
        self.uri = uri
        self.stage = stage
        self.start = start
        self.client = MlflowClient(uri)
        self.remote = _remote(uri)
        self.run_id: str = start["run"]
        self.parent_id: str = start["parent"]
        self.online = True
        self.spool: _Spool | None = None
        self.next_probe = 0.0
        self.kept_run: mlflow.ActiveRun | None = None
        self.refs: dict[str, str] = {}  # kept runs' refs -> their ids, once created
        self.last_step = 0  # of the curves logged so far: the stage's results go there

    def send(self, record: dict[str, Any], files: Sequence[str] = ()) -> Any:
        """Logs `record` (its `run` field names the stage run or the parent), or keeps it
        while the server does not answer; returns what logging it returned (None if kept)."""
        if not self.online and time.monotonic() >= self.next_probe:
            self.reconnect()
        record = {**record, "run": self.refs.get(record["run"], record["run"])}
        if self.online:
            try:
                return _apply(self.client, record)
            except Exception:
                why = unreachable(self.uri) if self.remote else None
                if why is None:
                    if not self.remote:
                        raise
                    return _apply(self.client, record)  # back already; a second error is real
                self.go_offline(f"lost {self.uri} ({why})")
        self.spool.keep(record, files)
        return None

    def go_offline(self, what: str) -> None:
        self.online = False
        self.next_probe = time.monotonic() + REPROBE_SECONDS
        if self.spool is None:
            self.spool = _Spool(repo_root() / SPOOL_DIR, self.uri, self.stage)
        where = self.spool.path
        if where.is_relative_to(Path.cwd()):
            where = where.relative_to(Path.cwd())
        print(
            f"mlflow: {what}; {self.stage} goes on and keeps its tracking in {where}, logged "
            "when the server answers (or by `python -m cts.tracking`); to log locally "
            "instead: --set mlflow_tracking_uri=sqlite:///mlruns.db (params.yaml: "
            "mlflow_tracking_uri)",
            file=sys.stderr,
        )

    def reconnect(self) -> bool:
        """When the server answers again: logs what was kept and goes on logging."""
        self.next_probe = time.monotonic() + REPROBE_SECONDS
        if unreachable(self.uri):
            return False
        try:
            logged, runs = _replay_file(self.client, self.uri, self.spool.path)
            if self.run_id in runs:  # the stage started without its server: its runs exist now
                mlflow.start_run(run_id=runs[self.run_id])
        except Exception:
            if unreachable(self.uri):
                return False  # lost again: the progress is saved, the rest stays kept
            raise
        if self.run_id in runs:
            self.refs.update(runs)
            self.run_id, self.parent_id = runs[self.run_id], runs[self.parent_id]
            self.kept_run = None
        self.spool.close()
        _remove_spool(self.spool.path)
        self.spool = None
        self.online = True
        logged += replay_spool(self.uri)  # what other stages kept
        print(f"mlflow: {self.uri} answers again; logged {logged} kept record(s)", file=sys.stderr)
        return True

    def active_run(self) -> mlflow.ActiveRun | None:
        """The stage's run for `mlflow.active_run()` in the stage's code: MLflow's active run,
        or, while the stage's runs wait to be created, a stand-in with the stage's ref."""
        return _mlflow_active_run() or self.kept_run

    def end(self, status: str) -> None:
        """Ends the stage run and the parent (or keeps that for later)."""
        if not self.online and time.monotonic() >= self.next_probe:
            self.reconnect()
        end_time = _now_ms()
        ended = False
        if _mlflow_active_run() is not None:
            # Without a server, end_run fails fast and the end is kept like any other record.
            try:
                with _environment(_FAIL_FAST, override=not self.online):
                    mlflow.end_run(status)
                ended = True
                # The parent ends when its stage run did, to the millisecond.
                end_time = self.client.get_run(self.run_id).info.end_time
            except Exception:
                if not self.remote:
                    raise
        if not ended:
            self.send({"op": "end", "run": self.run_id, "status": status, "end_time": end_time})
        self.send(
            {"op": "end_parent", "run": self.parent_id, "status": status, "end_time": end_time}
        )
        if self.spool is not None:
            self.spool.close()


_SESSION: _Session | None = None
_mlflow_active_run: Callable[[], mlflow.ActiveRun | None] = mlflow.active_run
_mlflow_log_artifact: Callable[..., None] = mlflow.log_artifact


def log_artifact(
    local_path: str | os.PathLike, artifact_path: str | None = None, run_id: str | None = None
) -> None:
    """`mlflow.log_artifact` that keeps the file for later while the stage's server does not
    answer. Inside `stage_run`, `mlflow.log_artifact` is this function (stages call it)."""
    session = _SESSION
    if session is None or (run_id is not None and run_id != session.run_id):
        _mlflow_log_artifact(str(local_path), artifact_path, run_id)
        return
    record = {"op": "artifact", "run": session.run_id, "path": str(local_path)}
    session.send({**record, "artifact_path": artifact_path}, files=("path",))


def log_model(
    checkpoint: str | os.PathLike, registered_model_name: str | None = None, name: str = "model"
) -> Any:
    """The pyfunc model of `checkpoint` on the stage run (cts.serving), kept for later while
    the server does not answer (then None); outside a stage, on MLflow's active run."""
    from cts.serving import log_model_to_run

    session = _SESSION
    if session is None:
        active = _mlflow_active_run()
        if active is None:
            raise ValueError("logging a model needs an active MLflow run")
        return log_model_to_run(active.info.run_id, checkpoint, registered_model_name, name)
    record = {"op": "model", "run": session.run_id, "checkpoint": str(checkpoint), "name": name}
    info = session.send({**record, "registered_model_name": registered_model_name}, ("checkpoint",))
    if registered_model_name:
        session.send({"op": "summary", "run": session.parent_id})
    return info


@contextmanager
def _stage_calls(session: _Session) -> Iterator[None]:
    """Routes the stage code's `mlflow.active_run` and `mlflow.log_artifact` through the
    session for the stage's duration (the stages call them directly)."""
    global _SESSION
    _SESSION = session
    mlflow.active_run, mlflow.log_artifact = session.active_run, log_artifact
    try:
        yield
    finally:
        mlflow.active_run, mlflow.log_artifact = _mlflow_active_run, _mlflow_log_artifact
        _SESSION = None


class _Unreachable(Exception):
    """The server did not answer the probe at the stage's start."""


def _open_session(
    stage: str,
    params: Mapping[str, Any],
    experiment: str,
    uri: str,
    upstream_metrics: Mapping[str | Path, Sequence[str]],
) -> _Session:
    """Replays what earlier stages kept, closes runs of dead stages, finds or creates the
    parent and starts the stage run; without an answering server, a session that keeps."""
    key = pipeline_key(params)
    root = repo_root()
    process = _this_process()
    tags = {_KEY_TAG: key, _KIND_TAG: "stage", _STAGE_TAG: stage, _PROCESS_TAG: process}
    upstream: dict[str, float] = {}
    for path, settings in upstream_metrics.items():
        path = Path(path)
        if path.is_file():
            results = {k: v for k, v in _read_json(path).items() if k not in settings}
            upstream.update(_scalars(results, f"{path.stem}."))
    start = {
        "op": "start",
        "run": f"kept-{uuid.uuid4().hex}",
        "parent": f"kept-{uuid.uuid4().hex}",
        "experiment": experiment,
        "key": key,
        "parent_name": parent_run_name(params, key, committed_params(root)),
        "commit": _git_head(root),
        "stage": stage,
        "process": process,
        "params": _flatten(params),
        "upstream": upstream,
        "start_time": _now_ms(),
    }
    session = _Session(uri, stage, start)
    remote = session.remote
    child = None
    try:
        if remote and (why := unreachable(uri)):
            raise _Unreachable(why)
        client = session.client
        if remote:
            replayed = replay_spool(uri)
            if replayed:
                print(
                    f"mlflow: logged {replayed} record(s) kept by earlier stages", file=sys.stderr
                )
        experiment_id = _experiment_id(client, experiment, uri)
        start["start_time"] = _now_ms()  # a new store's schema took seconds: not the stage's
        with _store_lock(uri):
            close_stale_runs(client, experiment_id)
            parent_id = _find_or_create_parent(client, experiment_id, start)
        child = mlflow.start_run(
            experiment_id=experiment_id, run_name=stage, parent_run_id=parent_id, tags=tags
        )
        session.run_id, session.parent_id = child.info.run_id, parent_id
        _log_batch(client, session.run_id, params=start["params"])
    except Exception as error:
        why = str(error) if isinstance(error, _Unreachable) else None
        why = why or (unreachable(uri) if remote else None)
        if why is None:
            raise
        if child is not None:  # started, then lost: the replay creates the stage's runs
            with _environment(_FAIL_FAST, override=True), contextlib.suppress(Exception):
                mlflow.end_run("FAILED")
        from mlflow.tracking.context.registry import resolve_tags

        start["tags"] = resolve_tags(tags)
        session.run_id, session.parent_id = start["run"], start["parent"]
        session.go_offline(f"{uri} does not answer ({why})")
        session.spool.keep(start, ())
        info = RunInfo(
            run_id=session.run_id,
            experiment_id="",
            user_id="",
            status="RUNNING",
            start_time=start["start_time"],
            end_time=None,
            lifecycle_stage="active",
            run_name=stage,
        )
        session.kept_run = mlflow.ActiveRun(Run(info, RunData()))
    return session


@contextmanager
def stage_run(
    stage: str,
    params: Mapping[str, Any],
    experiment: str = "cts",
    uri: str | None = None,
    upstream_metrics: Mapping[str | Path, Sequence[str]] | Sequence[str | Path] = (),
) -> Iterator[mlflow.ActiveRun | None]:
    """Runs the body inside a child run named `stage` of this pipeline's parent run.

    `params` must be the whole params file (the same dict in every stage): it is logged,
    flattened, on the child and, when the parent is created, on the parent, and it keys
    the parent outside DVC experiments. `upstream_metrics` are the metrics files of the
    stages upstream of this one (a mapping: each with its keys that are settings, as
    `log_metrics_file` takes them): the parent receives the scalar results of those that
    exist and that it does not hold yet, prefixed with the file stem (`policy.json` ->
    `policy.accuracy`). The parent is RUNNING until the body ends. The child is the active
    run, so plain `mlflow.log_*` calls inside the body go to it. An exception marks both
    runs FAILED, an interrupt (KeyboardInterrupt, which SIGTERM raises in `cts`) KILLED; it
    propagates.
    In a multi-process run only rank 0 logs: the other ranks get None.

    With a tracking server that does not answer, the body still runs (see the module doc):
    log through this module's functions, `mlflow.log_artifact` or `mlflow.active_run()`;
    other `mlflow.*` calls reach the server directly.
    """
    if int(os.environ.get("RANK", 0)) != 0:
        yield None
        return
    _quiet_mlflow()
    uri = tracking_uri(uri)
    mlflow.set_tracking_uri(uri)
    with _environment(_HTTP_SETTINGS if _remote(uri) else {}, override=False):
        if not isinstance(upstream_metrics, Mapping):
            upstream_metrics = dict.fromkeys(upstream_metrics, ())
        session = _open_session(stage, params, experiment, uri, upstream_metrics)
        status = "FAILED"
        with _stage_calls(session):
            try:
                yield session.active_run()
                status = "FINISHED"
            except KeyboardInterrupt:
                status = "KILLED"
                raise
            finally:
                session.end(status)


def log_json_metrics(
    metrics: Mapping[str, Any], step: int | None = None, prefix: str | None = None
) -> None:
    """Logs the numeric leaves of `metrics` (nested keys joined with '.') on the stage run.

    With a `step` they are a training curve and stay on the stage run. Without, they are
    the stage's results, named `<prefix>.<key>` (prefix default: the stage name) on the
    stage run, at its last step so far (a chart's final point, not a point at step 0), and
    on the pipeline parent, whose headline they update. Outside `stage_run` nothing is
    logged, so stages also run untracked.
    """
    if (session := _SESSION) is None:
        return
    scalars, now = _scalars(metrics), _now_ms()
    if step is not None:
        session.last_step = max(session.last_step, step)
        rows = [(key, value, now, step) for key, value in scalars.items()]
        session.send({"op": "metrics", "run": session.run_id, "metrics": rows})
        return
    prefix = prefix or session.stage
    results = {f"{prefix}.{key}": value for key, value in scalars.items()}
    rows = [(key, value, now, session.last_step) for key, value in results.items()]
    session.send({"op": "metrics", "run": session.run_id, "metrics": rows})
    rows = [(key, value, now, 0) for key, value in results.items()]
    session.send({"op": "metrics", "run": session.parent_id, "metrics": rows})
    session.send({"op": "summary", "run": session.parent_id})


def log_training_row(step: int, row: Mapping[str, float]) -> None:
    """A training loop's `on_log`: the row's values (loss, lr, val_*) as curves at `step`,
    under the loop's own names, so that every training stage charts `loss` alike."""
    log_json_metrics({key: value for key, value in row.items() if key != "step"}, step=step)


def log_metrics_file(path: str | Path, settings: Sequence[str] = ()) -> None:
    """Logs a stage's metrics JSON as its results (named `<file stem>.<key>`) and artifact.

    The keys in `settings` say how the results were obtained (a batch size, the iterations):
    they are params of the stage run, `<file stem>.<key>`, not metrics. The stem is the
    prefix `stage_run` uses when it seeds a parent from the same file, so a result keeps its
    name whichever run logged it.
    """
    if (session := _SESSION) is None:
        return
    path = Path(path)
    results = _read_json(path)
    params = {f"{path.stem}.{key}": results[key] for key in settings if key in results}
    if params:
        session.send({"op": "params", "run": session.run_id, "params": params})
    log_json_metrics({k: v for k, v in results.items() if k not in settings}, prefix=path.stem)
    log_artifact(path)


def ui_url(base: str = UI_BASE, experiment: str = "cts", uri: str | None = None) -> str:
    """The MLflow UI address of the experiment's runs table (MLflow 3's model-training view,
    with the registry in its sidebar), whatever view the browser used last; the experiments
    list when the store or the experiment does not exist yet."""
    uri = tracking_uri(uri)
    if uri.startswith("sqlite:///"):
        available = Path(uri.removeprefix("sqlite:///")).is_file()  # not created by asking
    else:
        available = not (_remote(uri) and unreachable(uri))
    found = None
    if available:
        _quiet_mlflow()
        with _environment(_HTTP_SETTINGS if _remote(uri) else {}, override=False):
            found = MlflowClient(uri).get_experiment_by_name(experiment)
    page = f"experiments/{found.experiment_id}/runs" if found else "experiments"
    return f"{base.rstrip('/')}/#/{page}?workflowType=machine_learning"


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m cts.tracking`: logs what stages kept while their server did not answer;
    `--ui-url [BASE]`: prints the MLflow UI address of the runs table instead."""
    parser = argparse.ArgumentParser(prog="python -m cts.tracking", description=main.__doc__)
    parser.add_argument("--ui-url", nargs="?", const=UI_BASE, metavar="BASE")
    parser.add_argument("--experiment", default="cts")
    options = parser.parse_args(argv)
    if options.ui_url:
        print(ui_url(options.ui_url, options.experiment))
        return 0
    _quiet_mlflow()
    logged = replay_spool()
    left = sorted((repo_root() / SPOOL_DIR).glob("*.jsonl"))
    print(f"mlflow: logged {logged} kept record(s); {len(left)} stage run(s) still kept")
    return 0


if __name__ == "__main__":
    sys.exit(main())
