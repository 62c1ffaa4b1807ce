"""Kill loop: random SIGKILL/SIGTERM points during a tiny `cts train_segmenter`, each
followed by a rerun, against one uninterrupted run.

    python scripts/measure/kill_loop.py --kills 10 --iterations 12

In a fresh folder it prepares a micro dataset and policy net (`cts download`, `preprocess`,
`train_policy`), trains the segmenter once without interruption (the reference), then
repeats: start `cts train_segmenter` from scratch, kill it with SIGKILL or SIGTERM after a
random delay, rerun it to completion (it resumes from the last checkpoint) and check:

- the final weights are identical to the reference (max |diff| over every tensor);
- no MLflow run is left RUNNING;
- no process the killed stage started (loader workers) outlives it;
- no temporary file (``*.tmp``) or staging folder (``*.partial``) is left;
- ``metrics/train.json`` and ``checkpoints/segmenter.pt`` describe the same training.

Prints one line per kill and a summary; ``--out`` also writes the records as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from cts.processes import descendants, running

REPO = Path(__file__).resolve().parents[2]
MICRO = {
    "synthetic_num_train": 8,
    "synthetic_num_val": 2,
    "synthetic_image_size": 128,
    "crop_size": 128,
    "num_tokens_shared": 4,
    "depth": 1,
    "policy_iterations": 2,
    "policy_batch_size": 2,
    "batch_size": 2,
    "eval_every": 0,
    "checkpoint_every": 1,
    "warmup_iterations": 1,
    "device": "cpu",
}


def _cts(work: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["cts", *args], cwd=work, capture_output=True, text=True)
    if check and result.returncode:
        raise SystemExit(f"cts {' '.join(args)} failed:\n{result.stderr[-2000:]}")
    return result


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    if a.keys() != b.keys():
        return float("inf")
    return max(((a[k].double() - b[k].double()).abs().max().item() for k in a), default=0.0)


def _running_runs(work: Path) -> int:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{work / 'mlruns.db'}")
    ids = [e.experiment_id for e in client.search_experiments()]
    return len(client.search_runs(ids, filter_string="attributes.status = 'RUNNING'"))


def _leftovers(work: Path) -> list[str]:
    return [
        str(p.relative_to(work))
        for p in work.rglob("*")
        if p.name.endswith((".tmp", ".partial")) and ".dvc" not in p.parts
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=12)
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, help="folder to run in (default: a temporary one)")
    parser.add_argument("--out", type=Path, help="write the records as JSON here")
    args = parser.parse_args()
    rng = random.Random(args.seed)

    work = args.work or Path(tempfile.mkdtemp(prefix="cts-kill-loop-"))
    work.mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params.update(
        MICRO,
        iterations=args.iterations,
        num_workers=args.num_workers,
        mlflow_tracking_uri=f"sqlite:///{work / 'mlruns.db'}",
    )
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ["PYTHONPATH"] = f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    for stage in ("download", "preprocess", "train_policy"):
        _cts(work, stage)

    started = time.monotonic()
    _cts(work, "train_segmenter", "--no-resume")
    reference_seconds = time.monotonic() - started
    reference = _weights(work / "checkpoints" / "segmenter.pt")
    print(f"reference: {args.iterations} iterations in {reference_seconds:.1f} s ({work})")

    records = []
    for trial in range(args.kills):
        for path in (work / "checkpoints" / "segmenter.pt", work / "metrics" / "train.json"):
            path.unlink(missing_ok=True)
        kind = rng.choice([signal.SIGKILL, signal.SIGTERM])
        delay = rng.uniform(0.2, 1.0) * reference_seconds
        process = subprocess.Popen(
            ["cts", "train_segmenter"],
            cwd=work,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + delay
        workers: list[int] = []
        while process.poll() is None and time.monotonic() < deadline:
            workers = sorted(set(workers) | set(descendants(process.pid)))
            time.sleep(0.05)
        workers = sorted(set(workers) | set(descendants(process.pid)))
        finished_first = process.poll() is not None
        process.send_signal(kind)
        _, err = process.communicate()
        last_line = err.strip().splitlines()[-1] if err.strip() else ""
        time.sleep(6)  # a loader worker checks for its parent every 5 s
        orphans = running([pid for pid in workers if pid != process.pid])

        rerun = _cts(work, "train_segmenter")
        resumed = next(
            (int(line.split()[5]) for line in rerun.stdout.splitlines() if "resuming" in line), 0
        )
        checkpoint = torch.load(work / "checkpoints" / "segmenter.pt", weights_only=True)
        metrics = json.loads((work / "metrics" / "train.json").read_text())
        record = {
            "trial": trial,
            "signal": signal.Signals(kind).name,
            "delay_s": round(delay, 2),
            "finished_before_kill": finished_first,
            "returncode": process.returncode,
            "message": last_line,
            "resumed_at": resumed,
            "max_abs_diff": _max_diff(checkpoint["model"], reference),
            "running_runs": _running_runs(work),
            "orphans": orphans,
            "leftovers": _leftovers(work),
            "metrics_match_checkpoint": metrics["iterations"] == checkpoint["history"][-1]["step"],
        }
        records.append(record)
        print(
            f"{trial}: {record['signal']} after {delay:5.1f} s (rc {process.returncode}), "
            f"resumed at {resumed}/{args.iterations}: max|diff| {record['max_abs_diff']:.3g}, "
            f"RUNNING {record['running_runs']}, orphans {len(orphans)}, "
            f"leftovers {len(record['leftovers'])}, "
            f"metrics=checkpoint {record['metrics_match_checkpoint']}"
        )

    ok = all(
        r["max_abs_diff"] == 0
        and r["running_runs"] == 0
        and not r["orphans"]
        and not r["leftovers"]
        and r["metrics_match_checkpoint"]
        for r in records
    )
    resumed = sum(r["resumed_at"] > 0 for r in records)
    print(
        f"summary: {len(records)} kills ({sum(r['signal'] == 'SIGKILL' for r in records)} "
        f"SIGKILL), {resumed} reruns resumed from a checkpoint; all checks "
        f"{'passed' if ok else 'FAILED'}"
    )
    if args.out:
        args.out.write_text(
            json.dumps({"reference_seconds": reference_seconds, "records": records}, indent=2)
        )
    if args.work is None and ok:
        shutil.rmtree(work, ignore_errors=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
