"""``pneumoscan train`` end to end: train, then gate on the run's own training films, then
export to ONNX with its parity check, so that ``OUT/bundle`` is ready to serve.

Training (:mod:`pneumoscan.training`) knows nothing of gates or exporters; this module joins the
three steps, each still its own command for experts (``fit-gate``, ``export``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pneumoscan.integrity import read_spec
from pneumoscan.training import TrainConfig, train


def train_bundle(config: TrainConfig, *, quiet: bool = False,
                 report: Callable[[str], None] = print) -> Path | None:
    """Train (:func:`pneumoscan.training.train`), then unless ``config`` turns them off fit the
    input gate and export to ONNX. A run whose validation split is too small to set the gate's
    limit gets no gate, with the reason reported. Returns the bundle, or None on other DDP ranks."""
    stages = 1 + int(config.gate) + int(config.export)
    announced = []

    def training_report(line: str) -> None:
        if not announced:  # once the data has been read: a bad folder is one error line, no stage line
            announced.append(True)
            report(f"stage 1/{stages}: training {config.backbone}")
        report(line)

    bundle = train(config, quiet=quiet, report=training_report)
    if bundle is None:
        return None
    stage = 1
    if config.gate:
        stage += 1
        if read_spec(bundle).provenance.training.get("few_validation_images"):
            report(f"stage {stage}/{stages}: no input gate: its limit needs {config.min_validation_per_class} "
                   "validation films a class (fit-gate can add one once there are)")
        else:
            from pneumoscan.bundle_tools import fit_bundle_gate

            report(f"stage {stage}/{stages}: fitting the input gate on the training films")
            gate = fit_bundle_gate(bundle, config.data, bundle)
            report(f"  it refuses {gate.validation_refused:.1%} of the validation films, {gate.inverted_refused:.1%} "
                   f"of their inverted copies and {gate.synthetic_non_xrays['refused']} of "
                   f"{gate.synthetic_non_xrays['n']} synthetic documents and screenshots")
    if config.export:
        from pneumoscan.export import export_bundle_onnx

        stage += 1
        report(f"stage {stage}/{stages}: exporting to ONNX and checking it against PyTorch")
        export_bundle_onnx(bundle)
    return bundle
