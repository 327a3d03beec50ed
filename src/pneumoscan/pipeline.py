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
    limit alone gets it cross-fitted over its training and validation films, and says so. Returns the bundle, or None on other DDP ranks."""
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
        from pneumoscan.bundle_tools import fit_bundle_gate

        stage += 1
        few = bool(read_spec(bundle).provenance.training.get("few_validation_images"))
        report(f"stage {stage}/{stages}: fitting the input gate on the training films"
               + (f" (its limit cross-fitted over the training and validation films: fewer than "
                  f"{config.min_validation_per_class} validation films a class cannot set it alone)" if few else ""))
        gate = fit_bundle_gate(bundle, config.data, bundle, cross_fit=few)
        report(f"  it refuses {gate.validation_refused:.1%} of the validation films"
               f"{' (which helped set its limit)' if few else ''}, {gate.inverted_refused:.1%} "
               f"of their inverted copies and {gate.synthetic_non_xrays['refused']} of "
               f"{gate.synthetic_non_xrays['n']} synthetic documents and screenshots")
    if config.export:
        from pneumoscan.export import export_bundle_onnx

        stage += 1
        report(f"stage {stage}/{stages}: exporting to ONNX and checking it against PyTorch")
        export_bundle_onnx(bundle)
    return bundle
