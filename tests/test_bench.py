"""bench/ scripts whose output decides what ships: run on a tiny real training run."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from conftest import TEST_INPUT

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_snapshot_ensemble_scores_each_kept_epoch_and_their_mean(xray_root: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from pneumoscan.models import load_bundle
    from pneumoscan.training import TrainConfig, train

    run = tmp_path / "run"
    train(TrainConfig(data=xray_root, out=run, weights="none", input_size=TEST_INPUT, epochs=2,
                      frozen_epochs=0, batch_size=8, val_fraction=0.25, lr=3e-3, accelerator="cpu",
                      devices="1", keep_epoch_checkpoints=True))
    snapshot = _load("snapshot")
    capsys.readouterr()  # the training run's progress output

    assert snapshot.main(["--data", str(xray_root), "--run", str(run), "--epochs", "0,1", "--test"]) == 0
    table = capsys.readouterr().out
    rows = {line.split()[0] + (" " + line.split()[1] if line.startswith("epoch") else "")
            for line in table.splitlines()[1:] if line.strip() and not line.startswith("validation")}
    assert rows == {"bundle", "epoch 0", "epoch 1", "ensemble"}
    assert "test acc" in table.splitlines()[0]

    cache = run / "checkpoints"
    best_epoch = load_bundle(run / "bundle")[1].provenance.training["best_checkpoint"].split("=")[1].split(".")[0]
    # the bundle is the best epoch's checkpoint stored in fp16: a member loaded from that checkpoint
    # and rounded alike must score the validation images the same way
    np.testing.assert_allclose(np.load(cache / f"snapshot-val-epoch{best_epoch}.npy"),
                               np.load(cache / "snapshot-val-bundle.npy"), rtol=1e-4, atol=1e-4)
    assert not np.allclose(np.load(cache / "snapshot-val-epoch0.npy"), np.load(cache / "snapshot-val-epoch1.npy"))

    assert snapshot.main(["--data", str(xray_root), "--run", str(run), "--epochs", "1,7"]) == 2
    assert "epoch=7.ckpt" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        snapshot.main(["--data", str(xray_root), "--run", str(run), "--epochs", "two"])
    assert "comma-separated epoch numbers" in capsys.readouterr().err


def test_latency_bench_times_ensembles_with_the_gate_extractor(tiny_bundle: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("onnxruntime")
    from pneumoscan.inference import Predictor

    latency = _load("latency")
    latency.ensemble_latency(Predictor.from_bundle(tiny_bundle, backend="torch"), latency._sample_jpeg(None),
                             [1, 2], repeats=3)
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.strip()[:1].isdigit()]
    assert [row[0] for row in rows] == ["1", "2"] and all(float(row[1]) > 0 for row in rows)
