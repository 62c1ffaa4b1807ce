"""Two jobs on one machine: wall time of a short `cts train_segmenter` alone and with N-1
copies of it running at once (what `dvc queue start -j N`, or evaluating while training, does).

    python scripts/measure/concurrent_jobs.py --jobs 2 --iterations 150 --repeats 3
    python scripts/measure/concurrent_jobs.py --code /tmp/cts-before      # another checkout's code
    python scripts/measure/concurrent_jobs.py --env OMP_WAIT_POLICY=PASSIVE --set num_threads=1

In a folder (``--work``, default a temporary one) it prepares the dataset and the policy net
once with the repository's params.yaml (``cts download``, ``preprocess``, ``train_policy`` with
``policy_iterations`` cut to 10: only the segmenter is timed), and gives each job a copy of it
(its own checkpoints, metrics and MLflow store; the dataset is shared read-only). Then, per
repeat, it times one job alone and N jobs started together, in turns, each from scratch
(``--no-resume``). It prints the medians: alone, together (every job's wall time), the slowdown
(together / alone; N is the fair share of N jobs on the same cores) and the machine's work rate
against running the N jobs one after the other (N x alone / the slowest of together; above 1:
running them at once finishes sooner).

``--code DIR`` runs the stages of another checkout (PYTHONPATH) with its params.yaml, to
compare commits with the same script (and the same prepared ``--work`` folder); ``--env
KEY=VALUE`` and ``--set key=value`` go to every job. OMP_*, GOMP_* and KMP_* variables of the
calling shell are passed on unchanged and printed with the results.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
CTS = Path(sys.executable).parent / "cts"
SHARED = ("data", "preprocessed")  # read-only inputs: one copy for every job


def _environment(args: argparse.Namespace) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("DVC_EXP_NAME", None)
    if args.code:
        env["PYTHONPATH"] = os.pathsep.join([str(args.code.resolve()), env.get("PYTHONPATH", "")])
    for pair in args.env:
        key, _, value = pair.partition("=")
        env[key] = value
    return env


def _cts(work: Path, env: dict[str, str], *words: str) -> None:
    result = subprocess.run([str(CTS), *words], cwd=work, env=env, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"cts {' '.join(words)} failed in {work}:\n{result.stderr[-2000:]}")


def _write_params(folder: Path, code: Path) -> None:
    """The params.yaml of the code that runs (another commit may know other keys)."""
    params = yaml.safe_load((code / "params.yaml").read_text())
    params["policy_iterations"] = 10
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def prepare(work: Path, jobs: int, env: dict[str, str], code: Path) -> list[Path]:
    """The prepared base folder and one folder per job (reused when already there, also by
    another commit's code: each run writes its code's params.yaml into the job folders)."""
    base = work / "base"
    if not (base / "checkpoints" / "policy.pt").is_file():
        base.mkdir(parents=True, exist_ok=True)
        _write_params(base, code)
        for stage in ("download", "preprocess", "train_policy"):
            print(f"preparing: cts {stage}", flush=True)
            _cts(base, env, stage)
    folders = []
    for index in range(jobs):
        folder = work / f"job{index}"
        if not folder.is_dir():
            folder.mkdir()
            (folder / "checkpoints").mkdir()
            shutil.copy(base / "checkpoints" / "policy.pt", folder / "checkpoints" / "policy.pt")
            for name in SHARED:
                (folder / name).symlink_to(base / name)
        _write_params(folder, code)
        folders.append(folder)
    return folders


def _start(folder: Path, env: dict[str, str], words: list[str]) -> subprocess.Popen:
    # Each job's MLflow store in its folder: the jobs share nothing but the machine.
    store = ["--set", f"mlflow_tracking_uri=sqlite:///{folder / 'mlruns.db'}"]
    with open(folder / "stderr.log", "w") as log:  # a file: a full pipe would stall the job
        return subprocess.Popen(
            [str(CTS), "train_segmenter", "--no-resume", *words, *store],
            cwd=folder,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )


def run_jobs(folders: list[Path], env: dict[str, str], words: list[str]) -> list[float]:
    """Starts one job per folder at once; the wall time of each."""
    started = time.monotonic()
    processes = [_start(folder, env, words) for folder in folders]
    seconds = [0.0] * len(processes)
    waiting = set(range(len(processes)))
    while waiting:
        for index in list(waiting):
            if processes[index].poll() is not None:
                seconds[index] = time.monotonic() - started
                waiting.discard(index)
        time.sleep(0.05)
    for process, folder in zip(processes, folders, strict=True):
        if process.returncode:
            stderr = (folder / "stderr.log").read_text()
            raise SystemExit(f"train_segmenter failed in {folder}:\n{stderr[-2000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2, help="jobs at once (default 2)")
    parser.add_argument("--iterations", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=1, help="alone/together pairs")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--code", type=Path, help="checkout whose cts and stages to run")
    parser.add_argument("--work", type=Path, help="folder to prepare in (default: temporary)")
    parser.add_argument("--label", default="", help="a name for this setting in the output")
    parser.add_argument("--out", type=Path, help="append the result as one JSON line here")
    args = parser.parse_args()

    env = _environment(args)
    work = args.work or Path(tempfile.mkdtemp(prefix="cts-concurrent-"))
    folders = prepare(work, args.jobs, env, (args.code or REPO).resolve())
    words = ["--set", f"iterations={args.iterations}"]
    for override in args.overrides:
        words += ["--set", override]

    alone, together = [], []
    for repeat in range(args.repeats):
        alone += run_jobs(folders[:1], env, words)
        together += run_jobs(folders, env, words)
        print(
            f"repeat {repeat + 1}/{args.repeats}: alone {alone[-1]:.1f} s, {args.jobs} at once "
            + " / ".join(f"{s:.1f}" for s in together[-args.jobs :])
            + " s",
            flush=True,
        )
    threads = {k: v for k, v in sorted(env.items()) if k.startswith(("OMP_", "GOMP_", "KMP_"))}
    result = {
        "label": args.label,
        "code": str(args.code or REPO),
        "jobs": args.jobs,
        "iterations": args.iterations,
        "overrides": args.overrides,
        "env": threads,
        "cores": len(os.sched_getaffinity(0)),
        "alone_s": round(statistics.median(alone), 2),
        "together_s": round(statistics.median(together), 2),
        "alone_all_s": [round(s, 2) for s in alone],
        "together_all_s": [round(s, 2) for s in together],
    }
    result["slowdown"] = round(result["together_s"] / result["alone_s"], 2)
    slowest = [max(together[i : i + args.jobs]) for i in range(0, len(together), args.jobs)]
    result["vs_one_after_another"] = round(
        args.jobs * result["alone_s"] / statistics.median(slowest), 2
    )
    print(
        f"{args.label or 'result'}: alone {result['alone_s']:.1f} s, {args.jobs} at once "
        f"{result['together_s']:.1f} s each ({result['slowdown']:.2f}x alone, fair share "
        f"{args.jobs}x); work rate {result['vs_one_after_another']:.2f}x one after another; "
        f"{result['cores']} cores, env {threads or '{}'}, --set {args.overrides or '[]'}"
    )
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(result) + "\n")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
