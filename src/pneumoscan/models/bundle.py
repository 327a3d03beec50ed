"""The model bundle: the only thing that crosses from training to serving.

A bundle is a directory with ``model.safetensors`` (the plain :class:`Classifier` state dict),
``model.json`` (:class:`~pneumoscan.spec.BundleSpec`: architecture, preprocessing, the
decision, the gate, the ONNX graph, provenance) and ``manifest.json`` (the sha256 of every other
file, model.json included, checked on every load: :mod:`pneumoscan.integrity`). It may also hold
``split.csv``, the train/validation split it was trained on, the gate and the ONNX graph.
"""

from __future__ import annotations

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
from pneumoscan.integrity import (
    MANIFEST_FILE,
    bundle_digest,
    check_file,
    check_files,
    read_manifest,
    sha256_file,
    write_manifest,
)
from pneumoscan.models.network import Classifier, Ensemble
from pneumoscan.models.registry import create_classifier
from pneumoscan.spec import BundleSpec, GateInfo, OnnxInfo

WEIGHTS_FILE = "model.safetensors"
SPEC_FILE = "model.json"
#: The digest (manifest sha256) of the packaged default bundle: editing its files and its manifest
#: together is caught too. Updated whenever the default bundle is rewritten.
DEFAULT_BUNDLE_DIGEST = "6f7e32a80125d94de154f4d22d0ad459f343b6cee1ba9860f336827817567eda"

__all__ = ["MANIFEST_FILE", "SPEC_FILE", "SPLIT_FILE", "WEIGHTS_FILE", "BundleSpec", "bundle_digest",
           "default_bundle_path", "load_bundle", "load_gate_extractor", "load_weights", "read_spec",
           "rewrite_bundle", "save_bundle", "save_weights", "seal_bundle", "sha256_file", "verify_bundle",
           "verify_part"]


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
            if item.is_file() and item.name not in (WEIGHTS_FILE, SPEC_FILE, MANIFEST_FILE, *drop)}
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
        write_manifest(tmp)  # last: it covers every file above
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


def _expected_digest(directory: Path, expected_digest: str | None) -> str | None:
    if expected_digest is None and DEFAULT_BUNDLE_DIGEST and directory.resolve() == default_bundle_path().resolve():
        return DEFAULT_BUNDLE_DIGEST
    return expected_digest


def _spec_of(directory: Path, manifest: dict[str, str]) -> BundleSpec:
    spec_path = directory / SPEC_FILE
    if not spec_path.is_file():
        raise BundleError(f"{directory} is not a model bundle: {SPEC_FILE} is missing")
    check_file(directory, manifest, SPEC_FILE)
    return BundleSpec.from_json(spec_path.read_text(), source=str(spec_path))


def _bundle_dir(directory: str | Path) -> Path:
    directory = Path(directory)
    if not directory.is_dir():
        raise BundleError(f"model bundle {directory} does not exist (expected a directory with "
                          f"{WEIGHTS_FILE} and {SPEC_FILE})")
    if not (directory / SPEC_FILE).is_file() and not (directory / MANIFEST_FILE).is_file():
        raise BundleError(f"{directory} is not a model bundle: {SPEC_FILE} is missing")
    return directory


def read_spec(directory: str | Path, *, expected_digest: str | None = None) -> BundleSpec:
    """Read and validate ``model.json`` of a bundle (checked against the manifest) without
    loading or checking the other files.

    Raises:
        BundleError: missing directory or file, no manifest, a modified model.json, or a bad spec.
    """
    directory = _bundle_dir(directory)
    return _spec_of(directory, read_manifest(directory, expected_digest=_expected_digest(directory, expected_digest)))


def verify_part(directory: Path, part: GateInfo | OnnxInfo) -> None:
    """Check one listed file of a bundle (the gate, the ONNX model) against its sha256.

    Raises:
        BundleError: the file is missing or its sha256 differs.
    """
    path = Path(directory) / part.file
    if not path.is_file() or sha256_file(path) != part.sha256:
        raise BundleError(f"{path} is missing, corrupt or was modified; refusing to load the bundle")


def verify_bundle(directory: str | Path, *, check_onnx: bool = True, expected_digest: str | None = None) -> BundleSpec:
    """Check a bundle without building the network: every file against the manifest (the ONNX
    graph only with ``check_onnx``), and that every file model.json names is listed there.

    Raises:
        BundleError: a missing, unlisted, corrupt or modified file (named), no manifest, a
            digest other than ``expected_digest``, or a bad spec.
    """
    directory = _bundle_dir(directory)
    manifest = read_manifest(directory, expected_digest=_expected_digest(directory, expected_digest))
    spec = _spec_of(directory, manifest)
    onnx = spec.onnx.file if spec.onnx is not None else None
    check_files(directory, manifest, skip=() if check_onnx or onnx is None else (onnx,))
    for name, sha in _recorded(spec, check_onnx=check_onnx).items():
        if name not in manifest:
            raise BundleError(f"{directory / name} is missing from {MANIFEST_FILE}; refusing to load the bundle")
        if manifest[name] != sha:
            raise BundleError(f"{directory / name}: its sha256 in {SPEC_FILE} and in {MANIFEST_FILE} differ; "
                              "refusing to load the bundle")
    return spec


def _recorded(spec: BundleSpec, *, check_onnx: bool = True) -> dict[str, str]:
    """``{file: sha256}`` of every file model.json names."""
    recorded = {WEIGHTS_FILE: spec.weights_sha256}
    if spec.gate is not None:
        recorded[spec.gate.file] = spec.gate.sha256
        if spec.gate.extractor_file:
            recorded[spec.gate.extractor_file] = spec.gate.extractor_sha256
    if spec.onnx is not None and check_onnx:
        recorded[spec.onnx.file] = spec.onnx.sha256
    return recorded


def seal_bundle(directory: str | Path) -> str:
    """Write the manifest of a bundle that has none (made before manifests existed), after
    checking every file model.json records; returns the new digest.

    Raises:
        BundleError: not a bundle, already sealed, or a file that differs from model.json.
    """
    directory = _bundle_dir(directory)
    if (directory / MANIFEST_FILE).exists():
        raise BundleError(f"{directory} is already sealed ({MANIFEST_FILE} exists)")
    spec = BundleSpec.from_json((directory / SPEC_FILE).read_text(), source=str(directory / SPEC_FILE))
    for name, sha in _recorded(spec).items():
        if not (directory / name).is_file() or sha256_file(directory / name) != sha:
            raise BundleError(f"{directory / name} is missing or differs from {SPEC_FILE}; not sealing the bundle")
    return write_manifest(directory)


def load_bundle(directory: str | Path, *, check_onnx: bool = True,
                expected_digest: str | None = None) -> tuple[Classifier | Ensemble, BundleSpec]:
    """Rebuild the network (a :class:`Classifier`, or an :class:`Ensemble` of them) from a verified
    bundle and return it in eval mode (float32).

    Raises:
        BundleError: see :func:`verify_bundle`; also weights that do not fit the declared
            architecture.
    """
    directory = Path(directory)
    spec = verify_bundle(directory, check_onnx=check_onnx, expected_digest=expected_digest)
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
