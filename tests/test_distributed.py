"""Several processes from the params: `dvc repro` with nproc_per_node 2, the same results as
one process, two nodes on loopback, a killed worker, SIGTERM to the launcher or to the whole
job, and bad launch settings (CPU, gloo)."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from helpers import (
    BIN,
    PIPELINE_TIMEOUT,
    REPO,
    Pipeline,
    base_env,
    copy_pipeline,
    finish,
    free_port,
    needs_dvc,
    run,
    set_params,
    stages_run,
    start_training,
    trained_by_rank_0_of_two,
    trained_weights,
    worst_difference,
)

from cts.launch import LaunchSettings, prepare, resolve_nproc_per_node
from cts.processes import process_group
from cts_stages.launch import DISTRIBUTED_STAGES

# On top of the micro pipeline's params (its 8 + 3 images: the two processes score 2 and 1).
TWO_PROCESSES = {
    "policy_iterations": 2,
    "batch_size": 4,
    "drop_path_rate": 0.0,  # no random masks: 2 and 1 processes differ in summation order only
    # fp32 and the loss on every pixel: each process would draw its own subgrid offset, and
    # bf16 rounding would amplify the summation-order differences.
    "train_precision": "fp32",
    "loss_stride": 1,
    "ms_scales": [1.0],
    "nproc_per_node": 2,
}


def _cts(repo: Path, env: dict, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [str(BIN / "cts"), *args], cwd=repo, env=env, capture_output=True, text=True, timeout=300
    )
    if ok:
        assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return result


def _stage_runs(store: Path) -> dict[str, list[str]]:
    """Stage name -> the ids of its MLflow runs in ``store``."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{store}")
    experiment = client.get_experiment_by_name("cts")
    found: dict[str, list[str]] = {}
    for each in client.search_runs([experiment.experiment_id], "tags.`cts.run_kind` = 'stage'"):
        found.setdefault(each.data.tags["cts.stage"], []).append(each.info.run_id)
    return found


@pytest.fixture(scope="module")
def repo(micro_pipeline, tmp_path_factory) -> Pipeline:
    """A copy of the session's micro pipeline after `dvc repro` of the stages that split their
    work (DISTRIBUTED_STAGES) on TWO_PROCESSES: its data and preprocessing are reused.
    benchmark and sweep run in one process whatever nproc_per_node (test_first_process);
    here they would cost the suite two more cts processes. ``output``: what repro printed."""
    # Two processes on a small machine: one thread each keeps the test quick, and the
    # one-process runs it is compared with use the same kernels.
    pipeline = copy_pipeline(
        micro_pipeline, tmp_path_factory.mktemp("distributed"), OMP_NUM_THREADS="1"
    )
    set_params(pipeline.repo, **TWO_PROCESSES)
    command = ["dvc", "repro", "eval_ss", "eval_ms"]
    output = run(command, pipeline.repo, pipeline.env, timeout=PIPELINE_TIMEOUT)
    return replace(pipeline, output=output)


@needs_dvc
@pytest.mark.e2e
def test_dvc_repro_runs_the_stages_on_two_processes_with_one_mlflow_run_each(repo, micro_pipeline):
    from mlflow.tracking import MlflowClient

    ran = stages_run(repo.output)
    assert ran == set(DISTRIBUTED_STAGES)  # download's and preprocess's outs are the micro's
    for name in ("policy.json", "train.json", "eval_ss.json", "eval_ms.json"):
        assert (repo.repo / "metrics" / name).is_file(), name
    # The runs this repro added to the copied store: one per stage, not one per process.
    before, after = _stage_runs(micro_pipeline.store), _stage_runs(repo.store)
    added = {stage: set(ids) - set(before.get(stage, ())) for stage, ids in after.items()}
    assert {stage: len(ids) for stage, ids in added.items() if ids} == dict.fromkeys(ran, 1)
    (train,) = added["train_segmenter"]
    # One process logs: one value per step, the validation of both processes' shares summed.
    history = MlflowClient(f"sqlite:///{repo.store}").get_metric_history(train, "val_mIoU")
    assert [m.step for m in history if m.step] == [2, 4]  # step 0: the final result
    status = run([str(BIN / "dvc"), "status", "eval_ss", "eval_ms"], repo.repo, repo.env)
    assert "up to date" in status


@needs_dvc
@pytest.mark.e2e
def test_evaluation_on_two_processes_gives_exactly_the_mIoU_of_one(repo):
    root, env = repo.repo, repo.env
    two = json.loads((root / "metrics" / "eval_ss.json").read_text())
    two_table = (root / "metrics" / "per_class_iou_ss.csv").read_text()
    _cts(root, env, "eval_ss", "--set", "nproc_per_node=1")
    one = json.loads((root / "metrics" / "eval_ss.json").read_text())
    assert one == two  # mIoU, pixel and mean accuracy: the confusion matrices are equal
    assert (root / "metrics" / "per_class_iou_ss.csv").read_text() == two_table


@needs_dvc
@pytest.mark.e2e
def test_training_on_two_processes_matches_one_process(repo):
    """Same global batch (4 = 2 x 2 vs 1 x 4): the same samples, and the loss is normalised by
    the global count of valid pixels, so the gradients agree up to float summation order."""
    root, env = repo.repo, repo.env
    checkpoint = root / "checkpoints" / "segmenter.pt"
    two = torch.load(checkpoint, map_location="cpu", weights_only=False)  # from `dvc repro`
    # Validation draws no random numbers: leaving it out changes no weight.
    _cts(root, env, "train_segmenter", "--no-resume", "--set", "nproc_per_node=1")
    one = torch.load(checkpoint, map_location="cpu", weights_only=False)
    worst = max(
        (one["model"][key].float() - two["model"][key].float()).abs().max().item()
        for key in one["model"]
    )
    assert worst < 1e-4, worst
    losses = [[row["loss"] for row in run["history"] if "loss" in row] for run in (one, two)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == pid and b"spawn_main" in cmdline:
            kids.append(int(stat.parent.name))
    return kids


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@needs_dvc
@pytest.mark.e2e
def test_a_killed_worker_ends_the_stage_with_one_line_and_the_rerun_resumes(repo):
    root, env = repo.repo, repo.env
    settings = ["--set", "iterations=12", "--set", "checkpoint_every=1", "--set", "eval_every=0"]
    resume_dir = root / "checkpoints" / "resume"
    shutil.rmtree(resume_dir, ignore_errors=True)
    launcher = subprocess.Popen(
        [str(BIN / "cts"), "train_segmenter", *settings],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not list(resume_dir.glob("segmenter-*.pt")) and launcher.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint written"
        time.sleep(0.05)
    workers = _children(launcher.pid)
    assert len(workers) == 2
    os.kill(workers[-1], signal.SIGKILL)
    _, stderr = launcher.communicate(timeout=120)
    assert launcher.returncode == 1
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert re.fullmatch(
        r"error: train_segmenter: worker rank [01] \(pid \d+\) was killed by SIGKILL", errors[0]
    ), errors
    assert not any(_running(pid) for pid in workers)

    result = _cts(root, env, "train_segmenter", *settings)
    resumed = re.search(r"resuming segmenter training at iteration (\d+)", result.stdout)
    assert resumed and 1 <= int(resumed.group(1)) < 12
    payload = torch.load(root / "checkpoints" / "segmenter.pt", weights_only=False)
    assert payload["history"][-1]["step"] == 12


def _start_training(root: Path, env: dict, *settings: str) -> subprocess.Popen:
    """`cts train_segmenter` in a session of its own: its process group is the whole job,
    which is what a scheduler signals."""
    return subprocess.Popen(
        [str(BIN / "cts"), "train_segmenter", *settings],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _gone_within(pgid: int, seconds: float) -> list[int]:
    """The processes of group ``pgid`` still running after up to ``seconds``."""
    deadline = time.monotonic() + seconds
    while (left := process_group(pgid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


@needs_dvc
@pytest.mark.e2e
@pytest.mark.parametrize("target", ["launcher", "process_group"])
def test_sigterm_with_two_processes_is_143_one_line_runs_killed_and_a_checkpoint_kept(repo, target):
    """SLURM, Kubernetes and `dvc queue kill` send SIGTERM to the stage's process, or to every
    process of the job at once: both end like one process does, a resume checkpoint kept. (The
    rerun from it, bit for bit: tests/test_preemption.py, after the killed worker's here.)"""
    from mlflow.tracking import MlflowClient

    root, env, store = repo.repo, repo.env, repo.store
    settings = ["--set", "iterations=12", "--set", "checkpoint_every=1", "--set", "eval_every=0"]
    resume_dir = root / "checkpoints" / "resume"
    shutil.rmtree(resume_dir, ignore_errors=True)
    launcher = _start_training(root, env, *settings)
    deadline = time.monotonic() + 120
    while not list(resume_dir.glob("segmenter-*.pt")) and launcher.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint written"
        time.sleep(0.05)
    assert len(_children(launcher.pid)) == 2
    if target == "launcher":
        launcher.send_signal(signal.SIGTERM)
    else:
        os.killpg(launcher.pid, signal.SIGTERM)
    _, stderr = launcher.communicate(timeout=120)
    assert launcher.returncode == 143, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: train_segmenter terminated (SIGTERM); run it again to resume"]
    # Neither a traceback nor the elastic agent's own account of the signal.
    assert not re.search(r"Traceback|SignalException|death signal|Closing process", stderr), stderr
    assert _gone_within(launcher.pid, 10) == []
    assert list(resume_dir.glob("segmenter-*.pt"))
    client = MlflowClient(f"sqlite:///{store}")
    experiment = client.get_experiment_by_name("cts").experiment_id
    (train, *_) = client.search_runs(
        [experiment],
        "tags.`cts.stage` = 'train_segmenter'",
        order_by=["attributes.start_time DESC"],
    )
    parent = client.get_run(train.data.tags["mlflow.parentRunId"])
    assert (train.info.status, parent.info.status) == ("KILLED", "KILLED")


@pytest.mark.e2e
def test_two_nodes_on_loopback_train_together(loopback_job, loopback_reference):
    """nnodes and node_rank from the params, no scheduler: each node launches its process as
    torchrun would, and together they train the weights of `nproc_per_node: 2` on one
    machine."""
    folder = loopback_job("two-nodes")
    common = ["--no-resume", "--set", "nnodes=2", "--set", "nproc_per_node=1"]
    common += ["--set", "master_addr=127.0.0.1", "--set", f"master_port={free_port()}"]
    # Node 1 first: it waits for the master.
    nodes = [
        start_training(folder, base_env(), *common, "--set", f"node_rank={rank}") for rank in (1, 0)
    ]
    trained_by_rank_0_of_two(finish(nodes)[::-1])
    assert worst_difference(trained_weights(folder), loopback_reference) < 1e-4


def test_a_batch_that_does_not_split_fails_before_any_worker(tiny_synthetic, tmp_path):
    from typer.testing import CliRunner

    from cts.cli import app

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params.update(data_root=str(tiny_synthetic), device="cpu")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    started = time.monotonic()
    result = CliRunner().invoke(
        app,
        [
            "train_segmenter",
            "--params",
            str(tmp_path / "params.yaml"),
            "--set",
            "nproc_per_node=3",
            "--set",
            "batch_size=8",
        ],
    )
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "batch_size=8 is the global batch" in lines[0]
    assert "3 process(es)" in lines[0] and "multiple of 3" in lines[0]
    assert time.monotonic() - started < 20


def test_node_rank_must_be_below_nnodes():
    from cts_stages.params import ParamError, load_params

    with pytest.raises(ParamError, match=r"node_rank=2: allowed 0\.\.1 for nnodes=2"):
        load_params(REPO / "params.yaml", ["nnodes=2", "node_rank=2"])
    with pytest.raises(ValueError, match="node_rank=1: allowed 0..0"):
        prepare(LaunchSettings(2, nnodes=1, node_rank=1))


def test_more_processes_than_gpus_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(ValueError, match=r"nproc_per_node=4: only 2 GPU\(s\) visible"):
        resolve_nproc_per_node(4, "auto")
    assert resolve_nproc_per_node("auto", "auto") == 2
    assert resolve_nproc_per_node("auto", "cpu") == 1
    assert resolve_nproc_per_node(4, "cpu") == 4  # CPU processes are not limited to the GPUs


def test_an_unreachable_master_is_one_line_before_any_worker():
    started = time.monotonic()
    with pytest.raises(ValueError, match=r"master 127\.0\.0\.1:\d+ unreachable after 1 s"):
        prepare(LaunchSettings(1, nnodes=2, node_rank=1, master_port=free_port(), timeout=1))
    assert time.monotonic() - started < 10
    with pytest.raises(ValueError, match="master_addr='no-such-host.invalid': unknown host"):
        prepare(LaunchSettings(1, nnodes=2, node_rank=1, master_addr="no-such-host.invalid"))
    with pytest.raises(ValueError, match="not an address of this machine"):
        prepare(LaunchSettings(2, nnodes=2, node_rank=0, master_addr="192.0.2.1"))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ValueError, match=f"master_port={port} is already in use"):
            prepare(LaunchSettings(2, master_port=port))


@needs_dvc
@pytest.mark.e2e
def test_policy_training_on_two_processes_matches_one_process(repo):
    """The policy net's batch norm normalises by the statistics of the global batch (synced
    over processes), so 2 processes x 1 image compute the running statistics of 1 process x
    2 images. One iteration: both start from the same weights, so only the batch norm's
    statistics can differ (AdamW's later steps would turn rounding noise on gradients that
    are 0 in theory, a bias before a norm, into steps of +-lr, sync or not)."""
    root, env = repo.repo, repo.env
    checkpoint = root / "checkpoints" / "policy.pt"
    kept = checkpoint.read_bytes()  # from `dvc repro`; the later stages were built on it
    runs = {}
    try:
        for nproc in (2, 1):
            settings = ["--set", f"nproc_per_node={nproc}", "--set", "policy_iterations=1"]
            _cts(root, env, "train_policy", "--no-resume", *settings)
            runs[nproc] = torch.load(checkpoint, map_location="cpu", weights_only=False)["model"]
    finally:
        checkpoint.write_bytes(kept)
    statistics = [key for key in runs[1] if key.endswith(("running_mean", "running_var"))]
    assert len(statistics) == 30  # 15 batch norms
    differences = {
        key: (runs[1][key].double() - runs[2][key].double()).abs().max().item()
        for key in statistics
    }
    worst = max(differences, key=differences.get)
    assert differences[worst] < 1e-4, (worst, differences[worst])
