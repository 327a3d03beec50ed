"""Build, ``Trainer.fit``, then export a model bundle chosen and thresholded on validation."""

from __future__ import annotations

import dataclasses
import json
import logging
import platform
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import (EarlyStopping, EMAWeightAveraging, LearningRateMonitor,
                                         ModelCheckpoint)
from lightning.pytorch.loggers import CSVLogger

from pneumoscan.data import CLASS_NAMES, Augmentation, class_counts, normalize
from pneumoscan.errors import ConfigError
from pneumoscan.evaluation import calibrate_on_validation, training_curves_figure
from pneumoscan.models import BundleSpec, backbone_info, create_classifier, save_bundle
from pneumoscan.training.callbacks import StagedFinetuning
from pneumoscan.training.checkpointing import AtomicCheckpointIO
from pneumoscan.training.datamodule import ChestXrayDataModule
from pneumoscan.training.module import PneumoniaClassifier

log = logging.getLogger(__name__)

CLASS_BALANCE_CHOICES = ("weights", "sampling", "none")


@dataclass(frozen=True)
class TrainConfig:
    """Every choice of a training run; saved into the bundle as ``training``."""

    data: Path
    out: Path
    backbone: str = "efficientnet_lite0"
    weights: str = "imagenet"
    head: str = "pool"
    input_size: int = 224
    equalize: bool = False  # histogram-equalise every image after the resize (serving too)
    dropout: float = 0.5
    epochs: int = 5
    frozen_epochs: int = 1
    finetune_blocks: int = 5
    lr: float = 1e-3
    finetune_lr_factor: float = 0.3
    weight_decay: float = 1e-4
    batch_size: int = 16
    val_fraction: float = 0.1
    seed: int = 0
    split_seed: int | None = None  # seed of the carved validation split; None = seed
    patience: int = 3
    augmentation: Augmentation = field(default_factory=Augmentation)
    class_balance: str = "weights"  # weights (loss), sampling (equal draws) or none
    label_smoothing: float = 0.0  # of the training loss only
    ema_decay: float | None = None  # per-step decay of an exponential moving average of the weights
    keep_epoch_checkpoints: bool = False  # also keep checkpoints/epoch=N.ckpt for every epoch
    num_workers: int = 0
    accelerator: str = "auto"
    devices: str = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    resume: bool = False
    half_bundle: bool = True
    limit_train_batches: float = 1.0  # a fraction or a count, for quick smoke runs

    def validate(self) -> None:
        """Raises ConfigError on values that cannot work."""
        backbone_info(self.backbone)
        checks = [
            (self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}"),
            (0 <= self.frozen_epochs, f"--frozen-epochs must be >= 0, got {self.frozen_epochs}"),
            (self.finetune_blocks >= 0, f"--finetune-blocks must be >= 0, got {self.finetune_blocks}"),
            (self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}"),
            (self.lr > 0, f"--lr must be positive, got {self.lr}"),
            (0 < self.val_fraction < 1, f"--val-fraction must be in (0, 1), got {self.val_fraction}"),
            (0 <= self.dropout < 1, f"--dropout must be in [0, 1), got {self.dropout}"),
            (self.class_balance in CLASS_BALANCE_CHOICES,
             f"--class-balance must be one of {', '.join(CLASS_BALANCE_CHOICES)}, "
             f"got {self.class_balance!r}"),
            (0 <= self.label_smoothing < 1,
             f"--label-smoothing must be in [0, 1), got {self.label_smoothing}"),
            (self.ema_decay is None or 0 < self.ema_decay < 1,
             f"--ema-decay must be in (0, 1), got {self.ema_decay}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def as_json(self) -> dict[str, Any]:
        """JSON-safe dict (paths as strings)."""
        raw = dataclasses.asdict(self)
        return json.loads(json.dumps(raw, default=str))


def _devices(value: str) -> int | str:
    return int(value) if value.isdigit() else value


def train(config: TrainConfig) -> Path | None:
    """Train, select the best epoch on validation loss, pick the threshold, write the bundle.

    Returns the bundle directory (``OUT/bundle``) on the main process, None on other DDP ranks.
    A run killed mid-way continues from ``OUT/checkpoints/last.ckpt`` with ``resume=True``.
    """
    config.validate()
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

    datamodule = ChestXrayDataModule(
        config.data, input_size=config.input_size, augmentation=config.augmentation,
        batch_size=config.batch_size, num_workers=config.num_workers,
        val_fraction=config.val_fraction, seed=config.seed, split_seed=config.split_seed,
        balanced_sampling=config.class_balance == "sampling", equalize=config.equalize)
    datamodule.setup("fit")
    net = create_classifier(config.backbone, weights=config.weights, head=config.head,
                            input_size=config.input_size, dropout=config.dropout)
    balance_weights = datamodule.class_weights() if config.class_balance != "none" else None
    module = PneumoniaClassifier(
        net, mean=info.mean, std=info.std, lr=config.lr, weight_decay=config.weight_decay,
        class_weights=balance_weights if config.class_balance == "weights" else None,
        val_class_weights=balance_weights, label_smoothing=config.label_smoothing)

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
    ]
    if config.ema_decay is not None:
        # Validation, early stopping and every checkpoint's state_dict see the averaged weights, so
        # the best epoch is chosen, and exported, as the average; the raw weights keep training
        # (saved beside it for --resume).
        callbacks.append(EMAWeightAveraging(decay=config.ema_decay))
    if config.weights != "none" or config.frozen_epochs > 0:
        callbacks.append(StagedFinetuning(unfreeze_at_epoch=config.frozen_epochs,
                                          blocks=config.finetune_blocks,
                                          lr_factor=config.finetune_lr_factor))
    trainer = pl.Trainer(
        default_root_dir=out, max_epochs=config.epochs, accelerator=config.accelerator,
        devices=_devices(config.devices), num_nodes=config.num_nodes, strategy=config.strategy,
        precision=config.precision, callbacks=callbacks, logger=CSVLogger(out, name="logs"),
        deterministic=False, log_every_n_steps=10, limit_train_batches=config.limit_train_batches,
        enable_model_summary=False, plugins=[AtomicCheckpointIO()])
    started = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(last_ckpt) if config.resume else None)
    fit_seconds = time.perf_counter() - started
    if not trainer.is_global_zero:
        return None
    return export_bundle(config, datamodule, module, best.best_model_path or str(last_ckpt),
                         fit_seconds=fit_seconds)


def export_bundle(config: TrainConfig, datamodule: ChestXrayDataModule, module: PneumoniaClassifier,
                  checkpoint: str, *, fit_seconds: float) -> Path:
    """Load the best checkpoint, choose the threshold on validation, write ``OUT/bundle``."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    module.load_state_dict(state)
    net = module.net.cpu().eval()
    if config.half_bundle:
        # The bundle stores fp16; pick the threshold on exactly the weights serving will load.
        net.half().float()
    info = backbone_info(config.backbone)
    assert datamodule.val_set is not None and datamodule.split is not None
    y_true, log_odds = [], []
    with torch.inference_mode():
        for pixels, labels in datamodule.val_dataloader():
            logits = net(normalize(pixels, info.mean, info.std))
            log_odds.extend((logits[:, 1] - logits[:, 0]).tolist())
            y_true.extend(labels.tolist())
    calibration = calibrate_on_validation(y_true, log_odds)
    threshold = calibration.operating_points["balanced"]
    val_metrics = {**calibration.report["operating_points"]["balanced"], "n": calibration.report["n"],
                   "n_by_class": dict(zip(CLASS_NAMES, class_counts(datamodule.split.val))),
                   "calibration": calibration.report}

    config.out.mkdir(parents=True, exist_ok=True)
    split_csv = config.out / "split.csv"
    split_sha = datamodule.split.write_manifest(split_csv, config.data)
    # A resumed run logs into a new logs/version_N; the curves join them all.
    metrics_csvs = sorted((config.out / "logs").glob("version_*/metrics.csv"),
                          key=lambda p: int(p.parent.name.split("_")[1]))
    if metrics_csvs:
        fig = training_curves_figure(metrics_csvs)
        fig.savefig(config.out / "curves.png")
    spec = BundleSpec(
        backbone=config.backbone, head=config.head, input_size=config.input_size, equalize=config.equalize,
        mean=info.mean, std=info.std, class_names=CLASS_NAMES, dropout=config.dropout,
        threshold=threshold, threshold_source="validation_youden",
        temperature=calibration.temperature, calibration="temperature_scaling_on_validation",
        operating_points=calibration.operating_points, default_operating_point="balanced",
        cam_layer=net.cam_layer,
        name=f"{config.backbone}-res{config.input_size}-chest_xray-{datetime.now(timezone.utc):%Y%m%d}",
        val_metrics=val_metrics,
        training={**config.as_json(), "best_checkpoint": Path(checkpoint).name,
                  "fit_seconds": round(fit_seconds, 1),
                  "train_counts": class_counts(datamodule.split.train)},
        split_manifest_sha256=split_sha,
        versions=_versions(),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    bundle_dir = config.out / "bundle"
    save_bundle(net, spec, bundle_dir, half=config.half_bundle, extra_files={"split.csv": split_csv})
    log.info("bundle written to %s (val AUC %.4f, temperature %.3f, threshold %.4f)", bundle_dir,
             val_metrics["roc_auc"], calibration.temperature, threshold)
    return bundle_dir


def _versions() -> dict[str, str]:
    import lightning
    import torchvision

    from pneumoscan import __version__

    return {"pneumoscan": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "lightning": lightning.__version__, "python": platform.python_version()}
