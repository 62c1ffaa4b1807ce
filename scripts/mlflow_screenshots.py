"""Screenshots of the MLflow UI as a new user sees it, and checks of what the pages show.

Usage (after `make run` and a `dvc exp run`; needs Chromium: `sudo apt-get install chromium`):

    .venv/bin/python scripts/mlflow_screenshots.py [--store sqlite:///mlruns.db] [--out docs/mlflow]

Starts `mlflow ui` on a free loopback port against the store, opens each page in headless
Chromium with a fresh profile (nothing remembered from an earlier visit: MLflow keeps its
GenAI/machine-learning switch in the browser's local storage), and writes:

- `runs.png`: the address `make run` prints (`cts ui`): the runs table in the experiment's
  headline view (its columns: eval_ss and eval_ms mIoU, speed-up, tokens);
- `compare.png`: the compare view of the two newest pipeline (parent) runs;
- `parent.png`: the newest parent's page (its description holds the headline figures);
- `registry.png`: the registered model's versions.

Each page's rendered DOM is checked: the runs table lists the parents by name with the
headline columns and the sidebar links the model registry (it does not in the GenAI view),
the compare view names both parents, the parent page shows its headline (its description,
above its metrics), and the registry lists every version with the beginning of its
description. A failed check is one
line on stderr and exit status 1; the screenshots are written either way.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from urllib.parse import quote

from mlflow.tracking import MlflowClient

from cts.tracking import HEADLINE, ui_url

# Every page in MLflow 3's model-training view: a page without it opens in the GenAI view.
VIEW = "workflowType=machine_learning"
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome", "chromium-headless-shell")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def find_browser() -> str:
    for name in BROWSERS:
        if path := shutil.which(name):
            return path
    raise SystemExit(
        f"no Chromium found (looked for {', '.join(BROWSERS)}): sudo apt-get install chromium"
    )


def start_ui(store: str, port: int, log: Path) -> subprocess.Popen:
    """`mlflow ui` on 127.0.0.1:port, once it answers /health."""
    mlflow = Path(sys.executable).parent / "mlflow"
    command = [str(mlflow), "ui", "--backend-store-uri", store, "--host", "127.0.0.1"]
    command += ["--port", str(port), "--workers", "1"]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(log, "w") as output:
        server = subprocess.Popen(
            command, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"mlflow ui exited with {server.returncode}: see {log}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return server
        except OSError:
            time.sleep(0.5)
    stop(server)
    raise SystemExit(f"mlflow ui did not answer on port {port} within 120 s: see {log}")


def stop(server: subprocess.Popen) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def browse(browser: str, url: str, screenshot: Path, wait_ms: int) -> str:
    """The page's DOM after `wait_ms` of virtual time, and its screenshot, each from a new
    browser profile."""
    common = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
    common += ["--no-first-run", "--window-size=1600,1000", f"--virtual-time-budget={wait_ms}"]
    dom = ""
    for action in ("--dump-dom", f"--screenshot={screenshot}"):
        with tempfile.TemporaryDirectory(prefix="cts-chromium-") as profile:
            result = subprocess.run(
                [browser, *common, f"--user-data-dir={profile}", action, url],
                capture_output=True,
                text=True,
                timeout=180,
            )
        if result.returncode != 0:
            raise SystemExit(f"{browser} failed on {url}: {result.stderr.strip()[-500:]}")
        dom = dom or result.stdout
    return dom


def check(failures: list[str], page: str, dom: str, expected: dict[str, bool]) -> None:
    """Each text must (True) or must not (False) be in the page."""
    for text, wanted in expected.items():
        if (text in dom) != wanted:
            failures.append(f"{page}: {text!r} {'missing' if wanted else 'shown'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", default=None, help="tracking store (default: the repo's)")
    parser.add_argument("--out", type=Path, default=Path("docs/mlflow"), help="PNG folder")
    parser.add_argument("--experiment", default="cts")
    parser.add_argument("--model", default="cts-segmenter", help="registered model name")
    parser.add_argument("--wait-ms", type=int, default=20000, help="virtual time per page")
    options = parser.parse_args()

    from cts_stages.mlflow_context import project_tracking_uri

    store = project_tracking_uri(options.store)
    if store.startswith("sqlite:///") and not Path(store.removeprefix("sqlite:///")).is_file():
        raise SystemExit(f"--store {store}: no such database: run the pipeline first")
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name(options.experiment)
    if experiment is None:
        raise SystemExit(f"--experiment {options.experiment}: not in {store}")
    parents = client.search_runs(
        [experiment.experiment_id],
        "tags.`cts.run_kind` = 'pipeline'",
        order_by=["attributes.start_time DESC"],
    )
    if len(parents) < 2:
        raise SystemExit(f"{store}: {len(parents)} pipeline run(s); the compare view needs two")
    browser = find_browser()
    options.out.mkdir(parents=True, exist_ok=True)

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = Path(tempfile.gettempdir()) / f"cts-mlflow-ui-{port}.log"
    server = start_ui(store, port, log)
    failures: list[str] = []
    try:
        newest, previous = parents[0], parents[1]
        names = [run.info.run_name for run in (newest, previous)]
        runs = ui_url(base, options.experiment, store)
        dom = browse(browser, runs, options.out / "runs.png", options.wait_ms)
        # The headline view's columns: the figures K=0 and K=103 are compared by.
        columns = {key: True for key, _, _ in HEADLINE}
        expected = {**dict.fromkeys(names, True), "Model registry": True, **columns}
        check(failures, "runs table", dom, expected)

        ids = quote(json.dumps([newest.info.run_id, previous.info.run_id]))
        experiments = quote(json.dumps([experiment.experiment_id]))
        compare = f"{base}/#/compare-runs?runs={ids}&experiments={experiments}&{VIEW}"
        dom = browse(browser, compare, options.out / "compare.png", options.wait_ms)
        check(failures, "compare view", dom, {**dict.fromkeys(names, True), "Model registry": True})

        run = newest.info.run_id
        page = f"{base}/#/experiments/{experiment.experiment_id}/runs/{run}?{VIEW}"
        headline = newest.data.tags.get("mlflow.note.content", "")
        dom = browse(browser, page, options.out / "parent.png", options.wait_ms)
        check(failures, "parent page", dom, {headline: bool(headline)})

        versions = client.search_model_versions(f"name = '{options.model}'")
        registry = f"{base}/#/models/{quote(options.model)}?{VIEW}"
        dom = browse(browser, registry, options.out / "registry.png", options.wait_ms)
        # The versions table shows the beginning of each description (about 30 characters).
        texts = {version.description[:24]: True for version in versions}
        check(failures, "registry", dom, {options.model: True, **texts})
    finally:
        stop(server)
    for line in failures:
        print(f"check failed: {line}", file=sys.stderr)
    print(f"{len(failures)} failed check(s); screenshots in {options.out}; runs table: {runs}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
