"""The plain network: backbone features, a head, and the one "uint8 pixels -> log-odds" module.

:class:`Classifier` exposes ``forward_features`` and ``forward_head`` (timm's split), so Grad-CAM
reads the feature map and fine-tuning swaps stages without knowing the backbone.
:class:`PixelNetwork` wraps it with the backbone's normalisation: the exported ONNX graph, the
PyTorch runtime, training's validation pass and the benchmarks all run exactly this module.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from pneumoscan.errors import ConfigError

HEADS: tuple[str, ...] = ("seed", "pool")


def normalize(batch: torch.Tensor, mean: Sequence[float] | torch.Tensor,
              std: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """uint8 ``(..., 1, H, W)`` -> float ``(..., 3, H, W)`` in the backbone's normalisation."""
    x = batch.float() / 255.0
    x = x.expand(*([-1] * (x.ndim - 3)), 3, -1, -1)  # -1 keeps a size: the batch stays dynamic in ONNX
    mean_t = mean if isinstance(mean, torch.Tensor) else torch.tensor(mean, dtype=x.dtype, device=x.device)
    std_t = std if isinstance(std, torch.Tensor) else torch.tensor(std, dtype=x.dtype, device=x.device)
    return (x - mean_t.view(3, 1, 1)) / std_t.view(3, 1, 1)


class Classifier(nn.Module):
    """Backbone features -> head -> 2 logits. Input: normalised float ``B x 3 x S x S``."""

    def __init__(self, features: nn.Module, head: nn.Module, *, blocks: list[nn.Module],
                 cam_layer: str, sequential_blocks: bool = False) -> None:
        super().__init__()
        self.features = features
        self.head = head
        # Plain list, not a ModuleList: the blocks are already registered under ``features``.
        self._blocks = blocks
        self.cam_layer = f"features.{cam_layer}"
        self.sequential_blocks = sequential_blocks

    @property
    def blocks(self) -> list[nn.Module]:
        """Backbone stages, shallow to deep."""
        return self._blocks

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images -> the backbone's last feature map (``B x C x h x w``)."""
        return self.features(x)

    def forward_blocks(self, x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Backbone stages ``blocks[start:stop]`` alone; all of them equal :meth:`forward_features`
        (backbones whose :attr:`sequential_blocks` is true)."""
        if not self.sequential_blocks:
            raise ConfigError("this backbone's blocks cannot be run one by one")
        for block in self._blocks[start:stop]:
            if isinstance(block, nn.ModuleList):
                for layer in block:
                    x = layer(x)
            else:
                x = block(x)
        return x

    def forward_head(self, feature_map: torch.Tensor) -> torch.Tensor:
        """Feature map -> the two class logits (NORMAL, PNEUMONIA)."""
        return self.head(feature_map)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def build_head(name: str, *, num_features: int, feature_hw: tuple[int, int], num_classes: int = 2,
               dropout: float = 0.5) -> nn.Module:
    """``seed``: the original Flatten -> 512 -> 128 -> 2 head; ``pool``: GAP -> dropout -> 2."""
    if name == "seed":
        flat = num_features * feature_hw[0] * feature_hw[1]
        return nn.Sequential(
            nn.Flatten(),
            nn.Linear(flat, 512), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(512, 128), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(128, num_classes),
        )
    if name == "pool":
        return nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout),
            nn.Linear(num_features, num_classes),
        )
    raise ConfigError(f"unknown head '{name}'; choose one of: {', '.join(HEADS)}")


class Ensemble(nn.Module):
    """K classifiers that share one preprocessing; their logits (so their log-odds) are averaged.

    Grad-CAM reads every member's own layer (:attr:`cam_layers`) and averages the maps.
    """

    def __init__(self, members: Sequence[Classifier]) -> None:
        super().__init__()
        if len(members) < 2:
            raise ConfigError(f"an ensemble needs at least 2 members, got {len(members)}")
        self.members = nn.ModuleList(members)

    @property
    def cam_layers(self) -> list[str]:
        return [f"members.{i}.{m.cam_layer}" for i, m in enumerate(self.members)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The mean of the logits differences to the mean of the members' log-odds.
        return torch.stack([member(x) for member in self.members]).mean(dim=0)


def pooled(feature_map: torch.Tensor) -> torch.Tensor:
    """A feature map averaged over space (``B x C``); vectors pass through."""
    return feature_map.mean(dim=(2, 3)) if feature_map.ndim == 4 else feature_map


def _block_state(block: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return list(block.state_dict(keep_vars=False).items())


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.detach().contiguous().flatten().view(torch.uint8),
                       b.detach().contiguous().flatten().view(torch.uint8))


def shared_prefix(networks: Sequence[Classifier]) -> int:
    """How many leading backbone blocks hold byte-identical weights and statistics in every one of
    ``networks`` (0 unless there are two or more of one sequential architecture).

    Fine-tuning leaves the first blocks of every network of a recipe at the ImageNet weights
    they started from (frozen, batch norms in eval mode), and the gate's extractor is that same
    frozen ImageNet network: those blocks compute the same numbers for all of them, so a graph
    needs them once.
    """
    if len(networks) < 2 or not all(n.sequential_blocks for n in networks):
        return 0
    counts = {len(n.blocks) for n in networks}
    if len(counts) != 1:
        return 0
    shared = 0
    for index in range(counts.pop()):
        first = _block_state(networks[0].blocks[index])
        for other in networks[1:]:
            state = _block_state(other.blocks[index])
            if len(state) != len(first) or not all(
                    name_a == name_b and _same_bytes(a, b) for (name_a, a), (name_b, b) in zip(first, state)):
                return shared
        shared += 1
    return shared


class PixelNetwork(nn.Module):
    """uint8 ``B x 1 x S x S`` pixels -> (uncalibrated log-odds of pneumonia ``B``, gate features ``B x C``).

    The log-odds are logit(PNEUMONIA) - logit(NORMAL), averaged over an ensemble's members. The
    gate features are the pooled last feature map of ``extractor`` (a frozen ImageNet backbone, so
    the input gate does not move when fine-tuning does), or, for bundles without one, of the
    classifier itself.

    The leading blocks that every member and the extractor hold byte for byte (the frozen
    ImageNet layers, see :func:`shared_prefix`) run once, and their output feeds each network's
    remaining blocks: the same numbers at less arithmetic (``share_frozen_layers=False`` runs
    every network whole, for comparison).
    """

    def __init__(self, net: Classifier | Ensemble, mean: Sequence[float], std: Sequence[float], *,
                 extractor: Classifier | None = None, extractor_mean: Sequence[float] | None = None,
                 extractor_std: Sequence[float] | None = None, with_cam: bool = False,
                 share_frozen_layers: bool = True) -> None:
        super().__init__()
        self.net = net
        self.extractor = extractor
        extractor_mean, extractor_std = extractor_mean or mean, extractor_std or std
        # The extractor reuses the classifier's normalised input when both normalise alike.
        self.shared_input = (tuple(extractor_mean), tuple(extractor_std)) == (tuple(mean), tuple(std))
        # As buffers, so that the ONNX trace records them as constants without a warning.
        for name, value in (("mean_t", mean), ("std_t", std),
                            ("extractor_mean_t", extractor_mean), ("extractor_std_t", extractor_std)):
            self.register_buffer(name, torch.tensor(value, dtype=torch.float32), persistent=False)
        self.with_cam = with_cam
        if with_cam and not supports_cam(net):
            raise ConfigError("a class activation map needs the pool head (global average pool, then linear)")
        # The networks that see the same normalised input and may share their first blocks.
        self.extractor_shares = extractor is not None and self.shared_input
        group = _members(net) + ([extractor] if self.extractor_shares else [])
        self.shared_blocks = shared_prefix(group) if share_frozen_layers else 0

    def gate_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """The extractor's pooled features alone (fitting a gate needs no log-odds)."""
        assert self.extractor is not None, "no gate extractor"
        return pooled(self.extractor.forward_features(normalize(pixels, self.extractor_mean_t, self.extractor_std_t)))

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = normalize(pixels, self.mean_t, self.std_t)
        members = _members(self.net)
        if self.shared_blocks:
            trunk = members[0].forward_blocks(x, 0, self.shared_blocks)
            feature_maps = [member.forward_blocks(trunk, self.shared_blocks) for member in members]
        else:
            feature_maps = [member.forward_features(x) for member in members]
        logits = torch.stack([m.forward_head(f) for m, f in zip(members, feature_maps)]).mean(dim=0)
        if self.extractor is not None:
            if self.shared_blocks and self.extractor_shares:
                gate_map = self.extractor.forward_blocks(trunk, self.shared_blocks)
            else:
                x_gate = x if self.shared_input else normalize(pixels, self.extractor_mean_t, self.extractor_std_t)
                gate_map = self.extractor.forward_features(x_gate)
            features = pooled(gate_map)
        else:
            features = pooled(feature_maps[0])
        log_odds = logits[:, 1] - logits[:, 0]
        if not self.with_cam:
            return log_odds, features
        # Each member's class activation map of the log-odds, before ReLU and scaling:
        # sum over channels of (W[PNEUMONIA] - W[NORMAL]) x feature map (B x K x h x w).
        cams = [torch.einsum("bchw,c->bhw", f, cam_weights(m)) for m, f in zip(members, feature_maps)]
        return log_odds, features, torch.stack(cams, dim=1)


def _members(net: Classifier | Ensemble) -> list[Classifier]:
    return list(net.members) if isinstance(net, Ensemble) else [net]


def supports_cam(net: Classifier | Ensemble) -> bool:
    """Whether every member has a pool head, so the graph can compute its class activation map."""
    return all(cam_weights(member) is not None for member in _members(net))


def cam_weights(member: Classifier) -> torch.Tensor | None:
    """``W[PNEUMONIA] - W[NORMAL]`` of a pool head's linear layer (``C``), or None for other heads.

    For global average pooling then a linear layer, the channel weights of Grad-CAM of the
    log-odds are exactly these (divided by h x w, which the normalisation removes).
    """
    layers = list(member.head) if isinstance(member.head, nn.Sequential) else []
    kinds = [type(layer) for layer in layers]
    if kinds != [nn.AdaptiveAvgPool2d, nn.Flatten, nn.Dropout, nn.Linear]:
        return None
    weight = layers[-1].weight
    return weight[1] - weight[0]
