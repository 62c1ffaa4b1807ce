"""Throughput, compute and memory of Segmenters, with and without token sharing.

What is timed is the whole inference of a batch already on the device: policy net, encoder,
decoder, unsharing, upsampling to full resolution and argmax (:meth:`Segmenter.predict`).
Sharing on (K) and off (K = 0, the same weights: exactly the plain Segmenter) are timed in
turns within one process, so that their ratio is fair on a shared, noisy machine.
"""

from __future__ import annotations

import datetime
import gc
import json
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from cts.data.io import write_bytes_atomic
from cts.engine import autocast
from cts.models import Segmenter, build_segmenter
from cts.paper import paper_setting

BENCH_PRECISIONS = ("fp32", "bf16")
COMPILE_MODES = (
    "auto",
    "none",
    "default",
    "reduce-overhead",
    "max-autotune",
    "max-autotune-no-cudagraphs",
)
# Untimed calls per K before timing a compiled forward: compile, warm up, record the graph.
COMPILED_PREWARM = 3


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


def _table_row(key: str, setting: str) -> TableRow:
    """The row of the paper's setting (:data:`cts.paper.PAPER_SETTINGS`) under ``key``."""
    row = paper_setting(setting)
    return TableRow(
        key,
        row.label,
        row.backbone,
        row.crop_size,
        row.num_tokens_shared,
        row.num_classes,
        row.dataset_label,
    )


# The settings whose throughput the authors' code was timed at (every row of their table
# but Pascal-Context ViT-S 480).
PAPER_TABLE = (
    _table_row("vit_ti_512", "ade20k-vit-ti"),
    _table_row("vit_s_512", "ade20k-vit-s"),
    _table_row("vit_b_512", "ade20k-vit-b"),
    _table_row("vit_l_640", "ade20k-vit-l-640"),
    _table_row("vit_s_768", "cityscapes-vit-s"),
)


@dataclass(frozen=True)
class PolicySetting:
    """Where the policy net looks: the image resized by ``input_scale``, the feature level of
    stride ``feature_stride``. All three settings give the same superpatch grid."""

    name: str
    input_scale: float
    feature_stride: int

    @property
    def label(self) -> str:
        return f"{self.name} (x{self.input_scale:g}, stride {self.feature_stride})"


# Multiply-adds per 512x512 image: paper (full resolution, stride 32) 1.90 G; half (the
# table's default) 0.32 G; quarter (the pipeline's default) 0.037 G, precision@103 93.8%
# against 92.3% for half on the embedded data.
POLICY_SETTINGS = {
    setting.name: setting
    for setting in (
        PolicySetting("paper", 1.0, 32),
        PolicySetting("half", 0.5, 16),
        PolicySetting("quarter", 0.25, 8),
    )
}


def resolve_policies(names: Sequence[str]) -> tuple[str, ...]:
    """Policy settings by name, each once, in the order given (empty: ``half``)."""
    unknown = [name for name in names if name not in POLICY_SETTINGS]
    if unknown:
        raise ValueError(f"policy {unknown}: allowed {', '.join(POLICY_SETTINGS)}")
    return tuple(dict.fromkeys(names)) or ("half",)


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
    """``auto``: Inductor + CUDA graphs (``reduce-overhead``) on a GPU, eager on CPU."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode {mode!r}: allowed {', '.join(COMPILE_MODES)}")
    if mode == "auto":
        return "reduce-overhead" if device.type == "cuda" else "none"
    return mode


def uses_cuda_graphs(compile_mode: str) -> bool:
    return compile_mode != "none" and bool(
        torch._inductor.list_mode_options(compile_mode).get("triton.cudagraphs", False)
    )


Predict = Callable[[Tensor, int], Tensor]


def inference_fn(model: Segmenter, compile_mode: str) -> Predict:
    """``(images, K) -> labels``: the model's :meth:`Segmenter.predict`, compiled or not.

    Compiled as one graph (``fullgraph``: a graph break is an error, not a slower number)
    with static shapes, so that each K and batch size gets its own graph, which CUDA graphs
    replay as one launch. With CUDA graphs, the labels returned are overwritten by the next
    call: clone them to keep them.
    """
    return _compiled(model.predict, compile_mode)


def _compiled(fn: Callable[..., Tensor], compile_mode: str) -> Callable[..., Tensor]:
    """``fn`` compiled as one graph with static shapes (``none``: as it is)."""
    if compile_mode == "none":
        return fn
    compiled = torch.compile(fn, mode=compile_mode, dynamic=False, fullgraph=True)
    if not uses_cuda_graphs(compile_mode):
        return compiled

    def run(*args: Any) -> Tensor:
        # Each call is a new inference step: the graph may reuse the last call's outputs.
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(*args)

    return run


def policy_fn(model: Segmenter, compile_mode: str) -> Callable[[Tensor], Tensor] | None:
    """``images -> (B, S)`` share scores of the model's policy net alone (its input resize
    included; not the top-K selection), compiled as :func:`inference_fn`; None without a
    policy net."""
    if model.policy_net is None:
        return None
    superpatch = 2 * model.patch_size

    def scores(images: Tensor) -> Tensor:
        grid = (-(-images.shape[-2] // superpatch), -(-images.shape[-1] // superpatch))
        return model.policy_net.share_scores(images, grid)

    return _compiled(scores, compile_mode)


def release_compiled(device: torch.device) -> None:
    """Drop compiled graphs and their CUDA-graph memory pools (and the allocator's cache)."""
    torch.compiler.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


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
    """Median wall time of each call. The calls are timed in turns, in alternating order,
    repeat after repeat, so that a change in the machine's load affects them alike."""
    times: dict[Any, list[float]] = {key: [] for key in calls}
    for i in range(warmup + repeats):
        order = list(calls) if i % 2 == 0 else list(reversed(calls))
        for key in order:
            _synchronize(device)
            start = time.perf_counter()
            calls[key]()
            _synchronize(device)
            if i >= warmup:
                times[key].append(time.perf_counter() - start)
    return {key: statistics.median(values) for key, values in times.items()}


def prewarm_peak_memory_mib(
    calls: dict[Any, Callable[[], object]], device: torch.device, prewarm: int
) -> dict[Any, float | None]:
    """Run each call ``prewarm`` times, one after the other, and return for each the memory
    it needs on its own in MiB: what was allocated before any ran (weights, inputs) plus the
    high-water mark of its own runs above what was allocated when they began. CUDA-graph
    replays allocate nothing, so the first runs (compile, warm-up, recording) are where the
    working memory shows. None on CPU."""
    peaks: dict[Any, float | None] = {}
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    for key, call in calls.items():
        if device.type == "cuda":
            _synchronize(device)
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(prewarm):
            call()
        if device.type == "cuda":
            _synchronize(device)
            peaks[key] = (base + torch.cuda.max_memory_allocated(device) - before) / 2**20
        else:
            peaks[key] = None
    return peaks


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
    run_batch: Callable[[int], object],
    batch_size: int,
    device: torch.device,
    what: str,
    batch_option: str = "--batch-size",
) -> None:
    """Run one batch; if the device runs out of memory, raise one clear error that names the
    largest batch that fits instead of a CUDA traceback."""

    def fits(batch: int) -> bool:
        try:
            run_batch(batch)
            _synchronize(device)
            return True
        except RuntimeError as error:  # torch.OutOfMemoryError is one
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
        f"the largest batch that fits is {largest}: set {batch_option} {largest}"
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


@contextmanager
def out_of_memory_as_error(what: str, advice: str, device: torch.device) -> Iterator[None]:
    """Turn a device out-of-memory error in the block into one clear line."""
    failed = False
    try:
        yield
    except RuntimeError as error:  # torch.OutOfMemoryError is one
        if not is_out_of_memory(error):
            raise
        failed = True
    if failed:  # outside the handler: the traceback's tensors are freed first
        release_compiled(device)
        raise BenchmarkOutOfMemoryError(
            f"out of memory while {what} on {device_name(device)}: {advice}"
        )


POLICY = "policy"  # the key of the policy net's own timing in time_inference's results


def time_inference(
    model: Segmenter,
    images: Tensor,
    ks: Sequence[int],
    precision: str = "fp32",
    compile_mode: str = "none",
    warmup: int = 3,
    repeats: int = 10,
    time_policy: bool = False,
) -> tuple[dict[int | str, float], dict[int | str, float | None]]:
    """Median seconds per batch and peak memory in MiB (None on CPU) of
    :meth:`Segmenter.predict` at each K, the K timed in turns; with ``time_policy`` (and a
    policy net) also the policy net alone, under the key :data:`POLICY`, in the same turns.

    Compiled forwards get at least :data:`COMPILED_PREWARM` untimed calls per K before
    ``warmup`` more; their graphs are released afterwards.
    """
    device = images.device
    compile_mode = resolve_compile_mode(compile_mode, device)
    predict = inference_fn(model, compile_mode)
    calls: dict[int | str, Callable[[], object]] = {
        k: (lambda k=k: predict(images, k)) for k in dict.fromkeys(ks)
    }
    policy = policy_fn(model, compile_mode) if time_policy else None
    if policy is not None:
        calls[POLICY] = lambda: policy(images)
    prewarm = 1 if compile_mode == "none" else COMPILED_PREWARM
    model.eval()
    try:
        with torch.inference_mode(), autocast(device, precision):
            peaks = prewarm_peak_memory_mib(calls, device, prewarm)
            seconds = median_seconds_interleaved(calls, device, warmup, repeats)
    finally:
        release_compiled(device)
    return seconds, peaks


def measure_sharing(
    model: Segmenter,
    images: Tensor,
    num_tokens_shared: int,
    precision: str = "fp32",
    compile_mode: str = "none",
    warmup: int = 3,
    repeats: int = 10,
) -> dict[str, float | None]:
    """Images per second and peak memory of one batch with K shared tokens and with none
    (:func:`time_inference`). Returns ``ims_per_sec``, ``ims_per_sec_no_sharing``,
    ``speedup``, ``ms_per_batch``, ``ms_per_batch_no_sharing``, ``peak_memory_mib``,
    ``peak_memory_mib_no_sharing`` (None on CPU), and the policy net's own time per batch,
    ``policy_ms_per_batch``, and share of the forward with sharing, ``policy_share`` (both
    None without a policy net or at K = 0, where it does not run).
    """
    seconds, peaks = time_inference(
        model,
        images,
        (num_tokens_shared, 0),
        precision,
        compile_mode,
        warmup,
        repeats,
        time_policy=num_tokens_shared > 0,
    )
    batch = images.shape[0]
    shared, plain = seconds[num_tokens_shared], seconds[0]
    policy = seconds.get(POLICY)
    return {
        "policy_ms_per_batch": None if policy is None else policy * 1e3,
        "policy_share": None if policy is None else policy / shared,
        "ims_per_sec": batch / shared,
        "ims_per_sec_no_sharing": batch / plain,
        "speedup": plain / shared,
        "ms_per_batch": shared * 1e3,
        "ms_per_batch_no_sharing": plain * 1e3,
        "peak_memory_mib": peaks[num_tokens_shared],
        "peak_memory_mib_no_sharing": peaks[0],
    }


def label_agreement(model: Segmenter, images: Tensor, num_tokens_shared: int) -> float | None:
    """Fraction of pixels whose bf16-autocast label equals the fp32 label, same weights and
    eager forwards; None where the device has no bf16.

    The policy net runs in each precision too, so a superpatch whose score is tied at the
    K-th place may be shared in one and not in the other; that counts as disagreement.
    """
    device = images.device
    if not bf16_supported(device):
        return None
    model.eval()
    with torch.inference_mode():
        reference = model.predict(images, num_tokens_shared)
        with autocast(device, "bf16"):
            low = model.predict(images, num_tokens_shared)
    return (reference == low).float().mean().item()


def ensure_batch_fits(
    model: Segmenter, images: Tensor, precision: str, what: str, batch_option: str
) -> None:
    """One eager forward without sharing (the larger of the two); on out-of-memory, a clear
    error naming the largest batch that fits. Eager is the conservative test: it writes the
    upsampled scores that a compiled forward never materialises."""
    device = images.device
    with torch.inference_mode(), autocast(device, precision):
        check_batch_fits(
            lambda b: model.predict(images[:b], 0),
            images.shape[0],
            device,
            f"{what} ({images.shape[-2]}x{images.shape[-1]}, {precision})",
            batch_option,
        )


def measure_model(
    model: Segmenter,
    images: Tensor,
    num_tokens_shared: int,
    precisions: Sequence[str],
    compile_mode: str,
    warmup: int,
    repeats: int,
    what: str,
    batch_option: str = "--batch-size",
    compile_option: str = "--compile",
    agreement_images: int = 8,
) -> list[dict[str, Any]]:
    """One record per precision: the same weights with K shared tokens and with sharing
    off, on one batch: throughput, speed-up, GFLOPs (multiply-accumulates, as the paper
    counts them), tokens, peak memory, and the bf16/fp32 label agreement.

    ``what`` names the model in errors; ``batch_option`` / ``compile_option`` name the
    settings an out-of-memory error tells the user to change.
    """
    device = images.device
    compile_mode = resolve_compile_mode(compile_mode, device)
    model.eval()
    image_size = images.shape[-1]
    shared = forward_cost(model, image_size, num_tokens_shared)
    plain = forward_cost(model, image_size, 0)
    records = []
    for precision in precisions:
        ensure_batch_fits(model, images, precision, what, batch_option)
        advice = (
            f"set a smaller {batch_option}, or {compile_option} none"
            if compile_mode != "none"
            else f"set a smaller {batch_option}"
        )
        with out_of_memory_as_error(
            f"timing {what} ({precision}, compile {compile_mode})", advice, device
        ):
            timing = measure_sharing(
                model, images, num_tokens_shared, precision, compile_mode, warmup, repeats
            )
        records.append(
            {
                "precision": precision,
                "compile": compile_mode,
                "batch_size": images.shape[0],
                "image_size": image_size,
                "num_tokens_shared": num_tokens_shared,
                "tokens": shared.tokens,
                "tokens_no_sharing": plain.tokens,
                "gflops": shared.gmacs,
                "gflops_no_sharing": plain.gmacs,
                **timing,
            }
        )
    # After the batch was found to fit: the agreement batch is no larger.
    agreement_batch = images[:agreement_images]
    with out_of_memory_as_error(
        f"comparing bf16 with fp32 labels of {what}", f"set a smaller {batch_option}", device
    ):
        agreement = {
            "bf16_fp32_agreement": label_agreement(model, agreement_batch, num_tokens_shared),
            "bf16_fp32_agreement_no_sharing": label_agreement(model, agreement_batch, 0),
        }
    return [{**record, **agreement} for record in records]


def measure_sweep(
    model: Segmenter,
    images: Tensor,
    ks: Sequence[int],
    precision: str,
    compile_mode: str,
    warmup: int,
    repeats: int,
    what: str,
    batch_option: str = "--batch-size",
    compile_option: str = "--compile",
) -> list[dict[str, Any]]:
    """One record per K of the same weights on one batch, timed as :func:`measure_model`
    times K and 0 (in turns, one process): ``num_tokens_shared``, ``tokens``, ``gflops``
    (multiply-accumulates per image), ``ims_per_sec``, ``ms_per_batch``."""
    device = images.device
    compile_mode = resolve_compile_mode(compile_mode, device)
    model.eval()
    ensure_batch_fits(model, images, precision, what, batch_option)
    advice = (
        f"set a smaller {batch_option}, or {compile_option} none"
        if compile_mode != "none"
        else f"set a smaller {batch_option}"
    )
    with out_of_memory_as_error(
        f"timing {what} ({precision}, compile {compile_mode})", advice, device
    ):
        seconds, _ = time_inference(model, images, ks, precision, compile_mode, warmup, repeats)
    records = []
    for k in ks:
        cost = forward_cost(model, images.shape[-1], k)
        records.append(
            {
                "num_tokens_shared": k,
                "tokens": cost.tokens,
                "gflops": cost.gmacs,
                "ims_per_sec": images.shape[0] / seconds[k],
                "ms_per_batch": seconds[k] * 1e3,
            }
        )
    return records


# --- the paper's table ----------------------------------------------------------------------


@dataclass(frozen=True)
class TableSettings:
    """How the table is measured; every field is written into the JSON."""

    batch_size: int
    precisions: tuple[str, ...] = BENCH_PRECISIONS
    compile_mode: str = "auto"
    warmup: int = 5
    repeats: int = 20
    policies: tuple[str, ...] = ("half",)
    depth: int | None = None
    agreement_images: int = 8
    seed: int = 0

    @classmethod
    def for_device(
        cls,
        device: torch.device,
        batch_size: int | None = None,
        precisions: Sequence[str] = BENCH_PRECISIONS,
        allow_fp32_fallback: bool = False,
        compile_mode: str = "auto",
        warmup: int | None = None,
        repeats: int | None = None,
        policies: Sequence[str] = ("half",),
        depth: int | None = None,
    ) -> TableSettings:
        """Settings with the device's defaults for what is None (GPU: batch 32, 5 warm-up
        and 20 timed runs; CPU: 2, 1 and 3), checked. ``policies``: names of
        :data:`POLICY_SETTINGS`, each row is measured with each."""
        gpu = device.type == "cuda"
        settings = cls(
            batch_size=(32 if gpu else 2) if batch_size is None else batch_size,
            precisions=resolve_precisions(precisions, device, allow_fp32_fallback),
            compile_mode=resolve_compile_mode(compile_mode, device),
            warmup=(5 if gpu else 1) if warmup is None else warmup,
            repeats=(20 if gpu else 3) if repeats is None else repeats,
            policies=resolve_policies(policies),
            depth=depth,
        )
        if settings.batch_size < 1 or settings.repeats < 1 or settings.warmup < 0:
            raise ValueError("--batch-size and --repeats must be at least 1, --warmup at least 0")
        return settings


def backbone_row(key: str) -> TableRow:
    """A row for any backbone sharing serves, ``NAME`` or ``NAME@CROP``: Segmenter on
    ADE20K's 150 classes at ``CROP`` (default: 512 rounded down to a multiple of the
    superpatch, 504 for a /14 ViT), K for the paper's 30% fewer tokens (``ceil(N / 10)``)."""
    from cts.models.vit import backbone_patch_size

    name, _, crop_text = key.partition("@")
    superpatch = 2 * backbone_patch_size(name)
    crop = int(crop_text) if crop_text.isdigit() else 512 // superpatch * superpatch
    if (crop_text and not crop_text.isdigit()) or crop < superpatch or crop % superpatch:
        raise ValueError(
            f"row {key!r}: the crop must be a positive multiple of {superpatch} "
            f"(2 x {name}'s patch size), e.g. {name}@{512 // superpatch * superpatch}"
        )
    patch_tokens = (crop // superpatch * 2) ** 2
    return TableRow(key, f"{name} {crop}", name, crop, -(-patch_tokens // 10), 150, "ADE20K")


def select_rows(keys: Iterable[str] | None) -> tuple[TableRow, ...]:
    """Rows by key, the paper's in its order, then backbone rows (:func:`backbone_row`) in
    the order given (None or empty: the paper's rows)."""
    keys = list(keys or [])
    known = {row.key: row for row in PAPER_TABLE}
    backbones = []
    for key in (k for k in keys if k not in known):
        try:
            backbones.append(backbone_row(key))
        except ValueError as error:
            if not str(error).startswith("unknown backbone"):
                raise
            raise ValueError(
                f"unknown row {key!r}: use {', '.join(known)}, or a timm backbone name "
                "(NAME or NAME@CROP, e.g. vit_small_patch14_reg4_dinov2@504)"
            ) from error
    paper = tuple(row for row in PAPER_TABLE if not keys or row.key in keys)
    return paper + tuple(backbones)


def build_row_model(
    row: TableRow,
    settings: TableSettings,
    device: torch.device,
    policy: PolicySetting | None = None,
) -> Segmenter:
    """Randomly initialised Segmenter (mask transformer) with the policy net, for a row;
    ``policy`` default: the first of the settings'. The segmenter's weights depend on the
    seed only (the policy net is built last), so every policy runs the same encoder."""
    policy = policy or POLICY_SETTINGS[settings.policies[0]]
    torch.manual_seed(settings.seed)
    model = build_segmenter(
        backbone=row.backbone,
        num_classes=row.num_classes,
        crop_size=row.crop_size,
        num_tokens_shared=row.num_tokens_shared,
        policy="policy_net",
        decoder="mask_transformer",
        depth=settings.depth,
        policy_feature_stride=policy.feature_stride,
        policy_input_scale=policy.input_scale,
    )
    return model.to(device).eval()


def measure_row(
    row: TableRow, settings: TableSettings, device: torch.device
) -> list[dict[str, Any]]:
    """One record per policy setting and precision for a row of the table."""
    records = []
    for name in settings.policies:
        policy = POLICY_SETTINGS[name]
        release_compiled(device)  # each model starts from an empty graph cache
        model = build_row_model(row, settings, device, policy)
        images = random_images(settings.batch_size, row.crop_size, device, settings.seed)
        measured = measure_model(
            model,
            images,
            row.num_tokens_shared,
            settings.precisions,
            settings.compile_mode,
            settings.warmup,
            settings.repeats,
            what=row.label,
            agreement_images=settings.agreement_images,
        )
        del model, images
        release_compiled(device)
        records += [{**asdict(row), "policy": policy.label, **record} for record in measured]
    return records


def runtime(device: torch.device) -> dict[str, Any]:
    """Device, torch version, and what "fp32" means there: whether TF32 is allowed for
    matmuls / cuDNN convolutions."""
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32) and device.type == "cuda",
    }


def environment(device: torch.device, settings: TableSettings) -> dict[str, Any]:
    return {
        **runtime(device),
        "date": datetime.date.today().isoformat(),
        **asdict(settings),
        "compile_mode": resolve_compile_mode(settings.compile_mode, device),
    }


def _memory(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _share(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _policy_time(record: dict[str, Any]) -> str:
    ms = record.get("policy_ms_per_batch")
    if ms is None:
        return "-"
    return f"{ms:,.{1 if ms >= 10 else 2}f} ({100 * record['policy_share']:.0f}%)"


def markdown_table(records: Sequence[dict[str, Any]], env: dict[str, Any]) -> str:
    """The table as markdown, with the settings it was measured under."""
    policies = ", ".join(POLICY_SETTINGS[name].label for name in env["policies"])
    lines = [
        f"Measured on {env['device']}, torch {env['torch']}, {env['date']}: batch "
        f"{env['batch_size']}, compile {env['compile_mode']}, policy net input scale and "
        f"feature stride: {policies}"
        + (f", depth {env['depth']}" if env["depth"] else "")
        + f"; median of {env['repeats']} runs after {env['warmup']} warm-up; "
        "random weights (bf16/fp32 label agreement: eager, random inputs). Policy net: its "
        "own time per batch and share of the CTS forward.",
        "",
        "| Model | Dataset | K | Tokens | Policy net | GFLOPs | Precision | im/s no sharing "
        "| im/s CTS | Speed-up | Policy net ms (share) | Peak MiB no sharing / CTS "
        "| bf16 = fp32 labels no sharing / CTS |",
        "|---|---|--:|--:|---|--:|---|--:|--:|--:|--:|--:|--:|",
    ]
    for r in records:
        lines.append(
            f"| {r['label']} | {r['dataset']} | {r['num_tokens_shared']} "
            f"| {r['tokens_no_sharing']} -> {r['tokens']} | {r['policy']} "
            f"| {r['gflops_no_sharing']:.1f} -> {r['gflops']:.1f} | {r['precision']} "
            f"| {r['ims_per_sec_no_sharing']:,.1f} | {r['ims_per_sec']:,.1f} "
            f"| {r['speedup']:.2f}x | {_policy_time(r)} "
            f"| {_memory(r['peak_memory_mib_no_sharing'])} / {_memory(r['peak_memory_mib'])} "
            f"| {_share(r['bf16_fp32_agreement_no_sharing'])} "
            f"/ {_share(r['bf16_fp32_agreement'])} |"
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
    "BENCH_PRECISIONS",
    "COMPILE_MODES",
    "PAPER_TABLE",
    "POLICY",
    "POLICY_SETTINGS",
    "BenchmarkOutOfMemoryError",
    "ForwardCost",
    "PolicySetting",
    "TableRow",
    "TableSettings",
    "backbone_row",
    "bf16_supported",
    "build_row_model",
    "check_batch_fits",
    "device_name",
    "ensure_batch_fits",
    "environment",
    "forward_cost",
    "inference_fn",
    "label_agreement",
    "largest_fitting_batch",
    "markdown_table",
    "measure_model",
    "measure_row",
    "measure_sharing",
    "measure_sweep",
    "median_seconds_interleaved",
    "policy_fn",
    "random_images",
    "release_compiled",
    "resolve_compile_mode",
    "resolve_policies",
    "resolve_precisions",
    "runtime",
    "select_rows",
    "time_inference",
    "uses_cuda_graphs",
    "write_table",
]
