"""What users see in the MLflow UI: parents with only their own execution's figures, their
life, their names and headline, chart steps, settings as params, the registry's versions,
the UI's address; and the validation curve DVC plots."""

import contextlib
import importlib
import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import mlflow
import pytest
import yaml
from helpers import MICRO as PIPELINE_MICRO
from helpers import REPO, runs
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

import cts  # noqa: F401  (applies the torchvision import fix)
import cts.tracking
from cts.cli import app
from cts.tracking import (
    changed_params,
    log_json_metrics,
    log_metrics_file,
    parent_run_name,
    stage_run,
    ui_url,
)
from cts_stages.common import STAGE_METRICS, STAGE_SETTINGS
from cts_stages.dvc_file import upstream_stages
from cts_stages.mlflow_context import committed_params, pipeline_context, upstream_stage_metrics

pytestmark = pytest.mark.usefixtures("outside_dvc")

PARAMS = {"seed": 0, "num_tokens_shared": 103, "policy": "policy_net"}


def _git(repo: Path, *args: str) -> str:
    identity = ["-c", "user.name=t", "-c", "user.email=t@t"]
    result = subprocess.run(["git", *identity, *args], cwd=repo, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


# ------------------------------------------------------------------ which results a parent gets
def test_upstream_stages_follow_the_pipeline_file(tmp_path):
    assert upstream_stages("download") == []
    assert upstream_stages("train_segmenter") == ["download", "preprocess", "train_policy"]
    for stage in ("eval_ss", "eval_ms", "benchmark", "sweep"):
        assert upstream_stages(stage) == [
            "download",
            "preprocess",
            "train_policy",
            "train_segmenter",
        ]
    # Not the results of the stages beside or after it: those rerun or are not its inputs.
    upstream = upstream_stage_metrics("eval_ms")
    assert list(upstream) == [
        STAGE_METRICS[name] for name in ("preprocess", "train_policy", "train_segmenter")
    ]
    assert upstream[STAGE_METRICS["train_policy"]] == STAGE_SETTINGS["train_policy"]
    pipeline = tmp_path / "dvc.yaml"
    pipeline.write_text(
        yaml.safe_dump(
            {
                "stages": {
                    "make": {"cmd": "x", "outs": [{"${root}/data": {"cache": False}}]},
                    "side": {"cmd": "x", "outs": ["side.bin"]},
                    "use": {"cmd": "x", "deps": ["${root}/data/a.csv"], "metrics": ["m.json"]},
                    "last": {"cmd": "x", "deps": ["m.json", "src"]},
                }
            }
        )
    )
    assert upstream_stages("last", pipeline) == ["make", "use"]
    with pytest.raises(KeyError, match="no stage 'nope'"):
        upstream_stages("nope", pipeline)


def test_a_parent_holds_the_upstream_results_it_lacks_and_no_others(store, tmp_path):
    experiment = "seeding"
    policy, train = tmp_path / "policy.json", tmp_path / "train.json"
    policy.write_text(json.dumps({"accuracy": 0.9, "iterations": 150}))
    train.write_text(json.dumps({"final_loss": 0.4}))
    upstream = {policy: ("iterations",)}  # a setting, not a result
    with stage_run("train_segmenter", PARAMS, experiment, store, upstream):
        pass
    (parent,), _ = runs(store, experiment)
    assert parent.data.metrics == {"policy.accuracy": 0.9}
    with stage_run("eval_ss", PARAMS, experiment, store, {**upstream, train: ()}):
        pass
    (parent,), _ = runs(store, experiment)
    assert parent.data.metrics == {"policy.accuracy": 0.9, "train.final_loss": 0.4}
    history = MlflowClient(store).get_metric_history(parent.info.run_id, "policy.accuracy")
    assert len(history) == 1  # what it held is not logged again


# ----------------------------------------------------------------------- the parent's life
def test_a_parent_runs_while_its_stages_run_and_ends_with_the_last(store):
    experiment = "life"
    client = MlflowClient(store)
    with stage_run("train_policy", PARAMS, experiment, store):
        pass
    (parent,), (first,) = runs(store, experiment)
    assert parent.info.status == "FINISHED" and parent.info.end_time == first.info.end_time
    with stage_run("eval_ss", PARAMS, experiment, store):
        assert client.get_run(parent.info.run_id).info.status == "RUNNING"
    (parent,), (_, second) = runs(store, experiment)
    assert parent.info.status == "FINISHED"
    assert parent.info.start_time <= first.info.start_time
    assert parent.info.end_time == second.info.end_time > first.info.end_time

    with pytest.raises(ValueError, match="boom"):
        with stage_run("benchmark", PARAMS, experiment, store):
            raise ValueError("boom")
    (parent,), children = runs(store, experiment)
    assert parent.info.status == "FAILED" and parent.info.end_time == children[-1].info.end_time

    with pytest.raises(KeyboardInterrupt):
        with stage_run("benchmark", PARAMS, experiment, store):
            assert client.get_run(parent.info.run_id).info.status == "RUNNING"
            raise KeyboardInterrupt
    (parent,), _ = runs(store, experiment)
    assert parent.info.status == "KILLED"


def _stage_until(store: str, experiment: str, started, release) -> None:
    with stage_run("eval_ss", PARAMS, experiment, store):
        started.set()
        release.wait(120)


def test_a_stage_ending_beside_a_running_one_leaves_the_parent_running(store):
    experiment = "beside"
    with stage_run("train_segmenter", PARAMS, experiment, store):  # the parent exists
        pass
    context = multiprocessing.get_context("fork")
    started, release = context.Event(), context.Event()
    other = context.Process(target=_stage_until, args=(store, experiment, started, release))
    other.start()
    try:
        assert started.wait(120)
        with stage_run("eval_ms", PARAMS, experiment, store):
            pass
        (parent,), _ = runs(store, experiment)
        assert parent.info.status == "RUNNING"
    finally:
        release.set()
        other.join(120)
    assert other.exitcode == 0
    (parent,), children = runs(store, experiment)
    assert parent.info.status == "FINISHED"
    assert parent.info.end_time == max(child.info.end_time for child in children)


# ------------------------------------------------------------------- chart steps and settings
def test_results_go_at_the_last_step_under_one_name_settings_as_params(store, tmp_path):
    experiment = "charts"
    results = tmp_path / "train.json"
    results.write_text(json.dumps({"val_mIoU": 30.0, "final_loss": 0.5, "iterations": 4}))
    with stage_run("train_segmenter", PARAMS, experiment, store):
        for step, value in ((2, 10.0), (4, 30.0)):
            log_json_metrics({"loss": 1.0 / step, "val_mIoU": value}, step=step)
        log_metrics_file(results, settings=("iterations",))
    (parent,), (child,) = runs(store, experiment)
    client = MlflowClient(store)

    def steps(run, key):
        return [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]

    assert steps(child, "val_mIoU") == [(2, 10.0), (4, 30.0)]  # no point back at step 0
    assert steps(child, "train.val_mIoU") == [(4, 30.0)]
    assert steps(child, "train.final_loss") == [(4, 0.5)]
    assert set(child.data.metrics) == {"loss", "val_mIoU", "train.val_mIoU", "train.final_loss"}
    assert set(parent.data.metrics) == {"train.val_mIoU", "train.final_loss"}
    assert child.data.params["train.iterations"] == "4"
    assert "train.iterations" not in parent.data.params


# ------------------------------------------------------------------------------------ names
def test_changed_params_and_names():
    committed = {"num_tokens_shared": 103, "lr": "3e-4", "seed": 0, "ms_scales": [1.0]}
    params = {"num_tokens_shared": 0, "lr": 0.0003, "seed": 0, "ms_scales": [1.0, 1.25]}
    assert changed_params(params, committed) == ["K=0", "ms_scales=[1.0, 1.25]"]
    assert changed_params({**params, "new": 1.5}, committed)[-1] == "new=1.5"
    many = {f"p{i}": i for i in range(6)}
    name = parent_run_name(
        {"backbone": "vit", "num_tokens_shared": 8, **many}, "abcdef01-2345678", {}
    )
    assert name == "vit K=8 abcdef0-234567 p0=0 p1=1 p2=2 p3=3 +2 more"


def test_a_dvc_experiment_parent_is_named_after_what_differs(store, tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    _git(repo, "add", "params.yaml")
    _git(repo, "commit", "-q", "-m", "params")
    baseline = _git(repo, "rev-parse", "HEAD")
    (repo / "params.yaml").write_text("seed: 1\n")  # the workspace is not what is compared
    monkeypatch.chdir(repo)
    assert committed_params() == PARAMS
    monkeypatch.setenv("DVC_EXP_NAME", "dusky-sick")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", baseline)
    changed = {**PARAMS, "num_tokens_shared": 0}
    with stage_run("train_segmenter", changed, "named", store, context=pipeline_context()):
        pass
    monkeypatch.setenv("DVC_EXP_NAME", "agley-rats")
    with stage_run("train_segmenter", PARAMS, "named", store, context=pipeline_context()):
        pass
    parents, _ = runs(store, "named")
    assert [p.info.run_name for p in parents] == ["dusky-sick K=0", "agley-rats"]
    assert parents[0].data.tags["cts.git_commit"] == baseline


# ---------------------------------------------------------------------- headline and registry
def test_the_parent_description_holds_the_headline_known_so_far(store, tmp_path):
    experiment = "headline"
    params = {**PARAMS, "backbone": "vit_tiny_patch16_384", "depth": 4}
    evaluation, benchmark = tmp_path / "eval_ss.json", tmp_path / "benchmark.json"
    evaluation.write_text(json.dumps({"mIoU": 45.594}))
    benchmark.write_text(json.dumps({"speedup": 1.527, "tokens": 715, "batch_size": 4}))
    with stage_run("eval_ss", params, experiment, store):
        log_metrics_file(evaluation)
    (parent,), _ = runs(store, experiment)
    note = parent.data.tags["mlflow.note.content"]
    assert note.startswith("K=103 · vit_tiny_patch16_384 d4 · eval_ss mIoU 45.59 · ")
    assert "speed-up" not in note and "tokens" not in note
    with stage_run("benchmark", params, experiment, store):
        log_metrics_file(benchmark, settings=("batch_size",))
    (parent,), _ = runs(store, experiment)
    note = parent.data.tags["mlflow.note.content"]
    assert note.startswith("K=103 · 715 tokens · vit_tiny_patch16_384 d4 · eval_ss mIoU 45.59")
    assert "speed-up 1.53x" in note and note.endswith(f"run {parent.info.run_name}")


# ---------------------------------------------------------------- an experiment failing midway
MICRO = {**PIPELINE_MICRO, "num_workers": 0, "mlflow_registered_model": "cts-ui-test"}


def _run_stage(stage: str, repo: Path, overrides: tuple[str, ...] = ()) -> None:
    from cts_stages.params import load_params

    module = importlib.import_module(f"cts_stages.{stage}")
    params = load_params(repo / "params.yaml", overrides, keys=module.PARAMS, stage=stage)
    module.run(params)


@pytest.mark.e2e
def test_an_experiment_failing_midway_shows_only_its_own_numbers(store, tmp_path, monkeypatch):
    """`make run`, then `dvc exp run -S num_tokens_shared=0` whose training fails: the new
    parent holds the reused upstream results and nothing of the first execution's training,
    evaluation or benchmark; the registry's version tells what it is."""
    import cts_stages.train_segmenter

    repo = tmp_path / "repo"
    (repo / ".dvc").mkdir(parents=True)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params.update(MICRO, mlflow_tracking_uri=store)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _git(repo, "init", "-q")
    _git(repo, "add", "params.yaml")
    _git(repo, "commit", "-q", "-m", "micro")
    commit = _git(repo, "rev-parse", "HEAD")
    monkeypatch.chdir(repo)
    for stage in ("download", "preprocess", "train_policy", "train_segmenter", "eval_ss"):
        _run_stage(stage, repo)
    _run_stage("benchmark", repo)

    def fails_at_step_2(step, row):
        if step == 2:
            raise RuntimeError("out of memory")

    monkeypatch.setenv("DVC_EXP_NAME", "dusky-sick")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", commit)
    monkeypatch.setattr(cts_stages.train_segmenter, "log_training_row", fails_at_step_2)
    with pytest.raises(RuntimeError, match="out of memory"):
        _run_stage("train_segmenter", repo, ("num_tokens_shared=0",))

    client = MlflowClient(store)
    (first, failed), children = runs(store, "cts")
    assert failed.info.run_name == "dusky-sick K=0"
    assert failed.info.status == "FAILED"
    assert {key.split(".")[0] for key in failed.data.metrics} == {"dataset", "policy"}
    assert "mIoU" not in failed.data.tags["mlflow.note.content"]

    # The first execution: every figure, a life from its first stage's start to its last's end.
    own = [c for c in children if c.data.tags["mlflow.parentRunId"] == first.info.run_id]
    assert first.info.run_name.startswith("vit_tiny_patch16_384 d1 K=4 ")
    assert first.info.status == "FINISHED"
    assert first.info.start_time <= min(c.info.start_time for c in own)
    assert first.info.end_time == max(c.info.end_time for c in own)
    prefixes = {key.split(".")[0] for key in first.data.metrics}
    assert prefixes == {"dataset", "policy", "train", "eval_ss", "benchmark"}
    stage = {c.data.tags["cts.stage"]: c for c in own}
    # Settings are params of their stage run, not metrics; one name per figure and curve.
    for key in ("benchmark.batch_size", "benchmark.image_size", "train.iterations", "policy.k"):
        assert key not in first.data.metrics, key
    assert stage["benchmark"].data.params["benchmark.batch_size"] == "1"
    assert stage["train_policy"].data.params["policy.iterations"] == "3"
    assert "loss" in stage["train_policy"].data.metrics
    assert not {"train_loss", "accuracy"} & set(stage["train_policy"].data.metrics)
    history = client.get_metric_history(stage["train_segmenter"].info.run_id, "val_mIoU")
    assert [m.step for m in history] == [2, 4]

    (version,) = client.search_model_versions("name = 'cts-ui-test'")
    assert version.run_id == stage["train_segmenter"].info.run_id
    metrics = first.data.metrics
    assert version.tags == {
        "K": "4",
        "tokens": f"{metrics['benchmark.tokens']:.0f}",
        "backbone": "vit_tiny_patch16_384",
        "depth": "1",
        "eval_ss.mIoU": f"{metrics['eval_ss.mIoU']:.2f}",
        "benchmark.speedup": f"{metrics['benchmark.speedup']:.2f}",
        "git_commit": commit,
        "pipeline_run": first.info.run_name,
        "pipeline_run_id": first.info.run_id,
    }
    assert version.description == first.data.tags["mlflow.note.content"]
    assert version.description.startswith(f"K=4 · {metrics['benchmark.tokens']:.0f} tokens · ")
    curve = (repo / "plots" / "val_miou.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in curve] == ["step", "2", "4"]


# ----------------------------------------------------------------------------- the UI address
def test_ui_url_opens_the_runs_table_in_the_model_training_view(store, tmp_path):
    experiment_id = MlflowClient(store).create_experiment("addressed")
    url = ui_url("http://127.0.0.1:5000/", "addressed", store)
    assert url == (
        f"http://127.0.0.1:5000/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    )
    missing = f"sqlite:///{tmp_path / 'none.db'}"
    assert ui_url(uri=missing).endswith("/#/experiments?workflowType=machine_learning")
    assert not (tmp_path / "none.db").exists()
    # `cts ui`, as `make run` prints it: the store the stages log to.
    printed = subprocess.run(
        [
            sys.executable,
            "-m",
            "cts.cli",
            "ui",
            "--base",
            "http://h:1",
            "--experiment",
            "addressed",
        ],
        cwd=REPO,
        env={**os.environ, "MLFLOW_TRACKING_URI": store},
        capture_output=True,
        text=True,
        check=True,
    )
    assert printed.stdout.strip() == url.replace("http://127.0.0.1:5000", "http://h:1")
    shown = CliRunner().invoke(
        app,
        ["ui", "--experiment", "addressed", "--params", str(REPO / "params.yaml")]
        + ["--set", f"mlflow_tracking_uri={store}"],
    )
    assert shown.exit_code == 0, shown.output
    assert shown.output.strip() == url


def test_the_ui_address_opens_a_view_that_shows_the_headline_figures(store):
    """MLflow 3.17 keeps the runs table's columns in the browser: a new one shows no metric.
    The experiment holds a saved view (the UI's *Views* menu) whose columns are the headline
    figures, and the address opens it."""
    experiment = "viewed"
    with stage_run("eval_ss", PARAMS, experiment, store):
        log_json_metrics({"mIoU": 45.6})
    url = ui_url("http://h:1", experiment, store)
    page, query = urlsplit(url).fragment.split("?")
    query = parse_qs(query)
    experiment_id = MlflowClient(store).get_experiment_by_name(experiment).experiment_id
    assert page == f"/experiments/{experiment_id}/runs"
    assert query["workflowType"] == ["machine_learning"]
    # A search facet in the address (searchFilter, orderByKey, ...) would make MLflow ignore it.
    assert set(query) == {"workflowType", "viewStateShareKey"}
    (key,) = query["viewStateShareKey"]
    tag = f"mlflow.sharedViewState.{key}"
    view = MlflowClient(store).get_experiment(experiment_id).tags[tag]
    envelope = json.loads(view)  # as MLflow's UI writes one
    assert isinstance(envelope["name"], str) and isinstance(envelope["createdAt"], int)
    columns = json.loads(envelope["state"])["selectedColumns"]
    headline = [f"metrics.`{key}`" for key, _, _ in cts.tracking.HEADLINE]
    assert headline == [
        "metrics.`eval_ss.mIoU`",
        "metrics.`eval_ms.mIoU`",
        "metrics.`benchmark.speedup`",
        "metrics.`benchmark.tokens`",
    ]
    assert columns[: len(headline)] == headline
    with stage_run("eval_ms", PARAMS, experiment, store):
        pass
    assert MlflowClient(store).get_experiment(experiment_id).tags[tag] == view  # kept as it is


# ------------------------------------------------------------------ the curve DVC plots draws
def test_the_validation_curve_has_one_row_per_step():
    from cts_stages.train_segmenter import validation_curve

    history = [
        {"step": 2, "loss": 1.0},
        {"step": 2, "val_mIoU": 10.0},
        {"step": 4, "val_mIoU": 20.0},
        {"step": 2, "val_mIoU": 11.0},  # a step validated again
        {"step": 4, "loss": 0.5},
    ]
    curve = validation_curve(history)
    assert curve.to_dict("list") == {"step": [2, 4], "mIoU": [11.0, 20.0]}


@pytest.mark.parametrize("ends", ["normally", "with an error", "interrupted"])
def test_mlflow_is_left_without_an_active_run(ends, tmp_path):
    """After a stage's run, whichever way its body ends, neither MLflow nor cts.tracking holds
    a run that the next stage in the same process (a test, a notebook) would log into."""
    store = f"sqlite:///{tmp_path / 'mlruns.db'}"
    raised = {"normally": None, "with an error": ValueError, "interrupted": KeyboardInterrupt}
    with contextlib.suppress(ValueError, KeyboardInterrupt):
        with stage_run("eval_ss", PARAMS, "left", store):
            assert mlflow.active_run() is not None and cts.tracking.session._SESSION is not None
            if raised[ends] is not None:
                raise raised[ends]
    assert mlflow.active_run() is None and cts.tracking.session._SESSION is None
