"""ONNX export of the whole inference of a Segmenter: one graph from images to labels.

The graph holds what :meth:`cts.models.Segmenter.predict` runs: policy net, top-K selection,
sharing, encoder, decoder, unsharing, bilinear upsampling and argmax. Its input is ``images``
float32 ``(B, 3, crop, crop)`` normalised as the model expects, with a dynamic batch
dimension; its output ``labels`` int64 ``(B, crop, crop)`` and, on request, ``scores``
float32 ``(B, n_cls, crop, crop)`` (the upsampled class logits).

The graph has a fixed crop size: the resize of a whole image to the evaluation's scale and
the sliding windows that ``cts predict`` runs around the model (:mod:`cts.inference`) are
not in it. :func:`tiling_hint` says how to do them for a checkpoint.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from cts.data.io import temp_file
from cts.geometry import check_num_shared, num_superpatches
from cts.inference import EvalGeometry
from cts.models import Segmenter
from cts.processes import pid_alive

# torch.export-based exporter (onnxscript): it writes opset 18 or later.
MIN_OPSET = 18


def max_opset() -> int:
    """The newest ONNX opset the installed onnx package knows."""
    import onnx

    return int(onnx.defs.onnx_opset_version())


class ExportedSegmenter(nn.Module):
    """``Segmenter.predict`` at a fixed K as a module, optionally with the class scores."""

    def __init__(self, model: Segmenter, num_tokens_shared: int, scores: bool = False) -> None:
        super().__init__()
        self.model = model.eval()
        self.num_tokens_shared = num_tokens_shared
        self.scores = scores

    def forward(self, images: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        """``(B, 3, crop, crop)`` -> labels ``(B, crop, crop)`` [, scores ``(B, n_cls, ...)``]."""
        if not self.scores:
            return self.model.predict(images, self.num_tokens_shared)
        logits = self.model(images, num_tokens_shared=self.num_tokens_shared).logits.float()
        return logits.argmax(1), logits


def export_k(model: Segmenter, num_tokens_shared: int | None) -> int:
    """The K the graph is built with (checked against the crop's superpatch grid)."""
    config = model.config
    if num_tokens_shared is None and config.share_threshold is not None:
        raise ValueError(
            f"the model shares by threshold (share_threshold={config.share_threshold}: K per "
            "image), which no graph of fixed shapes holds: export with --num-tokens-shared K"
        )
    if config.tome_r:
        raise ValueError(
            f"the model merges tokens (ToMe, tome_r={config.tome_r}): ONNX export takes CTS "
            "and plain Segmenter models only"
        )
    if config.algm_threshold:
        raise ValueError(
            f"the model merges tokens per image (ALGM, algm_threshold={config.algm_threshold}"
            "): its token count depends on the image, which no graph of fixed shapes holds; "
            "ONNX export takes CTS and plain Segmenter models only"
        )
    k = model.num_tokens_shared if num_tokens_shared is None else num_tokens_shared
    superpatches = num_superpatches(config.crop_size, model.patch_size)
    check_num_shared(k, superpatches, f"crop_size {config.crop_size}")
    if config.policy == "none" and k:
        raise ValueError(f"the model has policy none: it cannot share tokens (K={k} given)")
    if config.policy in ("oracle", "random") and k:
        raise ValueError(
            f"policy {config.policy} cannot be exported with K={k} (it needs labels or draws "
            "at random): export with --num-tokens-shared 0"
        )
    return k


def export_onnx(
    model: Segmenter,
    out: str | os.PathLike,
    num_tokens_shared: int | None = None,
    opset: int = MIN_OPSET,
    scores: bool = False,
) -> Path:
    """Write ``model``'s inference at its crop as an ONNX file (atomically: temp + rename).

    Args:
        model: a Segmenter (its weights are exported in fp32 on the CPU).
        out: the ``.onnx`` file to write.
        num_tokens_shared: K (default: the model's); 0 exports the plain Segmenter.
        opset: ONNX opset, ``MIN_OPSET`` .. :func:`max_opset`.
        scores: add the ``scores`` output.
    """
    newest = max_opset()
    if not MIN_OPSET <= opset <= newest:
        raise ValueError(f"opset {opset} is not supported: allowed {MIN_OPSET}..{newest}")
    k = export_k(model, num_tokens_shared)
    model = model.float().cpu().eval()
    crop = model.config.crop_size
    module = ExportedSegmenter(model, k, scores)
    example = torch.zeros(2, 3, crop, crop)
    output_names = ["labels", "scores"] if scores else ["labels"]
    batch = torch.export.Dim("batch", min=1)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_leftovers(out)
    fd, tmp = temp_file(out)  # the umask's permissions, the pid in the name
    os.close(fd)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module,
                (example,),
                dynamo=True,
                input_names=["images"],
                output_names=output_names,
                dynamic_shapes={"images": {0: batch}},
                opset_version=opset,
                optimize=True,
                verbose=False,
            )
        program.save(tmp, external_data=False)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def remove_dead_leftovers(out: Path) -> list[Path]:
    """The temporary files of exports to ``out`` that were killed mid-write
    (``.NAME.PID.XXXX.tmp`` of a pid no longer running); returns them."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(\d+)\.[^.]+\.tmp")
    removed = []
    for entry in out.parent.iterdir():
        found = pattern.fullmatch(entry.name)
        if found and not pid_alive(int(found.group(1))) and entry.is_file():
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def tiling_hint(crop: int, geometry: EvalGeometry | None) -> str:
    """One sentence: how to segment whole images with the crop-sized graph as ``cts
    predict`` does, with the evaluation sizes the checkpoint stores (None: the crop's)."""
    if geometry is None:
        return (
            f"the graph takes {crop}x{crop} images only: for others, resize and slide "
            f"{crop}x{crop} windows around it as `cts predict` does (this checkpoint stores "
            "no evaluation sizes; see docs/deploy.md#onnx)"
        )
    window = "" if geometry.window == crop else f" (the evaluation's was {geometry.window})"
    return (
        f"the graph takes {crop}x{crop} images only: for whole images, as `cts predict` and "
        f"the evaluation do, resize to a short side of {geometry.base_size} (long side at "
        f"most {geometry.max_ratio:g} times it), slide the {crop}x{crop} window{window} with "
        f"stride {geometry.stride} and average the windows' scores (docs/deploy.md#onnx)"
    )


def onnx_session(path: str | os.PathLike, threads: int | None = None):
    """An onnxruntime CPU inference session for an exported file."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def benchmark_onnx(
    model: Segmenter,
    exported: dict[int, str | os.PathLike],
    images: Tensor,
    warmup: int = 1,
    repeats: int = 5,
) -> list[dict]:
    """onnxruntime vs PyTorch eager on the CPU: same process, same images, timed in turns.

    Args:
        model: the Segmenter the files were exported from (fp32, CPU).
        exported: ONNX file per K.
        images: ``(B, 3, crop, crop)`` normalised.

    Returns one record per K: im/s of both (median of ``repeats``), the speed-up of
    onnxruntime over eager and the share of pixels whose labels agree.
    """
    from cts.throughput.timing import median_seconds_interleaved

    array = images.numpy()
    sessions = {k: onnx_session(path) for k, path in exported.items()}
    calls = {}
    for k, session in sessions.items():
        calls["torch", k] = lambda k=k: model.predict(images, k)
        calls["onnxruntime", k] = lambda s=session: s.run(["labels"], {"images": array})[0]
    with torch.inference_mode():
        seconds = median_seconds_interleaved(calls, torch.device("cpu"), warmup, repeats)
        records = []
        for k in exported:
            agree = torch.from_numpy(calls["onnxruntime", k]()) == calls["torch", k]()
            eager, runtime = (
                images.shape[0] / seconds[kind, k] for kind in ("torch", "onnxruntime")
            )
            records.append(
                {
                    "num_tokens_shared": k,
                    "batch_size": images.shape[0],
                    "ims_per_sec_torch": eager,
                    "ims_per_sec_onnxruntime": runtime,
                    "speedup": runtime / eager,
                    "label_agreement": float(agree.float().mean()),
                }
            )
    return records
