"""Which processes still run: what lets a later process clean up after a killed one (its
temporary files, its MLflow runs) without touching the work of a live one; and how a process
of ours ends when it is told to stop (SIGTERM, SIGUSR1, Ctrl-C), and how a training stops
only between two steps (:class:`DeferredStop`)."""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import MutableMapping
from pathlib import Path
from types import FrameType, TracebackType

# The signals that stop a stage cleanly; a worker they stop exits with 128 + the signal, as a
# shell reports it.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
# Of those, a scheduler's: SIGTERM (preemption, `scancel`, Kubernetes) and SIGUSR1 (SLURM's
# warning before the time limit, `--signal=USR1@N`). A training finishes its step first.
TERMINATE_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGUSR1 (schedulers, `timeout`, `docker stop`, DVC's queue): unwinds like
    Ctrl-C, so resume checkpoints stay, temporary files go and MLflow runs end KILLED."""


def raise_terminated(signum: int, frame: FrameType | None) -> None:
    """SIGTERM and SIGUSR1 handler of a stage's own process: the first unwinds, a second
    ends it at once."""
    for each in TERMINATE_SIGNALS:
        signal.signal(each, signal.SIG_DFL)
    raise Terminated()


class DeferredStop:
    """``with DeferredStop() as stop:`` (in the main thread): SIGTERM and SIGUSR1 interrupt
    nothing inside; the first is kept in ``stop.signum`` (0: none; repeats are ignored) for
    the code to act on where it can stop cleanly: a training loop finishes its step and
    writes its resume checkpoint. Leaving the block without an exception, a kept signal goes
    to the handler it replaced (a stage's raises :class:`Terminated`; Python's default ends
    the process with the signal). A signal that was ignored stays ignored."""

    def __init__(self) -> None:
        self.signum = 0
        self._replaced: dict[int, object] = {}

    def __enter__(self) -> DeferredStop:
        if threading.current_thread() is threading.main_thread():
            for each in TERMINATE_SIGNALS:
                handler = signal.getsignal(each)
                if handler not in (signal.SIG_IGN, None):  # None: set outside Python
                    self._replaced[each] = handler
                    signal.signal(each, self._keep)
        return self

    def _keep(self, signum: int, frame: FrameType | None) -> None:
        self.request(signum)

    def request(self, signum: int) -> None:
        """Stop as if ``signum`` had arrived (another process of the job received it)."""
        self.signum = self.signum or signum

    def __exit__(
        self, kind: type | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        for each, handler in self._replaced.items():
            signal.signal(each, handler)
        if kind is None and self.signum:
            handler = self._replaced.get(self.signum)
            if callable(handler):
                handler(self.signum, None)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(self.signum)
            # A handler that let the process go on: the work it stopped is not done.
            raise interrupt_for(self.signum)


def _ignore(signum: int, frame: FrameType | None) -> None:
    """A Python-level no-op, not SIG_IGN: SIG_IGN would survive exec into any process the
    worker starts while it unwinds."""


def stop_once(signum: int, frame: FrameType | None) -> None:
    """SIGTERM, SIGUSR1 and SIGINT handler of a worker process: the first raises Terminated
    (SIGTERM, SIGUSR1) or KeyboardInterrupt (SIGINT), later ones are ignored. A scheduler
    signals every process of the job and then the launcher passes the signal on: the second
    must not cut short the worker's cleanup (ending its MLflow runs KILLED). The launcher
    SIGKILLs a worker that has not ended within its shutdown timeout."""
    for each in STOP_SIGNALS:
        signal.signal(each, _ignore)
    raise interrupt_for(signum)


def stop_exit_code(error: KeyboardInterrupt) -> int:
    """The exit status of a worker that this interrupt stopped."""
    return 128 + (signal.SIGTERM if isinstance(error, Terminated) else signal.SIGINT)


def stopped_by(exitcode: int) -> signal.Signals | None:
    """The stop signal behind a process's exit status (a worker stopped cleanly: 128 + N; one
    that had no handler yet: -N), else None."""
    for each in STOP_SIGNALS:
        if exitcode in (128 + each, -each):
            return each
    return None


def interrupt_for(signum: int) -> KeyboardInterrupt:
    """What a stop signal raises in the process that handles it."""
    return Terminated() if signum in TERMINATE_SIGNALS else KeyboardInterrupt()


# libgomp, PyTorch's OpenMP runtime on Linux, lets a thread that waits for work spin 300,000
# times before it sleeps (6 ms on the 2-core test machine). Between the ops of one job that
# keeps it ready, but a second job on the same cores finds them taken by spinning threads: two
# trainings on 2 cores took 7.7x as long each, not 2x. 10,000 spins (0.25 ms there) keep a
# thread ready across the short gaps between the ops of a step and give the core up soon after;
# OMP_WAIT_POLICY=PASSIVE (no spinning) made a job alone 17% slower. Measured by
# scripts/measure/concurrent_jobs.py (docs/speed.md, "Several jobs on one machine").
OPENMP_SPIN_COUNT = 10_000


def bound_openmp_spinning(
    environ: MutableMapping[str, str] = os.environ, torch_loaded: bool | None = None
) -> bool:
    """Sets GOMP_SPINCOUNT to :data:`OPENMP_SPIN_COUNT` unless the user chose a wait policy or
    spin count (OMP_WAIT_POLICY, GOMP_SPINCOUNT); returns whether it did. libgomp reads them
    once, when torch loads it: only before that does this reach the process itself (and the
    workers and loaders it starts, which inherit the environment)."""
    if torch_loaded is None:
        torch_loaded = "torch" in sys.modules
    if torch_loaded or "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ:
        return False
    environ["GOMP_SPINCOUNT"] = str(OPENMP_SPIN_COUNT)
    return True


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of ``/proc/PID/stat`` after the command name (Linux): state at 0, parent pid
    at 1, process group at 2, start time at 19; None when the process is gone or there is
    no /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (another user's counts; a zombie counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def process_start(pid: int) -> str:
    """The process's start time since boot (Linux), "" elsewhere or when it is gone: pids
    are reused, a pid with its start time is not."""
    fields = _stat_fields(pid)
    return fields[19] if fields else ""


def running(pids: list[int]) -> list[int]:
    """The pids whose process runs: neither gone nor a zombie waiting for its parent."""
    return [pid for pid in pids if (fields := _stat_fields(pid)) and fields[0] != "Z"]


def descendants(pid: int) -> list[int]:
    """Children, grandchildren and so on of ``pid`` (Linux; empty without /proc)."""
    children: dict[int, list[int]] = {}
    proc = Path("/proc")
    for entry in proc.iterdir() if proc.is_dir() else ():
        if entry.name.isdigit() and (fields := _stat_fields(int(entry.name))):
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def process_group(pgid: int) -> list[int]:
    """The running processes (zombies left out) of process group ``pgid`` (Linux; empty
    without /proc): what a scheduler's signal to the job reaches, and must leave nothing of."""
    proc = Path("/proc")
    return [
        int(entry.name)
        for entry in (proc.iterdir() if proc.is_dir() else ())
        if entry.name.isdigit()
        and (fields := _stat_fields(int(entry.name)))
        and int(fields[2]) == pgid
        and fields[0] != "Z"
    ]
