"""The LightningDataModule: which splits, which transforms (built on :mod:`pneumoscan.data`)."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Sampler, WeightedRandomSampler

from pneumoscan.errors import DatasetError
from pneumoscan.data import (
    Augmentation,
    Split,
    XrayDataset,
    carve_validation,
    class_counts,
    scan_split,
)

log = logging.getLogger(__name__)


class ChestXrayDataModule(pl.LightningDataModule):
    """Kaggle-layout folder -> patient-grouped train/validation loaders.

    The training pool is ``train/`` plus the official ``val/`` folder when present (16 images in
    the Kaggle release: too few to select anything on), from which a patient-grouped,
    class-stratified validation split of ``val_fraction`` is carved. ``test/`` is never read here.
    """

    def __init__(self, root: str | Path, *, input_size: int = 224,
                 augmentation: Augmentation = Augmentation(), batch_size: int = 32,
                 num_workers: int = 0, val_fraction: float = 0.1, seed: int = 0,
                 split_seed: int | None = None, balanced_sampling: bool = False,
                 equalize: bool = False) -> None:
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

    def setup(self, stage: str | None = None) -> None:
        if self.split is not None:
            return
        pool = scan_split(self.root, "train")
        try:
            pool += scan_split(self.root, "val")
        except DatasetError:
            log.info("no usable official val/ folder; validation comes from train/ only")
        self.split = carve_validation(pool, fraction=self.val_fraction, seed=self.split_seed)
        log.info("train %s, validation %s (NORMAL, PNEUMONIA)",
                 class_counts(self.split.train), class_counts(self.split.val))
        self.train_set = XrayDataset(self.split.train, size=self.input_size,
                                     augment=self.augmentation.transform(), equalize=self.equalize)
        self.val_set = XrayDataset(self.split.val, size=self.input_size, equalize=self.equalize)

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
