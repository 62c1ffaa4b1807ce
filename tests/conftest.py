"""Shared fixtures: a local HTTP file server (127.0.0.1 only), a tiny synthetic dataset, MLflow
stores, the micro pipeline after `dvc repro` (built once per session) and the weights two
simulated nodes on loopback must train."""

from __future__ import annotations

import fcntl
import os
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from helpers import LOOPBACK_PARAMS as LOOPBACK
from helpers import (
    MICRO,
    REPO,
    Pipeline,
    build_pipeline,
    copy_pipeline,
    pipeline_env,
    train_nodes,
    trained_weights,
)

from cts.cli.common import use_checkout_stages

# In-process tests run this checkout's stages (cts_stages), whichever checkout the venv's
# editable install points at.
use_checkout_stages(REPO)


@dataclass
class FileServer:
    """Serves ``files`` (name -> bytes) at ``url``; supports ``Range: bytes=N-``. With
    ``drop_after`` set, the first GET sends the full headers but only that many bytes
    before closing the connection. ``requests`` records (path, Range header) per GET."""

    url: str = ""
    files: dict[str, bytes] = field(default_factory=dict)
    drop_after: int | None = None
    requests: list[tuple[str, str | None]] = field(default_factory=list)


def _handler(state: FileServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server API)
            name = self.path.lstrip("/")
            state.requests.append((name, self.headers.get("Range")))
            if name not in state.files:
                self.send_error(404)
                return
            data = state.files[name]
            start = 0
            if self.headers.get("Range"):
                start = int(self.headers["Range"].removeprefix("bytes=").rstrip("-"))
                if start >= len(data):
                    self.send_error(416)
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(len(data) - start))
            self.end_headers()
            body = data[start:]
            if state.drop_after is not None and len(state.requests) == 1:
                body = body[: state.drop_after]
                self.close_connection = True
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    return Handler


@pytest.fixture
def file_server():
    state = FileServer()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="session")
def tiny_synthetic(tmp_path_factory) -> Path:
    """4 train + 2 val synthetic scenes of 128x128 (read-only: copy before breaking it)."""
    from cts.data.synthetic import generate_scene_dataset

    root = tmp_path_factory.mktemp("synthetic") / "tiny"
    generate_scene_dataset(root, num_train=4, num_val=2, image_size=128, workers=1)
    return root


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """An MLflow sqlite store, one per test module: creating its schema takes seconds."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlruns.db'}"


@pytest.fixture
def outside_dvc(monkeypatch) -> None:
    """No DVC experiment, MLflow URI or pipeline run name from the environment the tests run
    in (`dvc exp run` may be running them)."""
    for name in ("DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "MLFLOW_TRACKING_URI", "CTS_PIPELINE_RUN"):
        monkeypatch.delenv(name, raising=False)


def _built_once(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """The folder ``name`` that ``build`` filled, shared by the session's pytest workers: the
    first that asks builds it, the others wait for it (a lock) and read the same folder. A
    build that failed leaves no mark: the next worker that asks builds it afresh."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # every worker's base folder lies in the session's
    folder, done = root / name, root / f"{name}.built"
    with (root / f"{name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def micro_pipeline(tmp_path_factory) -> Pipeline:
    """A copy of the repository on the MICRO params after the real `dvc repro`, built once
    per session (minutes) for all workers. Read-only: a test that writes in it takes
    ``micro_pipeline_copy``."""

    def build(folder: Path) -> None:
        pipeline = build_pipeline(folder / "repo", MICRO, pipeline_env())
        (folder / "repro.txt").write_text(pipeline.output)

    folder = _built_once(tmp_path_factory, "micro-pipeline", build)
    output = (folder / "repro.txt").read_text()
    return Pipeline(folder / "repo", pipeline_env(), folder / "mlruns.db", output)


@pytest.fixture
def micro_pipeline_copy(micro_pipeline, tmp_path) -> Pipeline:
    """A copy of the built micro pipeline (repository, DVC cache and MLflow store) of this
    test's own."""
    return copy_pipeline(micro_pipeline, tmp_path)


@pytest.fixture(scope="session")
def loopback_job(tmp_path_factory, tiny_synthetic):
    """A factory of job folders (the shared file system of simulated nodes), each with a
    params file of the tiny loopback run on ``tiny_synthetic``; one MLflow store for all."""
    store = tmp_path_factory.mktemp("loopback-mlflow") / "mlruns.db"

    def make(name: str) -> Path:
        folder = tmp_path_factory.mktemp(name)
        params = yaml.safe_load((REPO / "params.yaml").read_text())
        params.update(
            LOOPBACK, data_root=str(tiny_synthetic), mlflow_tracking_uri=f"sqlite:///{store}"
        )
        (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        return folder

    return make


@pytest.fixture(scope="session")
def loopback_reference(loopback_job, tmp_path_factory) -> dict:
    """The weights of `nproc_per_node: 2` on one machine, which every two-node job on
    loopback must train (to rounding); trained once per session for all workers."""

    def train(folder: Path) -> None:
        job = loopback_job("reference")
        (result,) = train_nodes(job, [{}], "--no-resume", "--set", "nproc_per_node=2")
        assert result[0] == 0, (result[1] + result[2])[-3000:]
        shutil.copytree(job / "checkpoints", folder / "checkpoints")

    return trained_weights(_built_once(tmp_path_factory, "loopback-reference", train))
