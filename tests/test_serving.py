"""The registered pyfunc model, served by the real `mlflow models serve` on loopback."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from cts.checkpoint import save_checkpoint, segmenter_payload
from cts.cli import app
from cts.data.io import read_mask, write_image
from cts.inference import EvalGeometry
from cts.models import build_segmenter
from cts.predict import load_predictor
from cts.tracking import log_model

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
NAME = "cts-segmenter-test"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(url: str, payload: object) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, json.dumps(payload).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """A tiny CTS checkpoint logged and registered in a fresh sqlite store."""
    folder = tmp_path_factory.mktemp("serving")
    torch.manual_seed(0)
    model = build_segmenter(
        backbone="vit_tiny_patch16_384",
        num_classes=5,
        crop_size=64,
        depth=1,
        policy="policy_net",
        num_tokens_shared=2,
        drop_path_rate=0.0,
    )
    # Cityscapes-like sizes (long side at most twice a base above the crop, stride half the
    # window): the served labels follow them as `cts predict` does.
    geometry = EvalGeometry(base_size=80, window=64, stride=32, max_ratio=2)
    payload = segmenter_payload(model, eval_geometry=geometry)
    checkpoint = save_checkpoint(folder / "segmenter.pt", payload)
    uri = f"sqlite:///{folder / 'mlruns.db'}"
    # Artifacts in the test's folder: a sqlite store would put them in ./mlruns otherwise.
    experiment_id = mlflow.MlflowClient(uri).create_experiment(
        "serving-test", artifact_location=(folder / "artifacts").as_uri()
    )
    mlflow.set_tracking_uri(uri)  # no set_experiment: it would leak into other tests
    try:
        with mlflow.start_run(experiment_id=experiment_id):
            info = log_model(checkpoint, NAME)
    finally:
        mlflow.set_tracking_uri(None)
    return folder, checkpoint, uri, info


def test_model_is_registered_with_a_signature(registered):
    _, _, uri, info = registered
    client = mlflow.MlflowClient(uri)
    versions = client.search_model_versions(f"name = '{NAME}'")
    assert [str(v.version) for v in versions] == ["1"]
    signature = info.signature.to_dict()
    assert "uint8" in signature["inputs"] and "[-1, -1, -1, 3]" in signature["inputs"]
    assert "int64" in signature["outputs"]
    assert {p["name"] for p in json.loads(signature["params"])} == {
        "num_tokens_shared",
        "share_threshold",
    }
    assert info.saved_input_example_info is not None


# Loads the logged model where `cts` is not installed (its editable finder removed), predicts,
# and reports the cts modules it ran and the distributions of what they import.
LOAD_ELSEWHERE = """
import ast, importlib.metadata, importlib.util, json, sys
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
sys.path_importer_cache.clear()
assert importlib.util.find_spec("cts") is None, "cts is importable"
import mlflow.pyfunc, numpy as np
model_dir, images, out = sys.argv[1:]
np.save(out, mlflow.pyfunc.load_model(model_dir).predict(np.load(images)))
ours = {n: m.__file__ for n, m in list(sys.modules.items()) if n.split(".")[0] == "cts"}
provides = importlib.metadata.packages_distributions()
imported = set()
for path in ours.values():
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            imported.add(node.module.split(".")[0])
third_party = sorted(
    name for name in imported - set(sys.stdlib_module_names) - {"cts", "__future__"}
    if name in sys.modules
)
print(json.dumps({"files": ours, "needs": {name: provides[name] for name in third_party}}))
"""


@pytest.fixture(scope="module")
def model_dir(registered, tmp_path_factory) -> Path:
    _, _, uri, info = registered
    location = mlflow.MlflowClient(uri).get_logged_model(info.model_id).artifact_location
    folder = tmp_path_factory.mktemp("downloaded")
    return Path(mlflow.artifacts.download_artifacts(location, dst_path=folder))


@pytest.fixture(scope="module")
def loaded_elsewhere(model_dir, tmp_path_factory) -> tuple[dict, np.ndarray, np.ndarray]:
    folder = tmp_path_factory.mktemp("elsewhere")
    images = np.random.default_rng(1).integers(0, 256, (2, 50, 70, 3), dtype=np.uint8)
    np.save(folder / "images.npy", images)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    result = subprocess.run(
        [
            sys.executable,
            "-I",
            "-B",
            "-c",
            LOAD_ELSEWHERE,
            str(model_dir),
            "images.npy",
            "labels.npy",
        ],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    return report, images, np.load(folder / "labels.npy")


def _requirements(model_dir: Path) -> dict[str, str]:
    """requirements.txt as {canonical name: specifier}."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    lines = (model_dir / "requirements.txt").read_text().splitlines()
    parsed = [Requirement(line) for line in lines if line.strip() and not line.startswith("#")]
    return {canonicalize_name(r.name): str(r.specifier) for r in parsed}


def test_logged_model_carries_its_code_and_loads_where_cts_is_not_installed(
    registered, model_dir, loaded_elsewhere
):
    _, checkpoint, _, _ = registered
    report, images, labels = loaded_elsewhere
    assert (model_dir / "code" / "cts" / "serving.py").is_file()
    assert not list((model_dir / "code").rglob("__pycache__"))
    code = (model_dir / "code").resolve()
    assert report["files"] and all(
        Path(path).resolve().is_relative_to(code) for path in report["files"].values()
    )
    predictor = load_predictor(checkpoint, torch.device("cpu"))
    assert predictor.geometry == EvalGeometry(base_size=80, window=64, stride=32, max_ratio=2)
    assert np.array_equal(labels, np.stack([predictor.labels(image) for image in images]))


def test_logged_requirements_pin_what_the_code_imports_and_nothing_else(
    model_dir, loaded_elsewhere
):
    from importlib.metadata import version

    from packaging.utils import canonicalize_name

    report, _, _ = loaded_elsewhere
    requirements = _requirements(model_dir)
    assert "cts" not in requirements  # on the registry, `cts` is another project
    needs = {
        module: {canonicalize_name(dist) for dist in dists}
        for module, dists in report["needs"].items()
    }
    provided = set().union(*needs.values())
    assert set(requirements) <= provided, sorted(set(requirements) - provided)
    assert [m for m, dists in needs.items() if not dists & set(requirements)] == []
    for name, specifier in requirements.items():  # pinned to what was tested here
        assert specifier == f"=={version(name).split('+')[0]}", (name, specifier)
    # conda.yaml (env manager conda) installs the same pip requirements.
    conda = yaml.safe_load((model_dir / "conda.yaml").read_text())
    (pip,) = [dep["pip"] for dep in conda["dependencies"] if isinstance(dep, dict)]
    lines = (model_dir / "requirements.txt").read_text().split()
    assert sorted(pip) == sorted(lines)


def test_served_model_answers_like_cts_predict(registered, tmp_path):
    folder, checkpoint, uri, _ = registered
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (2, 70, 90, 3), dtype=np.uint8)
    for i, image in enumerate(rgb):
        write_image(tmp_path / "images" / f"{i}.png", image)
    result = CliRunner().invoke(
        app,
        [
            "predict",
            str(tmp_path / "images"),
            "--model",
            str(checkpoint),
            "--out",
            str(tmp_path / "out"),
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    expected = np.stack([read_mask(tmp_path / "out" / f"{i}.png_labels.png") for i in range(2)])

    port = _free_port()
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        "PYTHONPATH": str(REPO),
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "CUDA_VISIBLE_DEVICES": "",
    }
    command = [str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{NAME}/latest"]
    command += ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115 (closed in finally)
    server = subprocess.Popen(
        command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "server did not start within 180 s"
            time.sleep(1)

        status, body = _post(f"{base}/invocations", {"inputs": rgb.tolist()})
        assert status == 200, body
        labels = np.asarray(body["predictions"])
        assert labels.shape == (2, 70, 90)
        assert (labels == expected).all()

        for bad, reason in (
            (rgb[0].tolist(), "shape"),  # rank 3
            (rgb[..., :2].tolist(), "shape"),  # 2 channels
            ((rgb.astype(np.int64) + 300).tolist(), "out of bounds for uint8"),  # not uint8
            ("an image", "Failed to convert"),
        ):
            status, body = _post(f"{base}/invocations", {"inputs": bad})
            assert status == 400, body
            assert reason in body["message"].splitlines()[-1], body["message"][-300:]
        status, body = _post(f"{base}/invocations", {"inputs": rgb[:1].tolist()})
        assert status == 200 and np.array_equal(body["predictions"], expected[:1])

        # K or a threshold per request; left out, the checkpoint's K (above)
        predictor = load_predictor(checkpoint, torch.device("cpu"))
        for params in ({"num_tokens_shared": 0}, {"share_threshold": 0.5}):
            status, body = _post(f"{base}/invocations", {"inputs": rgb.tolist(), "params": params})
            assert status == 200, body
            sharing = predictor.with_sharing(**params)
            assert np.array_equal(body["predictions"], [sharing.labels(image) for image in rgb])
        status, body = _post(
            f"{base}/invocations", {"inputs": rgb.tolist(), "params": {"share_threshold": 1.5}}
        )
        # MLflow answers 400 with a generic message; the reason is in the stack trace it sends
        assert status == 400 and "share_threshold=1.5: allowed" in json.dumps(body), body
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
        log.close()
