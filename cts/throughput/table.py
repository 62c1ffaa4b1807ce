"""The paper's throughput table (``cts throughput``): every row measured with random
weights, no sharing against CTS (and, asked, against ToMe), written as ``throughput.json``
and ``throughput.md``."""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from cts.data.io import write_bytes_atomic
from cts.engine import resolve_device
from cts.geometry import num_patches
from cts.merging import check_merge_count
from cts.models import Segmenter, build_segmenter
from cts.models.tome import tome_refusal
from cts.models.vit import backbone_patch_size, meta_backbone
from cts.throughput.compilation import release_compiled, resolve_compile_mode
from cts.throughput.devices import BENCH_PRECISIONS, device_name, resolve_precisions, runtime
from cts.throughput.inputs import random_images
from cts.throughput.measure import measure_model, measure_tome
from cts.throughput.rows import (
    POLICY_SETTINGS,
    PolicySetting,
    TableRow,
    resolve_policies,
    select_rows,
)


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
    tome_rs: tuple[int, ...] = ()
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
        tome_rs: Sequence[int] = (),
    ) -> TableSettings:
        """Settings with the device's defaults for what is None (GPU: batch 32, 5 warm-up
        and 20 timed runs; CPU: 2, 1 and 3), checked. ``policies``: names of
        :data:`POLICY_SETTINGS`, each row is measured with each; ``tome_rs``: ToMe's r
        (tokens merged per block), each row is also measured with each."""
        gpu = device.type == "cuda"
        settings = cls(
            batch_size=(32 if gpu else 2) if batch_size is None else batch_size,
            precisions=resolve_precisions(precisions, device, allow_fp32_fallback),
            compile_mode=resolve_compile_mode(compile_mode, device),
            warmup=(5 if gpu else 1) if warmup is None else warmup,
            repeats=(20 if gpu else 3) if repeats is None else repeats,
            policies=resolve_policies(policies),
            depth=depth,
            tome_rs=tuple(sorted(set(tome_rs))),
        )
        if settings.batch_size < 1 or settings.repeats < 1 or settings.warmup < 0:
            raise ValueError("--batch-size and --repeats must be at least 1, --warmup at least 0")
        if any(r < 1 for r in settings.tome_rs):
            raise ValueError(f"--tome-r {list(tome_rs)}: each r must be at least 1")
        return settings


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
    """One record per policy setting and precision for a row of the table, then one per
    ToMe r and precision (``settings.tome_rs``) on the first policy's model: the same
    segmenter weights, the policy net idle."""
    records, tome = [], []
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
        if settings.tome_rs and name == settings.policies[0]:
            tome = measure_tome(
                model,
                images,
                settings.tome_rs,
                settings.precisions,
                settings.compile_mode,
                settings.warmup,
                settings.repeats,
                what=row.label,
                agreement_images=settings.agreement_images,
            )
        del model, images
        release_compiled(device)
        records += [
            {**asdict(row), "method": "cts", "policy": policy.label, **record}
            for record in measured
        ]
    return records + [{**asdict(row), "method": "tome", "policy": None, **r} for r in tome]


def check_tome_rows(rows: Sequence[TableRow], settings: TableSettings) -> None:
    """One line, before any row is measured, unless ToMe can merge each r in each row."""
    for row in rows if settings.tome_rs else ():
        vit = meta_backbone(row.backbone)
        reason = tome_refusal(vit)
        if reason is not None:
            raise ValueError(f"--tome-r: backbone '{row.backbone}' cannot merge tokens: {reason}")
        depth = settings.depth or len(vit.blocks)
        patches = num_patches(row.crop_size, backbone_patch_size(row.backbone))
        for r in settings.tome_rs:
            check_merge_count(r, patches, depth, row.label)


def environment(device: torch.device, settings: TableSettings) -> dict[str, Any]:
    """What the table was measured on and with: :func:`runtime`, the date, the settings."""
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
    for r in (r for r in records if r.get("method", "cts") == "cts"):
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
    return "\n".join(lines + _tome_lines(records)) + "\n"


def _tome_lines(records: Sequence[dict[str, Any]]) -> list[str]:
    """The ToMe records as a second table (none: no lines)."""
    tome = [r for r in records if r.get("method") == "tome"]
    if not tome:
        return []
    lines = [
        "",
        "ToMe on the same weights (r tokens merged in every block, nothing shared; tokens: "
        "the mean entering a block; GFLOPs and speed-up against no token reduction, compiled "
        "as the table above):",
        "",
        "| Model | Dataset | r | Tokens | GFLOPs | Precision | im/s none | im/s ToMe "
        "| Speed-up | Peak MiB none / ToMe | bf16 = fp32 labels none / ToMe |",
        "|---|---|--:|--:|--:|---|--:|--:|--:|--:|--:|",
    ]
    for r in tome:
        lines.append(
            f"| {r['label']} | {r['dataset']} | {r['tome_r']} "
            f"| {r['tokens_no_sharing']} -> {r['tokens']:g} "
            f"| {r['gflops_no_sharing']:.1f} -> {r['gflops']:.1f} | {r['precision']} "
            f"| {r['ims_per_sec_no_sharing']:,.1f} | {r['ims_per_sec']:,.1f} "
            f"| {r['speedup']:.2f}x "
            f"| {_memory(r['peak_memory_mib_no_sharing'])} / {_memory(r['peak_memory_mib'])} "
            f"| {_share(r['bf16_fp32_agreement_no_sharing'])} "
            f"/ {_share(r['bf16_fp32_agreement'])} |"
        )
    return lines


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


def _progress_line(record: dict[str, Any]) -> str:
    if record["method"] == "tome":
        return (
            f"  ToMe r={record['tome_r']}, {record['precision']}: "
            f"{record['ims_per_sec_no_sharing']:,.1f} -> {record['ims_per_sec']:,.1f} "
            f"im/s ({record['speedup']:.2f}x)"
        )
    return (
        f"  policy {record['policy']}, {record['precision']}: "
        f"{record['ims_per_sec_no_sharing']:,.1f} -> {record['ims_per_sec']:,.1f} "
        f"im/s ({record['speedup']:.2f}x), policy net "
        f"{record['policy_ms_per_batch']:,.2f} ms per batch"
    )


def measure_table(
    out_dir: Path,
    rows: Sequence[str] | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    precisions: Sequence[str] | None = None,
    allow_fp32_fallback: bool = False,
    compile_mode: str = "auto",
    warmup: int | None = None,
    repeats: int | None = None,
    policies: Sequence[str] = (),
    depth: int | None = None,
    tome_rs: Sequence[int] = (),
    echo: Callable[[str], object] = print,
    warn: Callable[[str], object] = print,
) -> tuple[str, Path, Path]:
    """Measure the rows (:func:`select_rows`; None: the paper's) under the settings
    (:meth:`TableSettings.for_device`; None: the device's defaults) and return the markdown
    table and the paths of ``throughput.json`` and ``throughput.md`` in ``out_dir``.

    ``echo`` gets a line per row and per record as they are measured, ``warn`` the notice
    that bf16 falls back to fp32. The files are rewritten after every row, so that a later
    failure keeps the rows measured.
    """
    target = resolve_device(device)
    asked = precisions or BENCH_PRECISIONS
    settings = TableSettings.for_device(
        target,
        batch_size=batch_size,
        precisions=asked,
        allow_fp32_fallback=allow_fp32_fallback,
        compile_mode=compile_mode,
        warmup=warmup,
        repeats=repeats,
        policies=policies,
        depth=depth,
        tome_rs=tome_rs,
    )
    selected = select_rows(rows)
    check_tome_rows(selected, settings)
    if "bf16" in asked and "bf16" not in settings.precisions:
        warn(f"bf16 is not supported on {device_name(target)}: measuring fp32 only")
    env = environment(target, settings)
    records: list[dict[str, Any]] = []
    for row in selected:
        echo(f"measuring {row.label} (K={row.num_tokens_shared}) on {env['device']} ...")
        for record in measure_row(row, settings, target):
            records.append(record)
            echo(_progress_line(record))
        json_path, md_path = write_table(records, env, out_dir)
    return markdown_table(records, env), json_path, md_path
