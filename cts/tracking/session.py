"""The tracking of the stage that runs: `stage_run` opens its session (the stage's child
run of the pipeline's parent, or a spool while the server does not answer), and the
`log_*` functions and `active_run` the stage's code calls go through it."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Run, RunData, RunInfo
from mlflow.tracking import MlflowClient

from cts.tracking.naming import (
    PipelineContext,
    flatten,
    git_head,
    parent_run_name,
    pipeline_key,
    scalar_metrics,
)
from cts.tracking.parents import (
    KEY_TAG,
    KIND_TAG,
    PROCESS_TAG,
    STAGE_TAG,
    close_stale_runs,
    experiment_tags,
    find_or_create_parent,
    this_process,
)
from cts.tracking.spool import SPOOL_DIR, Spool, apply, remove_spool, replay_file, replay_spool
from cts.tracking.store import (
    FAIL_FAST,
    HTTP_SETTINGS,
    ensure_experiment,
    environment,
    log_batch,
    now_ms,
    quiet_mlflow,
    remote,
    store_lock,
    tracking_uri,
    unreachable,
)

# How often a stage that lost its server asks again.
REPROBE_SECONDS = 30.0


class Session:
    """The tracking of the stage that runs: logs each record, or keeps it while the server
    does not answer (see the package doc)."""

    def __init__(self, uri: str, stage: str, start: dict[str, Any], root: Path) -> None:
        self.uri = uri
        self.stage = stage
        self.start = start
        self.root = root
        self.client = MlflowClient(uri)
        self.remote = remote(uri)
        self.run_id: str = start["run"]
        self.parent_id: str = start["parent"]
        self.online = True
        self.spool: Spool | None = None
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
                return apply(self.client, record)
            except Exception:
                why = unreachable(self.uri) if self.remote else None
                if why is None:
                    if not self.remote:
                        raise
                    return apply(self.client, record)  # back already; a second error is real
                self.go_offline(f"lost {self.uri} ({why})")
        self.spool.keep(record, files)
        return None

    def go_offline(self, what: str) -> None:
        self.online = False
        self.next_probe = time.monotonic() + REPROBE_SECONDS
        if self.spool is None:
            self.spool = Spool(self.root / SPOOL_DIR, self.uri, self.stage)
        where = self.spool.path
        if where.is_relative_to(Path.cwd()):
            where = where.relative_to(Path.cwd())
        print(
            f"mlflow: {what}; {self.stage} goes on and keeps its tracking in {where}, logged "
            "when the server answers (or by `cts replay`); to log locally "
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
            logged, runs = replay_file(self.client, self.uri, self.spool.path)
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
        remove_spool(self.spool.path)
        self.spool = None
        self.online = True
        logged += replay_spool(self.uri, self.root)  # what other stages kept
        print(f"mlflow: {self.uri} answers again; logged {logged} kept record(s)", file=sys.stderr)
        return True

    def active_run(self) -> mlflow.ActiveRun | None:
        """MLflow's active run, or, while the stage's runs wait to be created, a stand-in
        with the stage's ref."""
        return mlflow.active_run() or self.kept_run

    def end(self, status: str) -> None:
        """Ends the stage run and the parent (or keeps that for later)."""
        if not self.online and time.monotonic() >= self.next_probe:
            self.reconnect()
        end_time = now_ms()
        ended = False
        if mlflow.active_run() is not None:
            # Without a server, end_run fails fast and the end is kept like any other record.
            try:
                with environment(FAIL_FAST, override=not self.online):
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


# The session of the stage that runs in this process (None outside `stage_run`).
_SESSION: Session | None = None


def active_run() -> mlflow.ActiveRun | None:
    """The stage's run, for the stage's code to check before it logs: inside `stage_run`,
    MLflow's active run or, while the server does not answer, a stand-in with the stage's
    ref; outside, `mlflow.active_run()`."""
    session = _SESSION
    return mlflow.active_run() if session is None else session.active_run()


def log_artifact(
    local_path: str | os.PathLike, artifact_path: str | None = None, run_id: str | None = None
) -> None:
    """`mlflow.log_artifact` that keeps the file for later while the stage's server does not
    answer (the stage's code calls it for its files)."""
    session = _SESSION
    if session is None or (run_id is not None and run_id != session.run_id):
        mlflow.log_artifact(str(local_path), artifact_path, run_id)
        return
    record = {"op": "artifact", "run": session.run_id, "path": str(local_path)}
    session.send({**record, "artifact_path": artifact_path}, files=("path",))


def log_model(
    checkpoint: str | os.PathLike, registered_model_name: str | None = None, name: str = "model"
) -> Any:
    """The pyfunc model of `checkpoint` (`cts.serving`: uint8 images in, label maps out, as
    `cts predict` computes them) on the stage run, and registered when named; kept for later
    while the server does not answer (then None). Outside a stage, on MLflow's active run."""
    session = _SESSION
    if session is None:
        from cts.serving import log_model_to_run  # torch: only where a model is logged

        active = mlflow.active_run()
        if active is None:
            raise ValueError("logging a model needs an active MLflow run")
        return log_model_to_run(active.info.run_id, checkpoint, registered_model_name, name)
    record = {"op": "model", "run": session.run_id, "checkpoint": str(checkpoint), "name": name}
    info = session.send({**record, "registered_model_name": registered_model_name}, ("checkpoint",))
    if registered_model_name:
        session.send({"op": "summary", "run": session.parent_id})
    return info


class _Unreachable(Exception):
    """The server did not answer the probe at the stage's start."""


def _upstream_results(upstream_metrics: Mapping[str | Path, Sequence[str]]) -> dict[str, float]:
    """The scalar results of the upstream metrics files that exist, less their settings keys,
    prefixed with the file stem (`policy.json` -> `policy.accuracy`)."""
    upstream: dict[str, float] = {}
    for path, settings in upstream_metrics.items():
        path = Path(path)
        if path.is_file():
            results = {k: v for k, v in json.loads(path.read_text()).items() if k not in settings}
            upstream.update(scalar_metrics(results, f"{path.stem}."))
    return upstream


def _start_record(
    stage: str,
    params: Mapping[str, Any],
    experiment: str,
    upstream_metrics: Mapping[str | Path, Sequence[str]],
    context: PipelineContext,
) -> dict[str, Any]:
    """The stage's start: what its runs are created with, now or by a later replay (the
    runs' refs stand for their ids until they exist)."""
    root = context.folder
    key = pipeline_key(params, root, context.name)
    named = bool(context.name)
    return {
        "op": "start",
        "run": f"kept-{uuid.uuid4().hex}",
        "parent": f"kept-{uuid.uuid4().hex}",
        "experiment": experiment,
        "key": key,
        "parent_name": parent_run_name(params, key, context.committed_params, named),
        "commit": git_head(root),
        "stage": stage,
        "process": this_process(),
        "params": flatten(params),
        "upstream": _upstream_results(upstream_metrics),
        "start_time": now_ms(),
    }


def _keep_start(session: Session, start: dict[str, Any], tags: Mapping[str, str], why: str) -> None:
    """The stage starts without its server: its start is kept, and a stand-in run with the
    stage's ref is what `active_run` returns until the replay creates the runs."""
    from mlflow.tracking.context.registry import resolve_tags

    start["tags"] = resolve_tags(tags)
    session.run_id, session.parent_id = start["run"], start["parent"]
    session.go_offline(f"{session.uri} does not answer ({why})")
    session.spool.keep(start, ())
    info = RunInfo(
        run_id=session.run_id,
        experiment_id="",
        user_id="",
        status="RUNNING",
        start_time=start["start_time"],
        end_time=None,
        lifecycle_stage="active",
        run_name=session.stage,
    )
    session.kept_run = mlflow.ActiveRun(Run(info, RunData()))


def _open_session(
    stage: str,
    params: Mapping[str, Any],
    experiment: str,
    uri: str,
    upstream_metrics: Mapping[str | Path, Sequence[str]],
    context: PipelineContext,
) -> Session:
    """Replays what earlier stages kept, closes runs of dead stages, finds or creates the
    parent and starts the stage run; without an answering server, a session that keeps."""
    start = _start_record(stage, params, experiment, upstream_metrics, context)
    tags = {
        KEY_TAG: start["key"],
        KIND_TAG: "stage",
        STAGE_TAG: stage,
        PROCESS_TAG: start["process"],
    }
    session = Session(uri, stage, start, context.folder)
    child = None
    try:
        if session.remote and (why := unreachable(uri)):
            raise _Unreachable(why)
        client = session.client
        if session.remote and (replayed := replay_spool(uri, session.root)):
            print(f"mlflow: logged {replayed} record(s) kept by earlier stages", file=sys.stderr)
        experiment_id = ensure_experiment(client, experiment, uri, experiment_tags())
        start["start_time"] = now_ms()  # a new store's schema took seconds: not the stage's
        with store_lock(uri):
            close_stale_runs(client, experiment_id)
            parent_id = find_or_create_parent(client, experiment_id, start)
        child = mlflow.start_run(
            experiment_id=experiment_id, run_name=stage, parent_run_id=parent_id, tags=tags
        )
        session.run_id, session.parent_id = child.info.run_id, parent_id
        log_batch(client, session.run_id, params=start["params"])
    except Exception as error:
        why = str(error) if isinstance(error, _Unreachable) else None
        why = why or (unreachable(uri) if session.remote else None)
        if why is None:
            raise
        if child is not None:  # started, then lost: the replay creates the stage's runs
            with environment(FAIL_FAST, override=True), contextlib.suppress(Exception):
                mlflow.end_run("FAILED")
        _keep_start(session, start, tags, why)
    return session


@contextmanager
def _current(session: Session) -> Iterator[None]:
    """`session` is the stage's for the body: the `log_*` functions and `active_run` go
    through it."""
    global _SESSION
    _SESSION = session
    try:
        yield
    finally:
        _SESSION = None


@contextmanager
def stage_run(
    stage: str,
    params: Mapping[str, Any],
    experiment: str = "cts",
    uri: str | None = None,
    upstream_metrics: Mapping[str | Path, Sequence[str]] | Sequence[str | Path] = (),
    context: PipelineContext | None = None,
) -> Iterator[mlflow.ActiveRun | None]:
    """Runs the body inside a child run named `stage` of this pipeline's parent run.

    `params` must be the whole params file (the same dict in every stage): it is logged,
    flattened, on the child and, when the parent is created, on the parent, and it keys
    the parent unless `context` names the execution. `uri` is resolved by `tracking_uri`
    with the context's root. `upstream_metrics` are the metrics files of the stages upstream
    of this one (a mapping: each with its keys that are settings, as `log_metrics_file`
    takes them): the parent receives the scalar results of those that exist and that it
    does not hold yet, prefixed with the file stem (`policy.json` -> `policy.accuracy`).
    The parent is RUNNING until the body ends. The child is the active run, so plain
    `mlflow.log_*` calls inside the body go to it. An exception marks both runs FAILED, an
    interrupt (KeyboardInterrupt, which SIGTERM raises in `cts`) KILLED; it propagates.
    In a multi-process run only rank 0 logs: the other ranks get None.

    With a tracking server that does not answer, the body still runs (see the package doc):
    log through this package's functions and check `active_run()`; `mlflow.*` calls reach
    the server directly.
    """
    if int(os.environ.get("RANK", 0)) != 0:
        yield None
        return
    context = context or PipelineContext()
    quiet_mlflow()
    uri = tracking_uri(uri, context.folder)
    mlflow.set_tracking_uri(uri)
    with environment(HTTP_SETTINGS if remote(uri) else {}, override=False):
        if not isinstance(upstream_metrics, Mapping):
            upstream_metrics = dict.fromkeys(upstream_metrics, ())
        session = _open_session(stage, params, experiment, uri, upstream_metrics, context)
        status = "FAILED"
        with _current(session):
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
    scalars, now = scalar_metrics(metrics), now_ms()
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
    results = json.loads(path.read_text())
    params = {f"{path.stem}.{key}": results[key] for key in settings if key in results}
    if params:
        session.send({"op": "params", "run": session.run_id, "params": params})
    log_json_metrics({k: v for k, v in results.items() if k not in settings}, prefix=path.stem)
    log_artifact(path)
