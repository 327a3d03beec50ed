"""Shared fixtures: tiny synthetic X-rays, a Kaggle-layout folder, a real (tiny) bundle."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "chest_xray"
TEST_INPUT = 64  # pixels: small enough that efficientnet_lite0 trains in seconds on 2 cores


def make_xray(seed: int, *, pneumonia: bool = False, size: tuple[int, int] = (72, 64)) -> Image.Image:
    """A greyscale stand-in for a chest X-ray: dark field, two bright 'lungs', seeded noise.

    The pneumonia variant adds a bright consolidation patch in the right 'lung', so the two
    classes are learnable.
    """
    rng = np.random.default_rng(seed)
    w, h = size
    image = Image.new("L", size, 20)
    draw = ImageDraw.Draw(image)
    draw.ellipse((w * 0.12, h * 0.15, w * 0.45, h * 0.85), fill=90)
    draw.ellipse((w * 0.55, h * 0.15, w * 0.88, h * 0.85), fill=90)
    if pneumonia:
        draw.ellipse((w * 0.6, h * 0.4, w * 0.85, h * 0.75), fill=210)
    noise = rng.normal(0, 12, (h, w))
    pixels = np.clip(np.asarray(image, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def image_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def write_kaggle_layout(root: Path, *, per_class: dict[str, int] | None = None) -> Path:
    """ROOT/{train,val,test}/{NORMAL,PNEUMONIA} with Kermany-style file names."""
    per_class = per_class or {"train": 16, "val": 2, "test": 6}
    seed = 0
    for split, count in per_class.items():
        for i in range(count):
            patient = {"train": 1000, "val": 2000, "test": 3000}[split] + i // 2  # 2 images each
            seed += 1
            normal = make_xray(seed)
            normal.save(root / _mk(root, split, "NORMAL") / f"IM-{patient:04d}-000{i % 2 + 1}.jpeg", quality=95)
            seed += 1
            sick = make_xray(seed, pneumonia=True)
            kind = "bacteria" if i % 3 else "virus"
            sick.save(root / _mk(root, split, "PNEUMONIA") / f"person{patient}_{kind}_{seed}.jpeg",
                      quality=95)
    return root


def signal_once_training_runs(run, out: Path, signum: int, *, timeout: float = 300) -> str:
    """Send ``signum`` to a ``train``/``distill`` subprocess a second after its training has
    started (Lightning wrote OUT/logs/version_*/hparams.yaml); its stderr once it has exited."""
    import time

    deadline = time.monotonic() + timeout
    while not list((out / "logs").glob("version_*/hparams.yaml")):
        assert run.poll() is None, run.stderr.read()[-2000:]
        assert time.monotonic() < deadline, f"training did not start in {timeout:.0f} s"
        time.sleep(0.05)
    time.sleep(1.0)
    run.send_signal(signum)
    return run.communicate(timeout=120)[1]


def _mk(root: Path, split: str, cls: str) -> Path:
    path = root / split / cls
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def xray_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_kaggle_layout(tmp_path_factory.mktemp("chest_xray"))


@pytest.fixture(scope="session")
def trained_run(xray_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real one-epoch training run on the synthetic folder; returns the run directory."""
    pytest.importorskip("torch", reason="training needs PyTorch (pneumoscan[train]); this is the light install")
    from pneumoscan.training import TrainConfig, train

    out = tmp_path_factory.mktemp("run")
    # the plain trained network (no gate, no ONNX): tests that need those fit or export them; its
    # 5-a-class validation split still gets a temperature (tests/test_train_own_data.py holds the
    # real minimum of 20)
    train(TrainConfig(data=xray_root, out=out, weights="none", input_size=TEST_INPUT, epochs=2,
                      frozen_epochs=0, batch_size=8, val_fraction=0.25, lr=3e-3,
                      accelerator="cpu", devices="1", gate=False, export=False, min_validation_per_class=2))
    return out


@pytest.fixture(scope="session")
def tiny_bundle(request: pytest.FixtureRequest) -> Path:
    """The tiny trained bundle. The light install (no PyTorch, so no training) gets the one the
    full run exported, with its ONNX graph, through ``PNEUMOSCAN_TEST_BUNDLE``."""
    given = os.environ.get("PNEUMOSCAN_TEST_BUNDLE")
    if given:
        return Path(given)
    bundle = request.getfixturevalue("trained_run") / "bundle"
    keep = os.environ.get("PNEUMOSCAN_SAVE_TEST_BUNDLE")
    if keep:
        from pneumoscan.export import export_bundle_onnx

        export_bundle_onnx(bundle, Path(keep))
    return bundle


@pytest.fixture(scope="session")
def exported_bundle(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny bundle with its ONNX graph (the light install gets one already exported)."""
    if (tiny_bundle / "model.onnx").is_file():
        return tiny_bundle
    from pneumoscan.export import export_bundle_onnx

    out = tmp_path_factory.mktemp("exported") / "bundle"
    export_bundle_onnx(tiny_bundle, out)
    return out


@pytest.fixture()
def app(tiny_bundle: Path):
    from pneumoscan.web import create_app

    # CSRF is off for the test client's form posts; tests/test_security.py checks it with it on.
    return create_app({"TESTING": True, "MODEL_DIR": str(tiny_bundle), "SECRET_KEY": "test",
                       "MAX_CONTENT_LENGTH": 2 * 1024 * 1024, "MAX_FILES": 4, "WTF_CSRF_ENABLED": False})


@pytest.fixture()
def client(app):
    return app.test_client()


@pytest.fixture()
def scores() -> tuple[np.ndarray, np.ndarray]:
    """300 labels and overlapping scores: a classifier that is good, not perfect."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    s = np.clip(0.35 * y + rng.normal(0.35, 0.2, 300), 0.001, 0.999)
    return y, s


def needs_shared_data() -> pytest.MarkDecorator:
    return pytest.mark.skipif(not (SHARED_DATA / "train").is_dir(),
                              reason=f"real Kermany data not found at {SHARED_DATA}")
