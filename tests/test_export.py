"""`cts export`: one ONNX graph from images to labels, equal to PyTorch's predict."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from typer.testing import CliRunner

from cts.checkpoint import save_checkpoint, segmenter_payload
from cts.cli import app
from cts.data.synthetic import render_scene
from cts.export import onnx_session, tiling_hint
from cts.inference import EvalGeometry
from cts.models import build_segmenter

CLASSES, CROP, K = 12, 64, 3
runner = CliRunner()


def _checkpoint(folder, policy: str, k: int, **config):
    torch.manual_seed(0)
    model = build_segmenter(
        backbone="vit_tiny_patch16_384",
        num_classes=CLASSES,
        crop_size=CROP,
        depth=1,
        policy=policy,
        num_tokens_shared=k,
        drop_path_rate=0.0,
        **config,
    )
    return save_checkpoint(folder / f"{policy}.pt", segmenter_payload(model)), model.eval()


@pytest.fixture(scope="module")
def cts_checkpoint(tmp_path_factory):
    return _checkpoint(tmp_path_factory.mktemp("ckpt"), "policy_net", K)


def _validation_images(model, count: int, seed: int = 0) -> torch.Tensor:
    """Synthetic scenes (the default dataset's generator) at the crop, normalised."""
    rng = np.random.default_rng(seed)
    rgb = np.stack([render_scene(CROP, CLASSES, rng)[0] for _ in range(count)])
    images = torch.from_numpy(rgb).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor(model.config.mean).view(1, 3, 1, 1)
    std = torch.tensor(model.config.std).view(1, 3, 1, 1)
    return (images - mean) / std


def _export(checkpoint, out, *extra: str):
    result = runner.invoke(app, ["export", "--model", str(checkpoint), "--out", str(out), *extra])
    assert result.exit_code == 0, result.output
    return result


@pytest.mark.parametrize("with_scores", [False, True], ids=["labels", "labels+scores"])
def test_onnx_labels_equal_pytorch_predict_for_several_batch_sizes(
    cts_checkpoint, tmp_path, with_scores
):
    """The default graph (labels only, what `cts export` writes) and the one with --scores:
    both share K superpatches in the graph and run in onnxruntime like PyTorch."""
    checkpoint, model = cts_checkpoint
    out = tmp_path / "model.onnx"
    result = _export(checkpoint, out, *(["--scores"] if with_scores else []))
    assert f"K {K}" in result.output and not list(tmp_path.glob(".*tmp"))
    graph = onnx.load(out).graph
    assert [i.name for i in graph.input] == ["images"]
    outputs = ["labels", "scores"] if with_scores else ["labels"]
    assert [o.name for o in graph.output] == outputs
    ops = {node.op_type for node in graph.node}
    assert {"TopK", "ScatterElements", "Resize", "ArgMax"} <= ops, ops  # all in one graph
    session = onnx_session(out)
    for batch, seed in ((1, 0), (2, 1), (5, 2)):
        images = _validation_images(model, batch, seed)
        results = session.run(None, {"images": images.numpy()})
        assert len(results) == len(outputs)
        labels = results[0]
        with torch.no_grad():
            expected = model.predict(images)
            logits = model(images).logits
        assert labels.dtype == np.int64 and labels.shape == (batch, CROP, CROP)
        assert (torch.from_numpy(labels) == expected).float().mean() >= 0.999
        if with_scores:
            scores = results[1]
            assert scores.shape == (batch, CLASSES, CROP, CROP)
            assert np.allclose(scores, logits.numpy(), atol=1e-3)


def test_k0_and_policy_none_export_the_plain_segmenter(cts_checkpoint, tmp_path):
    checkpoint, model = cts_checkpoint
    plain, plain_model = _checkpoint(tmp_path, "none", 0)
    images = _validation_images(model, 2)
    for path, net, extra in ((checkpoint, model, ["-k", "0"]), (plain, plain_model, [])):
        out = tmp_path / f"{path.stem}.onnx"
        _export(path, out, *extra)
        ops = {node.op_type for node in onnx.load(out).graph.node}
        assert "TopK" not in ops and "ScatterElements" not in ops, ops
        labels = onnx_session(out).run(None, {"images": images.numpy()})[0]
        with torch.no_grad():
            expected = net.predict(images, 0)
        assert (torch.from_numpy(labels) == expected).float().mean() >= 0.999


@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        (lambda d, c: ["--model", str(d / "missing.pt")], "missing.pt"),
        (lambda d, c: ["--model", str(d / "foreign.pt")], "foreign.pt"),
        (lambda d, c: ["--model", str(c), "--opset", "9"], "opset 9 is not supported"),
        (lambda d, c: ["--model", str(c), "-k", "5"], "num_tokens_shared=5 is out of range"),
    ],
)
def test_bad_input_is_one_line(cts_checkpoint, tmp_path, make_args, message):
    checkpoint, _ = cts_checkpoint
    (tmp_path / "foreign.pt").write_text("an ONNX file? no, some text")
    out = tmp_path / "model.onnx"
    result = runner.invoke(app, ["export", *make_args(tmp_path, checkpoint), "--out", str(out)])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: export:"), result.output
    assert message in lines[0]
    assert not out.exists()


def test_export_file_gets_the_umask_permissions_and_dead_leftovers_go(cts_checkpoint, tmp_path):
    import os

    checkpoint, _ = cts_checkpoint
    out = tmp_path / "model.onnx"
    dead = 2**22 + 12345  # above the default pid_max: no such process
    leftover = tmp_path / f".model.onnx.{dead}.ab12.tmp"
    leftover.write_bytes(b"half an export")
    previous = os.umask(0o022)
    try:
        result = _export(checkpoint, out)
    finally:
        os.umask(previous)
    assert out.stat().st_mode & 0o777 == 0o644
    assert not leftover.exists()
    # the graph is for crop-sized images: the output says how whole images are tiled
    assert f"{CROP}x{CROP} images only" in result.output and "cts predict" in result.output
    hint = tiling_hint(CROP, EvalGeometry(base_size=96, window=CROP, stride=32, max_ratio=2))
    assert "short side of 96" in hint and "at most 2 times" in hint and "stride 32" in hint


@pytest.mark.parametrize(
    ("merging", "reason"),
    [
        ({"tome_r": 2}, "the model merges tokens (ToMe, tome_r=2):"),
        (
            {"algm_threshold": 0.9, "algm_layers": (1,)},
            "the model merges tokens per image (ALGM, algm_threshold=0.9): its token count "
            "depends on the image, which no graph of fixed shapes holds;",
        ),
    ],
)
def test_a_model_trained_merging_is_refused_in_one_line(tmp_path, merging, reason):
    checkpoint, _ = _checkpoint(tmp_path, "none", 0, **merging)
    out = tmp_path / "model.onnx"
    result = runner.invoke(app, ["export", "--model", str(checkpoint), "--out", str(out)])
    assert result.exit_code == 1 and not out.exists()
    assert result.output.strip() == (
        f"error: export: {reason} ONNX export takes CTS and plain Segmenter models only"
    )
