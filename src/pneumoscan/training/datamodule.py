"""The LightningDataModule: which splits, which transforms (built on :mod:`pneumoscan.data`).

Its defaults are :class:`~pneumoscan.training.config.TrainConfig`'s, so a run configured in code
and one started from the CLI load the same batches.
"""

from __future__ import annotations

import logging
from pathlib import Path

from typing import Any, Callable

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Sampler, WeightedRandomSampler
from torchvision.transforms import v2

from pneumoscan.data import Split, carve_validation, class_counts, scan_split
from pneumoscan.dataset import XrayDataset
from pneumoscan.errors import DatasetError
from pneumoscan.imaging import Preprocessing
from pneumoscan.training.config import Augmentation, TrainConfig

log = logging.getLogger(__name__)

_DEFAULTS = TrainConfig.__dataclass_fields__


def _default(name: str) -> Any:
    return _DEFAULTS[name].default


def augmentation_pipeline(augmentation: Augmentation) -> Callable[[torch.Tensor], torch.Tensor]:
    """A transforms-v2 pipeline on uint8 ``1 x H x W`` tensors."""
    a = augmentation
    steps: list[torch.nn.Module] = []
    if a.rotation_degrees or a.translate or a.shear_degrees or (a.scale_min, a.scale_max) != (1.0, 1.0):
        steps.append(v2.RandomAffine(
            degrees=a.rotation_degrees,
            translate=(a.translate, a.translate) if a.translate else None,
            scale=(a.scale_min, a.scale_max),
            shear=a.shear_degrees or None,
            interpolation=v2.InterpolationMode.BILINEAR,
        ))
    if a.brightness or a.contrast:
        steps.append(v2.ColorJitter(brightness=a.brightness or None, contrast=a.contrast or None))
    if a.blur_sigma:
        steps.append(v2.RandomApply([v2.GaussianBlur(5, sigma=(0.1, a.blur_sigma))], p=0.5))
    if a.horizontal_flip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps) if steps else v2.Identity()


class ChestXrayDataModule(pl.LightningDataModule):
    """Kaggle-layout folder -> patient-grouped train/validation loaders.

    The training pool is ``train/`` plus the official ``val/`` folder when present (16 images in
    the Kaggle release: too few to select anything on), from which a patient-grouped,
    class-stratified validation split of ``val_fraction`` is carved. ``test/`` is never read here.
    """

    def __init__(self, root: str | Path, *, input_size: int = _default("input_size"),
                 augmentation: Augmentation = Augmentation(), batch_size: int = _default("batch_size"),
                 num_workers: int = _default("num_workers"), val_fraction: float = _default("val_fraction"),
                 seed: int = _default("seed"), split_seed: int | None = _default("split_seed"),
                 balanced_sampling: bool = False, equalize: bool = _default("equalize")) -> None:
        super().__init__()
        self.root = Path(root)
        self.input_size = input_size
        self.augmentation = augmentation
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_fraction = val_fraction
        self.seed = seed
        # The split has its own seed so that runs differing only in initialisation (seeds of an
        # ensemble, a seed study) can be compared on one shared validation split.
        self.split_seed = seed if split_seed is None else split_seed
        # Draw each class equally often (with replacement) instead of weighting the loss: the
        # network then sees the minority class's variety as often as the majority's.
        self.balanced_sampling = balanced_sampling
        self.equalize = equalize
        self.split: Split | None = None
        self.train_set: XrayDataset | None = None
        self.val_set: XrayDataset | None = None

    @classmethod
    def from_config(cls, config: TrainConfig) -> "ChestXrayDataModule":
        """The datamodule a training run configured by ``config`` uses."""
        return cls(config.data, input_size=config.input_size, augmentation=config.augmentation,
                   batch_size=config.batch_size, num_workers=config.num_workers,
                   val_fraction=config.val_fraction, seed=config.seed, split_seed=config.split_seed,
                   balanced_sampling=config.class_balance == "sampling", equalize=config.equalize)

    def setup(self, stage: str | None = None) -> None:
        if self.split is not None:
            return
        pool = scan_split(self.root, "train")
        try:
            pool += scan_split(self.root, "val")
        except DatasetError:
            log.info("no usable official val/ folder; validation comes from train/ only")
        self.split = carve_validation(pool, fraction=self.val_fraction, seed=self.split_seed)
        log.debug("train %s, validation %s (NORMAL, PNEUMONIA)",
                 class_counts(self.split.train), class_counts(self.split.val))
        preprocessing = Preprocessing(size=self.input_size, equalize=self.equalize)
        self.train_set = XrayDataset(self.split.train, preprocessing,
                                     augment=augmentation_pipeline(self.augmentation))
        self.val_set = XrayDataset(self.split.val, preprocessing)

    def class_weights(self) -> tuple[float, float]:
        """Inverse-frequency weights, normalised so a balanced set gets (1, 1)."""
        assert self.split is not None, "call setup() first"
        counts = class_counts(self.split.train)
        total = sum(counts)
        return tuple(total / (len(counts) * max(c, 1)) for c in counts)  # type: ignore[return-value]

    def balanced_sampler(self) -> WeightedRandomSampler:
        """Samples each class with equal probability; an epoch keeps the training set's size."""
        assert self.split is not None, "call setup() first"
        counts = class_counts(self.split.train)
        weights = torch.tensor([1.0 / max(counts[s.label], 1) for s in self.split.train],
                               dtype=torch.double)
        generator = torch.Generator().manual_seed(self.seed)
        return WeightedRandomSampler(weights, num_samples=len(weights), replacement=True,
                                     generator=generator)

    def _loader(self, dataset: XrayDataset, *, shuffle: bool,
                sampler: Sampler | None = None) -> DataLoader:
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle and sampler is None,
                          sampler=sampler, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None
        sampler = self.balanced_sampler() if self.balanced_sampling else None
        return self._loader(self.train_set, shuffle=True, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        assert self.val_set is not None
        return self._loader(self.val_set, shuffle=False)
