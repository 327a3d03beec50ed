"""The training dataset: labelled image files -> uint8 tensors, decoded once and cached.

Kept apart from :mod:`pneumoscan.data` (the folder layout and the split, no torch) so that
evaluation and serving run without PyTorch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch.utils.data import Dataset

from pneumoscan.data import Sample
from pneumoscan.imaging import Preprocessing


@dataclass
class XrayDataset(Dataset):
    """Labelled images -> ``(uint8 1 x S x S tensor, label)``; normalisation happens in the model.

    With ``cache=True`` each image is decoded and resized once and kept in memory (5,856 images at
    224 px are ~300 MB), which matters on a 2-core machine where JPEG decoding would otherwise
    compete with the network for the CPU every epoch.
    """

    samples: Sequence[Sample]
    preprocessing: Preprocessing
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None
    cache: bool = True
    _cache: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.samples)

    def image(self, index: int) -> torch.Tensor:
        """The resized uint8 image at ``index``, before augmentation."""
        cached = self._cache.get(index)
        if cached is not None:
            return cached
        pixels = torch.from_numpy(self.preprocessing.read(self.samples[index].path))
        if self.cache:
            self._cache[index] = pixels
        return pixels

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        pixels = self.image(index)
        if self.augment is not None:
            pixels = self.augment(pixels)
        return pixels, self.samples[index].label
