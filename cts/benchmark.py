"""Throughput, compute and memory of Segmenters, with and without token sharing.

What is timed is the whole inference of a batch already on the device: policy net, encoder,
decoder, unsharing, upsampling to full resolution and argmax (:meth:`Segmenter.predict`).
Sharing on (K) and off (K = 0, the same weights: exactly the plain Segmenter) are timed in
turns within one process, so that their ratio is fair on a shared, noisy machine.
"""

from __future__ import annotations

import datetime
import json
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from cts.data.io import write_bytes_atomic
from cts.engine import autocast
from cts.models import Segmenter, build_segmenter

BENCH_PRECISIONS = ("fp32", "bf16")
COMPILE_MODES = ("auto", "none", "default", "reduce-overhead", "max-autotune")


@dataclass(frozen=True)
class TableRow:
    """One row of the paper's throughput table (Segmenter + mask transformer, patch 16)."""

    key: str
    label: str
    backbone: str
    crop_size: int
    num_tokens_shared: int
    num_classes: int
    dataset: str


PAPER_TABLE = (
    TableRow("vit_ti_512", "ViT-Ti/16 512", "vit_tiny_patch16_384", 512, 103, 150, "ADE20K"),
    TableRow("vit_s_512", "ViT-S/16 512", "vit_small_patch16_384", 512, 103, 150, "ADE20K"),
    TableRow("vit_b_512", "ViT-B/16 512", "vit_base_patch16_384", 512, 103, 150, "ADE20K"),
    TableRow("vit_l_640", "ViT-L/16 640", "vit_large_patch16_384", 640, 160, 150, "ADE20K"),
    TableRow("vit_s_768", "ViT-S/16 768", "vit_small_patch16_384", 768, 336, 19, "Cityscapes"),
)


class BenchmarkOutOfMemoryError(RuntimeError):
    """A batch does not fit on the device; the message names the largest that does."""


# --- compute --------------------------------------------------------------------------------


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# torch's counter knows the CUDA attention kernels but not the CPU one.
_EXTRA_FLOP_FORMULAS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
}


@dataclass(frozen=True)
class ForwardCost:
    """Multiply-accumulates per image in G (what the paper calls GFLOPs) and the number of
    patch-level tokens the encoder processed."""

    gmacs: float
    tokens: int


def forward_cost(model: Segmenter, image_size: int, num_tokens_shared: int) -> ForwardCost:
    """Count one eager forward of one ``image_size`` square image."""
    device = next(model.parameters()).device
    images = torch.zeros(1, 3, image_size, image_size, device=device)
    counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOP_FORMULAS)
    with torch.no_grad(), counter:
        out = model(images, num_tokens_shared=num_tokens_shared)
    return ForwardCost(counter.get_total_flops() / 2 / 1e9, int(out.num_tokens))


def count_gmacs(model: Segmenter, image_size: int, num_tokens_shared: int) -> float:
    """Multiply-accumulates per image in G (the paper's "GFLOPs"), forward pass."""
    return forward_cost(model, image_size, num_tokens_shared).gmacs


# --- devices, precisions, compilation -------------------------------------------------------


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def bf16_supported(device: torch.device) -> bool:
    """CPU autocast always has bf16 (emulated where the processor lacks it)."""
    return device.type != "cuda" or torch.cuda.is_bf16_supported()


def resolve_precisions(
    precisions: Sequence[str], device: torch.device, allow_fp32_fallback: bool
) -> tuple[str, ...]:
    """The precisions to measure; bf16 without device support is an error unless allowed."""
    unknown = [p for p in precisions if p not in BENCH_PRECISIONS]
    if unknown or not precisions:
        raise ValueError(f"precision {unknown or '(none)'}: allowed {', '.join(BENCH_PRECISIONS)}")
    if "bf16" not in precisions or bf16_supported(device):
        return tuple(dict.fromkeys(precisions))
    if not allow_fp32_fallback:
        raise ValueError(
            f"bf16 is not supported on {device_name(device)}: measure fp32 only "
            "(--precision fp32) or allow the fallback (--allow-fp32-fallback)"
        )
    return ("fp32",)


def resolve_compile_mode(mode: str, device: torch.device) -> str:
    """``auto``: CUDA graphs + Inductor (``reduce-overhead``) on a GPU, eager on CPU."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode {mode!r}: allowed {', '.join(COMPILE_MODES)}")
    if mode == "auto":
        return "reduce-overhead" if device.type == "cuda" else "none"
    return mode


Predict = Callable[[Tensor, int], Tensor]


def inference_fn(model: Segmenter, compile_mode: str) -> Predict:
    """``(images, K) -> labels``: the model's :meth:`Segmenter.predict`, compiled or not.

    Shapes are static (``dynamic=False``): each K and batch size gets its own graph, which
    is what lets CUDA graphs replay the whole forward as one launch.
    """
    if compile_mode == "none":
        return model.predict
    compiled = torch.compile(model.predict, mode=compile_mode, dynamic=False)
    if compile_mode != "reduce-overhead":
        return compiled

    def run(images: Tensor, k: int) -> Tensor:
        # Each call is a new inference step: CUDA-graph outputs of the last may be reused.
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(images, k)

    return run


# --- timing and memory ----------------------------------------------------------------------


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds_interleaved(
    calls: dict[Any, Callable[[], object]],
    device: torch.device,
    warmup: int,
    repeats: int,
) -> dict[Any, float]:
    """Median wall time of each call; the calls are timed in turns, repeat after repeat, so
    a change in the machine's load affects them alike."""
    times: dict[Any, list[float]] = {key: [] for key in calls}
    for i in range(warmup + repeats):
        for key, call in calls.items():
            _synchronize(device)
            start = time.perf_counter()
            call()
            _synchronize(device)
            if i >= warmup:
                times[key].append(time.perf_counter() - start)
    return {key: statistics.median(values) for key, values in times.items()}


def peak_memory_mb(call: Callable[[], object], device: torch.device) -> float | None:
    """The CUDA allocator's high-water mark over one call (weights included); None on CPU."""
    if device.type != "cuda":
        return None
    _synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    call()
    _synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def largest_fitting_batch(fits: Callable[[int], bool], too_large: int) -> int:
    """Largest batch in ``[1, too_large)`` for which ``fits`` holds (0: none), assuming that
    whatever fits a batch fits every smaller one."""
    low, high = 0, too_large  # fits(low) holds (or low == 0), fits(high) does not
    while high - low > 1:
        middle = (low + high) // 2
        if fits(middle):
            low = middle
        else:
            high = middle
    return low


def check_batch_fits(
    run_batch: Callable[[int], object], batch_size: int, device: torch.device, what: str
) -> None:
    """Run one batch; if the device runs out of memory, raise one clear error that names the
    largest batch that fits instead of a CUDA traceback."""

    def fits(batch: int) -> bool:
        try:
            run_batch(batch)
            _synchronize(device)
            return True
        except (torch.OutOfMemoryError, RuntimeError) as error:
            if not is_out_of_memory(error):
                raise
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return False

    if fits(batch_size):
        return
    largest = largest_fitting_batch(fits, batch_size)
    memory = ""
    if device.type == "cuda":
        memory = f" ({torch.cuda.get_device_properties(device).total_memory / 2**30:.0f} GiB)"
    hint = (
        f"the largest batch that fits is {largest}: pass --batch-size {largest}"
        if largest
        else "not even a batch of 1 fits"
    )
    raise BenchmarkOutOfMemoryError(
        f"out of memory: batch {batch_size} of {what} does not fit on "
        f"{device_name(device)}{memory}; {hint}"
    )


# --- measurements ---------------------------------------------------------------------------


def random_images(batch_size: int, image_size: int, device: torch.device, seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
    return images.to(device)


def measure_sharing(
    model: Segmenter,
    images: Tensor,
    num_tokens_shared: int,
    precision: str = "fp32",
    compile_mode: str = "none",
    warmup: int = 3,
    repeats: int = 10,
) -> dict[str, float | None]:
    """Images per second and peak memory of one batch with K shared tokens and with none.

    Returns ``ims_per_sec``, ``ims_per_sec_no_sharing``, ``speedup``, ``ms_per_batch``,
    ``ms_per_batch_no_sharing``, ``peak_memory_mb``, ``peak_memory_mb_no_sharing``.
    """
    device = images.device
    predict = inference_fn(model, resolve_compile_mode(compile_mode, device))
    calls = {
        num_tokens_shared: lambda: predict(images, num_tokens_shared),
        0: lambda: predict(images, 0),
    }
    model.eval()
    with torch.inference_mode(), autocast(device, precision):
        seconds = median_seconds_interleaved(calls, device, warmup, repeats)
        peaks = {k: peak_memory_mb(call, device) for k, call in calls.items()}
    batch = images.shape[0]
    shared, plain = seconds[num_tokens_shared], seconds[0]
    return {
        "ims_per_sec": batch / shared,
        "ims_per_sec_no_sharing": batch / plain,
        "speedup": plain / shared,
        "ms_per_batch": shared * 1e3,
        "ms_per_batch_no_sharing": plain * 1e3,
        "peak_memory_mb": peaks[num_tokens_shared],
        "peak_memory_mb_no_sharing": peaks[0],
    }


def label_agreement(model: Segmenter, images: Tensor, num_tokens_shared: int) -> float:
    """Fraction of pixels whose bf16-autocast label equals the fp32 label, same weights.

    The policy net runs in each precision too, so a superpatch whose score is tied at the
    K-th place may be shared in one and not in the other; that counts as disagreement.
    """
    device = images.device
    model.eval()
    with torch.inference_mode():
        reference = model.predict(images, num_tokens_shared)
        with autocast(device, "bf16"):
            low = model.predict(images, num_tokens_shared)
    return (reference == low).float().mean().item()


def ensure_batch_fits(model: Segmenter, images: Tensor, precision: str, what: str) -> None:
    """One eager forward without sharing (the larger of the two); on out-of-memory, a clear
    error naming the largest batch that fits."""
    device = images.device
    with torch.inference_mode(), autocast(device, precision):
        check_batch_fits(
            lambda b: model.predict(images[:b], 0),
            images.shape[0],
            device,
            f"{what} ({images.shape[-2]}x{images.shape[-1]}, {precision})",
        )


def compare_sharing(
    model: Segmenter,
    images: Tensor,
    num_tokens_shared: int,
    precision: str = "fp32",
    compile_mode: str = "none",
    warmup: int = 3,
    repeats: int = 10,
) -> dict[str, Any]:
    """The same weights with K shared tokens and with sharing off: throughput, GMACs,
    tokens and peak memory on one batch, as one flat record (the benchmark stage's metrics).
    """
    device = images.device
    compile_mode = resolve_compile_mode(compile_mode, device)
    model.eval()
    ensure_batch_fits(model, images, precision, model.config.backbone)
    timing = measure_sharing(
        model, images, num_tokens_shared, precision, compile_mode, warmup, repeats
    )
    image_size = images.shape[-1]
    shared = forward_cost(model, image_size, num_tokens_shared)
    plain = forward_cost(model, image_size, 0)
    return {
        **timing,
        "tokens": shared.tokens,
        "tokens_no_sharing": plain.tokens,
        "gflops": shared.gmacs,
        "gflops_no_sharing": plain.gmacs,
        "device": device_name(device),
        "batch_size": images.shape[0],
        "precision": precision,
        "compile": compile_mode,
        "image_size": image_size,
        "num_tokens_shared": num_tokens_shared,
        "torch": torch.__version__,
    }


# --- the paper's table ----------------------------------------------------------------------


@dataclass(frozen=True)
class TableSettings:
    """How the table is measured; every field is written into the JSON."""

    batch_size: int
    precisions: tuple[str, ...] = BENCH_PRECISIONS
    compile_mode: str = "auto"
    warmup: int = 5
    repeats: int = 20
    policy_feature_stride: int = 16
    policy_input_scale: float = 0.5
    depth: int | None = None
    agreement_images: int = 8
    seed: int = 0


def select_rows(keys: Iterable[str] | None) -> tuple[TableRow, ...]:
    """Rows by key, in the paper's order (None or empty: all)."""
    keys = list(keys or [])
    known = {row.key: row for row in PAPER_TABLE}
    unknown = [k for k in keys if k not in known]
    if unknown:
        raise ValueError(f"unknown row(s) {unknown}: use {', '.join(known)}")
    return tuple(row for row in PAPER_TABLE if not keys or row.key in keys)


def build_row_model(row: TableRow, settings: TableSettings, device: torch.device) -> Segmenter:
    """Randomly initialised Segmenter (mask transformer) with the policy net, for a row."""
    torch.manual_seed(settings.seed)
    model = build_segmenter(
        backbone=row.backbone,
        num_classes=row.num_classes,
        crop_size=row.crop_size,
        num_tokens_shared=row.num_tokens_shared,
        policy="policy_net",
        decoder="mask_transformer",
        depth=settings.depth,
        policy_feature_stride=settings.policy_feature_stride,
        policy_input_scale=settings.policy_input_scale,
    )
    return model.to(device).eval()


def measure_row(
    row: TableRow, settings: TableSettings, device: torch.device
) -> list[dict[str, Any]]:
    """One record per precision for a row of the table."""
    compile_mode = resolve_compile_mode(settings.compile_mode, device)
    torch._dynamo.reset()  # a fresh graph cache per model: no recompile limit is reached
    model = build_row_model(row, settings, device)
    shared = forward_cost(model, row.crop_size, row.num_tokens_shared)
    plain = forward_cost(model, row.crop_size, 0)
    images = random_images(settings.batch_size, row.crop_size, device, settings.seed)
    records = []
    for precision in settings.precisions:
        ensure_batch_fits(model, images, precision, row.label)
        timing = measure_sharing(
            model,
            images,
            row.num_tokens_shared,
            precision,
            compile_mode,
            settings.warmup,
            settings.repeats,
        )
        records.append(
            {
                **asdict(row),
                "precision": precision,
                "tokens": shared.tokens,
                "tokens_no_sharing": plain.tokens,
                "gmacs": shared.gmacs,
                "gmacs_no_sharing": plain.gmacs,
                **timing,
            }
        )
    # After the batch was found to fit: the agreement batch is no larger.
    agreement_batch = images[: settings.agreement_images]
    agreement = {
        "bf16_fp32_agreement": label_agreement(model, agreement_batch, row.num_tokens_shared),
        "bf16_fp32_agreement_no_sharing": label_agreement(model, agreement_batch, 0),
    }
    records = [{**record, **agreement} for record in records]
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return records


def environment(device: torch.device, settings: TableSettings) -> dict[str, Any]:
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        **asdict(settings),
        "compile_mode": resolve_compile_mode(settings.compile_mode, device),
    }


def _memory(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def markdown_table(records: Sequence[dict[str, Any]], env: dict[str, Any]) -> str:
    """The table as markdown, with the settings it was measured under."""
    lines = [
        f"Measured on {env['device']}, torch {env['torch']}, {env['date']}: batch "
        f"{env['batch_size']}, compile {env['compile_mode']}, policy net input x"
        f"{env['policy_input_scale']} stride {env['policy_feature_stride']}"
        + (f", depth {env['depth']}" if env["depth"] else "")
        + f"; median of {env['repeats']} runs after {env['warmup']} warm-up.",
        "",
        "| Model | Dataset | K | Tokens | GMACs | Precision | im/s no sharing | im/s CTS "
        "| Speed-up | Peak MiB no sharing / CTS | bf16 = fp32 labels no sharing / CTS |",
        "|---|---|--:|--:|--:|---|--:|--:|--:|--:|--:|",
    ]
    for r in records:
        lines.append(
            f"| {r['label']} | {r['dataset']} | {r['num_tokens_shared']} "
            f"| {r['tokens_no_sharing']} -> {r['tokens']} "
            f"| {r['gmacs_no_sharing']:.1f} -> {r['gmacs']:.1f} | {r['precision']} "
            f"| {r['ims_per_sec_no_sharing']:,.1f} | {r['ims_per_sec']:,.1f} "
            f"| {r['speedup']:.2f}x "
            f"| {_memory(r['peak_memory_mb_no_sharing'])} / {_memory(r['peak_memory_mb'])} "
            f"| {100 * r['bf16_fp32_agreement_no_sharing']:.2f}% "
            f"/ {100 * r['bf16_fp32_agreement']:.2f}% |"
        )
    return "\n".join(lines) + "\n"


def write_table(
    records: Sequence[dict[str, Any]], env: dict[str, Any], out_dir: Path
) -> tuple[Path, Path]:
    """``throughput.json`` (settings + records) and ``throughput.md``, written atomically."""
    data = {"environment": env, "rows": list(records)}
    json_path = write_bytes_atomic(
        Path(out_dir) / "throughput.json", (json.dumps(data, indent=2) + "\n").encode()
    )
    md_path = write_bytes_atomic(
        Path(out_dir) / "throughput.md", markdown_table(records, env).encode()
    )
    return json_path, md_path


__all__ = [
    "PAPER_TABLE",
    "BenchmarkOutOfMemoryError",
    "ForwardCost",
    "TableRow",
    "TableSettings",
    "bf16_supported",
    "build_row_model",
    "random_images",
    "check_batch_fits",
    "ensure_batch_fits",
    "compare_sharing",
    "count_gmacs",
    "device_name",
    "environment",
    "forward_cost",
    "label_agreement",
    "largest_fitting_batch",
    "markdown_table",
    "measure_row",
    "measure_sharing",
    "resolve_compile_mode",
    "resolve_precisions",
    "select_rows",
    "write_table",
]
