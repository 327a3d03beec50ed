"""The command line: predict, evaluate, and clear one-line errors for bad input."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pneumoscan.cli import app

runner = CliRunner()


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """Through the real entry point, so error handling is exercised as a user sees it."""
    return subprocess.run([sys.executable, "-m", "pneumoscan", *args], capture_output=True,
                          text=True, timeout=300)


def test_predict_csv_for_files_and_folders(tiny_bundle: Path, xray_root: Path, tmp_path: Path) -> None:
    from pneumoscan.integrity import read_spec

    out = tmp_path / "preds.csv"
    one = next((xray_root / "train" / "NORMAL").iterdir())
    result = runner.invoke(app, ["predict", "--model", str(tiny_bundle), str(xray_root / "test"),
                                 str(one), "--csv", str(out)])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == ["path", "status", "label", "probability_pneumonia", "threshold", "review_recommended",
                             "review_reasons", "reasons", "error"]
    assert len(rows) == 13
    band = read_spec(tiny_bundle).decision.review
    for row in rows:
        p, t = float(row["probability_pneumonia"]), float(row["threshold"])
        assert row["status"] == "ok" and row["reasons"] == ""
        assert 0 <= p <= 1 and row["label"] == ("PNEUMONIA" if p >= t else "NORMAL")
        inside = min(band["low"], t) < p < max(band["high"], t)
        assert row["review_recommended"] == ("yes" if inside or row["review_reasons"] else "no")
        assert ("uncertain_probability" in row["review_reasons"]) is inside


def _colour_photo(path: Path) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(4)
    Image.fromarray(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)).save(path, quality=90)
    return path


def test_predict_applies_the_input_gate_as_the_api_does(tiny_bundle: Path, xray_root: Path, tmp_path: Path) -> None:
    photo = _colour_photo(tmp_path / "holiday.jpg")
    film = next((xray_root / "test" / "PNEUMONIA").iterdir())
    out = tmp_path / "preds.csv"
    result = runner.invoke(app, ["predict", "--model", str(tiny_bundle), str(photo), str(film), "--csv", str(out)])
    assert result.exit_code == 0, result.output  # a refusal is an answer, not a failure
    rejected, ok = csv.DictReader(out.open())
    assert rejected["status"] == "rejected" and rejected["reasons"] == "colour_image"
    assert rejected["label"] == "" and rejected["probability_pneumonia"] == ""  # no label for a refusal
    assert ok["status"] == "ok" and ok["label"] in ("NORMAL", "PNEUMONIA")
    # the API says the same about the same file
    from pneumoscan.web import create_app

    client = create_app({"TESTING": True, "MODEL_DIR": str(tiny_bundle)}).test_client()
    api = client.post("/api/v1/predict", data={"file": [(photo.open("rb"), photo.name)]},
                      content_type="multipart/form-data").get_json()["results"][0]
    assert api["status"] == "rejected" and api["reasons"] == ["colour_image"]
    # --no-gate labels it anyway, and still says what the gate would have refused
    result = runner.invoke(app, ["predict", "--model", str(tiny_bundle), str(photo), "--no-gate", "--csv", str(out)])
    assert result.exit_code == 0, result.output
    (row,) = csv.DictReader(out.open())
    assert row["status"] == "ok" and row["label"] in ("NORMAL", "PNEUMONIA") and row["reasons"] == "colour_image"


def test_predict_table_shows_refusals_and_errors(tiny_bundle: Path, tmp_path: Path) -> None:
    photo = _colour_photo(tmp_path / "holiday.jpg")
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"plain text, not a PNG")
    result = run_cli("predict", "--model", str(tiny_bundle), str(photo), str(bad), "--csv", str(tmp_path / "p.csv"))
    assert result.returncode == 1  # an unreadable file is a failure
    rows = {r["path"]: r for r in csv.DictReader((tmp_path / "p.csv").open())}
    assert rows[str(photo)]["status"] == "rejected" and rows[str(bad)]["status"] == "error"
    assert rows[str(bad)]["reasons"] == "unsupported_media_type" and "not a JPEG, PNG or DICOM" in rows[str(bad)]["error"]
    assert "0 predicted, 1 refused by the input gate, 1 unreadable" in result.stderr
    table = run_cli("predict", "--model", str(tiny_bundle), str(photo))
    assert table.returncode == 0 and "rejected" in table.stdout and "colour_image" in table.stdout


def test_predict_table_and_partial_failure(tiny_bundle: Path, xray_root: Path, tmp_path: Path) -> None:
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a whole jpeg")
    good = next((xray_root / "test" / "PNEUMONIA").iterdir())
    result = run_cli("predict", "--model", str(tiny_bundle), str(good), str(bad))
    assert result.returncode == 1
    assert good.name in result.stdout and "p(pneumonia)" in result.stdout
    assert "broken.jpg" in result.stderr and "1 of 2 file(s) could not be read" in result.stderr
    assert "Traceback" not in result.stderr


def test_evaluate_cli(tiny_bundle: Path, xray_root: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["evaluate", "--data", str(xray_root), "--split", "test", "--model",
                                 str(tiny_bundle), "--out", str(tmp_path), "--bootstrap", "200"])
    assert result.exit_code == 0, result.output
    assert "roc_auc" in result.output
    assert json.loads((tmp_path / "metrics.json").read_text())["n"] == 12


def test_evaluate_lists_unreadable_files_on_stderr(tiny_bundle: Path, xray_root: Path, tmp_path: Path) -> None:
    import shutil

    data = tmp_path / "data"
    shutil.copytree(xray_root / "test", data / "test")
    (data / "test" / "NORMAL" / "IM-9000-0001.jpeg").write_bytes(b"\xff\xd8\xff\xe0 cut short")
    result = run_cli("evaluate", "--data", str(data), "--split", "test", "--model", str(tiny_bundle),
                     "--out", str(tmp_path / "r"), "--bootstrap", "100")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "IM-9000-0001.jpeg" in result.stderr and "1 file(s) could not be read" in result.stderr
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert metrics["n"] == 12 and metrics["n_unreadable"] == 1
    assert metrics["unreadable"][0]["path"].endswith("IM-9000-0001.jpeg")


@pytest.mark.parametrize("args,message", [
    (["evaluate", "--data", "/nonexistent/chest_xray"], "dataset folder /nonexistent/chest_xray does not exist"),
    (["train", "--data", "/nonexistent", "--out", "/tmp/x", "--backbone", "nope"], "unknown backbone 'nope'"),
    (["predict", "--model", "/nonexistent/bundle", "README.md"], "model bundle /nonexistent/bundle does not exist"),
])
def test_bad_input_gives_one_clear_line(args: list[str], message: str) -> None:
    result = run_cli(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_split_and_tampered_bundle(tiny_bundle: Path, xray_root: Path, tmp_path: Path) -> None:
    result = run_cli("evaluate", "--data", str(xray_root), "--split", "holdout", "--model", str(tiny_bundle))
    assert result.returncode == 2 and "no 'holdout' split folder" in result.stderr
    import shutil

    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    result = run_cli("predict", "--model", str(copy), str(xray_root / "test"))
    assert result.returncode == 2 and "corrupt or was modified" in result.stderr
    assert "Traceback" not in result.stderr


def test_wrong_cli_arguments_are_usage_errors() -> None:
    result = run_cli("train", "--epochs", "many")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "Invalid value" in result.stderr or "Missing option" in result.stderr


def test_backbones_command_lists_registry() -> None:
    result = runner.invoke(app, ["backbones"])
    assert result.exit_code == 0 and "efficientnet_lite0" in result.output and "vgg19" in result.output


def test_calibrate_rewrites_only_the_spec(tiny_bundle: Path, xray_root: Path, tmp_path: Path) -> None:
    from pneumoscan.models import load_bundle, read_spec

    result = runner.invoke(app, ["calibrate", "--data", str(xray_root), "--model", str(tiny_bundle),
                                 "--out", str(tmp_path / "cal")])
    assert result.exit_code == 0, result.output
    assert "high_specificity" in result.output
    old, new = read_spec(tiny_bundle), read_spec(tmp_path / "cal")
    assert new.weights_sha256 == old.weights_sha256
    assert new.decision.calibration == "temperature_scaling_on_validation"
    assert new.val_metrics["n"] == old.val_metrics["n"]  # the same validation images
    load_bundle(tmp_path / "cal")
    import shutil

    shutil.copytree(tiny_bundle, tmp_path / "nosplit")
    (tmp_path / "nosplit" / "split.csv").unlink()
    failed = run_cli("calibrate", "--data", str(xray_root), "--model", str(tmp_path / "nosplit"),
                     "--out", str(tmp_path / "x"))
    assert failed.returncode == 2 and "split.csv is missing; refusing to load the bundle" in failed.stderr
    from pneumoscan.integrity import write_manifest

    write_manifest(tmp_path / "nosplit")  # a bundle written without its split list
    failed = run_cli("calibrate", "--data", str(xray_root), "--model", str(tmp_path / "nosplit"),
                     "--out", str(tmp_path / "x"))
    assert failed.returncode == 2 and "has no split.csv" in failed.stderr


def test_train_options_come_from_train_config() -> None:
    """One place for every default: each TrainConfig field is a train option with its default."""
    import dataclasses

    import typer.main

    from pneumoscan.card import RECIPE_KEYS
    from pneumoscan.training.config import TrainConfig, cli_options

    commands = typer.main.get_command(app).commands
    params = {p.name: p for p in commands["train"].params}
    for opt in cli_options():
        if opt.distill_only:  # distill's own options: train does not offer them
            assert opt.name not in params, opt.name
            continue
        assert opt.name in params, opt.name
        param = params[opt.name]
        if opt.default is dataclasses.MISSING:
            assert param.required, opt.name
        else:
            assert param.default == opt.default, opt.name
        assert param.help == opt.help and opt.help, opt.name
    assert set(params) == {o.name for o in cli_options() if not o.distill_only} | {"no_augment", "quiet"}
    # distill offers all of them, its teacher required
    distill = {p.name: p for p in commands["distill"].params}
    assert set(distill) == {o.name for o in cli_options()} | {"no_augment", "quiet"}
    assert distill["teacher"].required and distill["distill_weight"].default == TrainConfig.distill_weight
    assert "--fp32-bundle" in params["half_bundle"].secondary_opts
    # the model card's recipe names keys that training really writes
    written = TrainConfig(data=Path("d"), out=Path("o")).as_json()
    assert set(RECIPE_KEYS) <= set(written)


def test_train_cli_builds_the_config_it_shows(monkeypatch, tmp_path: Path) -> None:
    seen = []
    monkeypatch.setattr("pneumoscan.training.fit.train", lambda config, quiet=False, report=None: seen.append(config))
    result = runner.invoke(app, ["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--lr", "0.01",
                                 "--rotation", "5", "--no-hflip", "--fp32-bundle", "--split-seed", "7",
                                 "--limit-train-batches", "3"])
    assert result.exit_code == 0, result.output
    config = seen[-1]
    assert config.lr == 0.01 and config.augmentation.rotation_degrees == 5.0
    assert config.augmentation.horizontal_flip is False and config.half_bundle is False
    assert config.split_seed == 7 and config.train_batches == 3 and config.batch_size == 16
    result = runner.invoke(app, ["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--no-augment"])
    assert result.exit_code == 0, result.output
    from pneumoscan.training.config import Augmentation

    assert seen[-1].augmentation == Augmentation.none() and seen[-1].lr == 1e-3


def test_a_symlink_loop_in_the_data_folder_is_one_line(xray_root: Path, tmp_path: Path) -> None:
    import shutil

    data = tmp_path / "data"
    shutil.copytree(xray_root, data)
    normal = data / "train" / "NORMAL"
    (normal / "loop-a.jpeg").symlink_to(normal / "loop-b.jpeg")
    (normal / "loop-b.jpeg").symlink_to(normal / "loop-a.jpeg")
    result = run_cli("train", "--data", str(data), "--out", str(tmp_path / "run"), "--weights", "none")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "loop-a.jpeg is not a readable file (a symbolic link that loops" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_seal_a_bundle_from_before_manifests(tiny_bundle: Path, tmp_path: Path) -> None:
    import shutil

    old = tmp_path / "old"
    shutil.copytree(tiny_bundle, old)
    (old / "manifest.json").unlink()
    refused = run_cli("predict", "--model", str(old), "README.md")
    assert refused.returncode == 2 and f"pneumoscan seal --model {old}" in refused.stderr
    sealed = run_cli("seal", "--model", str(old))
    assert sealed.returncode == 0 and "digest" in sealed.stdout
    assert run_cli("predict", "--model", str(old), str(tiny_bundle / "model.json")).returncode == 1  # not an image: a per-file error


def test_version_and_bare_invocation() -> None:
    from pneumoscan import __version__

    version = run_cli("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"pneumoscan {__version__}"
    bare = run_cli()
    assert bare.returncode == 0 and "Usage: " in bare.stdout and "predict" in bare.stdout
    lines = run_cli("predict", "--help").stdout.splitlines()
    flags = [line for line in lines if "--tta" in line or "--no-gate" in line]
    assert len(flags) == 2 and not any("<bool>" in line for line in flags)  # flags take no value
