"""Every choice of a training run, with its default and its help text: the one place for both.

``pneumoscan train`` builds its options from these dataclasses (see :func:`cli_options`), the
datamodule and callbacks take their values from a :class:`TrainConfig`, and the bundle records
``TrainConfig.as_json()`` as its training provenance. No torch or Lightning here, so the CLI can
read it without starting either.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from pneumoscan.data import MIN_IMAGES_PER_CLASS
from pneumoscan.errors import ConfigError

CLASS_BALANCE_CHOICES = ("weights", "sampling", "none")


def option(default: Any = dataclasses.MISSING, help: str = "", *, flags: tuple[str, ...] = (),
           default_factory: Any = dataclasses.MISSING, distill_only: bool = False) -> Any:
    """A dataclass field that is also a ``pneumoscan train`` option (``flags`` replace the
    field-derived ``--name``); ``distill_only``: an option of ``pneumoscan distill`` alone."""
    metadata = {"help": help, "flags": flags, "distill_only": distill_only}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Augmentation:
    """The seed's training augmentation; every part can be switched off or resized."""

    rotation_degrees: float = option(30.0, "Augmentation: max rotation in degrees.", flags=("--rotation",))
    translate: float = option(0.2, "Augmentation: max shift as a fraction.")
    scale_min: float = option(0.8, "Augmentation: smallest zoom factor.")
    scale_max: float = option(1.2, "Augmentation: largest zoom factor.")
    shear_degrees: float = option(10.0, "Augmentation: max shear in degrees.", flags=("--shear",))
    brightness: float = option(0.2, "Augmentation: brightness jitter factor (0 = off).")
    horizontal_flip: bool = option(True, "Augmentation: mirror half the images.", flags=("--hflip/--no-hflip",))
    # Beyond the seed: exposure and sharpness differ between X-ray machines and copies.
    contrast: float = option(0.0, "Augmentation: contrast jitter factor (0 = off).")
    blur_sigma: float = option(0.0, "Augmentation: Gaussian blur up to this sigma on half the images (0 = off).")

    @classmethod
    def none(cls) -> "Augmentation":
        """No augmentation at all."""
        return cls(0.0, 0.0, 1.0, 1.0, 0.0, 0.0, False, 0.0, 0.0)


@dataclass(frozen=True)
class TrainConfig:
    """Every choice of a training run; saved into the bundle as its training provenance."""

    data: Path = option(help="Kaggle-layout root holding train/ (and val/).")
    out: Path = option(help="Run directory: checkpoints, logs, curves, bundle/.")
    backbone: str = option("efficientnet_lite0", "Backbone name (see 'pneumoscan backbones').")
    weights: str = option("imagenet", "imagenet, none (random init) or a path to a weights file.")
    head: str = option("pool", "seed (Flatten-512-128-2) or pool (GAP-dropout-2).")
    input_size: int = option(224, "Square input size in pixels.")
    equalize: bool = option(False, "Histogram-equalise every image after the square resize; the bundle "
                                   "records it, so serving does the same.", flags=("--equalize",))
    dropout: float = option(0.5, "Dropout before the head's last layer.")
    epochs: int = option(5, "Maximum epochs (early stopping may end sooner).")
    frozen_epochs: int = option(1, "Epochs with the whole backbone frozen.")
    finetune_blocks: int = option(5, "Backbone blocks unfrozen after the frozen epochs.")
    lr: float = option(1e-3, "Learning rate of the head.")
    finetune_lr_factor: float = option(0.3, "LR multiplier for unfrozen blocks.")
    weight_decay: float = option(1e-4, "AdamW weight decay.")
    batch_size: int = option(16, "Images per training step (16 is fastest on a small CPU).")
    val_fraction: float = option(0.1, "Share of patients carved from train for validation.")
    seed: int = option(0, "Seed of initialisation and augmentation (and of the split unless --split-seed).")
    split_seed: int | None = option(None, "Seed of the carved validation split (default: --seed); fix it "
                                          "to compare runs on one split.")
    patience: int = option(3, "Early-stopping patience on validation loss.")
    augmentation: Augmentation = option(default_factory=Augmentation)
    class_balance: str = option("weights", "Class balancing: weights (inverse-frequency loss weights), "
                                           "sampling (each class drawn equally often) or none.")
    label_smoothing: float = option(0.0, "Label smoothing of the training loss (validation loss stays plain).")
    ema_decay: float | None = option(None, "Keep an exponential moving average of the weights with this "
                                           "per-step decay (e.g. 0.997); validation, checkpoints and the "
                                           "bundle use the average. Default: off.")
    keep_epoch_checkpoints: bool = option(False, "Also keep OUT/checkpoints/epoch=N.ckpt for every epoch "
                                                 "(e.g. for snapshot ensembles).", flags=("--keep-epoch-checkpoints",))
    num_workers: int = option(0, "DataLoader worker processes.")
    accelerator: str = option("auto", "Lightning accelerator: auto, cpu, gpu...")
    devices: str = option("auto", "Lightning devices: auto, a count, or ids.")
    num_nodes: int = option(1, "Lightning nodes.")
    strategy: str = option("auto", "Lightning strategy, e.g. ddp.")
    precision: str = option("32-true", "Lightning precision, e.g. 32-true or bf16-mixed.")
    resume: bool = option(False, "Continue from OUT/checkpoints/last.ckpt.", flags=("--resume",))
    half_bundle: bool = option(True, "Store the bundle's weights in fp16 (--fp32-bundle: float32).",
                               flags=("--fp16-bundle/--fp32-bundle",))
    limit_train_batches: float = option(1.0, "Fraction (<=1) or number (>1) of train batches per epoch.")
    min_validation_per_class: int = option(MIN_IMAGES_PER_CLASS, "Validation films a class needs before a temperature and a gate "
                                               "limit are fitted on them (below it: a warning, neither is fitted).")
    gate: bool = option(True, "Fit the input gate on the run's own training films (--no-gate: the bundle "
                              "refuses nothing far from them, and says so everywhere).", flags=("--gate/--no-gate",))
    export: bool = option(True, "Export the bundle to ONNX, checked against PyTorch (--no-export: it then "
                                "runs only where PyTorch is installed).", flags=("--export/--no-export",))
    teacher: Path | None = option(None, "The bundle whose temperature-softened log-odds the student learns "
                                        "(an ensemble, say).", distill_only=True)
    distill_weight: float = option(0.7, "Share of the loss from the teacher's soft targets; the rest is the "
                                        "hard labels' cross-entropy.", distill_only=True)
    distill_temperature: float = option(2.0, "Temperature that softens teacher and student log-odds in the "
                                             "distillation loss.", distill_only=True)
    population: str | None = option(None, "Who the training films come from (ages, views, centres, "
                                           "scanners), for the model card; default: 'not described'.")

    def validate(self) -> None:
        """Raises ConfigError on values that cannot work."""
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
            (self.limit_train_batches > 0,
             f"--limit-train-batches must be positive, got {self.limit_train_batches}"),
            (0 <= self.distill_weight <= 1, f"--distill-weight must be in [0, 1], got {self.distill_weight}"),
            (self.distill_temperature > 0,
             f"--distill-temperature must be positive, got {self.distill_temperature}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    @property
    def train_batches(self) -> int | float:
        """``limit_train_batches`` as Lightning reads it: a count above 1, a fraction up to 1."""
        return int(self.limit_train_batches) if self.limit_train_batches > 1 else self.limit_train_batches

    def as_json(self) -> dict[str, Any]:
        """JSON-safe dict (paths as strings)."""
        raw = dataclasses.asdict(self)
        return json.loads(json.dumps(raw, default=str))


@dataclass(frozen=True)
class CliOption:
    """One ``pneumoscan train`` option, derived from a field."""

    name: str  # the keyword the command receives
    path: tuple[str, ...]  # where the value goes: ("lr",) or ("augmentation", "rotation_degrees")
    type: Any
    default: Any  # dataclasses.MISSING for a required option
    help: str
    flags: tuple[str, ...]
    distill_only: bool = False


def cli_options(cls: type = TrainConfig, prefix: tuple[str, ...] = ()) -> Iterator[CliOption]:
    """Every leaf field of ``cls`` (nested dataclasses flattened) as a :class:`CliOption`."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            yield from cli_options(kind, prefix + (f.name,))
            continue
        yield CliOption(name=f.name, path=prefix + (f.name,), type=kind, default=f.default,
                        help=f.metadata.get("help", ""), flags=f.metadata.get("flags", ()),
                        distill_only=f.metadata.get("distill_only", False))


def from_cli(values: dict[str, Any]) -> TrainConfig:
    """A :class:`TrainConfig` from option values keyed by :attr:`CliOption.name`."""
    nested: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    for opt in cli_options():
        if opt.name not in values:
            continue
        if len(opt.path) == 2:
            nested.setdefault(opt.path[0], {})[opt.path[1]] = values[opt.name]
        else:
            top[opt.name] = values[opt.name]
    hints = typing.get_type_hints(TrainConfig)
    for key, kwargs in nested.items():
        top[key] = hints[key](**kwargs)
    return TrainConfig(**top)
