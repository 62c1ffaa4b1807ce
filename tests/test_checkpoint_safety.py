"""Checkpoints are read as tensors and plain values: a hostile pickle never runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

import cts
from cts.checkpoint import load_checkpoint, save_checkpoint, segmenter_payload
from cts.cli import app
from cts.data.io import write_image
from cts.models import build_segmenter

runner = CliRunner()


class Payload:
    """Unpickling this creates ``marker``: the proof that a loader ran the file's code."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


@pytest.fixture
def evil(tmp_path):
    """An original-layout folder (checkpoint.pth + variant.yml) whose pickle runs code."""
    folder = tmp_path / "evil"
    folder.mkdir()
    marker = tmp_path / "payload-ran"
    torch.save(
        {"model": {"encoder.cls_token": torch.zeros(1)}, "x": Payload(marker)},
        folder / "checkpoint.pth",
    )
    (folder / "variant.yml").write_text(yaml.dump({"net_kwargs": {"d_model": 192}}))
    return folder / "checkpoint.pth", marker


def _one_line_error(result, command: str) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {command}:"), result.output
    return lines[0]


def test_predict_refuses_a_pickle_with_code(evil, tmp_path):
    path, marker = evil
    write_image(tmp_path / "in" / "a.png", np.zeros((32, 32, 3), np.uint8))
    result = runner.invoke(
        app, ["predict", str(tmp_path / "in"), "-m", str(path), "-o", str(tmp_path / "out")]
    )
    line = _one_line_error(result, "predict")
    assert str(path) in line and "--trust-checkpoint" in line and "exec" in line
    assert not marker.exists()


def test_import_checkpoint_refuses_a_pickle_with_code(evil, tmp_path):
    path, marker = evil
    result = runner.invoke(app, ["import_checkpoint", str(path), "-o", str(tmp_path / "o.pt")])
    line = _one_line_error(result, "import_checkpoint")
    assert str(path) in line and "--trust-checkpoint" in line
    assert not marker.exists() and not (tmp_path / "o.pt").exists()
    # The option is the user's explicit choice: then the file is unpickled (and its code runs).
    result = runner.invoke(
        app, ["import_checkpoint", str(path), "-o", str(tmp_path / "o.pt"), "--trust-checkpoint"]
    )
    assert marker.exists()


def test_load_model_refuses_unless_trusted(evil):
    path, marker = evil
    with pytest.raises(ValueError, match="trust=True"):
        cts.load_model(path)
    with pytest.raises(ValueError, match="trust=True"):
        cts.load_model(path.parent)  # the folder form reads the same file
    assert not marker.exists()


def test_eval_stage_refuses_a_pickle_with_code(evil, tmp_path, monkeypatch):
    from cts_stages.evaluation import run_evaluation

    path, marker = evil
    monkeypatch.chdir(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "segmenter.pt").write_bytes(path.read_bytes())
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "classes.txt").write_text("a\nb\n")
    params = {"device": "cpu", "data_root": "data"}
    params.update(base_size=None, eval_window=None, eval_stride=None)
    with pytest.raises(ValueError, match="refusing to unpickle"):
        run_evaluation(params, "eval_ss", [1.0], False)
    assert not marker.exists()


def test_own_and_numpy_checkpoints_load_safely(tmp_path):
    model = build_segmenter(
        backbone="vit_tiny_patch16_384",
        num_classes=3,
        crop_size=64,
        depth=1,
        num_tokens_shared=2,
        policy="random",
        decoder="linear",
    )
    path = save_checkpoint(tmp_path / "m.pt", segmenter_payload(model, history=[{"step": 1}]))
    assert cts.load_model(path).config == model.config
    save_checkpoint(
        tmp_path / "np.pt", {"epoch": np.int64(3), "lr": np.float64(0.1), "a": np.arange(3)}
    )
    payload = load_checkpoint(tmp_path / "np.pt")
    assert payload["epoch"] == 3 and payload["a"].tolist() == [0, 1, 2]


def test_empty_checkpoint_says_why(tmp_path):
    (tmp_path / "empty.pt").touch()
    with pytest.raises(ValueError, match=r"empty.pt is empty \(0 bytes\)"):
        load_checkpoint(tmp_path / "empty.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match=r"cannot be read: \S"):
        load_checkpoint(tmp_path / "junk.pt")


def test_unreadable_checkpoints_say_what_to_do(tmp_path):
    """Junk and foreign pickles: one line naming the file and the way out (another file, or
    --trust-checkpoint for a pickle the safe reader cannot read), never torch's advice to
    set weights_only=False nor a bare number."""
    import pickle

    (tmp_path / "junk.pt").write_bytes(b"hello world this is text\n" * 10)
    with open(tmp_path / "pickled.pt", "wb") as f:
        pickle.dump({"model": {"w": [1.0]}, "epoch": {1, 2}}, f, protocol=4)
    for name, advice in (("junk.pt", "torch.save"), ("pickled.pt", "--trust-checkpoint")):
        path = tmp_path / name
        with pytest.raises(ValueError) as caught:
            load_checkpoint(path)
        message = str(caught.value)
        assert str(path) in message and advice in message, message
        assert "weights_only" not in message and "\n" not in message, message
    write_image(tmp_path / "in" / "a.png", np.zeros((32, 32, 3), np.uint8))
    args = [str(tmp_path / "in"), "-m", str(tmp_path / "pickled.pt"), "-o", str(tmp_path / "o")]
    result = runner.invoke(app, ["predict", *args])
    assert "--trust-checkpoint" in _one_line_error(result, "predict")
