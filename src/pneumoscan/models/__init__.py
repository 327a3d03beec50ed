"""Backbones by name, the classifier around them, and the model bundle."""

from pneumoscan.spec import BundleSpec

from pneumoscan.models import backbones as _backbones  # noqa: F401  (registers the entries)
from pneumoscan.models.bundle import (
    build_network,
    bundle_digest,
    default_bundle_path,
    load_bundle,
    load_gate_extractor,
    read_spec,
    rewrite_bundle,
    save_bundle,
    seal_bundle,
    verify_bundle,
    verify_part,
)
from pneumoscan.models.network import HEADS, Classifier, Ensemble, PixelNetwork, normalize, pooled, supports_cam
from pneumoscan.models.registry import (
    backbone_info,
    create_classifier,
    list_backbones,
    register_backbone,
)

__all__ = [
    "HEADS",
    "BundleSpec",
    "Classifier",
    "Ensemble",
    "pooled",
    "backbone_info",
    "build_network",
    "bundle_digest",
    "create_classifier",
    "default_bundle_path",
    "list_backbones",
    "normalize",
    "PixelNetwork",
    "load_bundle",
    "load_gate_extractor",
    "read_spec",
    "rewrite_bundle",
    "register_backbone",
    "save_bundle",
    "seal_bundle",
    "supports_cam",
    "verify_bundle",
    "verify_part",
]
