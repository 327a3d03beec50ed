"""``pneumoscan train | evaluate | predict | serve | backbones``.

Each command parses its options, imports the one module it needs, and calls one function.
Errors a user can cause (:class:`~pneumoscan.errors.PneumoscanError`) are printed as one line
without a traceback and exit with status 2.
"""

from __future__ import annotations

import csv
import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from pneumoscan.errors import PneumoscanError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Pneumonia detection on chest X-rays: train, evaluate, predict, serve.")

ModelOption = Annotated[Optional[Path], typer.Option(
    "--model", help="Model bundle directory (default: the bundled model).")]
OperatingPointOption = Annotated[Optional[str], typer.Option(
    help="balanced (default), high_sensitivity or high_specificity: thresholds chosen on validation.")]
TtaOption = Annotated[bool, typer.Option("--tta", help="Average each image's logits with its mirror image.")]
BackendOption = Annotated[str, typer.Option(
    envvar="PNEUMOSCAN_BACKEND",
    help="auto (ONNX Runtime when the bundle has an ONNX model, else PyTorch), onnxruntime or torch.")]


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@app.command()
def train(
    data: Annotated[Path, typer.Option(help="Kaggle-layout root holding train/ (and val/).")],
    out: Annotated[Path, typer.Option(help="Run directory: checkpoints, logs, curves, bundle/.")],
    backbone: Annotated[str, typer.Option(help="Backbone name (see 'pneumoscan backbones').")] = "efficientnet_lite0",
    weights: Annotated[str, typer.Option(help="imagenet, none (random init) or a path to a weights file.")] = "imagenet",
    head: Annotated[str, typer.Option(help="seed (Flatten-512-128-2) or pool (GAP-dropout-2).")] = "pool",
    input_size: Annotated[int, typer.Option(help="Square input size in pixels.")] = 224,
    epochs: Annotated[int, typer.Option(help="Maximum epochs (early stopping may end sooner).")] = 5,
    frozen_epochs: Annotated[int, typer.Option(help="Epochs with the whole backbone frozen.")] = 1,
    finetune_blocks: Annotated[int, typer.Option(help="Backbone blocks unfrozen after the frozen epochs.")] = 5,
    finetune_lr_factor: Annotated[float, typer.Option(help="LR multiplier for unfrozen blocks.")] = 0.3,
    lr: Annotated[float, typer.Option(help="Learning rate of the head.")] = 1e-3,
    weight_decay: float = 1e-4,
    dropout: float = 0.5,
    batch_size: Annotated[int, typer.Option(help="Images per training step (16 is fastest on a small CPU).")] = 16,
    val_fraction: Annotated[float, typer.Option(help="Share of patients carved from train for validation.")] = 0.1,
    seed: Annotated[int, typer.Option(help="Seed of initialisation and augmentation (and of the split unless --split-seed).")] = 0,
    split_seed: Annotated[Optional[int], typer.Option(
        help="Seed of the carved validation split (default: --seed); fix it to compare runs on one split.")] = None,
    patience: Annotated[int, typer.Option(help="Early-stopping patience on validation loss.")] = 3,
    rotation: Annotated[float, typer.Option(help="Augmentation: max rotation in degrees.")] = 30.0,
    translate: Annotated[float, typer.Option(help="Augmentation: max shift as a fraction.")] = 0.2,
    scale_min: float = 0.8,
    scale_max: float = 1.2,
    shear: Annotated[float, typer.Option(help="Augmentation: max shear in degrees.")] = 10.0,
    brightness: float = 0.2,
    contrast: Annotated[float, typer.Option(help="Augmentation: contrast jitter factor (0 = off).")] = 0.0,
    blur_sigma: Annotated[float, typer.Option(help="Augmentation: Gaussian blur up to this sigma on half the images (0 = off).")] = 0.0,
    hflip: Annotated[bool, typer.Option("--hflip/--no-hflip")] = True,
    equalize: Annotated[bool, typer.Option("--equalize", help="Histogram-equalise every image after the square resize; the bundle records it, so serving does the same.")] = False,
    no_augment: Annotated[bool, typer.Option("--no-augment", help="Switch all augmentation off.")] = False,
    class_balance: Annotated[str, typer.Option(help="Class balancing: weights (inverse-frequency loss weights), sampling (each class drawn equally often) or none.")] = "weights",
    label_smoothing: Annotated[float, typer.Option(help="Label smoothing of the training loss (validation loss stays plain).")] = 0.0,
    ema_decay: Annotated[Optional[float], typer.Option(help="Keep an exponential moving average of the weights with this per-step decay (e.g. 0.997); validation, checkpoints and the bundle use the average. Default: off.")] = None,
    keep_epoch_checkpoints: Annotated[bool, typer.Option("--keep-epoch-checkpoints", help="Also keep OUT/checkpoints/epoch=N.ckpt for every epoch (e.g. for snapshot ensembles).")] = False,
    num_workers: int = 0,
    accelerator: str = "auto",
    devices: Annotated[str, typer.Option(help="Lightning devices: auto, a count, or ids.")] = "auto",
    num_nodes: int = 1,
    strategy: Annotated[str, typer.Option(help="Lightning strategy, e.g. ddp.")] = "auto",
    precision: str = "32-true",
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT/checkpoints/last.ckpt.")] = False,
    limit_train_batches: Annotated[float, typer.Option(help="Fraction (<=1) or number of train batches per epoch.")] = 1.0,
    fp32_bundle: Annotated[bool, typer.Option("--fp32-bundle", help="Store float32 weights (default fp16).")] = False,
) -> None:
    """Train a classifier and write OUT/bundle (threshold chosen on validation)."""
    from pneumoscan.data import Augmentation
    from pneumoscan.training import TrainConfig, train as run_training

    augmentation = Augmentation.none() if no_augment else Augmentation(
        rotation_degrees=rotation, translate=translate, scale_min=scale_min, scale_max=scale_max,
        shear_degrees=shear, brightness=brightness, horizontal_flip=hflip, contrast=contrast,
        blur_sigma=blur_sigma)
    config = TrainConfig(
        data=data, out=out, backbone=backbone, weights=weights, head=head, input_size=input_size,
        equalize=equalize, dropout=dropout, epochs=epochs, frozen_epochs=frozen_epochs, finetune_blocks=finetune_blocks,
        lr=lr, finetune_lr_factor=finetune_lr_factor, weight_decay=weight_decay,
        batch_size=batch_size, val_fraction=val_fraction, seed=seed, split_seed=split_seed, patience=patience,
        augmentation=augmentation, class_balance=class_balance, label_smoothing=label_smoothing, ema_decay=ema_decay,
        keep_epoch_checkpoints=keep_epoch_checkpoints, num_workers=num_workers,
        accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy,
        precision=precision, resume=resume, half_bundle=not fp32_bundle,
        limit_train_batches=int(limit_train_batches) if limit_train_batches > 1 else limit_train_batches)
    bundle = run_training(config)
    if bundle is not None:
        typer.echo(f"bundle written to {bundle}")


@app.command()
def evaluate(
    data: Annotated[Path, typer.Option(help="Kaggle-layout root.")],
    split: Annotated[str, typer.Option(help="Split folder to evaluate (test, val, train), or 'validation' for the bundle's own validation split.")] = "test",
    model: ModelOption = None,
    out: Annotated[Path, typer.Option(help="Report directory.")] = Path("reports/evaluate"),
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples for the 95% CIs.")] = 2000,
    seed: int = 0,
    operating_point: OperatingPointOption = None,
    tta: TtaOption = False,
    record: Annotated[bool, typer.Option(
        "--record", help="Also store the figures in the bundle's model.json (shown on its model card).")] = False,
    backend: BackendOption = "auto",
) -> None:
    """Evaluate a bundle on a split: metrics.json with 95% CIs, predictions.csv, plots, report.md."""
    from pneumoscan.evaluation import METRIC_NAMES, evaluate_folder, record_evaluation

    if bootstrap < 100:
        _fail(f"--bootstrap must be at least 100, got {bootstrap}")
    metrics = evaluate_folder(model, data, split, out, n_boot=bootstrap, seed=seed,
                              operating_point=operating_point, tta=tta, backend=backend)
    typer.echo(f"{split}: n={metrics['n']}, operating point {metrics['operating_point']}, "
               f"threshold={metrics['threshold']:.4f}")
    for name in METRIC_NAMES:
        m = metrics[name]
        if m["value"] is not None:
            typer.echo(f"  {name:<12} {m['value']:.4f}  (95% CI {m['ci_low']:.4f}-{m['ci_high']:.4f})")
    typer.echo(f"report written to {out}/report.md")
    if record:
        record_evaluation(model, metrics)
        typer.echo(f"figures recorded in the bundle's model.json under reported_metrics.{split}")


@app.command()
def calibrate(
    data: Annotated[Path, typer.Option(help="The Kaggle-layout root the model was trained on.")],
    out: Annotated[Path, typer.Option(help="Where to write the calibrated bundle.")],
    model: ModelOption = None,
) -> None:
    """Fit temperature scaling and the three operating points on the bundle's own validation split."""
    from pneumoscan.evaluation import recalibrate_bundle

    report = recalibrate_bundle(model, data, out)
    typer.echo(f"temperature {report['temperature']:.3f}; validation ECE {report['ece_15_before']:.4f} -> "
               f"{report['ece_15_after']:.4f} (n={report['n']})")
    for name, point in report["operating_points"].items():
        typer.echo(f"  {name:<17} threshold {point['threshold']:.4f}  sensitivity {point['sensitivity']:.3f}  "
                   f"specificity {point['specificity']:.3f}")
    typer.echo(f"calibrated bundle written to {out}")


@app.command("fit-gate")
def fit_gate(
    data: Annotated[Path, typer.Option(help="The Kaggle-layout root the model was trained on.")],
    out: Annotated[Path, typer.Option(help="Where to write the bundle with its input gate.")],
    model: ModelOption = None,
    quantile: Annotated[float, typer.Option(help="Validation quantile of the distance used as threshold.")] = 0.995,
) -> None:
    """Fit the input gate (Mahalanobis distance to training features) on the bundle's own split."""
    from pneumoscan.evaluation import fit_bundle_gate

    info = fit_bundle_gate(model, data, out, quantile=quantile)
    typer.echo(f"gate threshold {info['threshold']:.3f} ({info['quantile']:.1%} of {info['n_val']} validation "
               f"images, statistics from {info['n_train']} training images); bundle written to {out}")
    synthetic = info["synthetic_non_xrays"]
    typer.echo(f"refuses {synthetic['refused']} of {synthetic['n']} synthetic documents and screenshots")
    if synthetic["refused"] < synthetic["target"] * synthetic["n"]:
        typer.echo(f"warning: this gate refuses fewer than {synthetic['target']:.0%} of the synthetic "
                   "non-X-rays; this network's features do not separate them from X-rays (run "
                   "bench/gate.py for the full measurement)", err=True)


@app.command()
def predict(
    paths: Annotated[list[Path], typer.Argument(help="Image files and/or folders.")],
    model: ModelOption = None,
    csv_out: Annotated[Optional[Path], typer.Option("--csv", help="Write results to this CSV.")] = None,
    batch_size: int = 32,
    operating_point: OperatingPointOption = None,
    threshold: Annotated[Optional[float], typer.Option(help="Explicit threshold on P(pneumonia); overrides --operating-point.")] = None,
    tta: TtaOption = False,
    backend: BackendOption = "auto",
) -> None:
    """Predict images; exit status 1 if any file could not be read."""
    from pneumoscan.data import collect_image_paths
    from pneumoscan.inference import Predictor

    files = collect_image_paths(paths)
    if not files:
        _fail("no .jpeg/.jpg/.png images found in the given path(s)")
    predictor = Predictor.from_bundle(model, tta=tta, backend=backend)
    threshold, _ = predictor.threshold_for(operating_point, threshold)
    outcomes = predictor.predict_paths(files, batch_size=batch_size, threshold=threshold)
    if csv_out is not None:
        with csv_out.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(("path", "label", "probability_pneumonia", "threshold"))
            for o in outcomes:
                if o.error is None:
                    writer.writerow((o.path, o.label, f"{o.probability:.6f}", f"{threshold:.6f}"))
        typer.echo(f"{sum(o.error is None for o in outcomes)} prediction(s) written to {csv_out}")
    else:
        width = max(len(o.path) for o in outcomes)
        typer.echo(f"{'path':<{width}}  {'label':<9}  p(pneumonia)  threshold")
        for o in outcomes:
            if o.error is None:
                typer.echo(f"{o.path:<{width}}  {o.label:<9}  {o.probability:>12.4f}  {threshold:.4f}")
    failed = [o for o in outcomes if o.error is not None]
    for o in failed:
        typer.echo(f"error: {o.error}", err=True)
    if failed:
        typer.echo(f"{len(failed)} of {len(outcomes)} file(s) could not be read", err=True)
        raise typer.Exit(1)


@app.command()
def explain(
    images: Annotated[list[Path], typer.Argument(help="Image files and/or folders.")],
    out: Annotated[Path, typer.Option(help="Folder for the overlays (IMAGE.gradcam.png).")],
    model: ModelOption = None,
    opacity: Annotated[float, typer.Option(help="Heatmap opacity over the X-ray, 0-1.")] = 0.4,
) -> None:
    """Grad-CAM overlays of the PNEUMONIA class, with the share of the heatmap on the chest."""
    from pneumoscan.data import collect_image_paths, load_image
    from pneumoscan.explain import overlay
    from pneumoscan.inference import Predictor

    if not 0.0 <= opacity <= 1.0:
        _fail(f"--opacity must be between 0 and 1, got {opacity}")
    files = collect_image_paths(images)
    if not files:
        _fail("no .jpeg/.jpg/.png images found in the given path(s)")
    predictor = Predictor.from_bundle(model)
    out.mkdir(parents=True, exist_ok=True)
    failed = 0
    for path in files:
        try:
            image = load_image(path)
        except PneumoscanError as exc:
            typer.echo(f"error: {exc}", err=True)
            failed += 1
            continue
        prediction = predictor.predict_images([image])[0]
        explanation = predictor.explain(image)
        target = out / f"{path.stem}.gradcam.png"
        overlay(image, explanation.cam, opacity=opacity).save(target)
        warning = "  WARNING: heatmap mostly outside the chest" if explanation.shortcut_warning else ""
        typer.echo(f"{path}: {prediction.label} p={prediction.probability_pneumonia:.3f}, "
                   f"{explanation.central_share:.0%} of the heatmap on the chest -> {target}{warning}")
    if failed:
        raise typer.Exit(1)


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
        from pneumoscan.evaluation import split_samples
        from pneumoscan.inference import read_bundle_pixels
        from pneumoscan.models import default_bundle_path, read_spec

        bundle = model or default_bundle_path()
        spec = read_spec(bundle)
        real = [read_bundle_pixels(spec, s.path) for s in split_samples(bundle, data)[:32]]
    info = export_bundle_onnx(model, out, real_images=real)
    checks = ", ".join(f"{name} {value:.1e}" for name, value in info["parity_max_abs_diff"].items())
    typer.echo(f"model.onnx written (opset {info['opset']}); largest probability difference from PyTorch: "
               f"{checks} (limit {PARITY_TOLERANCE:.0e})")


@app.command()
def serve(
    model: Annotated[Optional[Path], typer.Option(
        "--model", envvar="PNEUMOSCAN_MODEL_DIR", help="Model bundle directory (default: the bundled model).")] = None,
    host: Annotated[str, typer.Option(envvar="PNEUMOSCAN_HOST")] = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar="PNEUMOSCAN_PORT")] = 8000,
    workers: Annotated[Optional[int], typer.Option(
        envvar="PNEUMOSCAN_WORKERS", help="gunicorn worker processes (default: one per core, at most 4).")] = None,
    threads: Annotated[int, typer.Option(envvar="PNEUMOSCAN_THREADS", help="Threads per worker.")] = 4,
    timeout: Annotated[int, typer.Option(envvar="PNEUMOSCAN_TIMEOUT", help="Seconds before a stuck worker is restarted.")] = 120,
    request_timeout: Annotated[Optional[float], typer.Option(
        help="Seconds to receive a request's body before answering 408 (default 30; env PNEUMOSCAN_REQUEST_TIMEOUT).")] = None,
    max_upload_mb: Annotated[Optional[int], typer.Option(
        help="Largest request body in MB (default 20; env PNEUMOSCAN_MAX_CONTENT_LENGTH in bytes).")] = None,
    max_files: Annotated[Optional[int], typer.Option(
        help="Most files per request (default 32; env PNEUMOSCAN_MAX_FILES).")] = None,
    audit_log: Annotated[Optional[Path], typer.Option(
        help="Append a JSON-lines audit record per image to this file (off by default; env PNEUMOSCAN_AUDIT_LOG).")] = None,
    backend: BackendOption = "auto",
    allow_torch_fallback: Annotated[bool, typer.Option(
        "--allow-torch-fallback", envvar="PNEUMOSCAN_ALLOW_TORCH_FALLBACK",
        help="Serve with PyTorch (and a warning) when the bundle's ONNX model is tampered or unusable.")] = False,
) -> None:
    """Serve the web app and JSON API with gunicorn (never the Flask debug server)."""
    from pneumoscan.web.server import run_gunicorn

    settings = {"MAX_CONTENT_LENGTH": max_upload_mb * 1024 * 1024 if max_upload_mb is not None else None,
                "MAX_FILES": max_files, "AUDIT_LOG": str(audit_log) if audit_log else None,
                "REQUEST_TIMEOUT": request_timeout,
                "BACKEND": backend, "ALLOW_TORCH_FALLBACK": "true" if allow_torch_fallback else "false"}
    run_gunicorn(model_dir=model, host=host, port=port, workers=workers, threads=threads, timeout=timeout,
                 settings={key: value for key, value in settings.items() if value is not None})


@app.command()
def backbones() -> None:
    """List the registered backbones."""
    from pneumoscan.models import backbone_info, list_backbones

    for name in list_backbones():
        typer.echo(f"{name:<20} {backbone_info(name).description}")


def main() -> None:
    """Console entry point: run the CLI, turning user errors into one-line messages."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    package_log = logging.getLogger("pneumoscan")
    package_log.addHandler(handler)
    package_log.setLevel(logging.INFO)
    try:
        app()
    except PneumoscanError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
