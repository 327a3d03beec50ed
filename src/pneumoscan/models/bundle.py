"""The model bundle: the only thing that crosses from training to serving.

A bundle is a directory with ``model.safetensors`` (the plain :class:`Classifier` state dict)
and ``model.json`` (:class:`~pneumoscan.spec.BundleSpec`: architecture, preprocessing, the
decision, the gate, the ONNX graph, provenance, and the sha256 of every file, checked on every
load). It may also hold ``split.csv``, the train/validation split it was trained on.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from pneumoscan.data import SPLIT_FILE
from pneumoscan.errors import BundleError, PneumoscanError
from pneumoscan.models.network import Classifier, Ensemble
from pneumoscan.models.registry import create_classifier
from pneumoscan.spec import BundleSpec, GateInfo, OnnxInfo

WEIGHTS_FILE = "model.safetensors"
SPEC_FILE = "model.json"

__all__ = ["SPEC_FILE", "SPLIT_FILE", "WEIGHTS_FILE", "BundleSpec", "default_bundle_path", "load_bundle",
           "load_gate_extractor", "load_weights", "read_spec", "rewrite_bundle", "save_bundle", "save_weights",
           "sha256_file", "verify_bundle", "verify_part"]


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_weights(model: nn.Module, path: Path, *, half: bool = False) -> None:
    """A module's state dict as safetensors (floating tensors in fp16 with ``half``)."""
    from safetensors.torch import save_file

    dtype = torch.float16 if half else torch.float32
    state = {k: (v.detach().to("cpu", dtype) if v.is_floating_point() else v.detach().cpu()).contiguous()
             for k, v in model.state_dict().items()}
    save_file(state, str(path))


def load_weights(model: nn.Module, path: Path, *, what: str) -> nn.Module:
    """Load a safetensors state dict into ``model`` (strictly, as float32) and return it in eval mode.

    Raises:
        BundleError: the file does not fit the model.
    """
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()},
                              strict=True)
    except Exception as exc:
        raise BundleError(f"{path} does not fit a {what} model: {str(exc).splitlines()[0]}") from None
    return model.eval()


def save_bundle(model: nn.Module, spec: BundleSpec, directory: str | Path, *, half: bool = False,
                extra_files: dict[str, Path] | None = None) -> BundleSpec:
    """Write a bundle atomically: into a temporary sibling directory, then renamed into place.

    A crash never leaves a half-written bundle under ``directory``. An existing bundle there is
    replaced. Returns the spec as written (with the weights' sha256 filled in).
    """
    members = len(model.members) if isinstance(model, Ensemble) else 1
    spec = spec.replace(weights_dtype="float16" if half else "float32", members=members)
    return _write_bundle(Path(directory), spec, lambda path: save_weights(model, path, half=half), extra_files)


def rewrite_bundle(source: str | Path, spec: BundleSpec, directory: str | Path, *,
                   extra_files: dict[str, Path] | None = None, drop: tuple[str, ...] = ()) -> BundleSpec:
    """Write ``spec`` as a new bundle that keeps ``source``'s weights file byte for byte, and its
    other files (split list, input gate, ONNX model) but those in ``drop``, with ``extra_files``
    added or replacing them."""
    source = Path(source)
    kept = {item.name: item for item in source.iterdir()
            if item.is_file() and item.name not in (WEIGHTS_FILE, SPEC_FILE, *drop)}
    return _write_bundle(Path(directory), spec, lambda path: shutil.copyfile(source / WEIGHTS_FILE, path),
                         {**kept, **(extra_files or {})})


def _write_bundle(directory: Path, spec: BundleSpec, write_weights: Callable[[Path], object],
                  extra_files: dict[str, Path] | None) -> BundleSpec:
    """Fill a temporary sibling directory, then rename it into place (replacing any old bundle)."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a bundle is meant to be shared and served
    try:
        write_weights(tmp / WEIGHTS_FILE)
        spec = spec.replace(weights_sha256=sha256_file(tmp / WEIGHTS_FILE))
        (tmp / SPEC_FILE).write_text(spec.to_json())
        for name, source in (extra_files or {}).items():
            shutil.copyfile(source, tmp / name)
        for item in tmp.iterdir():
            item.chmod(0o644)
            with open(item, "rb") as handle:
                os.fsync(handle.fileno())
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            directory.rename(old)
            tmp.rename(directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return spec


def read_spec(directory: str | Path) -> BundleSpec:
    """Read and validate ``model.json`` of a bundle without loading the weights.

    Raises:
        BundleError: missing directory or file, or a bad spec.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise BundleError(f"model bundle {directory} does not exist (expected a directory with "
                          f"{WEIGHTS_FILE} and {SPEC_FILE})")
    spec_path = directory / SPEC_FILE
    if not spec_path.is_file():
        raise BundleError(f"{directory} is not a model bundle: {SPEC_FILE} is missing")
    return BundleSpec.from_json(spec_path.read_text(), source=str(spec_path))


def verify_part(directory: Path, part: GateInfo | OnnxInfo) -> None:
    """Check one listed file of a bundle (the gate, the ONNX model) against its sha256.

    Raises:
        BundleError: the file is missing or its sha256 differs.
    """
    path = Path(directory) / part.file
    if not path.is_file() or sha256_file(path) != part.sha256:
        raise BundleError(f"{path} is missing, corrupt or was modified; refusing to load the bundle")


def verify_bundle(directory: str | Path, *, check_onnx: bool = True) -> BundleSpec:
    """Check a bundle without building the network: spec readable, weights present, sha256 right.

    Raises:
        BundleError: missing files, a bad spec, or a sha256 mismatch (corrupt or tampered weights,
            gate or, with ``check_onnx``, ONNX model).
    """
    directory = Path(directory)
    spec = read_spec(directory)
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        raise BundleError(f"{directory} is not a complete model bundle: {WEIGHTS_FILE} is missing")
    actual = sha256_file(weights_path)
    if actual != spec.weights_sha256:
        raise BundleError(
            f"{weights_path} is corrupt or was modified: its sha256 is {actual[:16]}..., but "
            f"{SPEC_FILE} records {spec.weights_sha256[:16] or 'nothing'}.... Refusing to load it; "
            "re-export or re-download the bundle."
        )
    # The input gate and the ONNX model are checked like the weights.
    for part in (spec.gate, spec.onnx if check_onnx else None):
        if part is not None:
            verify_part(directory, part)
    if spec.gate is not None and spec.gate.extractor_file:
        path = directory / spec.gate.extractor_file
        if not path.is_file() or sha256_file(path) != spec.gate.extractor_sha256:
            raise BundleError(f"{path} is missing, corrupt or was modified; refusing to load the bundle")
    return spec


def load_bundle(directory: str | Path, *, check_onnx: bool = True) -> tuple[Classifier | Ensemble, BundleSpec]:
    """Rebuild the network (a :class:`Classifier`, or an :class:`Ensemble` of them) from a verified
    bundle and return it in eval mode (float32).

    Raises:
        BundleError: see :func:`verify_bundle`; also weights that do not fit the declared
            architecture.
    """
    directory = Path(directory)
    spec = verify_bundle(directory, check_onnx=check_onnx)
    try:
        members = [create_classifier(spec.backbone, weights="none", head=spec.head,
                                     input_size=spec.input_size, dropout=spec.dropout)
                   for _ in range(max(spec.members, 1))]
    except PneumoscanError as exc:
        raise BundleError(f"{directory}: {exc}") from None
    model: Classifier | Ensemble = Ensemble(members) if len(members) > 1 else members[0]
    what = f"{spec.members}-member {spec.backbone}/{spec.head}" if spec.members > 1 else f"{spec.backbone}/{spec.head}"
    return load_weights(model, directory / WEIGHTS_FILE, what=what), spec


def load_gate_extractor(directory: str | Path, spec: BundleSpec) -> Classifier | None:
    """The gate's frozen ImageNet feature extractor (its file was checked with the bundle), or None.

    Raises:
        BundleError: the file does not fit the named backbone.
    """
    gate = spec.gate
    if gate is None or not gate.extractor:
        return None
    try:
        extractor = create_classifier(gate.extractor, weights="none", input_size=spec.input_size)
    except PneumoscanError as exc:
        raise BundleError(f"{directory}: the gate's extractor: {exc}") from None
    return load_weights(extractor, Path(directory) / gate.extractor_file, what=f"{gate.extractor} extractor")


def default_bundle_path() -> Path:
    """The bundle shipped inside the package (used when no --model is given)."""
    return Path(str(resources.files("pneumoscan") / "default_model"))
