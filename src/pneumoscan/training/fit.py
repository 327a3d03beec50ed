"""Build, ``Trainer.fit``, then export a model bundle chosen and thresholded on validation."""

from __future__ import annotations

import contextlib
import logging
import platform
import re
import signal
import threading
import time
import warnings
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EarlyStopping, EMAWeightAveraging, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException

from pneumoscan.calibration import calibrate_on_validation
from pneumoscan.data import CLASS_NAMES, class_counts, describe_dataset
from pneumoscan.errors import ConfigError, TrainingInterrupted
from pneumoscan.models import BundleSpec, PixelNetwork, backbone_info, create_classifier, save_bundle
from pneumoscan.plots import pyplot, training_curves_figure
from pneumoscan.progress import shows_progress
from pneumoscan.spec import Provenance
from pneumoscan.training.callbacks import EpochProgressBar, StagedFinetuning
from pneumoscan.training.config import TrainConfig
from pneumoscan.training.checkpointing import AtomicCheckpointIO
from pneumoscan.training.datamodule import ChestXrayDataModule
from pneumoscan.training.module import DistillationClassifier, PneumoniaClassifier

log = logging.getLogger(__name__)

def _devices(value: str) -> int | str:
    return int(value) if value.isdigit() else value


def train(config: TrainConfig, *, quiet: bool = False, report: Callable[[str], None] | None = None) -> Path | None:
    """Train, select the best epoch on validation loss, calibrate and pick the thresholds on
    validation, write ``OUT/bundle`` (the network only: :func:`pneumoscan.pipeline.train_bundle`
    adds the gate and the ONNX graph).

    Lightning's rich progress bar is drawn on stderr when it is a terminal, unless ``quiet``.
    ``report`` gets the split's sizes and any warning, a line each (default: the log). Below
    ``config.min_validation_per_class`` validation images of a class no temperature is fitted, and the bundle
    records ``few_validation_images``.

    Returns the bundle directory (``OUT/bundle``) on the main process, None on other DDP ranks.
    A run killed mid-way continues from ``OUT/checkpoints/last.ckpt`` with ``resume=True``.
    """
    say = report or log.info
    config.validate()
    backbone_info(config.backbone)  # an unknown name fails before any data is read
    pl.seed_everything(config.seed, workers=True, verbose=False)
    info = backbone_info(config.backbone)
    out = config.out
    checkpoint_dir = out / "checkpoints"
    last_ckpt = checkpoint_dir / "last.ckpt"
    if config.resume and not last_ckpt.is_file():
        raise ConfigError(f"--resume: no checkpoint at {last_ckpt} to resume from")
    if not config.resume and last_ckpt.is_file():
        raise ConfigError(f"{out} already holds a training run; pass --resume to continue it, "
                          "or choose another --out")

    datamodule = ChestXrayDataModule.from_config(config)
    datamodule.setup("fit")
    val_counts = dict(zip(CLASS_NAMES, class_counts(datamodule.split.val)))
    few = min(val_counts.values()) < config.min_validation_per_class
    if few:
        say(f"warning: validation holds {', '.join(f'{k} {v}' for k, v in val_counts.items())}, fewer than "
            f"{config.min_validation_per_class} of a class: no temperature will be fitted on so few"
            f"{', the input gate limit is cross-fitted over all the films' if config.gate else ''}, and the card says "
            "its figures rest on them (add films or raise --val-fraction)")
    say(f"  {sum(class_counts(datamodule.split.train))} training films, {sum(val_counts.values())} validation "
        f"films ({', '.join(f'{k} {v}' for k, v in val_counts.items())})")
    net = create_classifier(config.backbone, weights=config.weights, head=config.head,
                            input_size=config.input_size, dropout=config.dropout)
    balance_weights = datamodule.class_weights() if config.class_balance != "none" else None
    common = dict(mean=info.mean, std=info.std, lr=config.lr, weight_decay=config.weight_decay,
                  class_weights=balance_weights if config.class_balance == "weights" else None,
                  val_class_weights=balance_weights, label_smoothing=config.label_smoothing)
    if config.teacher is not None:
        teacher, teacher_spec = _teacher(config)
        say(f"  distilling {teacher_spec.name} ({config.distill_weight:.0%} soft targets at temperature "
            f"{config.distill_temperature:g})")
        module: PneumoniaClassifier = DistillationClassifier(
            net, teacher=teacher, teacher_mean=tuple(teacher_spec.mean), teacher_std=tuple(teacher_spec.std),
            distill_weight=config.distill_weight, distill_temperature=config.distill_temperature, **common)
    else:
        module = PneumoniaClassifier(net, **common)

    best = ModelCheckpoint(dirpath=checkpoint_dir, filename="best-{epoch}", monitor="val_loss",
                           mode="min", save_top_k=1)
    # Lightning's save_last only writes when the best checkpoint changes; a resumable run needs
    # last.ckpt after every epoch, so a second, unmonitored checkpoint keeps it (and, when asked,
    # epoch=N.ckpt for every epoch as well: snapshot ensembles, per-epoch analysis; ~40 MB each
    # for Lite0). Its save_last writes every epoch because it monitors nothing.
    if config.keep_epoch_checkpoints:
        latest = ModelCheckpoint(dirpath=checkpoint_dir, filename="{epoch}", monitor=None,
                                 save_top_k=-1, save_last=True)
    else:
        latest = ModelCheckpoint(dirpath=checkpoint_dir, filename="last", monitor=None, save_top_k=1,
                                 enable_version_counter=False)
    callbacks: list[pl.Callback] = [
        best,
        latest,
        EarlyStopping(monitor="val_loss", mode="min", patience=config.patience),
        LearningRateMonitor(logging_interval="epoch"),
        _StopOnSignal(),
    ]
    if config.ema_decay is not None:
        # Validation, early stopping and every checkpoint's state_dict see the averaged weights, so
        # the best epoch is chosen, and exported, as the average; the raw weights keep training
        # (saved beside it for --resume).
        callbacks.append(EMAWeightAveraging(decay=config.ema_decay))
    show_progress = shows_progress(quiet)
    if show_progress:
        callbacks.append(EpochProgressBar(console_kwargs={"stderr": True}))
    if config.weights != "none" or config.frozen_epochs > 0:
        callbacks.append(StagedFinetuning(unfreeze_at_epoch=config.frozen_epochs,
                                          blocks=config.finetune_blocks,
                                          lr_factor=config.finetune_lr_factor))
    with _quiet_lightning():  # its hardware lines and tips print when the Trainer is built
        trainer = _trainer(config, callbacks, out, show_progress)
    if trainer.world_size > 1 and trainer.is_global_zero:
        say(f"  {trainer.world_size} processes ({config.strategy}) on {config.accelerator}")
    started = time.perf_counter()
    with _interruptible(trainer, last_ckpt), _quiet_lightning():
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(last_ckpt) if config.resume else None)
    fit_seconds = time.perf_counter() - started
    if not trainer.is_global_zero:
        return None
    return export_bundle(config, datamodule, module, best.best_model_path or str(last_ckpt),
                         fit_seconds=fit_seconds, few_validation=few)


def _teacher(config: TrainConfig):
    """The teacher bundle's network (its log-odds, uncalibrated) and spec, checked to read the
    student's input: the same pixels go to both.

    Raises:
        ConfigError: the teacher's input size or equalisation differs from the student's.
        BundleError: the teacher bundle cannot be loaded.
    """
    from pneumoscan.models import load_bundle

    teacher, spec = load_bundle(config.teacher, check_onnx=False)
    if spec.input_size != config.input_size or bool(spec.equalize) != bool(config.equalize):
        raise ConfigError(f"the teacher {config.teacher} reads {spec.input_size}x{spec.input_size} pixels"
                          f"{' equalised' if spec.equalize else ''}; give the student the same "
                          f"(--input-size {spec.input_size}{', --equalize' if spec.equalize else ''})")
    return teacher, spec


def _teacher_record(config: TrainConfig) -> dict:
    """What the student's provenance (and so its card) says of its teacher."""
    if config.teacher is None:
        return {}
    from pneumoscan.integrity import bundle_digest, read_spec

    return {"teacher_bundle_sha256": bundle_digest(config.teacher), "teacher_name": read_spec(config.teacher).name}


def _trainer(config: TrainConfig, callbacks: list, out: Path, show_progress: bool) -> pl.Trainer:
    return pl.Trainer(
        default_root_dir=out, max_epochs=config.epochs, accelerator=config.accelerator,
        devices=_devices(config.devices), num_nodes=config.num_nodes, strategy=config.strategy,
        precision=config.precision, callbacks=callbacks, logger=CSVLogger(out, name="logs"),
        deterministic=False, log_every_n_steps=10, limit_train_batches=config.train_batches,
        enable_model_summary=False, enable_progress_bar=show_progress, plugins=[AtomicCheckpointIO()])


#: Lightning's messages that say nothing to someone training a model (hardware lines, a cloud
#: logging advert, our own deliberate datamodule/module split, small-batch logging advice).
_NOISE = ("isinstance(treespec, LeafSpec)", "You have overridden `on_after_batch_transfer`",
          "The number of training batches", "The number of validation batches")


@contextlib.contextmanager
def _quiet_lightning():
    """Lightning's info lines and known warnings off for the fit; real warnings still show."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric", "lightning")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    with warnings.catch_warnings():
        for text in _NOISE:
            warnings.filterwarnings("ignore", message=f".*{re.escape(text)}")
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)


class _StopSignal(BaseException):
    """SIGINT or SIGTERM during fit. Not a KeyboardInterrupt, which Lightning turns into exit status 1."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class _StopOnSignal(pl.Callback):
    """Raises _StopSignal at the next training batch's start once SIGINT or SIGTERM has arrived.

    The handlers only set a flag: an exception raised from a signal handler lands wherever the
    main thread happens to be, and inside ``torch.save`` that breaks the checkpoint being written
    ("enforce fail at inline_container.cc ... unexpected pos", exit 1 instead of 130). Only the
    start of a training batch is a safe place to stop: a checkpoint taken after an epoch's last
    batch, or in the middle of validation, resumes into an epoch end without ``val_loss``
    (Lightning: "Early stopping conditioned on metric `val_loss` which is not available"). So a
    signal during validation stops the run at the next epoch's first batch, or after the fit.
    On one process SIGTERM is taken from Lightning for the same reason; with several (DDP) it
    stays Lightning's, which stops every rank together.
    """

    def __init__(self) -> None:
        self.received: int | None = None

    def flag(self, signum, frame) -> None:
        self.received = signum

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after Lightning's signal connector has installed its own handler (after on_fit_start)
        if trainer.world_size == 1 and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self.flag)

    def on_train_batch_start(self, *args) -> None:
        if self.received is not None:
            raise _StopSignal(self.received)


@contextlib.contextmanager
def _interruptible(trainer: pl.Trainer, last_ckpt: Path):
    """SIGTERM or SIGINT (through _StopOnSignal; SIGTERM through Lightning under DDP): save a
    resumable checkpoint at ``last_ckpt``, then raise TrainingInterrupted with the exit status a
    scheduler expects."""
    stopper = next((c for c in trainer.callbacks if isinstance(c, _StopOnSignal)), None)

    def on_sigint(signum, frame):
        if stopper is None:
            raise _StopSignal(signum)
        stopper.flag(signum, frame)

    main = threading.current_thread() is threading.main_thread()
    previous = (signal.signal(signal.SIGINT, on_sigint), signal.getsignal(signal.SIGTERM)) if main else None
    finished = False
    try:
        yield
        if stopper is not None and stopper.received is not None:  # it came after the last batch: still a stop
            finished = True
            raise _StopSignal(stopper.received)
    except (SIGTERMException, _StopSignal) as exc:
        sigterm = isinstance(exc, SIGTERMException) or exc.signum == signal.SIGTERM
        if not finished:  # a finished fit's last.ckpt, written at its last epoch's end, already resumes
            trainer.save_checkpoint(str(last_ckpt))  # at a batch's start: the loops' progress is in it
        raise TrainingInterrupted(
            f"training stopped by {'SIGTERM' if sigterm else 'SIGINT'}; a resumable checkpoint is at {last_ckpt} "
            "(run the same command with --resume)", exit_code=143 if sigterm else 130) from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous[0])
            signal.signal(signal.SIGTERM, previous[1])


def export_bundle(config: TrainConfig, datamodule: ChestXrayDataModule, module: PneumoniaClassifier,
                  checkpoint: str, *, fit_seconds: float, few_validation: bool = False) -> Path:
    """Load the best checkpoint, choose the threshold on validation, write ``OUT/bundle``."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    module.load_state_dict(state)
    net = module.net.cpu().eval()
    if config.half_bundle:
        # The bundle stores fp16; pick the threshold on exactly the weights serving will load.
        net.half().float()
    info = backbone_info(config.backbone)
    assert datamodule.val_set is not None and datamodule.split is not None
    network = PixelNetwork(net, info.mean, info.std).eval()
    y_true, log_odds = [], []
    with torch.inference_mode():
        for pixels, labels in datamodule.val_dataloader():
            log_odds.extend(network(pixels)[0].tolist())
            y_true.extend(labels.tolist())
    calibration = calibrate_on_validation(y_true, log_odds, fit_scale=not few_validation)
    val_metrics = calibration.validation_metrics(
        n_by_class=dict(zip(CLASS_NAMES, class_counts(datamodule.split.val))))

    config.out.mkdir(parents=True, exist_ok=True)
    split_csv = config.out / "split.csv"
    split_sha = datamodule.split.write_manifest(split_csv, config.data)
    # A resumed run logs into a new logs/version_N; the curves join them all.
    metrics_csvs = sorted((config.out / "logs").glob("version_*/metrics.csv"),
                          key=lambda p: int(p.parent.name.split("_")[1]))
    if metrics_csvs:
        fig = training_curves_figure(metrics_csvs)
        fig.savefig(config.out / "curves.png")
        pyplot().close(fig)
    spec = BundleSpec(
        backbone=config.backbone, head=config.head, input_size=config.input_size, equalize=config.equalize,
        mean=info.mean, std=info.std, class_names=CLASS_NAMES, dropout=config.dropout,
        decision=calibration.decision, cam_layer=net.cam_layer,
        name=f"{config.backbone}-res{config.input_size}-chest_xray-{datetime.now(timezone.utc):%Y%m%d}",
        val_metrics=val_metrics,
        provenance=Provenance(
            training={**config.as_json(), "best_checkpoint": Path(checkpoint).name,
                      "fit_seconds": round(fit_seconds, 1),
                      "train_counts": class_counts(datamodule.split.train),
                      "dataset": describe_dataset(config.data, datamodule.split),
                      "few_validation_images": few_validation, **_teacher_record(config)},
            split_manifest_sha256=split_sha, versions=_versions(),
            created=datetime.now(timezone.utc).isoformat(timespec="seconds")),
    )
    bundle_dir = config.out / "bundle"
    save_bundle(net, spec, bundle_dir, half=config.half_bundle, extra_files={"split.csv": split_csv})
    log.debug("bundle written to %s (val AUC %.4f, temperature %.3f, threshold %.4f)", bundle_dir,
             val_metrics["roc_auc"], calibration.temperature, calibration.decision.threshold)
    return bundle_dir


def _versions() -> dict[str, str]:
    import lightning
    import torchvision

    from pneumoscan import __version__

    return {"pneumoscan": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "lightning": lightning.__version__, "python": platform.python_version()}
