import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
from helpers import runs
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

import cts  # noqa: F401  (applies the torchvision import fix)
import cts.tracking
from cts.cli import app
from cts.tracking import (
    PipelineContext,
    active_run,
    log_artifact,
    log_json_metrics,
    log_metrics_file,
    parent_run_name,
    pipeline_key,
    replay_spool,
    stage_run,
    tracking_uri,
)
from cts_stages import mlflow_context
from cts_stages.mlflow_context import (
    pipeline_context,
    pipeline_name,
    project_tracking_uri,
    repo_root,
)

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

PARAMS = {"seed": 0, "sharing": {"num_tokens_shared": 103, "policy": "effnet"}}


pytestmark = pytest.mark.usefixtures("outside_dvc")


def test_repo_root_and_default_uri(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    (repo / ".dvc").mkdir(parents=True)
    (repo / ".git").mkdir()
    (repo / "stages").mkdir()
    copy = repo / ".dvc" / "tmp" / "exps" / "tmpa1b2c3"
    (copy / ".dvc").mkdir(parents=True)
    (copy / "stages").mkdir()

    assert repo_root(repo / "stages") == repo
    assert repo_root(copy) == repo
    assert repo_root(copy / "stages") == repo
    assert project_tracking_uri(start=copy / "stages") == f"sqlite:///{repo}/mlruns.db"
    assert pipeline_context(copy / "stages").root == repo
    assert tracking_uri(root=repo) == f"sqlite:///{repo}/mlruns.db"
    assert repo_root(tmp_path / "elsewhere") == tmp_path / "elsewhere"

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://localhost:5000")
    assert project_tracking_uri(start=copy) == "http://localhost:5000"
    assert project_tracking_uri("sqlite:///x.db", start=copy) == "sqlite:///x.db"
    assert tracking_uri(root=repo) == "http://localhost:5000"


def test_pipeline_key(tmp_path, monkeypatch):
    key = pipeline_key(PARAMS, tmp_path)
    assert key.startswith("nogit-")
    assert key == pipeline_key(json.loads(json.dumps(PARAMS)), tmp_path)
    assert key != pipeline_key({**PARAMS, "seed": 1}, tmp_path)

    assert pipeline_name() is None and pipeline_context(tmp_path).name is None

    # Inside `dvc exp run`, its experiment's name keys the parent, whatever the params.
    monkeypatch.setenv("DVC_EXP_NAME", "agley-rats")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "0" * 40)
    name = pipeline_context(tmp_path).name
    assert pipeline_key(PARAMS, tmp_path, name) == pipeline_key({"other": 1}, name=name)
    assert pipeline_key(PARAMS, tmp_path, name) == "agley-rats"

    # An orchestrator's run (the tasks of a Kubeflow pipeline run) wins over both.
    monkeypatch.setenv("CTS_PIPELINE_RUN", "cts-20261201-abc")
    name = pipeline_name()
    assert pipeline_key(PARAMS, tmp_path, name) == pipeline_key({"other": 1}, name=name)
    assert pipeline_key(PARAMS, tmp_path, name) == "cts-20261201-abc"
    assert parent_run_name(PARAMS, name, named=True) == "cts-20261201-abc"


def test_stages_share_one_parent(store, tmp_path):
    experiment = "shared_parent"
    with stage_run("train_policy", PARAMS, experiment, store):
        log_json_metrics({"loss": 0.5}, step=10)
        log_json_metrics({"accuracy": 0.9})
    results = tmp_path / "eval_ss.json"
    results.write_text(json.dumps({"mIoU": 45.1, "per_class": {"wall": 70.0}, "names": ["a"]}))
    with stage_run("eval_ss", PARAMS, experiment, store):
        log_metrics_file(results)

    (parent,), children = runs(store, experiment)
    assert [c.info.run_name for c in children] == ["train_policy", "eval_ss"]
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert parent.info.status == "FINISHED" and all(c.info.status == "FINISHED" for c in children)

    flat = {"seed": "0", "sharing.num_tokens_shared": "103", "sharing.policy": "effnet"}
    assert parent.data.params == flat and children[0].data.params == flat
    assert parent.data.metrics == {
        "train_policy.accuracy": 0.9,
        "eval_ss.mIoU": 45.1,
        "eval_ss.per_class.wall": 70.0,
    }
    # A result has one name on its stage run and on the parent.
    assert children[0].data.metrics == {"loss": 0.5, "train_policy.accuracy": 0.9}
    assert children[1].data.metrics == {"eval_ss.mIoU": 45.1, "eval_ss.per_class.wall": 70.0}
    artifacts = MlflowClient(store).list_artifacts(children[1].info.run_id)
    assert [a.path for a in artifacts] == ["eval_ss.json"]


def test_new_params_make_new_parent_seeded_with_upstream(store, tmp_path):
    experiment = "new_parent"
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"accuracy": 0.9, "precision": {"at_k": 0.8}}))
    with stage_run("train_policy", PARAMS, experiment, store):
        log_metrics_file(policy)
    shared_more = {**PARAMS, "sharing": {**PARAMS["sharing"], "num_tokens_shared": 200}}
    with stage_run("eval_ss", shared_more, experiment, store, [policy, tmp_path / "none.json"]):
        log_json_metrics({"mIoU": 44.0})

    parents, _ = runs(store, experiment)
    assert [p.data.params["sharing.num_tokens_shared"] for p in parents] == ["103", "200"]
    expected = {"policy.accuracy": 0.9, "policy.precision.at_k": 0.8}
    assert parents[0].data.metrics == expected
    assert parents[1].data.metrics == {**expected, "eval_ss.mIoU": 44.0}


def test_parent_name_is_readable_and_experiment_has_its_kind(store):
    experiment = "readable"
    params = {"backbone": "vit_tiny_patch16_384", "depth": 4, "num_tokens_shared": 103}
    with stage_run("train_segmenter", params, experiment, store):
        pass
    (parent,), _ = runs(store, experiment)
    commit, digest = parent.data.tags["cts.pipeline_key"].split("-")
    assert parent.info.run_name == f"vit_tiny_patch16_384 d4 K=103 {commit[:7]}-{digest[:6]}"
    kind = MlflowClient(store).get_experiment_by_name(experiment).tags["mlflow.experimentKind"]
    assert kind == "custom_model_development"
    none = {**params, "depth": None, "policy": "none"}
    assert parent_run_name(none, "abcdef0123456-0123456789ab") == (
        "vit_tiny_patch16_384 K=0 abcdef0-012345"
    )


def test_existing_experiment_gets_the_kind_tag(store):
    client = MlflowClient(store)
    client.create_experiment("older")
    with stage_run("eval_ss", PARAMS, "older", store):
        pass
    tags = client.get_experiment_by_name("older").tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"


def test_dvc_experiment_name_keys_the_parent(store, monkeypatch):
    experiment = "dvc_exp"
    monkeypatch.setenv("DVC_EXP_NAME", "urban-mink")
    monkeypatch.setattr(mlflow_context, "committed_params", lambda start=None: PARAMS)
    for stage in ("train_segmenter", "benchmark"):
        with stage_run(stage, PARAMS, experiment, store, context=pipeline_context()):
            pass
    (parent,), children = runs(store, experiment)
    assert parent.info.run_name == "urban-mink" and len(children) == 2
    assert parent.data.tags["cts.pipeline_key"] == "urban-mink"

    # The library reads no orchestrator's environment: the name comes with the context.
    with stage_run(
        "eval_ss", PARAMS, experiment, store, context=PipelineContext(name="urban-mink")
    ):
        pass
    with stage_run("eval_ss", PARAMS, experiment, store):
        pass
    parents, children = runs(store, experiment)
    assert [p.data.tags["cts.pipeline_key"] == "urban-mink" for p in parents] == [True, False]
    assert len(children) == 4


def test_exception_marks_runs_failed(store):
    experiment = "failing"
    with pytest.raises(ValueError, match="boom"):
        with stage_run("eval_ss", PARAMS, experiment, store):
            raise ValueError("boom")
    (parent,), (child,) = runs(store, experiment)
    assert child.info.status == "FAILED" and parent.info.status == "FAILED"
    assert mlflow.active_run() is None


def test_artifacts_live_next_to_the_store(store):
    with stage_run("any", PARAMS, "artifacts", store):
        pass
    location = MlflowClient(store).get_experiment_by_name("artifacts").artifact_location
    assert location == (Path(store.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()


def test_logging_outside_a_stage_logs_nothing_even_into_an_active_run(store, tmp_path):
    results = tmp_path / "eval_ss.json"
    results.write_text(json.dumps({"mIoU": 45.1}))
    client = MlflowClient(store)
    experiment_id = client.create_experiment("outside")
    mlflow.set_tracking_uri(store)
    try:
        with mlflow.start_run(experiment_id=experiment_id) as run:
            log_json_metrics({"mIoU": 1.0})
            log_json_metrics({"loss": 0.5}, step=3)
            log_metrics_file(results)
    finally:
        mlflow.set_tracking_uri(None)
    logged = client.get_run(run.info.run_id)
    assert logged.data.metrics == {} and client.list_artifacts(run.info.run_id) == []
    log_json_metrics({"mIoU": 1.0})  # no run at all: nothing to log to, and no error


# ------------------------------------------------- a tracking server that stops answering
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MlflowServer:
    """The real `mlflow server` on loopback (sqlite store, proxied artifacts), which a test
    kills (SIGKILL, its whole process group) and starts again on the same port and store."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = _free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 300) -> None:
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no job runner processes
        command = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port)]
        command += ["--backend-store-uri", f"sqlite:///{self.folder / 'server.db'}"]
        command += ["--artifacts-destination", str(self.folder / "artifacts"), "--workers", "1"]
        with open(self.folder / "server.log", "a") as log:
            self.process = subprocess.Popen(
                command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while True:
            assert self.process.poll() is None, (self.folder / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=5) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            assert time.monotonic() < deadline, f"mlflow server not up within {timeout} s"
            time.sleep(0.5)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=60)

    @property
    def up(self) -> bool:
        return self.process is not None and self.process.poll() is None


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("server"))
    yield server
    server.kill()


def _silent_port():
    """A port that accepts connections and never answers (a hung host)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    return listener


def _mlflow_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("mlflow:")]


@pytest.mark.parametrize("kind", ["refused", "silent"])
def test_an_unreachable_server_at_start_is_one_line_and_the_stage_goes_on(
    kind, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    listener = _silent_port() if kind == "silent" else None
    port = listener.getsockname()[1] if listener else _free_port()
    uri = f"http://127.0.0.1:{port}"
    results = tmp_path / "eval_ss.json"
    results.write_text(json.dumps({"mIoU": 45.1}))
    started = time.monotonic()
    try:
        with stage_run("eval_ss", PARAMS, "down", uri) as run:
            assert active_run() is run is not None  # stages check it before logging
            log_json_metrics({"loss": 0.5}, step=1)
            log_metrics_file(results)
            log_artifact(str(results), artifact_path="copies")
    finally:
        if listener:
            listener.close()
    seconds = time.monotonic() - started
    (line,) = _mlflow_lines(capsys.readouterr().err)
    assert uri in line and "sqlite:///" in line and "mlflow-spool" in line, line
    assert seconds < 15, seconds  # a probe of 5 s, not MLflow's minutes of retries
    assert mlflow.active_run() is None
    (kept,) = (tmp_path / "mlflow-spool").glob("*.jsonl")
    ops = [json.loads(line)["op"] for line in kept.read_text().splitlines()]
    results = ["metrics", "metrics", "summary"]  # on the stage run, on the parent, headline
    assert ops == [
        "header",
        "start",
        "metrics",
        *results,
        "artifact",
        "artifact",
        "end",
        "end_parent",
    ]
    # `cts replay` leaves what a server that does not answer would get, and says so.
    replayed = CliRunner().invoke(app, ["replay"])
    assert replayed.exit_code == 0, replayed.output
    assert replayed.output == "mlflow: logged 0 kept record(s); 1 stage run(s) still kept\n"
    assert kept.is_file()


def test_a_replay_cut_short_logs_nothing_twice(store, tmp_path):
    """Progress is saved after each record; were it lost (a replay killed between logging a
    record and saving), metrics already in the run's history are not logged again."""
    client = MlflowClient(store)
    run_id = client.create_run(client.create_experiment("replayed")).info.run_id
    spool = cts.tracking.spool.Spool(tmp_path / "spool", store, "train_segmenter")
    for step in (1, 2):
        metrics = [["loss", 1.0 / step, 1000 + step, step], ["lr", 0.1, 1000 + step, step]]
        spool.keep({"op": "metrics", "run": run_id, "metrics": metrics}, ())
    spool.keep({"op": "end", "run": run_id, "status": "FINISHED", "end_time": 5000}, ())
    spool.close()
    assert cts.tracking.spool.replay_file(client, store, spool.path)[0] == 3
    spool.path.with_suffix(".done").unlink()
    assert cts.tracking.spool.replay_file(client, store, spool.path)[0] == 3
    history = client.get_metric_history(run_id, "loss")
    assert [(m.step, m.value, m.timestamp) for m in history] == [(1, 1.0, 1001), (2, 0.5, 1002)]
    assert len(client.get_metric_history(run_id, "lr")) == 2
    run = client.get_run(run_id).info
    assert (run.status, run.end_time) == ("FINISHED", 5000)


MICRO = [
    "synthetic_num_train=6",
    "synthetic_num_val=2",
    "synthetic_image_size=128",
    "crop_size=128",
    "num_tokens_shared=4",
    "depth=1",
    "policy_iterations=3",
    "policy_batch_size=2",
    "iterations=4",
    "batch_size=2",
    "eval_every=2",
    "checkpoint_every=2",
    "warmup_iterations=1",
    "device=cpu",
    "num_workers=0",
    "mlflow_registered_model=cts-kill-test",
]


def _run_stage(stage: str, uri: str) -> dict:
    from cts_stages.params import load_params

    module = importlib.import_module(f"cts_stages.{stage}")
    overrides = [*MICRO, f"mlflow_tracking_uri={uri}"]
    params = load_params(REPO / "params.yaml", overrides, keys=module.PARAMS, stage=stage)
    module.run(params)
    return params


def test_a_server_lost_mid_run_loses_no_work_and_each_record_is_logged_once(
    server, tmp_path, monkeypatch, capsys
):
    import cts_stages.evaluation
    import cts_stages.train_segmenter

    repo = tmp_path / "repo"
    (repo / ".dvc").mkdir(parents=True)
    monkeypatch.chdir(repo)
    server.start()
    for stage in ("download", "preprocess", "train_policy"):
        _run_stage(stage, server.uri)
    capsys.readouterr()

    # The server dies at the first validation of training (step 2 of 4), before it is logged.
    logged = cts_stages.train_segmenter.log_training_row

    def killed_at_step_2(step, row):
        if step == 2 and server.up:
            server.kill()
        logged(step, row)

    monkeypatch.setattr(cts_stages.train_segmenter, "log_training_row", killed_at_step_2)
    started = time.monotonic()
    _run_stage("train_segmenter", server.uri)
    training_seconds = time.monotonic() - started
    assert not server.up and (repo / "checkpoints" / "segmenter.pt").is_file()
    assert (repo / "metrics" / "train.json").is_file()

    # eval_ss starts without its server, which comes back before its results are logged.
    monkeypatch.setattr(cts.tracking.session, "REPROBE_SECONDS", 0.0)
    log_results = cts_stages.evaluation.log_metrics_file

    def server_back_first(path, settings=()):
        server.start()
        log_results(path, settings)

    monkeypatch.setattr(cts_stages.evaluation, "log_metrics_file", server_back_first)
    _run_stage("eval_ss", server.uri)
    lines = _mlflow_lines(capsys.readouterr().err)
    assert (repo / "metrics" / "eval_ss.json").is_file()

    lost = [line for line in lines if f"lost {server.uri}" in line]
    down = [line for line in lines if f"{server.uri} does not answer" in line]
    back = [line for line in lines if "answers again" in line]
    assert len(lost) == len(down) == len(back) == 1, lines
    assert training_seconds < 120, training_seconds  # was ~9 minutes of retries, then exit 1

    def state() -> dict:
        client = MlflowClient(server.uri)
        experiment = client.get_experiment_by_name("cts")
        found = client.search_runs([experiment.experiment_id])
        (parent,) = [r for r in found if r.data.tags["cts.run_kind"] == "pipeline"]
        stages = {r.data.tags["cts.stage"]: r for r in found if r is not parent}
        histories = {
            (stage, key): [(m.step, m.value) for m in client.get_metric_history(r.info.run_id, key)]
            for stage, r in stages.items()
            for key in r.data.metrics
        }
        return {"parent": parent, "stages": stages, "histories": histories, "client": client}

    found = state()
    stages, histories, client = found["stages"], found["histories"], found["client"]
    assert len(found["stages"]) == 5 and sorted(stages) == sorted(
        ["download", "preprocess", "train_policy", "train_segmenter", "eval_ss"]
    )
    assert {r.info.status for r in stages.values()} == {"FINISHED"}
    assert found["parent"].info.status == "FINISHED"
    train = json.loads((repo / "metrics" / "train.json").read_text())
    evaluation = json.loads((repo / "metrics" / "eval_ss.json").read_text())
    # Validations at steps 2 and 4, the results at the last step: each once.
    assert [step for step, _ in histories["train_segmenter", "val_mIoU"]] == [2, 4]
    assert [step for step, _ in histories["train_segmenter", "loss"]] == [4]
    assert histories["train_segmenter", "train.final_loss"] == [(4, train["final_loss"])]
    assert histories["eval_ss", "eval_ss.mIoU"] == [(0, evaluation["mIoU"])]
    parent_metrics = found["parent"].data.metrics
    assert parent_metrics["train.final_loss"] == train["final_loss"]
    assert parent_metrics["eval_ss.mIoU"] == evaluation["mIoU"]
    train_id = stages["train_segmenter"].info.run_id
    assert {a.path for a in client.list_artifacts(train_id)} >= {"checkpoints", "train.json"}
    eval_artifacts = {a.path for a in client.list_artifacts(stages["eval_ss"].info.run_id)}
    assert eval_artifacts >= {"eval_ss.json", "per_class_iou_ss.csv", "eval_ss"}
    (version,) = client.search_model_versions("name = 'cts-kill-test'")
    assert version.run_id == train_id
    assert not list((repo / "mlflow-spool").glob("*.jsonl"))

    # Nothing is left to log, and nothing is logged twice.
    assert replay_spool() == 0
    again = state()
    assert again["histories"] == histories and len(again["stages"]) == 5
