"""Progress of long loops: a rich bar on a terminal, plain lines at a steady interval in logs.

A bar redraws one line in place, which a log file (CI, ``nohup``, ``dvc exp run --queue``,
SLURM) does not show until the end. When stdout is not a terminal, :class:`LogProgress`
prints ``description: step N/T (p%), <status>, R it/s, elapsed, ETA`` every ``interval``
seconds and once at the end.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any, TextIO

from rich import get_console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

LOG_INTERVAL_SECONDS = 30.0


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}"


@dataclass
class _Task:
    description: str
    total: float | None
    completed: float
    visible: bool
    fields: dict[str, Any]
    started: float
    start_completed: float
    last_line: float
    printed: float | None = None


class LogProgress:
    """The part of rich's ``Progress`` API the loops use, writing plain lines to ``stream``."""

    def __init__(
        self,
        interval: float | None = None,
        stream: TextIO | None = None,
        disable: bool = False,
    ) -> None:
        self.interval = LOG_INTERVAL_SECONDS if interval is None else interval
        self.stream = stream
        self.disable = disable
        self.tasks: dict[int, _Task] = {}

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, kind: type | None, *_: object) -> None:
        if kind is None:  # the final line of every task not printed at its last step
            for task in self.tasks.values():
                if task.printed != task.completed:
                    self._print(task)

    def add_task(
        self,
        description: str,
        total: float | None = None,
        completed: float = 0,
        visible: bool = True,
        **fields: Any,
    ) -> int:
        now = time.monotonic()
        task_id = len(self.tasks)
        self.tasks[task_id] = _Task(
            description, total, completed, visible, fields, now, completed, now
        )
        return task_id

    def update(
        self,
        task_id: int,
        *,
        completed: float | None = None,
        advance: float | None = None,
        description: str | None = None,
        total: float | None = None,
        visible: bool | None = None,
        **fields: Any,
    ) -> None:
        task = self.tasks[task_id]
        if completed is not None:
            task.completed = completed
        if advance is not None:
            task.completed += advance
        if description is not None:
            task.description = description
        if total is not None:
            task.total = total
        if visible is not None:
            task.visible = visible
        task.fields.update(fields)
        if time.monotonic() - task.last_line >= self.interval:
            self._print(task)

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def line(self, task: _Task) -> str:
        """``train: step 120/450 (27%), loss 1.2345, 0.85 it/s, elapsed 0:02:21, ETA 0:06:28``."""
        elapsed = time.monotonic() - task.started
        done = task.completed - task.start_completed
        rate = done / elapsed if elapsed > 0 else 0.0
        parts = [f"step {task.completed:.0f}"]
        if task.total:
            parts[0] += f"/{task.total:.0f} ({100 * task.completed / task.total:.0f}%)"
        status = str(task.fields.get("status", "")).strip()
        if status:
            parts.append(status)
        parts += [f"{rate:.2f} it/s", f"elapsed {_clock(elapsed)}"]
        if task.total and rate > 0:
            parts.append(f"ETA {_clock((task.total - task.completed) / rate)}")
        return f"{task.description}: " + ", ".join(parts)

    def _print(self, task: _Task) -> None:
        task.last_line = time.monotonic()
        if self.disable or not task.visible:
            return
        print(self.line(task), file=self.stream or sys.stdout, flush=True)
        task.printed = task.completed


def progress_bar(*columns: Any, disable: bool = False) -> Progress | LogProgress:
    """A rich bar (``columns``, default: description, bar, N/T, status, elapsed, ETA) on a
    terminal; :class:`LogProgress` lines when stdout is not one."""
    if not get_console().is_terminal:
        return LogProgress(disable=disable)
    columns = columns or (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    return Progress(*columns, disable=disable)
