"""pneumoscan.training: a real (tiny) run, the bundle it exports, resume, DDP."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TEST_INPUT, make_xray, signal_once_training_runs
from pneumoscan.calibration import THRESHOLD_SOURCE
from pneumoscan.errors import ConfigError
from pneumoscan.models import load_bundle
from pneumoscan.training import TrainConfig, train


def test_training_run_writes_a_complete_bundle(trained_run: Path, xray_root: Path) -> None:
    model, spec = load_bundle(trained_run / "bundle")
    assert spec.backbone == "efficientnet_lite0" and spec.input_size == TEST_INPUT
    assert spec.decision.threshold_source == THRESHOLD_SOURCE and 0.0 <= spec.decision.threshold <= 1.0
    assert spec.val_metrics["n"] > 0 and "roc_auc" in spec.val_metrics
    assert spec.provenance.training["epochs"] == 2 and spec.provenance.training["fit_seconds"] > 0
    assert spec.provenance.versions["torch"] and spec.weights_dtype == "float16"
    split_rows = list(csv.DictReader((trained_run / "bundle" / "split.csv").open()))
    roles = {r["role"] for r in split_rows}
    assert roles == {"train", "val"}
    assert not any(r["path"].startswith("test/") for r in split_rows)  # test is never touched
    val_patients = {r["patient_id"] for r in split_rows if r["role"] == "val"}
    assert not val_patients & {r["patient_id"] for r in split_rows if r["role"] == "train"}
    # the official val/ folder joins the training pool
    assert any(r["path"].startswith("val/") for r in split_rows)
    for name in ("curves.png", "checkpoints/last.ckpt", "logs/version_0/metrics.csv"):
        assert (trained_run / name).is_file(), name


def test_refuses_to_overwrite_a_run_and_resume_needs_a_checkpoint(trained_run: Path, xray_root: Path,
                                                                   tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--resume"):
        train(TrainConfig(data=xray_root, out=trained_run, weights="none", input_size=TEST_INPUT))
    with pytest.raises(ConfigError, match="no checkpoint"):
        train(TrainConfig(data=xray_root, out=tmp_path, resume=True, input_size=TEST_INPUT))


def test_bad_config_values(xray_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown backbone"):
        train(TrainConfig(data=xray_root, out=tmp_path, backbone="alexnet9"))
    with pytest.raises(ConfigError, match="--epochs"):
        train(TrainConfig(data=xray_root, out=tmp_path, epochs=0))
    with pytest.raises(ConfigError, match="--class-balance"):
        train(TrainConfig(data=xray_root, out=tmp_path, class_balance="oversample"))


def test_balanced_sampling_draws_each_class_equally_often(xray_root: Path, tmp_path: Path) -> None:
    from pneumoscan.data import class_counts
    from pneumoscan.training.datamodule import ChestXrayDataModule

    # 4 NORMAL against 16 PNEUMONIA training images
    root = tmp_path / "imbalanced"
    shutil.copytree(xray_root, root)
    for path in sorted((root / "train" / "NORMAL").iterdir())[4:]:
        path.unlink()
    datamodule = ChestXrayDataModule(root, input_size=TEST_INPUT, val_fraction=0.25, batch_size=4,
                                     balanced_sampling=True)
    datamodule.setup("fit")
    assert datamodule.split is not None
    normal, pneumonia = class_counts(datamodule.split.train)
    assert pneumonia >= 3 * normal  # the pool really is imbalanced
    loader = datamodule.train_dataloader()
    labels = [int(y) for _ in range(40) for _, batch_labels in loader for y in batch_labels]
    assert len(labels) == 40 * (normal + pneumonia)  # an epoch keeps the training set's size
    assert 0.42 < labels.count(0) / len(labels) < 0.58  # without balancing it would be ~0.2
    plain = ChestXrayDataModule(root, input_size=TEST_INPUT, val_fraction=0.25, batch_size=4)
    plain.setup("fit")
    plain_labels = [int(y) for _, batch_labels in plain.train_dataloader() for y in batch_labels]
    assert plain_labels.count(0) == normal  # the default loader draws each image once


def test_split_seed_fixes_the_validation_split_independently_of_the_seed(xray_root: Path) -> None:
    from pneumoscan.training.datamodule import ChestXrayDataModule

    def validation_paths(**seeds: int) -> list[str]:
        datamodule = ChestXrayDataModule(xray_root, input_size=TEST_INPUT, val_fraction=0.25, **seeds)
        datamodule.setup("fit")
        assert datamodule.split is not None
        return sorted(str(s.path) for s in datamodule.split.val)

    by_seed = {seed: validation_paths(seed=seed) for seed in range(4)}
    assert len({tuple(paths) for paths in by_seed.values()}) > 1  # the seed alone moves the split
    for seed in range(4):
        assert validation_paths(seed=seed, split_seed=0) == by_seed[0]  # split_seed pins it


def test_resume_continues_from_the_last_checkpoint(xray_root: Path, tmp_path: Path) -> None:
    base = dict(data=xray_root, out=tmp_path, weights="imagenet", input_size=TEST_INPUT,
                frozen_epochs=1, finetune_blocks=1, batch_size=8, val_fraction=0.25,
                accelerator="cpu", devices="1", patience=10)
    train(TrainConfig(**base, epochs=1))
    first = load_bundle(tmp_path / "bundle")[1]
    assert first.provenance.training["epochs"] == 1
    train(TrainConfig(**base, epochs=2, resume=True))
    rows = [r for path in sorted((tmp_path / "logs").glob("version_*/metrics.csv"))
            for r in csv.DictReader(path.open())]
    assert len(list((tmp_path / "logs").glob("version_*"))) == 2  # the first log is kept
    epochs_logged = sorted({int(float(r["epoch"])) for r in rows if r.get("val_loss")})
    assert epochs_logged == [0, 1]  # epoch 0 was not run again
    assert load_bundle(tmp_path / "bundle")[1].provenance.training["resume"] is True


def test_weight_averaging_exports_the_average_and_resumes_it(xray_root: Path, tmp_path: Path) -> None:
    import torch

    from safetensors.torch import load_file

    base = dict(data=xray_root, out=tmp_path, weights="none", input_size=TEST_INPUT, frozen_epochs=0,
                batch_size=8, val_fraction=0.25, lr=3e-3, accelerator="cpu", devices="1", patience=10,
                ema_decay=0.9, keep_epoch_checkpoints=True)
    train(TrainConfig(**base, epochs=1))
    first = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    steps_per_epoch = first["global_step"]
    assert first["averaging_state"]["n_averaged"].item() == steps_per_epoch > 1
    averaged, current = first["state_dict"], first["current_model_state"]
    assert any(not torch.equal(averaged[k], current[k]) for k in averaged if k.startswith("net."))

    train(TrainConfig(**base, epochs=2, resume=True))
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["averaging_state"]["n_averaged"].item() == 2 * steps_per_epoch  # the average went on
    kept = sorted(p.name for p in (tmp_path / "checkpoints").glob("epoch=*.ckpt"))
    assert kept == ["epoch=0.ckpt", "epoch=1.ckpt"]  # one per epoch, across the resume
    spec = load_bundle(tmp_path / "bundle")[1]
    assert spec.provenance.training["ema_decay"] == 0.9
    best = torch.load(tmp_path / "checkpoints" / spec.provenance.training["best_checkpoint"], map_location="cpu",
                      weights_only=True)
    exported = load_file(tmp_path / "bundle" / "model.safetensors")
    for key, value in exported.items():  # the bundle holds the averaged weights, not the raw ones
        torch.testing.assert_close(value.float(), best["state_dict"]["net." + key].half().float())


def test_equalized_training_is_recorded_and_served_with_the_same_pixels(xray_root: Path,
                                                                        tmp_path: Path) -> None:
    import numpy as np
    import torch
    from sklearn.metrics import roc_auc_score

    from pneumoscan.card import model_card
    from pneumoscan.data import scan_split
    from pneumoscan.dataset import XrayDataset
    from pneumoscan.imaging import Preprocessing, load_image
    from pneumoscan.inference import Predictor

    train(TrainConfig(data=xray_root, out=tmp_path, weights="none", input_size=TEST_INPUT, epochs=1,
                      frozen_epochs=0, batch_size=8, val_fraction=0.25, lr=3e-3, accelerator="cpu",
                      devices="1", equalize=True))
    bundle = tmp_path / "bundle"
    spec = load_bundle(bundle)[1]
    assert spec.equalize is True and spec.provenance.training["equalize"] is True
    assert model_card(spec)["architecture"]["histogram_equalized"] is True  # told to API clients
    predictor = Predictor.from_bundle(bundle, backend="torch")
    val_paths = {r["path"] for r in csv.DictReader((bundle / "split.csv").open()) if r["role"] == "val"}
    pool = scan_split(xray_root, "train") + scan_split(xray_root, "val")
    val = [s for s in pool if s.path.relative_to(xray_root).as_posix() in val_paths]
    trained_on = XrayDataset(val, Preprocessing(size=TEST_INPUT, equalize=True))
    plain = XrayDataset(val, Preprocessing(size=TEST_INPUT))
    served = [predictor.preprocessing.pixels(load_image(s.path)) for s in val]
    for i, pixels in enumerate(served):  # serving feeds exactly what training validated on
        assert torch.equal(torch.from_numpy(pixels), trained_on.image(i))
    assert not all(torch.equal(torch.from_numpy(pixels), plain.image(i)) for i, pixels in enumerate(served))
    # ... and so reproduces the validation figures the bundle was calibrated with.
    log_odds = predictor.forward(np.stack(served))[0]
    assert roc_auc_score([s.label for s in val], log_odds) == pytest.approx(spec.val_metrics["roc_auc"], abs=1e-6)  # stored to 6 places


def test_sanity_check_on_one_class_batches_gives_no_auroc_warning(xray_root: Path, tmp_path: Path) -> None:
    import warnings

    # Validation is ordered by class, so Lightning's two sanity-check batches of 2 hold NORMAL
    # images only: ROC-AUC is undefined there and must not be computed (nor warned about).
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(TrainConfig(data=xray_root, out=tmp_path, weights="none", input_size=TEST_INPUT, epochs=1,
                          frozen_epochs=0, batch_size=2, val_fraction=0.5, limit_train_batches=2,
                          accelerator="cpu", devices="1"))
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "samples in targets" in m], messages
    rows = [r for r in csv.DictReader((tmp_path / "logs" / "version_0" / "metrics.csv").open())
            if r.get("val_auroc")]
    assert len(rows) == 1 and 0.0 <= float(rows[0]["val_auroc"]) <= 1.0  # once per epoch, all batches


def test_ema_decay_must_lie_between_zero_and_one(xray_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--ema-decay"):
        train(TrainConfig(data=xray_root, out=tmp_path, ema_decay=1.0))


@pytest.mark.slow
def test_two_process_ddp_on_cpu(xray_root: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "pneumoscan", "train", "--data", str(xray_root), "--out",
           str(tmp_path / "ddp"), "--weights", "none", "--input-size", str(TEST_INPUT), "--epochs", "1",
           "--frozen-epochs", "0", "--batch-size", "4", "--val-fraction", "0.25",
           "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 processes (ddp) on cpu" in result.stderr
    spec = json.loads((tmp_path / "ddp" / "bundle" / "model.json").read_text())
    training = spec["provenance"]["training"]
    assert training["strategy"] == "ddp" and training["devices"] == "2"


def test_exported_bundle_is_calibrated_on_validation(trained_run: Path) -> None:
    from pneumoscan.inference import Predictor

    predictor = Predictor.from_bundle(trained_run / "bundle")
    spec = predictor.spec
    decision = spec.decision
    assert decision.calibration == "temperature_scaling_on_validation" and decision.temperature > 0
    assert set(decision.operating_points) == {"balanced", "high_sensitivity", "high_specificity"}
    assert decision.threshold == decision.operating_points["balanced"]
    report = spec.val_metrics["calibration"]
    assert {"ece_15_before", "ece_15_after", "brier_before", "brier_after"} <= set(report)
    assert decision.threshold_for("high_sensitivity")[0] == decision.operating_points["high_sensitivity"]
    with pytest.raises(ConfigError, match="unknown operating point"):
        decision.threshold_for("aggressive")
    with pytest.raises(ConfigError, match="between 0 and 1"):
        decision.threshold_for(threshold=1.5)


def test_checkpoints_are_written_atomically(tmp_path: Path) -> None:
    import torch

    from pneumoscan.training.checkpointing import AtomicCheckpointIO

    target = tmp_path / "checkpoints" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"epoch": 1, "weights": torch.ones(3)}, target)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("killed half-way through writing")

    with pytest.raises(RuntimeError, match="half-way"):
        io.save_checkpoint({"epoch": 2, "junk": Unpicklable()}, target)
    assert torch.load(target, weights_only=True)["epoch"] == 1  # the old checkpoint is intact
    assert [p.name for p in target.parent.iterdir()] == ["last.ckpt"]  # no partial file left


def _train_command(tmp_path: Path, *, epochs: int) -> tuple[Path, list[str], dict[str, str]]:
    """A real ``pneumoscan train`` subprocess on 30 images a class: (run folder, command, env)."""
    from conftest import write_kaggle_layout

    data = write_kaggle_layout(tmp_path / "data", per_class={"train": 30, "val": 2, "test": 2})
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "pneumoscan", "train", "--data", str(data), "--out", str(out), "--weights", "none",
           "--input-size", str(TEST_INPUT), "--epochs", str(epochs), "--frozen-epochs", "0", "--batch-size", "2",
           "--val-fraction", "0.25", "--patience", "10", "--accelerator", "cpu", "--devices", "1"]
    return out, cmd, {**os.environ, "PYTHONUNBUFFERED": "1"}


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_loses_at_most_one_epoch(tmp_path: Path) -> None:
    """A run killed with SIGKILL in the middle of an epoch resumes from last.ckpt and completes."""
    import signal
    import time

    import torch

    out, cmd, env = _train_command(tmp_path, epochs=3)
    run = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    last = out / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    while not last.exists():
        assert run.poll() is None, run.stderr.read()[-2000:]
        assert time.monotonic() < deadline, "no checkpoint after 300 s"
        time.sleep(0.05)
    time.sleep(0.5)  # into the next epoch
    run.send_signal(signal.SIGKILL)
    run.wait(timeout=30)
    assert run.returncode == -signal.SIGKILL
    assert not (out / "bundle").exists()  # no bundle from a killed run
    saved = torch.load(last, map_location="cpu", weights_only=False)  # complete and readable
    completed = saved["epoch"] + 1  # epochs finished when last.ckpt was written

    resumed = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=600, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = list(csv.DictReader(sorted((out / "logs").glob("version_*/metrics.csv"))[-1].open()))
    resumed_epochs = sorted({int(float(r["epoch"])) for r in rows if r.get("val_loss")})
    assert resumed_epochs == list(range(completed, 3))  # only the interrupted epoch is run again
    assert load_bundle(out / "bundle")[1].provenance.training["resume"] is True
    assert not list((out / "checkpoints").glob(".*.partial"))


@pytest.mark.parametrize(("signum", "status"), [("SIGTERM", 143), ("SIGINT", 130)])
def test_sigterm_or_sigint_saves_a_checkpoint_and_exits_non_zero(tmp_path: Path, signum: str, status: int) -> None:
    """A scheduler's SIGTERM (or Ctrl+C) mid-run: a resumable checkpoint, an honest exit status,
    no bundle; --resume then completes the run."""
    import signal

    out, cmd, env = _train_command(tmp_path, epochs=2)
    run = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    stderr = signal_once_training_runs(run, out, getattr(signal, signum))
    assert run.returncode == status, stderr[-2000:]
    assert f"training stopped by {signum}" in stderr and "--resume" in stderr and "Traceback" not in stderr
    assert (out / "checkpoints" / "last.ckpt").is_file() and not (out / "bundle").exists()
    resumed = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=600, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (out / "bundle" / "model.json").is_file()


def test_validation_loss_is_weighted_for_the_class_balance_trained_for() -> None:
    import torch
    import torch.nn.functional as F

    from pneumoscan.models import backbone_info, create_classifier
    from pneumoscan.training.module import PneumoniaClassifier

    info = backbone_info("efficientnet_lite0")
    net = create_classifier("efficientnet_lite0", weights="none", input_size=TEST_INPUT)
    weighted = PneumoniaClassifier(net, mean=info.mean, std=info.std, class_weights=(2.0, 0.5))
    assert weighted.val_class_weights.tolist() == [2.0, 0.5]  # loss weights: same for validation
    # balanced sampling: unweighted training loss, validation loss still under the balanced prior
    sampled = PneumoniaClassifier(net, mean=info.mean, std=info.std, val_class_weights=(2.0, 0.5))
    assert sampled.class_weights.tolist() == [1.0, 1.0]
    net.eval()
    x = torch.randn(6, 3, TEST_INPUT, TEST_INPUT)
    y = torch.tensor([0, 1, 1, 1, 1, 1])
    loss, _, _ = sampled._step((x, y), weight=sampled.val_class_weights)
    expected = F.cross_entropy(net(x), y, weight=torch.tensor([2.0, 0.5]))
    assert torch.allclose(loss, expected)
    assert not torch.allclose(loss, F.cross_entropy(net(x), y))


def test_label_smoothing_applies_to_the_training_loss_only() -> None:
    import torch
    import torch.nn.functional as F

    from pneumoscan.models import backbone_info, create_classifier
    from pneumoscan.training.module import PneumoniaClassifier

    info = backbone_info("efficientnet_lite0")
    net = create_classifier("efficientnet_lite0", weights="none", input_size=TEST_INPUT).eval()
    module = PneumoniaClassifier(net, mean=info.mean, std=info.std, class_weights=(2.0, 0.5),
                                 label_smoothing=0.1)
    logged: dict[str, torch.Tensor] = {}
    module.log = lambda name, value, **_: logged.__setitem__(name, value)  # no Trainer here
    x = torch.randn(6, 3, TEST_INPUT, TEST_INPUT)
    y = torch.tensor([0, 1, 1, 1, 1, 1])
    weight = torch.tensor([2.0, 0.5])
    with torch.no_grad():
        logits = net(x)
        train_loss = module.training_step((x, y), 0)
        module.validation_step((x, y), 0)
    assert torch.allclose(train_loss, F.cross_entropy(logits, y, weight=weight, label_smoothing=0.1))
    assert torch.allclose(logged["val_loss"], F.cross_entropy(logits, y, weight=weight))
    assert not torch.allclose(train_loss, logged["val_loss"])
    with pytest.raises(ConfigError, match="--label-smoothing"):
        TrainConfig(data=Path("."), out=Path("."), label_smoothing=1.0).validate()


def test_augmentation_keeps_shape_and_changes_pixels() -> None:
    import torch

    from pneumoscan.imaging import square_resize
    from pneumoscan.training.config import Augmentation
    from pneumoscan.training.datamodule import augmentation_pipeline

    torch.manual_seed(0)
    pixels = torch.from_numpy(square_resize(make_xray(6), 64))
    out = augmentation_pipeline(Augmentation())(pixels)
    assert out.shape == pixels.shape and out.dtype == torch.uint8
    assert not torch.equal(out, pixels)
    assert torch.equal(augmentation_pipeline(Augmentation.none())(pixels), pixels)


class _Payload:
    """Unpickling this runs a command: what a crafted last.ckpt can do under a permissive load."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_resume_never_unpickles_code_whatever_the_environment_says(xray_root: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    marker = tmp_path / "ran"
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": {}, "payload": _Payload(marker)}, tmp_path / "run" / "checkpoints" / "last.ckpt")
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # torch's default would then unpickle anything
    with pytest.raises(ConfigError, match="weights_only=True"):
        train(TrainConfig(data=xray_root, out=tmp_path / "run", resume=True, input_size=TEST_INPUT, epochs=1,
                          batch_size=8, accelerator="cpu", devices="1"))
    assert not marker.exists()
