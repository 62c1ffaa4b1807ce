"""The tracking store: its URI and artifact location, a lock per store, whether its server
answers, the HTTP settings a stage runs with, batch writes, and the UI's address."""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import requests
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

# The experiment's kind spares the MLflow 3 UI's "choose the experiment type" prompt. Which
# view an experiment opens in is not the tag's doing: MLflow 3.17 takes it from the sidebar's
# workflow switch (browser local storage, GenAI for a new browser) unless the address carries
# ?workflowType=machine_learning, as `ui_url` does.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = (EXPERIMENT_KIND_TAG, "custom_model_development")
# MLflow 3.17 keeps the runs table's columns in the browser's local storage; a new browser
# shows Source, Models and Dataset and no metric. A saved view (the UI's *Views* menu) is an
# experiment tag `mlflow.sharedViewState.<id>`, which an address with ?viewStateShareKey=<id>
# opens in any browser (unless the address also carries a search facet: searchFilter,
# orderByKey, ...). The pipeline's experiment holds one, the headline view (`ui_url`).
VIEW_TAG_PREFIX = "mlflow.sharedViewState."
HEADLINE_VIEW = "cts-headline"
UI_BASE = "http://127.0.0.1:5000"
# Reachability: how long a probe of the server waits. A probe costs nothing against a refused
# connection and at most its timeout against a silent host.
PROBE_TIMEOUT_SECONDS = 5.0
# MLflow's own defaults (7 retries with exponential backoff, 120 s per request) held a stage
# about 9 minutes per call once its server had died.
HTTP_SETTINGS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}
# For the one call that must go out while the server is known not to answer: MLflow's
# end_run forgets its active run, then tells the server.
FAIL_FAST = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "3"}


def tracking_uri(explicit: str | None = None, root: Path | None = None) -> str:
    """`explicit`, else $MLFLOW_TRACKING_URI, else `sqlite:///<root>/mlruns.db` (root default:
    the working directory)."""
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI")
    return uri or f"sqlite:///{(root or Path.cwd()).resolve() / 'mlruns.db'}"


def artifact_location(uri: str) -> str | None:
    """Artifacts of a sqlite store go next to its database file; servers choose their own."""
    if not uri.startswith("sqlite:///"):
        return None
    database = Path(uri.removeprefix("sqlite:///")).resolve()
    return (database.parent / "mlartifacts").as_uri()


def remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def quiet_mlflow() -> None:
    # The sqlite store announces its schema creation and every alembic migration at INFO.
    for name in ("alembic", "mlflow.store.db.utils"):
        logging.getLogger(name).setLevel(logging.WARNING)


def saved_view(name: str, state: Mapping[str, Any], now: int) -> str:
    """A saved view's tag value as MLflow's UI writes one: an envelope whose `state` is the
    JSON of the runs page's state (a key it lacks keeps MLflow's default)."""
    envelope = {"name": name, "createdAt": now, "updatedAt": now, "state": json.dumps(state)}
    return json.dumps(envelope)


def column(kind: str, key: str) -> str:
    """The id of a runs-table column: `kind` attributes, params, metrics or tags."""
    return f"{kind}.`{key}`"


def ensure_experiment(
    client: MlflowClient, name: str, uri: str, tags: Mapping[str, str] | None = None
) -> str:
    """The experiment's id, created with its artifact location, kind and `tags` if it is new;
    an existing one gets those it lacks (one it holds is kept, whatever its value)."""
    tags = {**dict([EXPERIMENT_KIND]), **(tags or {})}
    # MLflow would put artifacts under the cwd, which for a stage run in a temporary copy of
    # the repository is deleted.
    if experiment := client.get_experiment_by_name(name):
        for key, value in tags.items():
            if key not in experiment.tags:
                client.set_experiment_tag(experiment.experiment_id, key, value)
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location(uri), tags=tags)
    except MlflowException:  # created concurrently by another stage process
        return client.get_experiment_by_name(name).experiment_id


@contextmanager
def store_lock(uri: str) -> Iterator[None]:
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
def environment(values: Mapping[str, str], override: bool) -> Iterator[None]:
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


def now_ms() -> int:
    return int(time.time() * 1000)


def log_batch(
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


def ui_url(base: str = UI_BASE, experiment: str = "cts", uri: str | None = None) -> str:
    """The MLflow UI address of the experiment's runs table (MLflow 3's model-training view,
    with the registry in its sidebar), whatever view the browser used last, in the headline
    view when the experiment holds it; the experiments list when the store or the experiment
    does not exist yet."""
    uri = tracking_uri(uri)
    if uri.startswith("sqlite:///"):
        available = Path(uri.removeprefix("sqlite:///")).is_file()  # not created by asking
    else:
        available = not (remote(uri) and unreachable(uri))
    found = None
    if available:
        quiet_mlflow()
        with environment(HTTP_SETTINGS if remote(uri) else {}, override=False):
            found = MlflowClient(uri).get_experiment_by_name(experiment)
    page = f"experiments/{found.experiment_id}/runs" if found else "experiments"
    view = ""
    if found and f"{VIEW_TAG_PREFIX}{HEADLINE_VIEW}" in found.tags:
        view = f"viewStateShareKey={HEADLINE_VIEW}&"
    return f"{base.rstrip('/')}/#/{page}?{view}workflowType=machine_learning"
