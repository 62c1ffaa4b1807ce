import json
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

import cts  # noqa: F401  (applies the torchvision import fix)
from cts.tracking import (
    log_json_metrics,
    log_metrics_file,
    parent_run_name,
    pipeline_key,
    repo_root,
    stage_run,
    tracking_uri,
)

PARAMS = {"seed": 0, "sharing": {"num_tokens_shared": 103, "policy": "effnet"}}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One sqlite store for the module: creating its schema takes seconds."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlruns.db'}"


@pytest.fixture(autouse=True)
def outside_dvc(monkeypatch):
    for name in ("DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)


def runs(store: str, experiment: str) -> tuple[list, list]:
    """(parents, children) of an experiment, oldest first."""
    client = MlflowClient(store)
    found = client.search_runs(
        [client.get_experiment_by_name(experiment).experiment_id],
        order_by=["attributes.start_time ASC"],
    )
    parents = [r for r in found if "mlflow.parentRunId" not in r.data.tags]
    return parents, [r for r in found if "mlflow.parentRunId" in r.data.tags]


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
    assert tracking_uri(start=copy / "stages") == f"sqlite:///{repo}/mlruns.db"
    assert repo_root(tmp_path / "elsewhere") == tmp_path / "elsewhere"

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://localhost:5000")
    assert tracking_uri(start=copy) == "http://localhost:5000"
    assert tracking_uri("sqlite:///x.db", start=copy) == "sqlite:///x.db"


def test_pipeline_key(tmp_path, monkeypatch):
    key = pipeline_key(PARAMS, tmp_path)
    assert key.startswith("nogit-")
    assert key == pipeline_key(json.loads(json.dumps(PARAMS)), tmp_path)
    assert key != pipeline_key({**PARAMS, "seed": 1}, tmp_path)

    monkeypatch.setenv("DVC_EXP_NAME", "agley-rats")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "0" * 40)
    assert pipeline_key(PARAMS, tmp_path) == pipeline_key({"other": 1}) == "agley-rats"


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
    assert children[0].data.metrics == {"loss": 0.5, "accuracy": 0.9}
    assert children[1].data.metrics == {"mIoU": 45.1, "per_class.wall": 70.0}
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


def test_parent_name_is_readable_and_experiment_opens_in_model_training_view(store):
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
    for stage in ("train_segmenter", "benchmark"):
        with stage_run(stage, PARAMS, experiment, store):
            pass
    (parent,), children = runs(store, experiment)
    assert parent.info.run_name == "urban-mink" and len(children) == 2
    assert parent.data.tags["cts.pipeline_key"] == "urban-mink"


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


def test_logging_outside_a_stage_is_a_no_op(tmp_path):
    log_json_metrics({"mIoU": 1.0})
    assert mlflow.active_run() is None
