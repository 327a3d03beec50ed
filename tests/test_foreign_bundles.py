"""Bundles from elsewhere: sealed by whoever made them, so the manifest matches, but their values
must still be ones pneumoscan can serve. Each is refused in one line naming the file and value."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from pneumoscan.errors import BundleError
from pneumoscan.inference import Predictor
from pneumoscan.integrity import sha256_file, write_manifest


@pytest.fixture(scope="module")
def gated_bundle() -> Path:
    """The packaged bundle: gated, with its extractor and ONNX graph (the tiny test one has no gate)."""
    from pneumoscan.integrity import default_bundle_path

    return default_bundle_path()


def _copy(bundle: Path, tmp_path: Path) -> Path:
    target = tmp_path / "foreign"
    shutil.copytree(bundle, target)
    return target


def _edit_spec(bundle: Path, edit: Callable[[dict], None]) -> None:
    raw = json.loads((bundle / "model.json").read_text())
    edit(raw)
    (bundle / "model.json").write_text(json.dumps(raw))
    write_manifest(bundle)  # sealed, as its maker would


def _rewrite_gate(bundle: Path, edit: Callable[[dict], dict] | None = None, raw: bytes | None = None) -> None:
    from safetensors.numpy import load_file, save_file

    path = bundle / "gate.safetensors"
    if raw is None:
        save_file(edit(dict(load_file(str(path)))), str(path))
    else:
        path.write_bytes(raw)
    _edit_spec(bundle, lambda spec: spec["gate"].update(sha256=sha256_file(path)))


def _refused(bundle: Path, pattern: str) -> str:
    with pytest.raises(BundleError, match=pattern) as caught:
        Predictor.from_bundle(bundle)
    assert "\n" not in str(caught.value)
    return str(caught.value)


def test_an_input_size_beyond_the_limit_is_refused(exported_bundle: Path, tmp_path: Path) -> None:
    bundle = _copy(exported_bundle, tmp_path)
    _edit_spec(bundle, lambda raw: raw.update(input_size=100_000))
    _refused(bundle, "input_size must be a whole number from 32 to 1024, got 100000")


def test_a_deeply_nested_model_json_is_refused_before_parsing(exported_bundle: Path, tmp_path: Path) -> None:
    bundle = _copy(exported_bundle, tmp_path)
    raw = json.loads((bundle / "model.json").read_text())
    text = json.dumps(raw)[:-1] + ', "deep": ' + "[" * 100_000 + "]" * 100_000 + "}"
    (bundle / "model.json").write_text(text)
    write_manifest(bundle)
    _refused(bundle, r"model\.json nests 100001 levels deep; the limit is 32")


@pytest.mark.parametrize(("edit", "pattern"), [
    (lambda t: {k: v for k, v in t.items() if k != "precision"}, "lacks the tensor 'precision'"),
    (lambda t: {**t, "threshold": np.array([np.nan])}, "threshold holds values that are not finite"),
    (lambda t: {**t, "threshold": np.array([np.inf])}, "threshold holds values that are not finite"),
    (lambda t: {**t, "threshold": np.array([-1.0])}, "the threshold must be above 0"),
    (lambda t: {**t, "precision": t["precision"][:-1]}, r"precision has shape \[\d+, \d+\], expected"),
    (lambda t: {**t, "mean": np.append(t["mean"], 0).astype(np.float32),
                "precision": np.eye(len(t["mean"]) + 1, dtype=np.float32),
                **({"polarity": np.append(t["polarity"], 0)} if "polarity" in t else {})},
     r"measures \d+ features, but the network gives \d+"),
    (lambda t: {**t, "threshold": t["threshold"] * 2}, "differs from the .* model.json"),
])
def test_gate_values_are_checked(gated_bundle: Path, tmp_path: Path, edit, pattern: str) -> None:
    """A NaN threshold turned the gate off while the card showed the old limit."""
    bundle = _copy(gated_bundle, tmp_path)
    _rewrite_gate(bundle, edit)
    assert "gate.safetensors" in _refused(bundle, pattern)


def test_a_gate_header_claiming_2_to_the_60_bytes_is_refused(gated_bundle: Path, tmp_path: Path) -> None:
    bundle = _copy(gated_bundle, tmp_path)
    original = (bundle / "gate.safetensors").read_bytes()
    _rewrite_gate(bundle, raw=struct.pack("<Q", 1 << 60) + original[8:])
    _refused(bundle, "its header claims 1152921504606846976 bytes")


def test_manifest_paths_stay_inside_the_bundle_and_reveal_nothing(exported_bundle: Path, tmp_path: Path) -> None:
    bundle = _copy(exported_bundle, tmp_path)
    (tmp_path / "exists.txt").write_text("outside")
    manifest = json.loads((bundle / "manifest.json").read_text())
    messages = []
    for name in ("../exists.txt", "../missing.txt", "../../../../etc/passwd", "/etc/passwd"):
        edited = {**manifest, "files": {**manifest["files"], name: "0" * 64}}
        (bundle / "manifest.json").write_text(json.dumps(edited))
        messages.append(_refused(bundle, "not a plain file name inside the bundle").replace(name, "NAME"))
    assert len(set(messages)) == 1  # the same words whether the outside file exists or not


def test_a_symlink_out_of_the_bundle_is_refused(gated_bundle: Path, tmp_path: Path) -> None:
    bundle = _copy(gated_bundle, tmp_path)
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(bundle / "gate.safetensors", outside)
    os.symlink(outside, bundle / "gate.safetensors")
    _refused(bundle, "gate.safetensors is a symbolic link")


def test_the_cli_names_the_problem_in_one_line(gated_bundle: Path, tmp_path: Path) -> None:
    from conftest import image_bytes, make_xray

    bundle = _copy(gated_bundle, tmp_path)
    _rewrite_gate(bundle, lambda t: {**t, "threshold": np.array([np.nan])})
    image = tmp_path / "x.png"
    image.write_bytes(image_bytes(make_xray(1)))
    done = subprocess.run([sys.executable, "-m", "pneumoscan", "predict", str(image), "--model", str(bundle)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: ") and "not finite" in done.stderr
