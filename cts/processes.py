"""Which processes still run: what lets a later process clean up after a killed one (its
temporary files, its MLflow runs) without touching the work of a live one."""

from __future__ import annotations

import os
from pathlib import Path


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of ``/proc/PID/stat`` after the command name (Linux): state at 0, parent pid
    at 1, start time at 19; None when the process is gone or there is no /proc."""
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
