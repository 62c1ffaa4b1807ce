"""Where the inference time of a Segmenter goes, with sharing (K) and without (K = 0).

    python scripts/measure/inference_profile.py [--checkpoint checkpoints/segmenter.pt] [--batch 4]

Runs :meth:`Segmenter.predict` (what the benchmark stage times) on the same inputs for K and
for 0, in turns, with each part of the forward measured: policy net, selection + layout,
patch embedding + sharing, encoder blocks, decoder, unsharing, upsampling + argmax. Parts are
timed in CPU time of the calling thread (``--threads 1``: the work done, not the waiting for a
core on a shared machine) or wall time (``--clock wall``). ``--ops N`` also prints the N
costliest ops of each K from ``torch.profiler``. Without a checkpoint, a randomly initialised
model of the default pipeline's shape (ViT-Ti, 4 blocks, linear decoder, 12 classes) is used,
or with ``--row`` one of `cts throughput`'s paper rows (e.g. ``vit_s_512``: ViT-S, 12 blocks,
mask transformer, 150 classes, K=103). On a GPU each part is bracketed by synchronisations,
so its wall time is its kernels' time (the whole forward is timed with those syncs too).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections import defaultdict
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile, record_function

import cts.models.segmenter as segmenter_module
from cts.checkpoint import load_segmenter
from cts.engine import autocast
from cts.models import Segmenter, build_segmenter
from cts.throughput.inputs import validation_batch
from cts.throughput.rows import PAPER_TABLE, POLICY_SETTINGS, PolicySetting
from cts.throughput.table import TableSettings, build_row_model

PARTS = (
    "policy net",
    "selection + layout",
    "patch embedding + sharing",
    "encoder blocks",
    "decoder",
    "unsharing",
    "upsampling + argmax",
)


SPENT: dict[str, float] = defaultdict(float)
SYNC_DEVICE: torch.device | None = None  # a GPU: kernels run asynchronously, a part ends at a sync


def _sync() -> None:
    if SYNC_DEVICE is not None:
        torch.cuda.synchronize(SYNC_DEVICE)


def _labelled(label: str, fn: Callable, clock: Callable[[], float]) -> Callable:
    @functools.wraps(fn)
    def run(*args, **kwargs):
        _sync()
        start = clock()
        with record_function(label):
            out = fn(*args, **kwargs)
        _sync()
        SPENT[label] += clock() - start
        return out

    return run


def label_parts(model: Segmenter, clock: Callable[[], float]) -> None:
    """Measure each part of the forward (this process only); nested parts are not nested."""
    if model.policy_net is not None:
        model.policy_net.forward = _labelled("policy net", model.policy_net.forward, clock)
    for name in ("select_shared", "plan_layout"):
        labelled = _labelled("selection + layout", getattr(segmenter_module, name), clock)
        setattr(segmenter_module, name, labelled)
    for module, name, label in (
        (segmenter_module, "unshare_tokens", "unsharing"),
        (segmenter_module, "upsample_argmax", "upsampling + argmax"),
    ):
        setattr(module, name, _labelled(label, getattr(module, name), clock))
    encoder = model.encoder
    for name in ("_embed", "_shared_tokens"):  # K = 0 / K > 0
        labelled = _labelled("patch embedding + sharing", getattr(encoder, name), clock)
        setattr(encoder, name, labelled)
    # K = 0 runs timm's forward_features: its patch embedding and position embedding (K > 0
    # embeds through _shared_tokens and uses _pos_embed for the positions only).
    vit = encoder.vit
    vit.patch_embed.forward = _labelled("patch embedding + sharing", vit.patch_embed.forward, clock)
    vit._pos_embed = _labelled("patch embedding + sharing", vit._pos_embed, clock)
    encoder.vit.blocks.forward = _labelled("encoder blocks", encoder.vit.blocks.forward, clock)
    model.decoder.forward = _labelled("decoder", model.decoder.forward, clock)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--k", type=int, default=None, help="default: the model's K")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--clock", choices=("cpu", "wall"), help="default: cpu; wall on a GPU")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--ops", type=int, default=0, help="also print the N costliest ops")
    parser.add_argument(
        "--policy-stride",
        type=int,
        default=None,
        help="without a checkpoint (default: the pipeline's 8; with --row: the table's 16)",
    )
    parser.add_argument(
        "--policy-scale",
        type=float,
        default=None,
        help="without a checkpoint (default: the pipeline's 0.25; with --row: the table's 0.5)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument(
        "--data-root",
        default=None,
        help="time on this dataset's first validation images, as the benchmark stage does "
        "(default: Gaussian noise, on which a trained model's scores are far less confident)",
    )
    rows = {row.key: row for row in PAPER_TABLE}
    parser.add_argument("--row", choices=sorted(rows), default=None, help="without a checkpoint")
    args = parser.parse_args()
    on_gpu = torch.device(args.device).type == "cuda"
    if on_gpu and args.clock == "cpu":
        parser.error("--clock cpu measures host threads; on a GPU use --clock wall")
    args.clock = args.clock or ("wall" if on_gpu else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)

    default_policy = POLICY_SETTINGS["half" if args.row else "quarter"]
    args.policy_stride = args.policy_stride or default_policy.feature_stride
    args.policy_scale = args.policy_scale or default_policy.input_scale

    device = torch.device(args.device)
    if args.checkpoint:
        model = load_segmenter(args.checkpoint, device)
    elif args.row:
        policy = PolicySetting("profile", args.policy_scale, args.policy_stride)
        settings = TableSettings(batch_size=args.batch)
        model = build_row_model(rows[args.row], settings, device, policy)
    else:
        torch.manual_seed(0)
        model = build_segmenter(
            backbone="vit_tiny_patch16_384",
            depth=4,
            num_classes=12,
            decoder="linear",
            policy_feature_stride=args.policy_stride,
            policy_input_scale=args.policy_scale,
        )
    model = model.to(device).eval()
    k = model.num_tokens_shared if args.k is None else args.k
    crop = model.config.crop_size
    if args.data_root:
        images = validation_batch(args.data_root, model, args.batch)
    else:
        noise = torch.Generator().manual_seed(0)
        images = torch.randn(args.batch, 3, crop, crop, generator=noise)
    images = images.to(device)

    global SYNC_DEVICE
    SYNC_DEVICE = device if device.type == "cuda" else None
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    label_parts(model, clock)
    spent = {key: defaultdict(list) for key in (k, 0)}
    totals = {key: [] for key in (k, 0)}
    with torch.inference_mode(), autocast(device, args.precision):
        for i in range(args.warmup + args.repeats):
            for key in (k, 0) if i % 2 == 0 else (0, k):
                SPENT.clear()
                start = clock()
                model.predict(images, key)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                total = clock() - start
                if i >= args.warmup:
                    totals[key].append(total)
                    for part in PARTS:
                        spent[key][part].append(SPENT.get(part, 0.0))
        profiles = {}
        if args.ops:
            activities = [ProfilerActivity.CPU]
            if device.type == "cuda":
                activities.append(ProfilerActivity.CUDA)
            for key in (k, 0):
                with profile(activities=activities) as prof:
                    model.predict(images, key)
                profiles[key] = prof

    print(
        f"device={device} torch={torch.__version__} threads={torch.get_num_threads()} "
        f"clock={args.clock} backbone={model.config.backbone} depth={model.config.depth} "
        f"decoder={model.config.decoder} classes={model.config.num_classes} crop={crop} "
        f"batch={args.batch} precision={args.precision} policy input x"
        f"{model.config.policy_input_scale} stride {model.config.policy_feature_stride}; "
        f"median of {args.repeats}"
    )
    total = {key: statistics.median(totals[key]) * 1e3 for key in (k, 0)}
    print(f"{'part (ms per batch)':28s} {'K=' + str(k):>15s} {'K=0':>15s}")
    for part in [*PARTS, "rest"]:
        cells = []
        for key in (k, 0):
            if part == "rest":
                value = total[key] - sum(statistics.median(v) * 1e3 for v in spent[key].values())
            else:
                value = statistics.median(spent[key][part]) * 1e3
            cells.append(f"{value:7.1f} ({100 * value / total[key]:4.1f}%)")
        print(f"{part:28s} {cells[0]:>15s} {cells[1]:>15s}")
    print(
        f"{'whole predict':28s} {total[k]:7.1f}{'':8s} {total[0]:7.1f}{'':8s} "
        f"speed-up {total[0] / total[k]:.3f}x (spread of K=0/K per repeat: "
        + ", ".join(f"{a / b:.2f}" for a, b in zip(totals[0], totals[k], strict=True))
        + ")"
    )
    for key, prof in profiles.items():
        print(f"\nK={key}: costliest ops (torch.profiler, one call)")
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=args.ops))


if __name__ == "__main__":
    main()
