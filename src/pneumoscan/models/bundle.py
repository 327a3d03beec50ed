"""The model bundle: the only thing that crosses from training to serving.

A bundle is a directory with ``model.safetensors`` (the plain :class:`Classifier` state dict),
``model.json`` (:class:`~pneumoscan.spec.BundleSpec`: architecture, preprocessing, the
decision, the gate, the ONNX graph, provenance) and ``manifest.json`` (the sha256 of every other
file, model.json included, checked on every load: :mod:`pneumoscan.integrity`). It may also hold
``split.csv``, the train/validation split it was trained on, the gate and the ONNX graph.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pneumoscan.data import SPLIT_FILE
from pneumoscan.errors import BundleError, PneumoscanError
from pneumoscan.integrity import (
    MANIFEST_FILE,
    SPEC_FILE,
    WEIGHTS_FILE,
    bundle_digest,
    default_bundle_path,
    read_spec,
    rewrite_bundle,
    seal_bundle,
    sha256_file,
    verify_bundle,
    verify_part,
    write_bundle,
)
from pneumoscan.models.network import Classifier, Ensemble
from pneumoscan.models.registry import create_classifier
from pneumoscan.spec import BundleSpec


__all__ = ["MANIFEST_FILE", "SPEC_FILE", "SPLIT_FILE", "WEIGHTS_FILE", "BundleSpec", "bundle_digest",
           "build_network", "default_bundle_path", "load_bundle", "load_gate_extractor", "load_weights", "read_spec",
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

    from pneumoscan.integrity import check_safetensors_header

    check_safetensors_header(Path(path))
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
    return write_bundle(Path(directory), spec, lambda path: save_weights(model, path, half=half), extra_files)


def load_bundle(directory: str | Path, *, check_onnx: bool = True,
                expected_digest: str | None = None) -> tuple[Classifier | Ensemble, BundleSpec]:
    """Rebuild the network (a :class:`Classifier`, or an :class:`Ensemble` of them) from a verified
    bundle and return it in eval mode (float32).

    Raises:
        BundleError: see :func:`verify_bundle`; also weights that do not fit the declared
            architecture.
    """
    spec = verify_bundle(directory, check_onnx=check_onnx, expected_digest=expected_digest)
    return build_network(directory, spec), spec


def build_network(directory: str | Path, spec: BundleSpec) -> Classifier | Ensemble:
    """The network of a bundle already verified against its manifest (:func:`verify_bundle`),
    without hashing its files again.

    Raises:
        BundleError: weights that do not fit the declared architecture.
    """
    directory = Path(directory)
    try:
        members = [create_classifier(spec.backbone, weights="none", head=spec.head,
                                     input_size=spec.input_size, dropout=spec.dropout)
                   for _ in range(max(spec.members, 1))]
    except PneumoscanError as exc:
        raise BundleError(f"{directory}: {exc}") from None
    model: Classifier | Ensemble = Ensemble(members) if len(members) > 1 else members[0]
    what = f"{spec.members}-member {spec.backbone}/{spec.head}" if spec.members > 1 else f"{spec.backbone}/{spec.head}"
    return load_weights(model, directory / WEIGHTS_FILE, what=what)


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
