"""Training with PyTorch Lightning: the only package that imports lightning."""

from pneumoscan.training.fit import TrainConfig, train

__all__ = ["TrainConfig", "train"]
