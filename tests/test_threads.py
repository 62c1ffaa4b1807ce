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

from cts_stages.params import ParamError, load_params

# Runs parallel regions (an elementwise op on 2 threads) with idle gaps between them, as a
# training step does between its ops and a job does while the other job has the cores, and
# prints how much of the wall time the OpenMP worker threads were on a CPU, then how much they
# were runnable: on a CPU or queued for one. A thread that sleeps between regions is neither
# beyond its work; one that spins is runnable all along, whatever the load of the machine (the
# run-queue wait counts too), and on a CPU as much as the scheduler lets it.
PROBE = """
import os, threading, time
import torch

torch.set_num_threads(2)
x = torch.randn(512, 512)
for _ in range(20):
    x.mul_(0.5)
main = threading.get_native_id()


def workers() -> tuple[int, int]:
    # (on a CPU, queued) nanoseconds of every thread but the main one
    on_cpu = queued = 0
    for tid in os.listdir("/proc/self/task"):
        if int(tid) != main:
            ran, waited, _ = open(f"/proc/self/task/{tid}/schedstat").read().split()
            on_cpu, queued = on_cpu + int(ran), queued + int(waited)
    return on_cpu, queued


wall, (ran, waited) = time.monotonic_ns(), workers()
for _ in range(300):
    x.mul_(0.5)
    time.sleep(0.002)
wall, (ran_after, waited_after) = time.monotonic_ns() - wall, workers()
print((ran_after - ran) / wall, (ran_after - ran + waited_after - waited) / wall)
"""


def _without_openmp_settings() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_", "KMP_"))}


def _shares(prelude: str, env: dict[str, str]) -> tuple[float, float]:
    """(on a CPU, runnable) shares of the wall time of the probe's OpenMP worker threads."""
    result = subprocess.run(
        [sys.executable, "-c", prelude + PROBE],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    on_cpu, runnable = map(float, result.stdout.split())
    return on_cpu, runnable


needs_two_cores_and_schedstat = pytest.mark.skipif(
    len(os.sched_getaffinity(0)) < 2 or not Path("/proc/self/schedstat").exists(),
    reason="needs 2 cores and /proc/<pid>/task/<tid>/schedstat (Linux)",
)


@needs_two_cores_and_schedstat
def test_idle_openmp_threads_of_a_cts_process_do_not_spin():
    """libgomp's default lets a waiting thread spin for about 3 ms: between the ops of one job
    that keeps it ready, but two jobs on 2 cores spin on the cores the other one waits for
    (each 7.7x slower instead of 2x). A cts process bounds the spinning.

    Measured against threads told to spin (OMP_WAIT_POLICY=ACTIVE), back to back: on a
    loaded host a spinning thread gets only its share of the cores, and a queued one waits
    longer, so an absolute bound on either would pass or fail with the load, not the code."""
    bounded = _without_openmp_settings()
    spinning = {**bounded, "OMP_WAIT_POLICY": "ACTIVE"}
    cts_on_cpu, _ = _shares("import cts\n", bounded)
    spin_on_cpu, _ = _shares("import cts\n", spinning)
    assert cts_on_cpu < 0.5 * spin_on_cpu, (
        f"cts's idle OpenMP threads were on a CPU {cts_on_cpu:.0%} of the loop, "
        f"threads told to spin {spin_on_cpu:.0%}"
    )


@needs_two_cores_and_schedstat
def test_a_wait_policy_the_user_sets_is_kept():
    env = {**_without_openmp_settings(), "OMP_WAIT_POLICY": "ACTIVE"}
    _, runnable = _shares("import cts\n", env)
    assert runnable > 0.8  # a spinning thread is runnable all along, loaded host or not


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
@pytest.mark.parametrize("threads", [1, 3])
def test_num_threads_sets_the_threads_a_stage_computes_with(stage, threads, monkeypatch):
    import importlib

    from cts_stages.launch import run_stage

    module = importlib.import_module(f"cts_stages.{stage}")
    overrides = [f"num_threads={threads}", "device=cpu"]
    params = load_params(REPO / "params.yaml", overrides, keys=module.PARAMS)
    seen: list[int] = []
    monkeypatch.setattr(
        module, "run", lambda params, **kwargs: seen.append(torch.get_num_threads())
    )
    before = torch.get_num_threads()
    # Neither the host's core count nor the asked value: a stage that set nothing shows 2.
    torch.set_num_threads(2)
    try:
        run_stage(stage, params)
    finally:
        torch.set_num_threads(before)
    assert seen == [threads]


def test_num_threads_is_checked():
    with pytest.raises(ParamError, match=r"num_threads=0: allowed: auto or"):
        load_params(REPO / "params.yaml", ["num_threads=0"])
