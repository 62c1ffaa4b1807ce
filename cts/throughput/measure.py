"""Measurements of one model on one batch: with K shared tokens and with sharing off
(:func:`measure_model`), or at every K of a sweep (:func:`measure_sweep`), every sharing
threshold (:func:`measure_thresholds`) and every ToMe ``r`` or ALGM threshold
(:func:`measure_merges`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from cts.engine import autocast
from cts.geometry import num_patches, tokens_kept
from cts.models import Segmenter
from cts.models.segmenter import merging_setting
from cts.throughput.compilation import inference_fn, resolve_compile_mode
from cts.throughput.cost import batch_cost, forward_cost
from cts.throughput.devices import bf16_supported
from cts.throughput.memory import ensure_batch_fits, out_of_memory_as_error
from cts.throughput.timing import POLICY, median_seconds_interleaved, time_calls, time_inference


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


def label_agreement(
    model: Segmenter, images: Tensor, num_tokens_shared: int, tome_r: int = 0
) -> float | None:
    """Fraction of pixels whose bf16-autocast label equals the fp32 label, same weights and
    eager forwards (K shared, or ToMe merging ``tome_r`` per block); None where the device
    has no bf16.

    The policy net runs in each precision too, so a superpatch whose score is tied at the
    K-th place may be shared in one and not in the other; that counts as disagreement.
    """
    device = images.device
    if not bf16_supported(device):
        return None
    model.eval()
    with torch.inference_mode():
        reference = model.predict(images, num_tokens_shared, tome_r=tome_r)
        with autocast(device, "bf16"):
            low = model.predict(images, num_tokens_shared, tome_r=tome_r)
    return (reference == low).float().mean().item()


def _timing_advice(compile_mode: str, batch_option: str, compile_option: str) -> str:
    """What an out-of-memory error while timing tells the user to change."""
    if compile_mode != "none":
        return f"set a smaller {batch_option}, or {compile_option} none"
    return f"set a smaller {batch_option}"


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
    advice = _timing_advice(compile_mode, batch_option, compile_option)
    records = []
    for precision in precisions:
        ensure_batch_fits(model, images, precision, what, batch_option)
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


def measure_tome(
    model: Segmenter,
    images: Tensor,
    rs: Sequence[int],
    precisions: Sequence[str],
    compile_mode: str,
    warmup: int,
    repeats: int,
    what: str,
    agreement_images: int = 8,
) -> list[dict[str, Any]]:
    """One record per precision and ToMe ``r`` (tokens merged per block): the same weights
    with ToMe and without token reduction, nothing shared, on one batch, each r and none
    timed in turns (:func:`measure_merges`), compiled as the CTS rows are;
    :func:`measure_model`'s keys (``*_no_sharing``: without reduction), ``tokens`` the mean
    entering a block, and ``tome_r``."""
    device = images.device
    compile_mode = resolve_compile_mode(compile_mode, device)
    advice = _timing_advice(compile_mode, "--batch-size", "--compile")
    records = []
    for precision in precisions:
        ensure_batch_fits(model, images, precision, what, "--batch-size")
        with out_of_memory_as_error(
            f"timing {what} with ToMe ({precision}, compile {compile_mode})", advice, device
        ):
            plain, *merged = measure_merges(
                model, images, "tome_r", [0, *rs], precision, warmup, repeats, compile_mode
            )
        records += [
            _against_none({"tome_r": row["tome_r"]}, plain, row, precision, images, compile_mode)
            | {"peak_memory_mib": row["peak_memory_mib"]}
            | {"peak_memory_mib_no_sharing": plain["peak_memory_mib"]}
            for row in merged
        ]
    # After the batch was found to fit: the agreement batch is no larger.
    agreement = {r: label_agreement(model, images[:agreement_images], 0, r) for r in (0, *rs)}
    return [
        record
        | {
            "bf16_fp32_agreement": agreement[record["tome_r"]],
            "bf16_fp32_agreement_no_sharing": agreement[0],
        }
        for record in records
    ]


def _against_none(
    setting: dict[str, Any],
    plain: dict[str, Any],
    merged: dict[str, Any],
    precision: str,
    images: Tensor,
    compile_mode: str = "none",
) -> dict[str, Any]:
    """A merging record of :func:`measure_merges` against its no-reduction one, under
    :func:`measure_model`'s keys, ``setting``'s keys after ``num_tokens_shared``."""
    return {
        "precision": precision,
        "compile": compile_mode,
        "batch_size": images.shape[0],
        "image_size": images.shape[-1],
        "num_tokens_shared": 0,
        **setting,
        "tokens": merged["tokens"],
        "tokens_no_sharing": plain["tokens"],
        "gflops": merged["gflops"],
        "gflops_no_sharing": plain["gflops"],
        "ims_per_sec": merged["ims_per_sec"],
        "ims_per_sec_no_sharing": plain["ims_per_sec"],
        "speedup": plain["ms_per_batch"] / merged["ms_per_batch"],
        "ms_per_batch": merged["ms_per_batch"],
        "ms_per_batch_no_sharing": plain["ms_per_batch"],
    }


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
    with out_of_memory_as_error(
        f"timing {what} ({precision}, compile {compile_mode})",
        _timing_advice(compile_mode, batch_option, compile_option),
        device,
    ):
        seconds, _ = time_inference(model, images, ks, precision, compile_mode, warmup, repeats)
    records = []
    for k in ks:
        cost = forward_cost(model, images.shape[-1], k, tome_r=0)
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


def measure_thresholds(
    model: Segmenter,
    images: Tensor,
    thresholds: Sequence[float],
    precision: str,
    warmup: int,
    repeats: int,
) -> list[dict[str, Any]]:
    """One record per sharing threshold of the same weights on one batch, eager (an image's
    K depends on its content, so there is no graph of static shapes to compile), timed in
    turns: ``share_threshold``, ``num_tokens_shared`` and ``tokens`` (means per image),
    ``gflops`` (the mean of each image's forward), ``ims_per_sec``, ``ms_per_batch``."""
    device = images.device
    model.eval()
    calls = {t: (lambda t=t: model.predict(images, share_threshold=t)) for t in thresholds}
    with torch.inference_mode(), autocast(device, precision):
        seconds = median_seconds_interleaved(calls, device, warmup, repeats)
        shared = {t: model(images, share_threshold=t).shared.flatten(1).sum(1) for t in calls}
    costs: dict[int, float] = {}
    records = []
    for t, ks in shared.items():
        for k in ks.tolist():
            costs.setdefault(k, forward_cost(model, images.shape[-1], k).gmacs)
        mean_k = ks.double().mean().item()
        records.append(
            {
                "share_threshold": t,
                "num_tokens_shared": mean_k,
                "tokens": tokens_kept(num_patches(images.shape[-1], model.patch_size), mean_k),
                "gflops": sum(costs[k] for k in ks.tolist()) / len(ks),
                "ims_per_sec": images.shape[0] / seconds[t],
                "ms_per_batch": seconds[t] * 1e3,
            }
        )
    return records


def measure_merging(
    model: Segmenter, images: Tensor, precision: str, warmup: int, repeats: int
) -> dict[str, Any]:
    """The benchmark record of a model that merges (ToMe, its ``tome_r``; ALGM, its
    ``algm_threshold``) against the same weights without merging, under
    :func:`measure_model`'s keys (``*_no_sharing``: without token reduction). Eager
    (:func:`measure_merges`); no bf16 agreement is measured."""
    setting, own = merging_setting(model.config)
    plain, merged = measure_merges(model, images, setting, [0, own], precision, warmup, repeats)
    config = model.config
    setting_keys = {"tome_r": config.tome_r, "algm_threshold": config.algm_threshold}
    record = _against_none(setting_keys, plain, merged, precision, images)
    return record | {"bf16_fp32_agreement": None}


def measure_merges(
    model: Segmenter,
    images: Tensor,
    setting: str,
    values: Sequence[float],
    precision: str,
    warmup: int,
    repeats: int,
    compile_mode: str = "none",
) -> list[dict[str, Any]]:
    """One record per value of a merging ``setting`` (``tome_r``: ToMe's r per block;
    ``algm_threshold``: ALGM's local threshold; 0: no merging) of the same weights on one
    batch, no sharing (training-free when the model was trained otherwise), timed in
    turns: the setting, ``tokens`` (the mean over blocks and images), ``gflops`` (the mean
    over the batch's images: ALGM keeps a number per image), ``ims_per_sec``,
    ``ms_per_batch``, ``peak_memory_mib`` (None on CPU). ``compile_mode``: one graph per
    value (ToMe's shapes are fixed by r; ALGM's depend on the image: eager only)."""
    predict = inference_fn(model, compile_mode)
    # K = 0 stated: a value of 0 means no reduction, not the model's own sharing.
    calls = {v: (lambda v=v: predict(images, 0, **{setting: v})) for v in values}
    seconds, peaks = time_calls(
        model, calls, images.device, precision, compile_mode, warmup, repeats
    )
    records = []
    for value in values:
        cost = batch_cost(model, images, num_tokens_shared=0, **{setting: value})
        records.append(
            {
                setting: value,
                "num_tokens_shared": 0,
                "tokens": cost.tokens,
                "gflops": cost.gmacs,
                "ims_per_sec": images.shape[0] / seconds[value],
                "ms_per_batch": seconds[value] * 1e3,
                "peak_memory_mib": peaks[value],
            }
        )
    return records
