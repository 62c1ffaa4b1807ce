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


def _saved_segmenter(path, **config):
    """A tiny one-block Segmenter of ``config`` saved at ``path``."""
    torch.manual_seed(0)
    model = build_segmenter(
        backbone="vit_tiny_patch16_384",
        num_classes=CLASSES,
        crop_size=CROP,
        depth=1,
        drop_path_rate=0.0,
        **config,
    )
    return save_checkpoint(path, segmenter_payload(model))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    return _saved_segmenter(path, policy="policy_net", num_tokens_shared=2)


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
    for stem, (h, w) in (("wide.png", (50, 90)), ("sub/tall.jpg", (100, 70))):
        for kind in OUTPUTS:
            assert (out / f"{stem}_{kind}.png").is_file(), (stem, kind)
        labels = read_mask(out / f"{stem}_labels.png")
        assert labels.shape == (h, w) and labels.max() < CLASSES
        # the pictures start at the top left, a legend and a caption below them
        rgb = read_image(images / stem)
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
    assert sorted(p.name for p in out.iterdir()) == sorted(f"wide.png_{k}.png" for k in OUTPUTS)
    out = tmp_path / "errors"

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
    data = (out / "wide.png_labels.png").read_bytes()
    assert data[12:16] == b"IHDR" and data[24:26] == bytes([8, 3])  # 8-bit palette
    start = data.index(b"PLTE") + 4
    table = np.frombuffer(data[start : start + 768], np.uint8).reshape(256, 3)
    colours = palette(CLASSES)
    assert np.array_equal(table[:CLASSES], colours)
    labels = read_mask(out / "wide.png_labels.png")  # the ids, not the colours
    assert labels.shape == (50, 90) and labels.max() < CLASSES
    coloured = read_image(out / "wide.png_color.png")
    assert np.array_equal(coloured[:50, :90], colorize(labels, colours))
    below = coloured[50:]
    shown = [int((below == c).all(-1).sum() >= 100) for c in colours]
    assert shown == [int(i in np.unique(labels)) for i in range(CLASSES)]

    three = tmp_path / "three.txt"
    three.write_text("sky\nroad\ncar\n")
    args.append("--force")  # the pictures exist
    result = runner.invoke(app, [*args, "--classes", str(three)])
    assert result.exit_code == 1 and "3 class names given for a model of 4 classes" in result.output
    result = runner.invoke(app, [*args, "--classes", str(tmp_path / "missing.txt")])
    assert result.exit_code == 1 and "missing.txt not found" in result.output


def _normalised(rgb: np.ndarray, model) -> torch.Tensor:
    """``(H, W, 3)`` uint8 -> ``(1, 3, H, W)`` normalised as the model expects."""
    image = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255
    mean = torch.tensor(model.config.mean).view(1, 3, 1, 1)
    return (image - mean) / torch.tensor(model.config.std).view(1, 3, 1, 1)


def test_predict_follows_the_evaluation_geometry_the_checkpoint_stores(tmp_path):
    """A Cityscapes-like geometry (base above the crop, stride half the window, long side at
    most twice the base): `cts predict` labels what eval_ss scores, and the stride and short
    side given on the command line replace the stored ones."""
    from cts.checkpoint import load_segmenter
    from cts.inference import predict_labels

    torch.manual_seed(1)
    model = build_segmenter(
        backbone="vit_tiny_patch16_384",
        num_classes=CLASSES,
        crop_size=CROP,
        depth=1,
        policy="policy_net",
        num_tokens_shared=2,
        drop_path_rate=0.0,
    )
    stored = EvalGeometry(base_size=96, window=CROP, stride=32, max_ratio=2)
    path = save_checkpoint(tmp_path / "city.pt", segmenter_payload(model, eval_geometry=stored))
    model = load_segmenter(path)
    rgb = np.random.default_rng(3).integers(0, 256, (40, 200, 3), dtype=np.uint8)
    write_image(tmp_path / "in" / "wide.png", rgb)

    def eval_ss_labels(geometry: EvalGeometry) -> np.ndarray:
        with torch.no_grad():
            labels = predict_labels(
                lambda x: model(x, num_tokens_shared=2).logits,
                _normalised(rgb, model),
                CLASSES,
                geometry,
            )
        return labels[0].numpy()

    for extra, geometry in (
        ([], stored),
        (["--short-side", "80", "--stride", "16"], EvalGeometry(80, CROP, 16, max_ratio=2)),
    ):
        out = tmp_path / f"out{len(extra)}"
        args = ["predict", str(tmp_path / "in"), "-m", str(path), "-o", str(out), *extra]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        assert "geometry" not in result.output  # the stored one: nothing to say
        labels = read_mask(out / "wide.png_labels.png")
        assert np.array_equal(labels, eval_ss_labels(geometry)), (extra, geometry)


def test_a_checkpoint_without_geometry_says_so_once(checkpoint, images, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["predict", str(images), "-m", str(checkpoint), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert result.output.count("stores no evaluation geometry") == 1, result.output


def test_outputs_are_unique_per_input_and_never_overwritten_unasked(checkpoint, tmp_path):
    """x.png, x.jpg and x_png.png: three sets of pictures, each of its own image; a second run
    stops before any work naming a picture that exists, unless --force."""
    rng = np.random.default_rng(0)
    sizes = {"x.png": (40, 50), "x.jpg": (30, 70), "x_png.png": (60, 36)}
    for name, (h, w) in sizes.items():
        write_image(tmp_path / "in" / name, rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    out = tmp_path / "out"
    args = ["predict", str(tmp_path / "in"), "-m", str(checkpoint), "-o", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0 and "predicted 3 image(s)" in result.output, result.output
    assert len(list(out.iterdir())) == 3 * len(OUTPUTS)
    for name, size in sizes.items():
        assert read_mask(out / f"{name}_labels.png").shape == size, name
    before = {p: p.stat().st_mtime_ns for p in out.iterdir()}

    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "--force" in lines[0], result.output
    assert str(out / "x.jpg_labels.png") in lines[0]
    assert {p: p.stat().st_mtime_ns for p in out.iterdir()} == before

    result = runner.invoke(app, [*args, "--force"])
    assert result.exit_code == 0 and "predicted 3 image(s)" in result.output, result.output


def test_symlinked_folders_are_followed_and_loops_are_not(checkpoint, tmp_path):
    rng = np.random.default_rng(0)
    elsewhere = tmp_path / "elsewhere"
    for i in range(3):
        write_image(elsewhere / f"{i}.png", rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))
    folder = tmp_path / "in"
    write_image(folder / "own.png", rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))
    (folder / "linked").symlink_to(elsewhere, target_is_directory=True)
    (elsewhere / "loop").symlink_to(folder, target_is_directory=True)  # in -> linked -> loop
    found = find_images(folder)
    assert [str(p.relative_to(folder)) for p in found] == [
        "linked/0.png",
        "linked/1.png",
        "linked/2.png",
        "own.png",
    ]
    out = tmp_path / "out"
    result = runner.invoke(app, ["predict", str(folder), "-m", str(checkpoint), "-o", str(out)])
    assert result.exit_code == 0 and "predicted 4 image(s)" in result.output, result.output
    assert (out / "linked" / "2.png_labels.png").is_file()


def test_errors_name_the_file_and_what_to_do(checkpoint, images, tmp_path):
    def error(*args) -> str:
        result = runner.invoke(app, ["predict", *map(str, args)])
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1, result.output
        return lines[0]

    binary = tmp_path / "classes.bin"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00")
    line = error(images, "-m", checkpoint, "-o", tmp_path / "o", "--classes", binary)
    assert str(binary) in line and "one name per line" in line

    # --out is checked before the model loads: a junk model is not even read
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"hello world this is text\n" * 10)
    taken = tmp_path / "a-file"
    taken.write_text("")
    line = error(images, "-m", junk, "-o", taken)
    assert str(taken) in line and "folder" in line and "Errno" not in line

    line = error(images, "-m", junk, "-o", tmp_path / "o")
    assert str(junk) in line and "torch.save" in line


def test_train_segmenter_stores_the_evaluation_geometry(tmp_path, monkeypatch):
    """The stage writes the sizes eval_ss uses (params, else the dataset's) with the
    weights: what `cts predict` reads back."""
    from cts.checkpoint import load_checkpoint, stored_eval_geometry
    from cts.data.info import DatasetInfo, write_dataset_info
    from cts.engine import TrainState
    from cts_stages.common import SEGMENTER_CHECKPOINT
    from cts_stages.train_segmenter import write_results

    monkeypatch.chdir(tmp_path)
    names = tuple(f"c{i}" for i in range(CLASSES))
    info = DatasetInfo("city", names, base_size=96, max_ratio=2, window=CROP, stride=32)
    write_dataset_info(tmp_path / "data", info)
    model = build_segmenter(
        backbone="vit_tiny_patch16_384",
        num_classes=CLASSES,
        crop_size=CROP,
        depth=1,
        policy="none",
        num_tokens_shared=0,
    )
    params = {"data_root": "data", "base_size": None, "eval_window": None, "eval_stride": None}
    params.update(iterations=1, mlflow_registered_model=None)
    state = TrainState(1, [{"step": 1, "loss": 1.0, "lr": 0.1}])
    write_results(params, model, state, 1.0)
    stored = stored_eval_geometry(load_checkpoint(SEGMENTER_CHECKPOINT))
    assert stored == EvalGeometry(base_size=96, window=CROP, stride=32, max_ratio=2)


def test_a_threshold_shares_per_image_what_the_policy_is_sure_of(checkpoint, images, tmp_path):
    """`cts predict -t`: every window is segmented with K per image (the model's
    `share_threshold`), the sharing picture counts what its own forward shared, and a setting
    the model cannot run is one line before any picture."""
    from cts.checkpoint import load_segmenter
    from cts.inference import normalised_resize

    model = load_segmenter(checkpoint)
    predictor = Predictor(model, "cpu", short_side=80, stride=32, share_threshold=0.5)
    assert (predictor.num_tokens_shared, predictor.share_threshold) == (None, 0.5)
    rgb = read_image(images / "sub" / "tall.jpg")
    with torch.no_grad():
        probs = predict_logits(
            lambda x: model(x, share_threshold=0.5).logits,
            _normalised(rgb, model),
            CLASSES,
            EvalGeometry(base_size=80, window=CROP, stride=32),
        )
        crop = normalised_resize(
            torch.from_numpy(rgb), (CROP, CROP), model.config.mean, model.config.std
        )
        shared = model(crop, share_threshold=0.5).shared
    assert np.array_equal(predictor.labels(rgb), probs.argmax(1)[0].numpy())
    assert predictor.sharing_picture(rgb)[1] == int(shared.sum())
    fixed = predictor.with_sharing(num_tokens_shared=1)
    assert (fixed.num_tokens_shared, fixed.share_threshold, fixed.model) == (1, None, model)

    out = tmp_path / "out"
    args = ["predict", str(images / "wide.png"), "-m", str(checkpoint), "-o", str(out)]
    result = runner.invoke(app, [*args, "-t", "0.5"])
    assert result.exit_code == 0, result.output
    assert (out / "wide.png_shared.png").is_file()
    for extra, message in (
        (["-t", "1.5"], "share_threshold=1.5"),
        (["-t", "0.5", "-k", "1"], "give one"),
    ):
        result = runner.invoke(app, [*args, "--force", *extra])
        assert result.exit_code == 1 and message in result.output, result.output
    model.config.policy = "none"
    with pytest.raises(ValueError, match="policy none"):
        predictor.with_sharing(share_threshold=0.5)


@pytest.mark.parametrize(
    "merging", [{"tome_r": 8}, {"algm_threshold": 0.05, "algm_layers": (1,)}], ids=["tome", "algm"]
)
def test_a_checkpoint_trained_merging_predicts_merging(images, tmp_path, merging):
    """A model trained with `token_reduction: tome` or `algm` keeps its setting: `cts predict`
    segments every window merging, and its sharing picture shares nothing."""
    from cts.checkpoint import load_segmenter

    model = load_segmenter(_saved_segmenter(tmp_path / "merging.pt", policy="none", **merging))
    assert all(getattr(model.config, key) == value for key, value in merging.items())
    predictor = Predictor(model, "cpu", short_side=80, stride=32)
    rgb = read_image(images / "sub" / "tall.jpg")
    image, geometry = _normalised(rgb, model), EvalGeometry(base_size=80, window=CROP, stride=32)
    with torch.no_grad():
        merged = predict_logits(lambda x: model(x).logits, image, CLASSES, geometry)
        plain = predict_logits(lambda x: model(x, tome_r=0).logits, image, CLASSES, geometry)
        out = model(image[..., :CROP, :CROP])
    assert out.num_tokens == 16 and not out.shared.any()  # one block: 16 tokens enter it
    labels = predictor.labels(rgb)
    assert np.array_equal(labels, merged.argmax(1)[0].numpy())
    assert not np.array_equal(labels, plain.argmax(1)[0].numpy())  # merging shows here
    assert predictor.sharing_picture(rgb)[1] == 0
