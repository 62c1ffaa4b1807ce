"""Kills and leftovers: SIGTERM/SIGKILL leave no processes, no temp files, no RUNNING runs."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from cts.checkpoint import save_checkpoint
from cts.processes import descendants, running
from cts.tracking import stage_run

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PARAMS = {"seed": 0, "k": 1}


@pytest.fixture(autouse=True)
def outside_dvc(monkeypatch):
    for name in ("DVC_EXP_NAME", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)


def _runs(store: str, experiment: str) -> list:
    client = MlflowClient(store)
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id]) if found else []


# ------------------------------------------------------------------------- MLflow run states
def test_the_parent_runs_again_with_its_next_stage(store):
    with stage_run("train_policy", PARAMS, "reopen", store):
        pass
    with stage_run("eval_ss", PARAMS, "reopen", store):
        (parent,) = [r for r in _runs(store, "reopen") if r.data.tags["cts.run_kind"] == "pipeline"]
        assert parent.info.status == "RUNNING"
    assert {r.info.status for r in _runs(store, "reopen")} == {"FINISHED"}


def test_interrupt_marks_runs_killed(store):
    with pytest.raises(KeyboardInterrupt):
        with stage_run("train_segmenter", PARAMS, "killed", store):
            raise KeyboardInterrupt
    assert {r.info.status for r in _runs(store, "killed")} == {"KILLED"}
    assert mlflow.active_run() is None


def _enter_stage(store: str, barrier, experiment: str) -> None:
    barrier.wait()
    with stage_run("stage", PARAMS, experiment, store):
        pass


def test_stages_starting_at_once_share_one_parent(store):
    with stage_run("warm", PARAMS, "race-setup", store):  # schema and experiment exist
        pass
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(3)
    workers = [context.Process(target=_enter_stage, args=(store, barrier, "race")) for _ in "abc"]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
        assert worker.exitcode == 0
    runs = _runs(store, "race")
    assert len([r for r in runs if r.data.tags["cts.run_kind"] == "pipeline"]) == 1
    assert len(runs) == 4


def _die_inside_a_stage(store: str) -> None:
    with stage_run("train_segmenter", PARAMS, "sigkill", store):
        os.kill(os.getpid(), signal.SIGKILL)


def test_the_next_stage_closes_runs_of_a_killed_one(store):
    process = multiprocessing.get_context("fork").Process(target=_die_inside_a_stage, args=(store,))
    process.start()
    process.join(120)
    assert process.exitcode == -signal.SIGKILL
    assert {r.info.status for r in _runs(store, "sigkill")} == {"RUNNING"}
    with stage_run("train_segmenter", PARAMS, "sigkill", store):
        pass
    runs = _runs(store, "sigkill")
    assert len(runs) == 3 and "RUNNING" not in {r.info.status for r in runs}
    killed = [r for r in runs if r.info.status == "FAILED"]
    assert len(killed) == 1 and killed[0].data.tags["cts.run_kind"] == "stage"


# ----------------------------------------------------------------- files: modes, leftovers
def test_files_and_folders_follow_the_umask(tmp_path):
    from cts.data.io import staging_dir, umask, write_bytes_atomic

    previous = os.umask(0o022)
    umask.cache_clear()
    try:
        write_bytes_atomic(tmp_path / "a.json", b"{}")
        save_checkpoint(tmp_path / "b.pt", {"w": torch.zeros(1)})
        with staging_dir(tmp_path / "data") as folder:
            (folder / "x").write_bytes(b"")
    finally:
        os.umask(previous)
        umask.cache_clear()
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "b.pt").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "data").stat().st_mode) == 0o755


def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_leftovers_of_dead_writers_are_removed_live_ones_kept(tmp_path):
    from cts.data.io import remove_leftovers

    dead, alive = _dead_pid(), os.getpid()
    (tmp_path / f".segmenter.pt.{dead}.ab12.tmp").write_bytes(b"")
    (tmp_path / f".segmenter.pt.{alive}.cd34.tmp").write_bytes(b"")
    (tmp_path / f".synthetic.{dead}.ef56.partial" / "images").mkdir(parents=True)
    (tmp_path / "keep.tmp").write_bytes(b"")
    removed = remove_leftovers(tmp_path)
    assert sorted(p.name for p in removed) == sorted(
        [f".segmenter.pt.{dead}.ab12.tmp", f".synthetic.{dead}.ef56.partial"]
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f".segmenter.pt.{alive}.cd34.tmp", "keep.tmp"]
    )


def test_resume_checkpoints_of_earlier_runs_go_when_training_completes(tmp_path, monkeypatch):
    from cts_stages import common

    monkeypatch.chdir(tmp_path)
    common.RESUME_DIR.mkdir(parents=True)
    old = [common.RESUME_DIR / f"segmenter-{key}.pt" for key in ("aaa", "bbb")]
    for path in old:
        path.write_bytes(b"x")
        os.utime(path, (1, 1))
    policy = common.RESUME_DIR / "policy-ccc.pt"
    policy.write_bytes(b"x")
    os.utime(policy, (1, 1))
    newer = common.RESUME_DIR / "segmenter-ddd.pt"  # a run started meanwhile
    newer.write_bytes(b"x")
    assert sorted(common.remove_resume_checkpoints("segmenter", time.time() - 60)) == old
    assert sorted(p.name for p in common.RESUME_DIR.iterdir()) == [policy.name, newer.name]


# ------------------------------------------------------------------------ a killed download
@pytest.fixture
def download_repo(tmp_path, store) -> tuple[Path, dict]:
    MlflowClient(store).search_experiments()  # a copy of a store with its schema: seconds saved
    shutil.copy(store.removeprefix("sqlite:///"), tmp_path / "mlruns.db")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params.update(
        synthetic_num_train=300,
        synthetic_num_val=8,
        synthetic_image_size=256,
        mlflow_tracking_uri=f"sqlite:///{tmp_path / 'mlruns.db'}",
    )
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI", None)
    return tmp_path, env


def _start_download_and_wait_for_workers(repo: Path, env: dict) -> tuple[subprocess.Popen, list]:
    process = subprocess.Popen(
        [shutil.which("cts", path=str(BIN)) or "cts", "download"],
        cwd=repo,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        workers = running(descendants(process.pid))
        if len(workers) >= 2 and list((repo / "data").glob(".synthetic.*.partial/images/train/*")):
            return process, workers
        assert process.poll() is None, process.communicate()
        time.sleep(0.2)
    process.kill()
    raise AssertionError("the download pool never started")


def _gone_within(pids: list[int], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while running(pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not running(pids)


def _store_of(repo: Path) -> str:
    return f"sqlite:///{repo / 'mlruns.db'}"


@pytest.mark.skipif(os.cpu_count() == 1, reason="one CPU: the download runs without a pool")
def test_killed_download_leaves_no_workers_no_leftovers_no_running_runs(download_repo):
    repo, env = download_repo
    process, workers = _start_download_and_wait_for_workers(repo, env)
    process.kill()
    process.communicate(timeout=60)
    assert _gone_within(workers, 5), "pool workers outlived their SIGKILLed parent"
    (partial,) = (repo / "data").glob(".synthetic.*.partial")
    assert {r.info.status for r in _runs(_store_of(repo), "cts")} == {"RUNNING"}

    # The rerun removes the dead run's staging folder and closes its runs; SIGTERM then
    # stops it in one line, with its workers and its own staging folder gone.
    process, workers = _start_download_and_wait_for_workers(repo, env)
    assert not partial.exists()
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 143
    assert err.splitlines()[-1] == "error: download terminated (SIGTERM); run it again to resume"
    assert "removed 1 leftover(s) of killed runs: data/.synthetic." in err
    assert "Traceback" not in err and len(err.splitlines()) == 3, err
    assert _gone_within(workers, 5)
    assert list((repo / "data").iterdir()) == []
    runs = _runs(_store_of(repo), "cts")
    kinds = sorted((r.data.tags["cts.run_kind"], r.info.status) for r in runs)
    assert kinds == [("pipeline", "KILLED"), ("stage", "FAILED"), ("stage", "KILLED")]
