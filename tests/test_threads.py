"""Several jobs on one machine: cts's OpenMP threads do not busy-wait on cores another job
needs, and `num_threads` sets the CPU threads each process of a stage computes with."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO

from stages.params import ParamError, load_params

# Runs parallel regions (an elementwise op on 2 threads) with idle gaps between them, as a
# training step does between its ops and a job does while the other job has the cores, and
# prints how much of the wall time the OpenMP worker threads were runnable: on a CPU or queued
# for one. A thread that sleeps between regions is neither; one that spins is runnable all
# along, whatever the load of the machine (the run-queue wait counts too).
PROBE = """
import os, threading, time
import torch

torch.set_num_threads(2)
x = torch.randn(512, 512)
for _ in range(20):
    x.mul_(0.5)
main = threading.get_native_id()


def runnable() -> int:
    total = 0
    for tid in os.listdir("/proc/self/task"):
        if int(tid) != main:
            on_cpu, queued, _ = open(f"/proc/self/task/{tid}/schedstat").read().split()
            total += int(on_cpu) + int(queued)
    return total


wall, busy = time.monotonic_ns(), runnable()
for _ in range(300):
    x.mul_(0.5)
    time.sleep(0.002)
print((runnable() - busy) / (time.monotonic_ns() - wall))
"""


def _without_openmp_settings() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_", "KMP_"))}


def _runnable_share(prelude: str, env: dict[str, str]) -> float:
    result = subprocess.run(
        [sys.executable, "-c", prelude + PROBE],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return float(result.stdout)


needs_two_cores_and_schedstat = pytest.mark.skipif(
    len(os.sched_getaffinity(0)) < 2 or not Path("/proc/self/schedstat").exists(),
    reason="needs 2 cores and /proc/<pid>/task/<tid>/schedstat (Linux)",
)


@needs_two_cores_and_schedstat
def test_idle_openmp_threads_of_a_cts_process_do_not_spin():
    """libgomp's default lets a waiting thread spin for about 3 ms: between the ops of one job
    that keeps it ready, but two jobs on 2 cores spin on the cores the other one waits for
    (each 7.7x slower instead of 2x). A cts process bounds the spinning."""
    share = _runnable_share("import cts\n", _without_openmp_settings())
    assert share < 0.5, f"the OpenMP threads were runnable {share:.0%} of an idle loop"


@needs_two_cores_and_schedstat
def test_a_wait_policy_the_user_sets_is_kept():
    env = {**_without_openmp_settings(), "OMP_WAIT_POLICY": "ACTIVE"}
    assert _runnable_share("import cts\n", env) > 0.8


def test_openmp_spinning_is_bounded_only_where_the_user_chose_nothing():
    from cts.processes import OPENMP_SPIN_COUNT, bound_openmp_spinning

    environ: dict[str, str] = {}
    assert bound_openmp_spinning(environ, torch_loaded=False)
    assert environ == {"GOMP_SPINCOUNT": str(OPENMP_SPIN_COUNT)}
    for chosen in ({"OMP_WAIT_POLICY": "active"}, {"GOMP_SPINCOUNT": "300000"}):
        environ = dict(chosen)
        assert not bound_openmp_spinning(environ, torch_loaded=False)
        assert environ == chosen
    # Once torch has loaded OpenMP the setting could reach only this process's children.
    environ = {}
    assert not bound_openmp_spinning(environ, torch_loaded=True) and environ == {}


def test_threads_per_process(monkeypatch):
    from cts.launch import threads_per_process

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert threads_per_process("auto", 1) == 8
    assert threads_per_process("auto", 3) == 2  # an equal share of the cores, rounded down
    assert threads_per_process("auto", 16) == 1
    assert threads_per_process(3, 2) == 3  # the param, whatever the share
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert threads_per_process("auto", 2) == 5
    assert threads_per_process(1, 2) == 1


@pytest.mark.parametrize("stage", ["train_policy", "train_segmenter", "eval_ss", "eval_ms"])
def test_num_threads_sets_the_threads_a_stage_computes_with(stage, monkeypatch):
    import importlib

    from stages.launch import run_stage

    module = importlib.import_module(f"stages.{stage}")
    params = load_params(REPO / "params.yaml", ["num_threads=1", "device=cpu"], keys=module.PARAMS)
    seen: list[int] = []
    monkeypatch.setattr(
        module, "run", lambda params, **kwargs: seen.append(torch.get_num_threads())
    )
    before = torch.get_num_threads()
    try:
        run_stage(stage, params)
    finally:
        torch.set_num_threads(before)
    assert seen == [1]


def test_num_threads_is_checked():
    with pytest.raises(ParamError, match=r"num_threads=0: allowed: auto or"):
        load_params(REPO / "params.yaml", ["num_threads=0"])
