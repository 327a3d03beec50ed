"""Training with PyTorch Lightning: the only package that imports lightning.

``TrainConfig`` (in :mod:`~pneumoscan.training.config`) imports no torch; ``train`` is imported on
first use, so the CLI can build its options without starting Lightning.
"""

from __future__ import annotations

from typing import Any

from pneumoscan.training.config import Augmentation, TrainConfig

__all__ = ["Augmentation", "TrainConfig", "train"]


def __getattr__(name: str) -> Any:
    if name == "train":
        from pneumoscan.training.fit import train

        return train
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
