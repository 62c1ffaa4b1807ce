"""Pictures and plots: label maps as palette PNGs, legends and captions, the outline of the
shared superpatches, the eval scenes, the confusion matrix, the DVC plot definitions (titles,
axis labels, the common 0-100 IoU axis, K on the sweep points) and the sweep's subtitle."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from cts.data.folder import SegmentationFolder
from cts.data.io import read_mask, write_image, write_label_png
from cts.visualize import (
    IGNORE_COLOUR,
    MIN_WIDTH,
    annotate,
    classes_present,
    colorize,
    confusion_layout,
    confusion_matrix_image,
    eval_scene,
    legend,
    legend_entries,
    outline_shared,
    palette,
    titled_panels,
)

REPO = Path(__file__).resolve().parents[1]


def colour_counts(picture: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """Pixels of ``picture`` exactly equal to each colour."""
    return np.array([(picture == c).all(-1).sum() for c in colours])


def test_label_png_is_a_palette_png_of_the_ids(tmp_path):
    colours = palette(12)
    ids = np.random.default_rng(0).integers(0, 12, (37, 53)).astype(np.uint8)
    ids[0, :5] = 255  # ignore
    path = write_label_png(tmp_path / "x_labels.png", ids, colours)
    with Image.open(path) as image:
        assert (image.format, image.mode, image.size) == ("PNG", "P", (53, 37))
        assert np.array_equal(np.asarray(image), ids)  # the ids are the pixels
        table = np.array(image.getpalette(), np.uint8).reshape(-1, 3)
    assert len(table) == 256 and np.array_equal(table[:12], colours) and not table[12:].any()
    # cts reads the ids back; a viewer shows the colours (OpenCV decodes to them)
    assert np.array_equal(read_mask(path), ids)
    shown = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    assert np.array_equal(shown, table[ids])
    assert [p.name for p in tmp_path.iterdir()] == ["x_labels.png"]  # no temporary left


def test_label_png_above_256_classes_is_16_bit_grey(tmp_path):
    ids = np.arange(300, dtype=np.int64).reshape(10, 30)
    path = write_label_png(tmp_path / "big.png", ids, palette(300))
    back = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert back.dtype == np.uint16 and np.array_equal(back, ids)


def palette_png(ids: np.ndarray, colours: np.ndarray, bits: int) -> bytes:
    """A palette PNG as other writers make them: ``bits`` per pixel, ``colours`` only."""
    image = Image.fromarray(ids)
    image.putpalette(colours.tobytes())
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", bits=bits)
    return buffer.getvalue()


@pytest.mark.parametrize("bits", [4, 8])
def test_dataset_reads_the_ids_of_palette_label_maps(tmp_path, bits):
    """Pascal VOC style label maps: a user's folder dataset gets the ids, not the colours."""
    ids = np.random.default_rng(1).integers(0, 16, (6, 10)).astype(np.uint8)
    root = tmp_path / "voc"
    write_image(root / "images" / "val" / "a.png", np.zeros((6, 10, 3), np.uint8))
    mask = root / "masks" / "val" / "a.png"
    mask.parent.mkdir(parents=True)
    mask.write_bytes(palette_png(ids, palette(16), bits))
    (root / "classes.txt").write_text("".join(f"c{i}\n" for i in range(16)))
    assert np.array_equal(read_mask(mask), ids)
    sample = SegmentationFolder(root, "val")[0]
    assert np.array_equal(sample["label"].numpy(), ids)


def test_legend_shows_exactly_the_classes_present():
    colours = palette(12)
    assert not any(c[0] == c[1] == c[2] for c in colours)  # no grey: text is no swatch
    names = [f"class number {i}" for i in range(12)]
    labels = np.full((40, 60), 4)
    labels[:10] = 1
    labels[30:, :5] = 7
    labels[0, 0] = 255
    assert classes_present(labels) == [4, 1, 7]  # most pixels first, ignore left out
    picture = colorize(labels, colours)
    out = annotate(picture, legend_entries([4, 1, 7], names, colours), "a caption")
    assert out.shape[1] == MIN_WIDTH and np.array_equal(out[:40, :60], picture)
    assert (out[:40, 60:] == 255).all()  # padding
    counts = colour_counts(out[40:], colours)
    assert set(np.flatnonzero(counts)) == {1, 4, 7} and counts[[1, 4, 7]].min() >= 100
    assert (out[-10:] < 128).any()  # the caption's ink


def test_legend_wraps_every_entry_into_the_width():
    colours = palette(40)
    entries = legend_entries(range(40), [f"a longer class name {i}" for i in range(40)], colours)
    strip = legend(entries, 500)
    assert strip.shape[1] == 500 and strip.shape[0] > 10 * 20  # many rows
    assert colour_counts(strip, colours).min() >= 100  # every swatch whole
    assert legend([], 500).shape == (0, 500, 3)


def test_shared_superpatches_framed_black_outside_white_inside():
    image = np.full((16, 24, 3), 230, np.uint8)  # pale: a white frame alone would not show
    shared = np.array([[True, False, False], [False, False, True]])
    out = outline_shared(image, shared, 8)
    outer = np.ones((8, 8), bool)
    outer[1:-1, 1:-1] = False
    inner = np.zeros((8, 8), bool)
    inner[1:-1, 1:-1] = True
    inner[2:-2, 2:-2] = False
    for cell in (out[:8, :8], out[8:, 16:]):
        assert (cell[outer] == 0).all() and (cell[inner] == 255).all()
        assert (cell[2:-2, 2:-2] == 230).all()
    assert (out[:8, 8:] == 230).all() and (out[8:, :16] == 230).all()


def test_panels_have_titles_above_them():
    colours = palette(3)
    panels = [np.broadcast_to(c, (20, 30, 3)).copy() for c in colours]
    scene = titled_panels(list(zip(("input", "prediction", "ground truth"), panels, strict=True)))
    assert scene.shape[1] == 3 * 30 + 2 * 8
    title = scene.shape[0] - 20
    assert title > 10
    for left, colour in zip((0, 38, 76), colours, strict=True):
        assert (scene[title:, left : left + 30] == colour).all()
        assert (scene[:title, left : left + 30] < 128).any()  # the title's ink
    assert (scene[:, 30:38] == 255).all() and (scene[:, 68:76] == 255).all()  # the gaps


def test_confusion_matrix_has_axis_titles_and_a_colour_scale(tmp_path):
    names = ["wall", "chest of drawers", "sky", "absent"]
    confusion = np.array([[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]])
    path = confusion_matrix_image(confusion, names, tmp_path / "confusion.png", cell=20)
    image = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    top, left, margin, _ = confusion_layout(names, 20)
    viridis = cv2.applyColorMap(np.arange(256, dtype=np.uint8)[:, None], cv2.COLORMAP_VIRIDIS)
    viridis = viridis[:, 0, ::-1]  # RGB
    shares = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
    for i in range(4):
        for j in range(4):
            y, x = top + 20 * i + 10, left + 20 * j + 10
            assert (image[y, x] == viridis[round(shares[i, j] * 255)]).all(), (i, j)
    title = top - margin
    assert (image[:title, left : left + 80] < 128).any()  # "predicted class" above
    assert (image[top : top + 80, :title] < 128).any()  # "true class" beside, vertical
    bar = image[top : top + 80, left + 80 :]
    column = next(x for x in range(bar.shape[1]) if (bar[0, x] == viridis[255]).all())
    assert (bar[-1, column] == viridis[0]).all()  # 100% at the top, 0% at the bottom
    assert (image[top : top + 80, left + 80 + column + 12 :] < 128).any()  # tick labels


def dvc_plots() -> dict[str, dict]:
    """The plot definitions of dvc.yaml's stages: path -> properties (images left out)."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    plots = {}
    for stage in stages.values():
        for entry in stage.get("plots", []):
            ((path, props),) = entry.items()
            if not path.endswith(".png"):
                plots[path] = props
    return plots


def render(path: str, props: dict) -> dict:
    """The vega-lite spec DVC's renderer fills for a plot of dvc.yaml (templates looked up
    in .dvc/plots, as `dvc plots show` does) from a few rows of its committed data."""
    from dvc_render import VegaRenderer

    with open(REPO / path, newline="") as f:
        rows = [dict(row, rev="workspace") for row in csv.DictReader(f)][:5]
    renderer = VegaRenderer(rows, path, template_dir=str(REPO / ".dvc" / "plots"), **props)
    spec = renderer.get_filled_template()
    assert "<DVC_METRIC" not in json.dumps(spec), path  # every anchor filled
    return spec


def test_every_dvc_plot_has_a_title_and_axis_labels():
    plots = dvc_plots()
    assert len(plots) == 7
    for path, props in plots.items():
        assert props.get("title") and props.get("x_label") and props.get("y_label"), path
        spec = render(path, props)
        text = json.dumps(spec)
        assert spec["title"]["text"] == props["title"] and path not in props["title"]
        for label in (props["x_label"], props["y_label"]):
            assert json.dumps(label) in text, (path, label)


def test_per_class_iou_plots_share_a_0_to_100_axis():
    plots = {p: v for p, v in dvc_plots().items() if "per_class_iou" in p}
    assert sorted(plots) == ["metrics/per_class_iou_ms.csv", "metrics/per_class_iou_ss.csv"]
    for path, props in plots.items():
        x = render(path, props)["encoding"]["x"]
        assert x["field"] == "iou" and x["scale"]["domain"] == [0, 100], path
        assert x["title"] == "IoU (%)"


def test_k_sweep_points_are_labelled_with_their_k_threshold_or_r():
    """A fixed-K row (share_threshold and tome_r empty) is labelled K=..., a threshold row
    t=..., a ToMe row r=...; the modes are told apart by the same tests, so each draws its own
    curve."""
    props = dvc_plots()["plots/k_sweep.csv"]
    spec = render("plots/k_sweep.csv", props)
    (text,) = [layer for layer in spec["layer"] if layer["mark"]["type"] == "text"]
    field = text["encoding"]["text"]["field"]
    (label,) = [t for t in spec["transform"] if t.get("as") == field]
    (mode,) = [t for t in spec["transform"] if t.get("as") == spec["encoding"]["shape"]["field"]]
    is_threshold = "isValid(datum.share_threshold) && datum.share_threshold !== ''"
    is_tome = "isValid(datum.tome_r) && datum.tome_r !== ''"
    assert label["calculate"] == (
        f"{is_threshold} ? 't=' + datum.share_threshold : {is_tome} ? 'r=' + datum.tome_r : "
        "'K=' + datum.num_tokens_shared"
    )
    assert (
        mode["calculate"].startswith(f"{is_threshold} ? ")
        and f": {is_tome} ? " in (mode["calculate"])
    )
    columns = pd.read_csv(REPO / "plots/k_sweep.csv").columns
    assert {"num_tokens_shared", "share_threshold", "tome_r"} <= set(columns)


def test_sweep_subtitle_is_a_formula_of_k(monkeypatch):
    """The subtitle's N is worked back from a row with K > 0 (1024 patch tokens: 715 at
    K = 103); the figure shows the sweep's points, each labelled with its K, and the
    trained K starred (read off the figure plot_curve saves)."""
    from matplotlib.figure import Figure

    from cts.throughput.sweep import plot_curve, token_formula

    ks = np.array([26, 103, 205])
    table = pd.DataFrame(
        {"num_tokens_shared": ks, "tokens": 1024 - 3 * ks, "mIoU": [45.5, 45.2, 37.0]}
    )
    table["ims_per_sec"], table["gflops"] = 20 + ks / 10, 3.5 - ks / 100
    formula = token_formula(table)
    match = re.match(r"tokens = (\d+) − 3·K\b", formula)
    assert match and int(match[1]) == 1024, formula

    saved, savefig = [], Figure.savefig

    def recording_savefig(figure, *args, **kwargs):
        saved.append(figure)
        return savefig(figure, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", recording_savefig)
    png = np.frombuffer(plot_curve(table, 103, "a title"), np.uint8)
    assert cv2.imdecode(png, cv2.IMREAD_COLOR).shape[2] == 3
    (axes,) = saved[0].axes
    assert axes.get_title() == f"a title\n{formula}"
    curve, star = axes.get_lines()
    assert list(curve.get_xdata()) == pytest.approx([22.6, 30.3, 40.5])
    assert list(curve.get_ydata()) == [45.5, 45.2, 37.0]
    assert list(star.get_xdata()) == pytest.approx([30.3]) and list(star.get_ydata()) == [45.2]
    labels = {t.get_text(): t.xy for t in axes.texts}
    assert sorted(labels) == ["K=103", "K=205", "K=26"]
    assert labels["K=103"] == pytest.approx((30.3, 45.2))


def test_eval_scene_legend_holds_prediction_and_ground_truth_classes():
    """The panels by hand: the input, each class's colour blended half and half over it
    (truncated to uint8), ignore as black blended; the shared superpatch framed black
    outside, white inside; 8 white pixels between panels, titles above."""
    colours = palette(12)
    rgb = np.full((64, 64, 3), 128, np.uint8)
    prediction = np.full((64, 64), 2)
    prediction[:, 40:] = 5
    truth = np.full((64, 64), 2)
    truth[:16] = 9
    truth[-1] = 255
    shared = np.zeros((2, 2), bool)
    shared[1, 0] = True
    names = [f"c{i}" for i in range(12)]
    scene = eval_scene(rgb, prediction, truth, shared, 32, names, colours, "img_7")

    def blend(colour):
        return np.floor(0.5 * 128 + 0.5 * np.asarray(colour, np.float64)).astype(np.uint8)

    predicted = np.empty((64, 64, 3), np.uint8)
    predicted[:, :40], predicted[:, 40:] = blend(colours[2]), blend(colours[5])
    predicted[32:64, 0:32] = 0  # the frame: a black ring outside ...
    predicted[33:63, 1:31] = 255  # ... a white one inside
    predicted[34:62, 2:30] = blend(colours[2])
    true = np.empty((64, 64, 3), np.uint8)
    true[:], true[:16], true[-1] = blend(colours[2]), blend(colours[9]), blend((0, 0, 0))
    top = next(y for y in range(scene.shape[0]) if (scene[y, :64] == 128).all())
    assert top > 10 and (scene[:top, :64] < 128).any()  # the title's ink above
    assert np.array_equal(scene[top : top + 64, :64], rgb)
    assert np.array_equal(scene[top : top + 64, 72:136], predicted)
    assert np.array_equal(scene[top : top + 64, 144:208], true)
    assert (scene[: top + 64, 64:72] == 255).all() and (scene[: top + 64, 136:144] == 255).all()
    for left in (72, 144):
        assert (scene[:top, left : left + 64] < 128).any()
    below = scene[top + 64 :]
    assert set(np.flatnonzero(colour_counts(below, colours) >= 100)) == {2, 5, 9}
    # ignore's swatch: a black square (the text's black strokes are thinner)
    black = (below == IGNORE_COLOUR).all(-1).astype(np.uint8)
    assert cv2.erode(black, np.ones((9, 9), np.uint8)).any()
    assert (below[-10:] < 128).any()  # the caption


def test_eval_stage_writes_a_scene_per_picture(tiny_synthetic, tmp_path):
    from cts.data.transforms import ValTransform
    from cts.models import build_segmenter
    from cts_stages.evaluation import write_pictures

    torch.manual_seed(0)
    model = build_segmenter(
        backbone="vit_tiny_patch16_384",
        num_classes=12,
        crop_size=64,
        depth=1,
        policy="policy_net",
        num_tokens_shared=2,
        drop_path_rate=0.0,
    ).eval()
    config = model.config
    dataset = SegmentationFolder(tiny_synthetic, "val", ValTransform(config.mean, config.std))
    paths = write_pictures(model, dataset, tmp_path, "cpu", dataset.info.class_names)
    assert [p.name for p in paths] == [f"{name}.png" for name, _, _ in dataset.samples]
    for path in paths:
        picture = cv2.imread(str(path))
        assert picture.shape[1] == max(3 * 64 + 2 * 8, MIN_WIDTH) and picture.shape[0] > 64
