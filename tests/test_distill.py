"""``pneumoscan distill``: one student learns a teacher bundle's softened log-odds on tiny
synthetic data (random-init backbone); its bundle is as complete as train's, loads in the light
install, names its teacher, and a run stopped by SIGTERM resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TEST_INPUT, signal_once_training_runs, write_kaggle_layout

pytest.importorskip("torch", reason="distillation needs PyTorch (pneumoscan[train]); this is the light install")


def _distill(teacher: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pneumoscan", "distill", "--teacher", str(teacher), "--data", str(data),
            "--out", str(out), "--weights", "none", "--input-size", str(TEST_INPUT), "--frozen-epochs", "0",
            "--batch-size", "8", "--val-fraction", "0.34", "--accelerator", "cpu", "--devices", "1", *extra]


def test_distill_makes_a_complete_student_that_names_its_teacher_and_runs_without_torch(
        tiny_bundle: Path, tmp_path: Path) -> None:
    from test_light import _NO_TORCH

    from pneumoscan.card import model_card
    from pneumoscan.integrity import bundle_digest, read_spec

    data = write_kaggle_layout(tmp_path / "films", per_class={"train": 30, "val": 2})
    done = subprocess.run(_distill(tiny_bundle, data, tmp_path / "student", "--epochs", "1"),
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "distilling" in done.stderr and "70% soft targets at temperature 2" in done.stderr
    assert "nn.Module" not in done.stderr  # Lightning's warning about the teacher in the hyperparameters
    bundle = tmp_path / "student" / "bundle"
    assert f"bundle ready: {bundle}" in done.stdout and "exported to ONNX" in done.stdout
    spec = read_spec(bundle)
    assert spec.gate is not None and spec.onnx is not None  # gated and exported, its parity checked on export
    card = model_card(spec)
    assert card["distilled_from"]["bundle_sha256"] == bundle_digest(tiny_bundle)
    assert card["distilled_from"]["soft_target_weight"] == 0.7
    image = next((data / "train" / "PNEUMONIA").iterdir())
    light = subprocess.run([sys.executable, "-c", _NO_TORCH + """
import json, sys
from pneumoscan.inference import Predictor
predictor = Predictor.from_bundle(sys.argv[1])
result = predictor.predict_paths([sys.argv[2]])[0]
print(json.dumps({"status": result.status, "runner": type(predictor.runner).__name__,
                  "torch": [m for m in sys.modules if m.split(".")[0] == "torch"]}))
""", str(bundle), str(image)], capture_output=True, text=True, timeout=300)
    assert light.returncode == 0, light.stderr[-2000:]
    out = json.loads(light.stdout.strip().splitlines()[-1])
    assert out["torch"] == [] and out["runner"] == "OnnxRunner" and out["status"] in ("ok", "rejected")


def test_a_teacher_that_reads_other_pixels_is_refused_in_one_line(tiny_bundle: Path, tmp_path: Path) -> None:
    data = write_kaggle_layout(tmp_path / "films", per_class={"train": 4, "val": 2})
    command = _distill(tiny_bundle, data, tmp_path / "student", "--epochs", "1")
    command[command.index("--input-size") + 1] = str(TEST_INPUT * 2)
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"give the student the same (--input-size {TEST_INPUT}" in done.stderr


def test_a_distillation_stopped_by_sigterm_resumes(tiny_bundle: Path, tmp_path: Path) -> None:
    data = write_kaggle_layout(tmp_path / "films", per_class={"train": 30, "val": 2})
    out = tmp_path / "student"
    command = _distill(tiny_bundle, data, out, "--epochs", "2", "--no-gate", "--no-export", "--batch-size", "2")
    run = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "PYTHONUNBUFFERED": "1"})
    stderr = signal_once_training_runs(run, out, signal.SIGTERM)
    assert run.returncode == 143, stderr[-2000:]
    assert (out / "checkpoints" / "last.ckpt").is_file() and not (out / "bundle").exists()
    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    from pneumoscan.integrity import read_spec

    training = read_spec(out / "bundle").provenance.training
    assert training["resume"] is True and training["teacher_bundle_sha256"]
