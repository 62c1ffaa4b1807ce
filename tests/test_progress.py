"""Progress reaches logs: plain lines at a steady interval when stdout is not a terminal."""

from __future__ import annotations

import re

import torch
from helpers import points_loop

import cts.progress
from cts.engine import batches_from
from cts.inference import EvalGeometry, evaluate
from cts.progress import LogProgress, progress_bar


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_lines_at_a_steady_interval_with_step_status_rate_and_eta(monkeypatch, capsys):
    clock = Clock()
    monkeypatch.setattr(cts.progress.time, "monotonic", clock)
    with LogProgress(interval=5) as bar:
        task = bar.add_task("train", total=20, completed=2, status="")
        for step in range(3, 21):
            clock.now += 1.0
            bar.update(task, completed=step, status=f"loss {1 / step:.4f}")
    lines = capsys.readouterr().out.splitlines()
    assert [re.match(r"train: step (\d+)/20", line).group(1) for line in lines] == [
        "7",
        "12",
        "17",
        "20",
    ]
    assert lines[0] == (
        "train: step 7/20 (35%), loss 0.1429, 1.00 it/s, elapsed 0:00:05, ETA 0:00:13"
    )


def test_not_a_terminal_gives_plain_lines(capsys):
    assert isinstance(progress_bar(), LogProgress)


def test_training_and_evaluation_print_progress_lines_in_logs(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cts.progress, "LOG_INTERVAL_SECONDS", 0.0)
    loop, state, loader, _ = points_loop(tmp_path, iterations=4)
    loop.run(state, batches_from(loader))
    train = [line for line in capsys.readouterr().out.splitlines() if line.startswith("train:")]
    assert {re.match(r"train: step (\d)/4 \(", line).group(1) for line in train} == set("1234")
    assert train[-1].startswith("train: step 4/4 (100%), loss ")
    assert all(", loss " in line and " it/s, elapsed " in line for line in train)
    assert ", ETA " in train[0]

    images = [{"image": torch.randn(1, 3, 32, 32), "label": torch.zeros(1, 32, 32)}] * 3
    geometry = EvalGeometry(base_size=32, window=32, stride=32)
    evaluate(lambda x: torch.randn(x.shape[0], 2, *x.shape[-2:]), images, 2, geometry, "cpu")
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" (")[0] for line in lines] == [f"eval: step {i}/3" for i in (1, 2, 3)]
