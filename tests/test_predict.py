"""`cts predict`: folders of images of any size, pictures written, unreadable ones skipped."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cts.checkpoint import save_checkpoint, segmenter_payload
from cts.cli import app
from cts.data.io import read_image, read_mask, write_image
from cts.inference import EvalGeometry, predict_logits
from cts.models import build_segmenter
from cts.predict import OUTPUTS, Predictor, find_images
from cts.visualize import MIN_WIDTH, colorize, overlay, palette

CLASSES, CROP = 4, 64
runner = CliRunner()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = build_segmenter(
        backbone="vit_tiny_patch16_384",
        num_classes=CLASSES,
        crop_size=CROP,
        depth=1,
        policy="policy_net",
        num_tokens_shared=2,
        drop_path_rate=0.0,
    )
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt", segmenter_payload(model))


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    write_image(folder / "wide.png", rng.integers(0, 256, (50, 90, 3), dtype=np.uint8))
    write_image(folder / "sub" / "tall.jpg", rng.integers(0, 256, (100, 70, 3), dtype=np.uint8))
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_predict_folder_writes_pictures_and_skips_unreadable(checkpoint, images, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(
        app,
        ["predict", str(images), "--model", str(checkpoint), "--out", str(out), "--device", "cpu"],
    )
    assert result.exit_code == 0, result.output
    assert "broken.jpg" in result.output and "skipped 1 unreadable" in result.output
    assert "predicted 2 image(s)" in result.output
    for stem, (h, w) in (("wide", (50, 90)), ("sub/tall", (100, 70))):
        for kind in OUTPUTS:
            assert (out / f"{stem}_{kind}.png").is_file(), (stem, kind)
        labels = read_mask(out / f"{stem}_labels.png")
        assert labels.shape == (h, w) and labels.max() < CLASSES
        # the pictures start at the top left, a legend and a caption below them
        rgb = read_image(images / f"{stem}{'.png' if stem == 'wide' else '.jpg'}")
        overlaid = read_image(out / f"{stem}_overlay.png")
        assert np.array_equal(overlaid[:h, :w], overlay(rgb, labels, palette(CLASSES)))
        assert overlaid.shape[0] > h and overlaid.shape[1] == max(w, MIN_WIDTH)
        assert read_image(out / f"{stem}_shared.png").shape[1] == max(CROP, MIN_WIDTH)
    assert not list(out.glob("broken*"))


def test_labels_are_the_sliding_window_argmax(checkpoint, images):
    from cts.checkpoint import load_segmenter

    model = load_segmenter(checkpoint)
    predictor = Predictor(model, "cpu", num_tokens_shared=1, short_side=80, stride=32)
    rgb = read_image(images / "sub" / "tall.jpg")
    labels, picture = predictor.predict(rgb)
    image = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255
    image = (image - torch.tensor(model.config.mean).view(1, 3, 1, 1)) / torch.tensor(
        model.config.std
    ).view(1, 3, 1, 1)
    with torch.no_grad():
        probs = predict_logits(
            lambda x: model(x, num_tokens_shared=1).logits,
            image,
            CLASSES,
            EvalGeometry(base_size=80, window=CROP, stride=32),
        )
    assert np.array_equal(labels, probs.argmax(1)[0].numpy())
    # the sharing picture outlines exactly one superpatch (K=1) in white
    assert (picture == 255).all(-1).any()


def test_single_image_and_bad_arguments(checkpoint, images, tmp_path):
    out = tmp_path / "one"
    result = runner.invoke(
        app, ["predict", str(images / "wide.png"), "-m", str(checkpoint), "-o", str(out), "-k", "0"]
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == sorted(f"wide_{k}.png" for k in OUTPUTS)

    def error(*args):
        result = runner.invoke(app, ["predict", *map(str, args)])
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        return result.output

    assert "num_tokens_shared=99 is out of range" in error(
        images, "-m", checkpoint, "-o", out, "-k", 99
    )
    assert "not found" in error(tmp_path / "missing", "-m", checkpoint, "-o", out)
    assert "no image could be read" in error(images / "broken.jpg", "-m", checkpoint, "-o", out)
    assert "skipped" in error(images / "broken.jpg", "-m", checkpoint, "-o", out)


def test_find_images_leaves_out_the_output_folder(images):
    out = images / "predictions"
    write_image(out / "old_overlay.png", np.zeros((4, 4, 3), np.uint8))
    found = find_images(images, exclude=out)
    assert [p.name for p in found] == ["broken.jpg", "tall.jpg", "wide.png"]


def test_labels_are_a_palette_png_and_pictures_have_a_legend(checkpoint, images, tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("sky\nroad\ncar\nperson\n")
    out = tmp_path / "out"
    args = ["predict", str(images / "wide.png"), "-m", str(checkpoint), "-o", str(out)]
    result = runner.invoke(app, [*args, "--classes", str(names)])
    assert result.exit_code == 0, result.output
    data = (out / "wide_labels.png").read_bytes()
    assert data[12:16] == b"IHDR" and data[24:26] == bytes([8, 3])  # 8-bit palette
    start = data.index(b"PLTE") + 4
    table = np.frombuffer(data[start : start + 768], np.uint8).reshape(256, 3)
    colours = palette(CLASSES)
    assert np.array_equal(table[:CLASSES], colours)
    labels = read_mask(out / "wide_labels.png")  # the ids, not the colours
    assert labels.shape == (50, 90) and labels.max() < CLASSES
    coloured = read_image(out / "wide_color.png")
    assert np.array_equal(coloured[:50, :90], colorize(labels, colours))
    below = coloured[50:]
    shown = [int((below == c).all(-1).sum() >= 100) for c in colours]
    assert shown == [int(i in np.unique(labels)) for i in range(CLASSES)]

    three = tmp_path / "three.txt"
    three.write_text("sky\nroad\ncar\n")
    result = runner.invoke(app, [*args, "--classes", str(three)])
    assert result.exit_code == 1 and "3 class names given for a model of 4 classes" in result.output
    result = runner.invoke(app, [*args, "--classes", str(tmp_path / "missing.txt")])
    assert result.exit_code == 1 and "missing.txt not found" in result.output
