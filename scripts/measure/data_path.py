"""Does the loader keep up with training? Loader images/s against training-step images/s.

Run from a repository whose dataset is prepared (`cts download`), with its params.yaml:

    python scripts/measure/data_path.py [--params params.yaml] [--workers 0 1 2] [--batches 10]

The loader is the train_segmenter one (decode, random resize/crop/flip, normalise) at the
params' batch_size; the step is one TrainLoop iteration of the params' model (forward,
loss, backward, optimizer) on a batch already loaded, with a random-weight policy net.
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch
import torch.nn.functional as F

from cts.data.folder import SegmentationFolder
from cts.data.loader import build_loader
from cts.data.transforms import TrainTransform
from cts.engine import TrainLoop, TrainState, resolve_device
from cts.models import Segmenter, backbone_normalization
from cts_stages.common import dataset_info, segmenter_config
from cts_stages.params import load_params


def train_set(params: dict) -> SegmentationFolder:
    info = dataset_info(params)
    mean, std = backbone_normalization(params["backbone"])
    transform = TrainTransform(
        info.base_size, params["crop_size"], mean, std, ignore_index=info.ignore_index
    )
    return SegmentationFolder(params["data_root"], "train", transform)


def loader_images_per_second(params: dict, num_workers: int, batches: int) -> float:
    dataset = train_set(params)
    loader = build_loader(dataset, params["batch_size"], True, num_workers, 0, drop_last=True)
    loader.sampler.set_epoch(0)
    iterator = iter(loader)
    next(iterator)  # workers started, first batch out
    started = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * params["batch_size"] / (time.perf_counter() - started)


def step_images_per_second(params: dict, steps: int) -> float:
    info = dataset_info(params)
    device = resolve_device(params["device"])
    model = Segmenter(segmenter_config(params, info.num_classes)).to(device)
    dataset = SegmentationFolder(
        params["data_root"],
        "train",
        TrainTransform(info.base_size, params["crop_size"], model.config.mean, model.config.std),
    )
    batch = next(iter(build_loader(dataset, params["batch_size"], True, 0, 0, drop_last=True)))
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=params["lr"]
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)

    def loss_fn(net, micro):
        out = net(micro["image"], micro["label"])
        return F.cross_entropy(
            out.logits.float(), micro["label"], ignore_index=info.ignore_index, reduction="sum"
        )

    def count_fn(micro):
        return (micro["label"] != info.ignore_index).sum()

    timings = []
    for iterations in (1, steps):  # the first step warms up
        loop = TrainLoop(
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            loss_fn=loss_fn,
            count_fn=count_fn,
            iterations=iterations,
            device=device,
            precision=params["precision"],
            log_every=10**9,
        )
        started = time.perf_counter()
        loop.run(TrainState(), itertools.repeat(batch))
        timings.append(time.perf_counter() - started)
    return steps * params["batch_size"] / timings[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    params = load_params(args.params)
    print(
        f"batch_size {params['batch_size']}, crop {params['crop_size']}, "
        f"{torch.get_num_threads()} torch threads, device {params['device']}"
    )
    for workers in args.workers:
        rate = loader_images_per_second(params, workers, args.batches)
        print(f"loader, num_workers={workers}: {rate:.1f} images/s")
    print(f"training step: {step_images_per_second(params, args.steps):.1f} images/s")


if __name__ == "__main__":
    main()
