"""The parent run of a pipeline execution: found or created (seeded with the upstream
results it lacks), its life (RUNNING while a stage runs, the status and end of its latest
stage, runs of killed stages closed), and its headline (the description of the parent and
of the model version one of its stages registered)."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Mapping

from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from cts.processes import pid_alive, process_start
from cts.tracking.store import (
    HEADLINE_VIEW,
    VIEW_TAG_PREFIX,
    column,
    log_batch,
    now_ms,
    saved_view,
)

KEY_TAG = "cts.pipeline_key"
KIND_TAG = "cts.run_kind"
STAGE_TAG = "cts.stage"
PARENT_TAG = "mlflow.parentRunId"
PROCESS_TAG = "cts.process"
COMMIT_TAG = "cts.git_commit"
NOTE_TAG = "mlflow.note.content"  # a run's description in the MLflow UI
# The figures a pipeline execution is judged by: (parent metric, label, format).
HEADLINE = (
    ("eval_ss.mIoU", "eval_ss mIoU", "{:.2f}"),
    ("eval_ms.mIoU", "eval_ms mIoU", "{:.2f}"),
    ("benchmark.speedup", "speed-up", "{:.2f}x"),
    ("benchmark.tokens", "tokens", "{:.0f}"),
)


def experiment_tags() -> dict[str, str]:
    """What the pipeline's experiment holds besides its kind: the headline view, whose runs
    table shows the headline figures in any browser (MLflow orders them by name)."""
    columns = [column("metrics", key) for key, _, _ in HEADLINE]
    name = "cts headline: mIoU, speed-up, tokens"
    view = saved_view(name, {"selectedColumns": columns}, now_ms())
    return {f"{VIEW_TAG_PREFIX}{HEADLINE_VIEW}": view}


def this_process() -> str:
    """This process as a `cts.process` tag: host, pid, start time."""
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


def _find_parent(client: MlflowClient, experiment_id: str, key: str) -> str | None:
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{KEY_TAG}` = '{key}' and tags.`{KIND_TAG}` = 'pipeline'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def close_stale_runs(client: MlflowClient, experiment_id: str) -> list[str]:
    """Mark FAILED the RUNNING runs whose process is gone (SIGKILL, power loss), whatever
    their pipeline key; returns their ids. Runs without a process tag or of another host
    are left: nothing tells whether they still run."""
    running = client.search_runs(
        [experiment_id],
        filter_string=f"attributes.status = 'RUNNING' and tags.`{PROCESS_TAG}` != ''",
        max_results=10_000,
    )
    stale = [
        run.info.run_id
        for run in running
        if PROCESS_TAG in run.data.tags and not _is_alive(run.data.tags[PROCESS_TAG])
    ]
    for run_id in stale:
        client.set_terminated(run_id, "FAILED")
    if stale:
        print(
            f"mlflow: marked {len(stale)} run(s) of a killed earlier execution FAILED",
            file=sys.stderr,
        )
    return stale


def _stage_running(client: MlflowClient, parent: Run) -> bool:
    """Whether a stage run of `parent` runs (its process lives: a SIGKILLed one does not)."""
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=(
            f"tags.`{PARENT_TAG}` = '{parent.info.run_id}' and attributes.status = 'RUNNING'"
        ),
    )
    return any(_is_alive(child.data.tags.get(PROCESS_TAG, "")) for child in children)


def end_parent(
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
    end_time = max(end_time or now_ms(), parent.info.end_time or 0)
    client.set_terminated(parent_id, status, end_time)


def find_or_create_parent(client: MlflowClient, experiment_id: str, start: Mapping) -> str:
    """The pipeline's parent run (see the package doc), RUNNING from now on, with the
    upstream stages' results it lacks; a new one also gets the params. `start` is the stage's
    start record (see `cts.tracking.session`). The caller holds the store lock."""
    upstream = start["upstream"]
    if parent_id := _find_parent(client, experiment_id, start["key"]):
        held = client.get_run(parent_id).data.metrics
        upstream = {key: value for key, value in upstream.items() if key not in held}
        params = None
        # The process that holds it RUNNING: close_stale_runs ends it if that one dies.
        client.set_tag(parent_id, PROCESS_TAG, this_process())
        client.update_run(parent_id, "RUNNING")
    else:
        tags = {KEY_TAG: start["key"], KIND_TAG: "pipeline", PROCESS_TAG: this_process()}
        if start.get("commit"):
            tags[COMMIT_TAG] = start["commit"]
        parent_id = client.create_run(
            experiment_id, start_time=start["start_time"], tags=tags, run_name=start["parent_name"]
        ).info.run_id
        params = start["params"]
    rows = [(key, value, start["start_time"], 0) for key, value in upstream.items()]
    log_batch(client, parent_id, rows, params)
    summarize(client, parent_id)
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
    if COMMIT_TAG in tags:
        found["git_commit"] = tags[COMMIT_TAG]
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


def summarize(client: MlflowClient, parent_id: str) -> None:
    """The parent's headline as its description (the first thing on its page), and as the
    tags and description of the newest model version one of its stages registered."""
    parent = client.get_run(parent_id)
    headline = _headline(parent)
    text = _summary(headline)
    client.set_tag(parent_id, NOTE_TAG, text)
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'"
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
