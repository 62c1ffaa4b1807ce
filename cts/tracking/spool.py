"""The offline spool: what a stage could not log while its server did not answer, kept in
order in `<repository root>/mlflow-spool/`, and its replay, which logs each record once.

A record is a dict with an `op` (start, metrics, params, summary, artifact, model, end,
end_parent) and the `run` it goes to: a run id, or the ref of a run the stage could not
create yet (replaced by the id of the run the replay creates for it).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import LoggedModelStatus
from mlflow.tracking import MlflowClient

from cts.tracking.parents import (
    PARENT_TAG,
    end_parent,
    experiment_tags,
    find_or_create_parent,
    summarize,
)
from cts.tracking.store import (
    HTTP_SETTINGS,
    ensure_experiment,
    environment,
    log_batch,
    quiet_mlflow,
    store_lock,
    unreachable,
)

SPOOL_DIR = "mlflow-spool"


def apply(client: MlflowClient, record: Mapping[str, Any], folder: Path | None = None) -> Any:
    """Logs one record; file paths are relative to `folder` when the record comes from a
    spool. Returns what logging a model returned, else None."""

    def local(path: str) -> str:
        return str(folder / path) if folder is not None else path

    op, run_id = record["op"], record["run"]
    if op == "metrics":
        log_batch(client, run_id, record["metrics"])
    elif op == "params":
        log_batch(client, run_id, params=record["params"])
    elif op == "summary":
        summarize(client, run_id)
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
        end_parent(client, run_id, record["status"], record["end_time"])
    else:
        raise ValueError(f"unknown tracking record {op!r}")
    return None


def _open_kept_runs(client: MlflowClient, uri: str, start: Mapping) -> tuple[str, str]:
    """Creates the runs of a stage that started while its server did not answer, with the
    times, tags and values it had then; returns (child, parent)."""
    experiment = ensure_experiment(client, start["experiment"], uri, experiment_tags())
    with store_lock(uri):
        parent_id = find_or_create_parent(client, experiment, start)
    tags = {**start["tags"], PARENT_TAG: parent_id}
    child_id = client.create_run(
        experiment, start_time=start["start_time"], tags=tags, run_name=start["stage"]
    ).info.run_id
    log_batch(client, child_id, params=start["params"])
    return child_id, parent_id


class Spool:
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


def _new_metrics(
    client: MlflowClient,
    record: Mapping[str, Any],
    history: dict[tuple[str, str], set[tuple[int, int, float]]],
) -> list[tuple[str, float, int, int]]:
    """The rows of a metrics record that are not in its run's history yet (`history` caches
    the histories read so far)."""
    run_id, new = record["run"], []
    for key, value, ts, step in record["metrics"]:
        if (run_id, key) not in history:
            history[run_id, key] = {
                (m.step, m.timestamp, m.value) for m in client.get_metric_history(run_id, key)
            }
        if (step, ts, value) not in history[run_id, key]:
            new.append((key, value, ts, step))
    return new


def replay_file(client: MlflowClient, uri: str, path: Path) -> tuple[int, dict[str, str]]:
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
            if new := _new_metrics(client, record, history):
                apply(client, {**record, "metrics": new})
        elif record["op"] == "model" and _has_model(client, record["run"], record["name"]):
            pass  # logged before the progress of an earlier replay was saved
        else:
            apply(client, record, folder)
        logged += 1
        progress["applied"] = index + 1
        temporary = progress_file.with_suffix(".done.tmp")
        temporary.write_text(json.dumps(progress))
        os.replace(temporary, progress_file)
    return logged, runs


def _has_model(client: MlflowClient, run_id: str, name: str) -> bool:
    experiment = client.get_run(run_id).info.experiment_id
    found = client.search_logged_models(
        experiment_ids=[experiment],
        filter_string=f"source_run_id = '{run_id}' AND name = '{name}'",
    )
    return any(model.status == LoggedModelStatus.READY for model in found)


def remove_spool(path: Path) -> None:
    """Deletes a spool file, its copies and its progress."""
    shutil.rmtree(path.with_suffix(".files"), ignore_errors=True)
    _progress_path(path).unlink(missing_ok=True)
    path.unlink(missing_ok=True)


def kept_stage_runs(root: Path | None = None) -> list[Path]:
    """The spool files under `root` (default: the working directory), one per stage
    execution whose records are not all logged, oldest first."""
    return sorted(((root or Path.cwd()) / SPOOL_DIR).glob("*.jsonl"))


def _replay_one(path: Path, uri: str | None) -> int:
    """Logs what one spool file kept, unless its stage still runs, it is for another server
    than `uri`, or its server does not answer; removes the file once all is logged."""
    with open(path) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return 0  # its stage is still running
        records = _read_records(path)
        if not records:
            return 0
        target = records[0]["uri"]
        if (uri is not None and target != uri) or unreachable(target):
            return 0
        mlflow.set_tracking_uri(target)  # the model's logging reads it
        try:
            logged = replay_file(MlflowClient(target), target, path)[0]
        except Exception as error:
            if not unreachable(target):
                # Not the connection: say so and leave the file; the stage that replays
                # goes on, and the rest of the file waits for a fix.
                text = str(error).splitlines()[0] if str(error) else ""
                print(
                    f"mlflow: could not log the records kept in {path}: "
                    f"{type(error).__name__}: {text}",
                    file=sys.stderr,
                )
            return 0
        remove_spool(path)
    return logged


def replay_spool(uri: str | None = None, root: Path | None = None) -> int:
    """Logs what stages kept in the spool folder of `root` (default: the working directory)
    while their server did not answer, to `uri`'s server (default: each file's own server);
    returns how many records it logged.

    Files of stages still running are left; a server that does not answer keeps its files.
    """
    quiet_mlflow()
    with environment(HTTP_SETTINGS, override=False):
        return sum(_replay_one(path, uri) for path in kept_stage_runs(root))
