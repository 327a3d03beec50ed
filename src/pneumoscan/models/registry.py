"""A registry that builds every backbone by name (timm's idea, a fraction of its size).

A backbone entry is a function ``(weights: WeightsSource) -> BackboneParts`` registered with
:func:`register_backbone`; :func:`create_classifier` adds a head and returns the plain
:class:`Classifier` module that bundles save and serving loads.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from pneumoscan.errors import ConfigError
from pneumoscan.models.network import HEADS, Classifier, build_head

#: ``"imagenet"``, ``"none"`` (random init) or a path to a local weights file.
WeightsSource = str


@dataclass
class BackboneParts:
    """What an entry builds: a feature extractor and how to fine-tune and explain it."""

    features: nn.Module  # image batch -> feature map B x C x h x w
    num_features: int
    blocks: list[nn.Module]  # shallow -> deep; the last N are unfrozen by --finetune-blocks N
    cam_layer: str  # dotted name inside ``features`` of the layer Grad-CAM reads
    # Running ``blocks`` in order (a ModuleList's layers in order) computes exactly ``features``:
    # then networks whose first blocks hold the same weights can compute those blocks once.
    sequential_blocks: bool = False


@dataclass(frozen=True)
class BackboneInfo:
    """A registered backbone and the preprocessing facts that travel with it."""

    name: str
    factory: Callable[[WeightsSource], BackboneParts]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    default_input_size: int
    description: str


_REGISTRY: dict[str, BackboneInfo] = {}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def register_backbone(*, mean: tuple[float, float, float] = IMAGENET_MEAN,
                      std: tuple[float, float, float] = IMAGENET_STD,
                      default_input_size: int = 224) -> Callable[[Callable[[WeightsSource], BackboneParts]], Callable[[WeightsSource], BackboneParts]]:
    """Decorator: file the function under its own ``__name__``; its docstring describes it."""

    def decorate(fn: Callable[[WeightsSource], BackboneParts]) -> Callable[[WeightsSource], BackboneParts]:
        _REGISTRY[fn.__name__] = BackboneInfo(
            name=fn.__name__, factory=fn, mean=mean, std=std,
            default_input_size=default_input_size,
            description=(fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else "",
        )
        return fn

    return decorate


def list_backbones(pattern: str = "*") -> list[str]:
    """Registered backbone names matching an fnmatch pattern, sorted."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def backbone_info(name: str) -> BackboneInfo:
    """The registry entry for ``name``.

    Raises:
        ConfigError: unknown name (the message lists the known ones).
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"unknown backbone '{name}'; choose one of: {', '.join(list_backbones())}"
        ) from None


def create_classifier(backbone: str, *, weights: WeightsSource = "none", head: str = "pool",
                      input_size: int = 224, dropout: float = 0.5) -> Classifier:
    """Build backbone + head by name.

    Raises:
        ConfigError: unknown backbone or head, or an input size the backbone cannot take.
        WeightsUnavailableError: ``weights`` names ImageNet weights that are not here offline.
    """
    info = backbone_info(backbone)
    if head not in HEADS:
        raise ConfigError(f"unknown head '{head}'; choose one of: {', '.join(HEADS)}")
    if input_size < 32:
        raise ConfigError(f"input size must be at least 32 pixels, got {input_size}")
    parts = info.factory(weights)
    feature_hw = _feature_hw(parts.features, input_size)
    head_module = build_head(head, num_features=parts.num_features, feature_hw=feature_hw,
                             dropout=dropout)
    return Classifier(parts.features, head_module, blocks=parts.blocks, cam_layer=parts.cam_layer,
                      sequential_blocks=parts.sequential_blocks)


def _feature_hw(features: nn.Module, input_size: int) -> tuple[int, int]:
    """Spatial size of the feature map for a square input (needed by the Flatten head)."""
    was_training = features.training
    features.eval()
    try:
        with torch.no_grad():
            out = features(torch.zeros(1, 3, input_size, input_size))
    except RuntimeError as exc:
        raise ConfigError(f"input size {input_size} does not fit this backbone: {exc}") from None
    finally:
        features.train(was_training)
    return int(out.shape[-2]), int(out.shape[-1])


def resolve_weights_path(weights: WeightsSource) -> Path | None:
    """``none`` -> None; a path -> that path (must exist); ``imagenet`` is handled by each entry."""
    if weights == "none":
        return None
    path = Path(weights).expanduser()
    if not path.is_file():
        from pneumoscan.errors import WeightsUnavailableError

        raise WeightsUnavailableError(
            f"weights file {path} does not exist; pass --weights imagenet, none, or a path to a "
            ".pth/.safetensors file"
        )
    return path
