"""End to end: the real `dvc repro` on a micro configuration in a copy of the repository (the
session's ``micro_pipeline``; a test that writes in it takes a copy of its own)."""

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import BIN, PIPELINE_TIMEOUT, needs_dvc, run, set_params, stages_run

pytestmark = [needs_dvc, pytest.mark.e2e]


def _metrics(repo: Path, name: str) -> dict:
    return json.loads((repo / "metrics" / name).read_text())


def test_every_stage_writes_its_metrics(micro_pipeline):
    repo = micro_pipeline.repo
    assert {"accuracy", "precision_at_k"} <= set(_metrics(repo, "policy.json"))
    for name in ("eval_ss.json", "eval_ms.json"):
        metrics = _metrics(repo, name)
        for key in ("mIoU", "pixel_acc", "mean_acc"):
            assert 0.0 <= metrics[key] <= 100.0
    benchmark = _metrics(repo, "benchmark.json")
    for key in (
        "ims_per_sec",
        "ims_per_sec_no_sharing",
        "speedup",
        "tokens",
        "tokens_no_sharing",
        "gflops",
        "gflops_no_sharing",
        "device",
        "batch_size",
        "precision",
        "compile",
        "peak_memory_mib",
        "float32_matmul_precision",
    ):
        assert key in benchmark
    assert benchmark["compile"] == "none"  # auto: eager on CPU
    for key in ("bf16_fp32_agreement", "bf16_fp32_agreement_no_sharing"):
        assert 0.0 < benchmark[key] <= 1.0
    assert benchmark["tokens"] == 64 - 3 * 4 and benchmark["tokens_no_sharing"] == 64
    # At this micro size the policy net costs more than the tokens save: only check both counted.
    assert benchmark["gflops"] > 0 and benchmark["gflops_no_sharing"] > 0
    for name in ("per_class_iou_ss.csv", "per_class_iou_ms.csv"):
        assert (repo / "metrics" / name).read_text().startswith("class,iou")
    for name in ("train_loss.csv", "val_miou.csv"):
        assert (repo / "plots" / name).is_file()
    assert (repo / "dvc.lock").is_file()


def test_the_k_sweep_holds_every_k_and_matches_eval_ss_at_the_trained_k(micro_pipeline):
    import pandas as pd

    repo = micro_pipeline.repo
    table = pd.read_csv(repo / "plots" / "k_sweep.csv", float_precision="round_trip")
    columns = ["num_tokens_shared", "share_threshold", "tome_r", "algm_threshold", "tokens", "mIoU"]
    assert list(table.columns) == [*columns, "ims_per_sec", "gflops"]
    by_threshold = table[table["share_threshold"].notna()]
    (tome,) = table[table["tome_r"].notna()].itertuples()  # ToMe on the same weights
    assert tome.tome_r == 8 and tome.num_tokens_shared == 0 and tome.tokens == 64  # 1 block
    assert 0 <= tome.mIoU <= 100 and tome.ims_per_sec > 0 and tome.gflops > 0
    table = table[table["share_threshold"].isna() & table["tome_r"].isna()]
    assert table["num_tokens_shared"].tolist() == [0, 2, 4]  # the swept K and the trained K
    assert table["tokens"].tolist() == [64, 64 - 3 * 2, 64 - 3 * 4]
    (threshold,) = by_threshold.itertuples()  # K per image: its mean, on the same batch
    assert threshold.share_threshold == 0.5 and 0 <= threshold.num_tokens_shared <= 16
    assert threshold.tokens == 64 - 3 * threshold.num_tokens_shared
    assert 0 <= threshold.mIoU <= 100 and threshold.ims_per_sec > 0 and threshold.gflops > 0
    trained = table.set_index("num_tokens_shared").loc[4]
    assert trained["mIoU"] == _metrics(repo, "eval_ss.json")["mIoU"]
    assert (table["ims_per_sec"] > 0).all() and (table["gflops"] > 0).all()
    assert table["mIoU"].between(0, 100).all()
    assert (repo / "plots" / "k_sweep.png").read_bytes().startswith(b"\x89PNG")


def test_one_mlflow_parent_run_holds_every_stage(micro_pipeline):
    from mlflow.tracking import MlflowClient

    store = micro_pipeline.store
    client = MlflowClient(f"sqlite:///{store}")
    experiment = client.get_experiment_by_name("cts")
    parents = client.search_runs([experiment.experiment_id], "tags.`cts.run_kind` = 'pipeline'")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.data.params["num_tokens_shared"] == "4"
    for metric in (
        "policy.accuracy",
        "eval_ss.mIoU",
        "eval_ms.mIoU",
        "benchmark.ims_per_sec",
        "benchmark.speedup",
    ):
        assert metric in parent.data.metrics, metric
    children = client.search_runs(
        [experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    stages = {run.data.tags["cts.stage"]: run for run in children}
    assert set(stages) == {
        "download",
        "preprocess",
        "train_policy",
        "train_segmenter",
        "eval_ss",
        "eval_ms",
        "benchmark",
        "sweep",
    }
    sweep = client.get_metric_history(stages["sweep"].info.run_id, "mIoU")
    assert sorted(m.step for m in sweep) == [0, 2, 4]
    artifacts = {a.path for a in client.list_artifacts(stages["sweep"].info.run_id)}
    assert {"k_sweep.csv", "k_sweep.png"} <= artifacts
    history = client.get_metric_history(stages["train_segmenter"].info.run_id, "loss")
    assert history and history[-1].step == 4
    artifacts = {a.path for a in client.list_artifacts(stages["eval_ss"].info.run_id)}
    assert "per_class_iou_ss.csv" in artifacts and "eval_ss" in artifacts
    trained = {a.path for a in client.list_artifacts(stages["train_segmenter"].info.run_id)}
    assert "checkpoints" in trained
    assert client.search_logged_models([experiment.experiment_id])
    (version,) = client.search_model_versions("name = 'cts-segmenter'")
    assert version.run_id == stages["train_segmenter"].info.run_id
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert parent.info.run_name.startswith("vit_tiny_patch16_384 d1 K=4 ")


def test_changing_k_reruns_only_training_evaluation_and_benchmark(micro_pipeline_copy):
    from mlflow.tracking import MlflowClient

    repo, env, store = micro_pipeline_copy.repo, micro_pipeline_copy.env, micro_pipeline_copy.store
    set_params(repo, num_tokens_shared=2)
    ran = stages_run(run(["dvc", "repro"], repo, env, timeout=PIPELINE_TIMEOUT))
    assert ran == {"train_segmenter", "eval_ss", "eval_ms", "benchmark", "sweep"}
    # The new parent holds every stage's results, those of the stages not rerun included.
    client = MlflowClient(f"sqlite:///{store}")
    experiment = client.get_experiment_by_name("cts")
    parent = client.search_runs(
        [experiment.experiment_id],
        "tags.`cts.run_kind` = 'pipeline' and params.num_tokens_shared = '2'",
    )[0]
    for prefix in ("dataset", "policy", "train", "eval_ss", "eval_ms", "benchmark"):
        assert any(m.startswith(f"{prefix}.") for m in parent.data.metrics), prefix
    assert parent.data.metrics["benchmark.tokens"] == 64 - 3 * 2
    assert _metrics(repo, "benchmark.json")["tokens"] == 64 - 3 * 2
    status = run(["dvc", "status"], repo, env)
    assert "up to date" in status


def test_training_runs_under_an_outer_torchrun_with_two_cpu_processes(micro_pipeline_copy):
    repo, env = micro_pipeline_copy.repo, micro_pipeline_copy.env
    checkpoint = repo / "checkpoints" / "segmenter.pt"
    checkpoint.unlink()
    run(
        [
            str(BIN / "torchrun"),
            "--nproc-per-node",
            "2",
            "--no-python",
            "cts",
            "train_segmenter",
            "--no-resume",
            # Under an outer torchrun the stage is one of its workers and launches nothing.
            "--set",
            "nproc_per_node=2",
        ],
        repo,
        env,
    )
    assert checkpoint.is_file()


def test_plots_page_loads_nothing_remote(micro_pipeline_copy):
    repo, env = micro_pipeline_copy.repo, micro_pipeline_copy.env
    run(["dvc", "plots", "show"], repo, env)
    page = (repo / "dvc_plots" / "index.html").read_text()
    assert "vegaEmbed(" in page and 'var e="5.20.2"' in page  # plots, vega inlined
    # The only sources are files DVC writes beside the page (the K-sweep picture).
    sources = re.findall(r"<(?:script|link|img)[^>]+(?:src|href)\s*=\s*[\"']([^\"']*)", page)
    assert not [s for s in sources if re.match(r"(?i)([a-z]+:|//)", s)], sources
    assert (repo / "dvc_plots" / "static" / "workspace_plots_k_sweep.png").is_file()
    assert "cdn.jsdelivr" not in page


def _statuses(store: Path) -> set[str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{store}")
    ids = [e.experiment_id for e in client.search_experiments()]
    return {run.info.status for run in client.search_runs(ids)}


def test_a_kill_between_checkpoint_and_metrics_leaves_no_disagreeing_pair(
    micro_pipeline_copy, monkeypatch
):
    import cts_stages.train_segmenter as stage
    from cts.checkpoint import load_checkpoint
    from cts_stages.params import load_params

    repo = micro_pipeline_copy.repo
    monkeypatch.chdir(repo)
    params = load_params(repo / "params.yaml", ["iterations=6"], keys=stage.PARAMS)
    write_json = stage.write_json

    def killed_at_train_json(path, data):
        if path.name == "train.json":
            raise KeyboardInterrupt
        return write_json(path, data)

    monkeypatch.setattr(stage, "write_json", killed_at_train_json)
    with pytest.raises(KeyboardInterrupt):
        stage.run(params, resume_training=False)
    trained = load_checkpoint(repo / "checkpoints" / "segmenter.pt")["history"][-1]["step"]
    metrics = repo / "metrics" / "train.json"
    assert trained == 6
    assert not metrics.exists() or _metrics(repo, "train.json")["iterations"] == trained


@pytest.mark.parametrize("k_range", [None, [1, 16]])
def test_each_training_step_shares_the_k_drawn_for_it(micro_pipeline_copy, monkeypatch, k_range):
    import cts_stages.train_segmenter as stage
    from cts.models.segmenter import Segmenter
    from cts.sharing import training_num_shared
    from cts_stages.params import load_params

    repo = micro_pipeline_copy.repo
    monkeypatch.chdir(repo)
    overrides = ["iterations=8", "eval_every=0", "train_unshared_fraction=0.5"]
    overrides.append(f"train_tokens_shared_range={k_range}".replace("None", "null"))
    params = load_params(repo / "params.yaml", overrides, keys=stage.PARAMS)
    used = []
    forward = Segmenter.forward

    def spy(self, images, labels=None, num_tokens_shared=None, upsample=True):
        if labels is not None:  # a training forward (validation passes no labels)
            used.append(num_tokens_shared)
        return forward(self, images, labels, num_tokens_shared, upsample)

    monkeypatch.setattr(Segmenter, "forward", spy)
    stage.run(params, resume_training=False)
    k = tuple(k_range) if k_range else params["num_tokens_shared"]
    assert used == [training_num_shared(k, 0.5, params["seed"], step) for step in range(8)]
    if k_range:  # one model for every K: several are drawn in these 8 steps
        assert 0 in used and len(set(used)) > 2 and all(0 <= x <= 16 for x in used)
    else:
        assert set(used) == {0, k}  # both are drawn in these 8 steps


def test_sigterm_during_training_keeps_the_resume_checkpoint_and_ends_mlflow_runs(
    micro_pipeline_copy,
):
    repo, env, store = micro_pipeline_copy.repo, micro_pipeline_copy.env, micro_pipeline_copy.store
    process = subprocess.Popen(
        ["cts", "train_segmenter", "--set", "iterations=5000", "--set", "checkpoint_every=1"],
        cwd=repo,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    resume_dir = repo / "checkpoints" / "resume"
    deadline = time.monotonic() + 240
    while not list(resume_dir.glob("segmenter-*.pt")) and time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err
    assert err.strip().splitlines()[-1] == (
        "error: train_segmenter terminated (SIGTERM); run it again to resume"
    )
    assert "Traceback" not in err
    assert list(resume_dir.glob("segmenter-*.pt"))
    assert not [p for p in (repo / "checkpoints").rglob("*.tmp")]
    assert "RUNNING" not in _statuses(store) and "KILLED" in _statuses(store)


def test_an_empty_sweep_list_skips_the_sweep(micro_pipeline_copy):
    repo, env = micro_pipeline_copy.repo, micro_pipeline_copy.env
    empty = ["sweep_tokens_shared=[]", "sweep_share_thresholds=[]", "sweep_tome_r=[]"]
    output = run([str(BIN / "cts"), "sweep", *(f"--set={e}" for e in empty)], repo, env)
    assert "skipped" in output
    assert (repo / "plots" / "k_sweep.csv").read_text().strip() == (
        "num_tokens_shared,share_threshold,tome_r,algm_threshold,tokens,mIoU,ims_per_sec,gflops"
    )
    assert (repo / "plots" / "k_sweep.png").read_bytes().startswith(b"\x89PNG")


def test_a_merging_experiment_trains_merging_and_gets_its_own_mlflow_parent(micro_pipeline_copy):
    """`dvc exp run -S token_reduction=algm` (the path ToMe's `token_reduction=tome` takes
    too: `merging_name`, `measure_merging`): the segmenter trains merging 2x2 windows in its
    one block, is evaluated and benchmarked so (against itself without merging) and its sweep
    adds its own threshold to the one swept (its K row merges nothing); a parent of its own in
    MLflow."""
    import csv

    from mlflow.tracking import MlflowClient

    repo, env, store = micro_pipeline_copy.repo, micro_pipeline_copy.env, micro_pipeline_copy.store
    command = ["dvc", "exp", "run", "-S", "token_reduction=algm", "-S", "algm_layers=[1]"]
    command += ["-S", "algm_threshold=0.2", "-S", "sweep_algm_thresholds=[0.5]"]
    ran = stages_run(run(command, repo, env, timeout=PIPELINE_TIMEOUT))
    assert ran == {"train_segmenter", "eval_ss", "eval_ms", "benchmark", "sweep"}
    assert _metrics(repo, "eval_ss.json")["algm_threshold"] == 0.2
    bench = _metrics(repo, "benchmark.json")
    assert bench["algm_threshold"] == 0.2 and bench["tokens_no_sharing"] == 64
    assert bench["gflops"] < bench["gflops_no_sharing"]  # a synthetic scene has flat windows
    with (repo / "plots" / "k_sweep.csv").open() as f:
        rows = {r["algm_threshold"]: r for r in csv.DictReader(f)}
    assert sorted(rows) == ["", "0.2", "0.5"] and rows[""]["tokens"] == "64"
    # One block: 64 tokens enter it at any threshold; its MLP sees fewer, the lower it is.
    gflops = [float(rows[t]["gflops"]) for t in ("0.2", "0.5", "")]
    assert gflops == sorted(gflops) and gflops[0] < gflops[2]
    client = MlflowClient(f"sqlite:///{store}")
    experiment = client.get_experiment_by_name("cts")
    parents = client.search_runs([experiment.experiment_id], "tags.`cts.run_kind` = 'pipeline'")
    algm = [p for p in parents if p.data.params.get("token_reduction") == "algm"]
    assert len(parents) == 2 and len(algm) == 1
    assert algm[0].data.metrics["benchmark.gflops"] == pytest.approx(bench["gflops"])
