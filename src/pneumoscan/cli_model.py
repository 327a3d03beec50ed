"""The ``pneumoscan`` commands that make or rewrite a model bundle: train, calibrate, fit-gate,
ensemble, export; and ``models``, which lists the bundled ones. They register on
:data:`pneumoscan.cli.app`; each imports its module when run.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from pneumoscan.cli import ModelOption, QuietOption, _echo, _fail, app


def _train(**values: Any) -> None:
    """Train a classifier and write OUT/bundle, ready to serve: calibrated and thresholded on
    validation, gated on the training films and exported to ONNX (--no-gate, --no-export)."""
    from pneumoscan.pipeline import train_bundle
    from pneumoscan.training import Augmentation
    from pneumoscan.training.config import from_cli

    no_augment = values.pop("no_augment")
    quiet = values.pop("quiet")
    config = from_cli(values)
    if no_augment:
        config = replace(config, augmentation=Augmentation.none())
    bundle = train_bundle(config, quiet=quiet, report=lambda line: typer.echo(line, err=True))
    if bundle is not None:
        from pneumoscan.integrity import read_spec

        spec = read_spec(bundle)
        few = spec.provenance.training.get("few_validation_images")
        parts = ["NOT calibrated (too few validation films for a temperature)" if few else "calibrated",
                 "gated" if spec.gate else "NOT gated (it refuses nothing far from its training films)",
                 "exported to ONNX" if spec.onnx else "not exported (runs only with PyTorch)"]
        typer.echo(f"bundle ready: {bundle} ({', '.join(parts)}); serve it with: pneumoscan serve --model {bundle}")


def _register_train(command: str = "train") -> None:
    """``pneumoscan train`` (and ``distill``, with its own options and a required --teacher): one
    option per TrainConfig field, with the field's default and help."""
    from pneumoscan.training.config import cli_options

    parameters = []
    for opt in cli_options():
        if opt.distill_only and command != "distill":
            continue
        if opt.name == "teacher" and command == "distill":
            opt = dataclasses.replace(opt, default=dataclasses.MISSING, type=Path)
        kind = opt.type
        if type(None) in typing.get_args(kind):  # "int | None" -> Optional[int], which typer reads
            kind = Optional[next(t for t in typing.get_args(kind) if t is not type(None))]
        required = opt.default is dataclasses.MISSING
        flag = {"metavar": ""} if kind is bool else {}  # a flag takes no value: no "<bool>" in the help
        info = typer.Option(*opt.flags, help=opt.help, show_default=not required, **flag)
        parameters.append(inspect.Parameter(opt.name, inspect.Parameter.KEYWORD_ONLY,
                                            default=... if required else opt.default,
                                            annotation=Annotated[kind, info]))
    parameters.append(inspect.Parameter(
        "no_augment", inspect.Parameter.KEYWORD_ONLY, default=False,
        annotation=Annotated[bool, typer.Option("--no-augment", help="Switch all augmentation off.", metavar="")]))
    parameters.append(inspect.Parameter(
        "quiet", inspect.Parameter.KEYWORD_ONLY, default=False,
        annotation=QuietOption))

    def train(**values: Any) -> None:
        _train(**values)

    train.__doc__ = _train.__doc__ if command == "train" else DISTILL_DOC
    train.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    train.__annotations__ = {p.name: p.annotation for p in parameters}
    app.command(command)(train)


DISTILL_DOC = """Distil a teacher bundle (an ensemble, say) into one student network.

    The student (EfficientNet-Lite0 unless --backbone) trains on the teacher's temperature-softened
    log-odds, teacher and student seeing the same augmented view each step, mixed with the hard
    labels by --distill-weight; then, as for train, it is calibrated, gated and exported, and its
    card names its teacher and the teacher's digest. Resumable like train (--resume).
    """

_register_train()
_register_train("distill")


@app.command()
def calibrate(
    out: Annotated[Path, typer.Option(help="Where to write the calibrated bundle.")],
    data: Annotated[Optional[Path], typer.Option(
        help="Kaggle-layout root: the bundle's own validation split, or with --split a labelled split of a site.")] = None,
    split: Annotated[Optional[str], typer.Option(help="With --data: calibrate on DATA/SPLIT (a site's labelled images).")] = None,
    site: Annotated[Optional[Path], typer.Option(
        help="A site's labelled sample: a folder holding NORMAL/ and PNEUMONIA/ (at least 20 images each).")] = None,
    model: ModelOption = None,
) -> None:
    """Refit temperature and operating points, on validation or on a site's labelled images.

    Without --site or --split: the bundle's own validation split. With --site DIR (NORMAL/ and
    PNEUMONIA/, at least 20 images each) or --data ROOT --split NAME: a site's sample, recorded
    on the model card.
    """
    from pneumoscan.bundle_tools import recalibrate_bundle

    if split is not None and data is None:
        _fail("--split needs --data ROOT")
    report = recalibrate_bundle(model, out, data_root=data, split=split, site=site)
    typer.echo(f"temperature {report['temperature']:.3f}; validation ECE {report['ece_15_before']:.4f} -> "
               f"{report['ece_15_after']:.4f} (n={report['n']})")
    for name, point in report["operating_points"].items():
        typer.echo(f"  {name:<17} threshold {point['threshold']:.4f}  sensitivity {point['sensitivity']:.3f}  "
                   f"specificity {point['specificity']:.3f}")
    if report["site"]:
        counts = ", ".join(f"{k} {v}" for k, v in report["site"]["n_by_class"].items())
        typer.echo(f"site calibration from {report['site']['source']} ({counts}); recorded on the model card")
    typer.echo(f"calibrated bundle written to {out}")


@app.command("fit-gate")
def fit_gate(
    data: Annotated[Path, typer.Option(help="The Kaggle-layout root the model was trained on.")],
    out: Annotated[Path, typer.Option(help="Where to write the bundle with its input gate.")],
    model: ModelOption = None,
    quantile: Annotated[float, typer.Option(help="Validation quantile of the distance used as threshold.")] = 0.995,
    extractor: Annotated[str, typer.Option(
        help="Frozen ImageNet backbone whose features the gate measures, or 'classifier' for the fine-tuned "
             "network's own (moves with every recipe).")] = "efficientnet_lite0",
    cross_fit: Annotated[bool, typer.Option(
        "--cross-fit", help="Take the threshold's quantile over 5-fold out-of-fold distances of the training and "
                            "validation images (for a validation split too small to set it alone).")] = False,
) -> None:
    """Fit the input gate (Mahalanobis distance to training features) on the bundle's own split."""
    from pneumoscan.bundle_tools import fit_bundle_gate

    info = fit_bundle_gate(model, data, out, quantile=quantile,
                           extractor=None if extractor == "classifier" else extractor, cross_fit=cross_fit)
    measured = (f"{info.n_train + info.n_val} training and validation images, cross-fitted" if cross_fit
                else f"{info.n_val} validation images")
    typer.echo(f"gate threshold {info.threshold:.3f} ({info.quantile:.1%} of {measured}, statistics from "
               f"{info.n_train} training images); bundle written to {out}")
    synthetic = info.synthetic_non_xrays
    typer.echo(f"refuses {synthetic['refused']} of {synthetic['n']} synthetic documents and screenshots, "
               f"{info.validation_refused:.1%} of the validation X-rays and {info.inverted_refused:.1%} of "
               "their inverted copies")
    if synthetic["refused"] < synthetic["target"] * synthetic["n"]:
        typer.echo(f"warning: this gate refuses fewer than {synthetic['target']:.0%} of the synthetic "
                   "non-X-rays; this network's features do not separate them from X-rays (run "
                   "bench/gate.py for the full measurement)", err=True)


@app.command()
def ensemble(
    members: Annotated[list[Path], typer.Argument(help="Member bundles (same recipe and --split-seed, other --seed).")],
    data: Annotated[Path, typer.Option(help="The Kaggle-layout root the members were trained on.")],
    out: Annotated[Path, typer.Option(help="Where to write the ensemble bundle.")],
) -> None:
    """Join member bundles into one ensemble: mean log-odds, calibrated on their shared validation split."""
    from pneumoscan.bundle_tools import build_ensemble

    report = build_ensemble(members, data, out)
    point = report["operating_points"]["balanced"]
    typer.echo(f"{len(members)} members; validation (n={report['n']}): log loss {point['loss']:.4f}, "
               f"AUC {point['roc_auc']:.4f}, accuracy {point['accuracy']:.4f} at threshold {point['threshold']:.4f}; "
               f"temperature {report['temperature']:.3f}")
    if report["gate_kept"]:
        typer.echo(f"ensemble bundle written to {out}, with the first member's independent gate; next: "
                   "'pneumoscan export'")
    else:
        typer.echo(f"ensemble bundle written to {out}; next: 'pneumoscan fit-gate' and 'pneumoscan export'")


@app.command()
def export(
    model: ModelOption = None,
    out: Annotated[Optional[Path], typer.Option(help="Write the bundle with its ONNX model here (default: in place).")] = None,
    format: Annotated[str, typer.Option("--format", help="Export format (onnx).")] = "onnx",
    data: Annotated[Optional[Path], typer.Option(
        help="Kaggle-layout root the model was trained on: adds its validation images to the parity check.")] = None,
) -> None:
    """Export the bundle's network to ONNX (model.onnx, sha256 in model.json), checked against PyTorch."""
    if format != "onnx":
        _fail(f"unknown export format '{format}'; the one supported is onnx")
    from pneumoscan.export import PARITY_TOLERANCE, export_bundle_onnx

    real = []
    if data is not None:
        from pneumoscan.data import read_split
        from pneumoscan.models import default_bundle_path, read_spec

        bundle = model or default_bundle_path()
        preprocessing = read_spec(bundle).preprocessing
        real = [preprocessing.read(s.path) for s in read_split(bundle, data)[:32]]
    info = export_bundle_onnx(model, out, real_images=real)
    checks = ", ".join(f"{name} {value:.1e}" for name, value in info.parity_max_abs_diff.items())
    typer.echo(f"model.onnx written (opset {info.opset}); largest probability difference from PyTorch: "
               f"{checks} (limit {PARITY_TOLERANCE:.0e})")


@app.command()
def seal(model: Annotated[Path, typer.Option("--model", help="Bundle directory without a manifest.json.")]) -> None:
    """Write manifest.json for a bundle made before manifests existed (after checking every file
    model.json records), and print its digest for --model-sha256."""
    from pneumoscan.models import seal_bundle

    typer.echo(f"sealed {model}; its digest (pneumoscan serve --model-sha256): {seal_bundle(model)}")


@app.command()
def models() -> None:
    """List the bundled models: the names --model takes, what each is, and its test figures."""
    from pneumoscan.integrity import BUNDLED_MODELS, bundled_model_path, read_spec

    for name, (_, description) in BUNDLED_MODELS.items():
        spec = read_spec(bundled_model_path(name))
        point = spec.reported_metrics.get("test", {}).get("operating_points", {}).get("balanced", {})
        figures = ", ".join(f"{label} {point[key]['value']:.3f}" for key, label in (
            ("accuracy", "accuracy"), ("f1_weighted", "weighted F1"), ("roc_auc", "AUC")) if key in point)
        _echo(f"{name:<8} {description}")
        _echo(f"{'':<8} {spec.name}" + (f"; official test split: {figures}" if figures else ""))
