"""The light install: serving, predicting and explaining never import PyTorch.

In the full environment each check runs in a subprocess that refuses to import torch; in the
light environment (``make test-light``) torch is not even installed.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import image_bytes, make_xray

#: Makes the training stack look uninstalled in the child process.
_NO_TORCH = """
import importlib.util, sys
BLOCKED = {"torch", "torchvision", "lightning", "timm", "pytorch_grad_cam", "cv2", "onnx"}
class _Uninstalled:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, _Uninstalled())
_find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, package=None: None if name.split(".")[0] in BLOCKED else _find_spec(name, package)
"""


def _run(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _NO_TORCH + code, *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_the_app_predicts_and_explains_without_torch(exported_bundle: Path, tmp_path: Path) -> None:
    image = tmp_path / "x.png"
    image.write_bytes(image_bytes(make_xray(7, pneumonia=True)))
    result = _run("""
import io, json, sys
from pneumoscan.web import create_app
client = create_app({"TESTING": True, "MODEL_DIR": sys.argv[1], "WTF_CSRF_ENABLED": False}).test_client()
data = {"file": [(io.BytesIO(open(sys.argv[2], "rb").read()), "x.png")], "explain": "true"}
body = client.post("/api/v1/predict", data=data, content_type="multipart/form-data").get_json()
page = client.post("/", data={"file": [(io.BytesIO(open(sys.argv[2], "rb").read()), "x.png")], "explain": "true"},
                   content_type="multipart/form-data")
print(json.dumps({"result": body["results"][0], "page": page.status_code,
                  "torch": [m for m in sys.modules if m.split(".")[0] == "torch"]}))
""", str(exported_bundle), str(image))
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["torch"] == [] and out["page"] == 200
    assert out["result"]["status"] == "ok" and out["result"]["gradcam_png"]
    assert 0 <= out["result"]["gradcam_central_share"] <= 1
    # the same answer as this process gives (the full install, when torch is here)
    from pneumoscan.inference import Predictor

    predictor = Predictor.from_bundle(exported_bundle)
    here = predictor.predict([predictor.preprocessing.decode(image.read_bytes())])[0]
    assert abs(here.probability - out["result"]["probability_pneumonia"]) < 1e-6


def test_predict_and_evaluate_cli_without_torch(exported_bundle: Path, xray_root: Path, tmp_path: Path) -> None:
    result = _run("""
import sys
from pneumoscan.cli import main
sys.argv = ["pneumoscan", *sys.argv[1:]]
main()
""", "evaluate", "--model", str(exported_bundle), "--data", str(xray_root), "--split", "test",
        "--out", str(tmp_path / "report"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "report" / "metrics.json").is_file()


@pytest.mark.parametrize("args", [["train", "--data", "x", "--out", "y"], ["backbones"]])
def test_training_commands_name_the_extra_without_torch(args: list[str]) -> None:
    result = _run("""
import sys
from pneumoscan.cli import main
sys.argv = ["pneumoscan", *sys.argv[1:]]
main()
""", *args)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "pip install 'pneumoscan[train]'" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_graph_without_a_cam_output_answers_explain_with_a_note_without_torch(exported_bundle: Path,
                                                                                  monkeypatch) -> None:
    """A graph exported before the CAM output existed still serves; without PyTorch, explain=true
    gets a note on the result, never a 500."""
    from pneumoscan import runtime
    from pneumoscan.web import create_app

    app = create_app({"TESTING": True, "MODEL_DIR": str(exported_bundle), "WTF_CSRF_ENABLED": False})
    predictor = app.extensions["pneumoscan"]
    monkeypatch.setattr(predictor.runner, "has_cam", False)
    real = importlib.util.find_spec
    monkeypatch.setattr(runtime.importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    response = app.test_client().post("/api/v1/predict", content_type="multipart/form-data", data={
        "file": [(io.BytesIO(image_bytes(make_xray(8))), "x.png")], "explain": "true"})
    assert response.status_code == 200
    result = response.get_json()["results"][0]
    assert result["status"] == "ok" and "gradcam_png" not in result
    assert "needs PyTorch" in result["explain_error"] and "pneumoscan[train]" in result["explain_error"]


@pytest.mark.parametrize("command", ["predict", "evaluate", "serve"])
def test_a_bundle_without_onnx_says_the_one_command_that_fixes_it_without_torch(
        exported_bundle: Path, xray_root: Path, tmp_path: Path, command: str) -> None:
    """Not "install PyTorch (6.6 GB)" and not 130 lines of gunicorn tracebacks: one line naming
    ``pneumoscan export``, exit 2, from predict, evaluate and serve (before any worker forks)."""
    from pneumoscan.integrity import read_spec, rewrite_bundle

    bare = tmp_path / "bare"
    rewrite_bundle(exported_bundle, read_spec(exported_bundle).replace(onnx=None), bare, drop=("model.onnx",))
    args = {"predict": ["predict", "--model", str(bare), str(next((xray_root / "test" / "NORMAL").iterdir()))],
            "evaluate": ["evaluate", "--model", str(bare), "--data", str(xray_root), "--out", str(tmp_path / "r")],
            "serve": ["serve", "--model", str(bare), "--port", "18999"]}[command]
    result = _run("""
import sys
from pneumoscan.cli import main
sys.argv = ["pneumoscan", *sys.argv[1:]]
main()
""", *args)
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("INFO ")]
    assert result.returncode == 2 and "Traceback" not in result.stderr and "Worker failed" not in result.stderr
    assert len(lines) == 1, result.stderr[-2000:]
    assert f"run 'pneumoscan export --model {bare}' where PyTorch is installed" in lines[0]


@pytest.mark.skipif(not os.environ.get("PNEUMOSCAN_TEST_BUNDLE"), reason="only in the light install")
def test_this_is_really_the_light_install() -> None:
    assert importlib.util.find_spec("torch") is None


def test_engine_ray_without_ray_says_what_to_install_in_one_line(tmp_path: Path) -> None:
    image = tmp_path / "x.png"
    image.write_bytes(image_bytes(make_xray(3)))
    result = subprocess.run([sys.executable, "-c", _NO_TORCH.replace('"onnx"}', '"onnx", "ray"}') + """
from pneumoscan.cli import main
sys.argv = ["pneumoscan", *sys.argv[1:]]
main()
""", "predict", str(image), "--engine", "ray"], capture_output=True, text=True, timeout=300)
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("INFO ")]
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert lines == ["error: --engine ray needs Ray Data: pip install 'pneumoscan[ray]'"], result.stderr[-2000:]
