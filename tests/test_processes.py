import os
import subprocess
import sys
import time

import pytest

from cts.processes import descendants, pid_alive, process_start, running

linux_only = pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc")


def _exited_child() -> subprocess.Popen:
    """A child that has exited and is not yet waited for: a zombie."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while running([process.pid]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return process


def test_a_reaped_pid_is_dead_and_this_process_alive():
    process = subprocess.Popen(["true"])
    process.wait()
    assert not pid_alive(process.pid)
    assert pid_alive(os.getpid())


@linux_only
def test_start_time_tells_a_process_from_a_later_one_with_its_pid():
    assert process_start(os.getpid()) == process_start(os.getpid()) != ""
    process = subprocess.Popen(["true"])
    process.wait()
    assert process_start(process.pid) == ""


@linux_only
def test_a_zombie_exists_but_does_not_run():
    zombie = _exited_child()
    try:
        assert pid_alive(zombie.pid)
        assert running([zombie.pid, os.getpid()]) == [os.getpid()]
    finally:
        zombie.wait()


@linux_only
def test_descendants_reach_grandchildren():
    code = "import subprocess, sys, time; subprocess.Popen(['sleep', '30']); time.sleep(30)"
    child = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 30
        while len(descendants(child.pid)) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        found = descendants(os.getpid())
        assert child.pid in found
        assert set(descendants(child.pid)) <= set(found) and descendants(child.pid)
    finally:
        for pid in descendants(child.pid):
            os.kill(pid, 9)
        child.kill()
        child.wait()
