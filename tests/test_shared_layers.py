"""The frozen layers that an ensemble's members and the gate's extractor hold byte for byte run
once in the graph (issue 26, item 2): same numbers, less arithmetic."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from pneumoscan.models import Ensemble, PixelNetwork, create_classifier
from pneumoscan.models.network import shared_prefix

pytestmark = pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
SIZE = 64
LITE = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def _fine_tuned(base: torch.nn.Module, from_block: int, seed: int) -> torch.nn.Module:
    """A copy of ``base`` whose blocks from ``from_block`` on moved (as fine-tuning moves them)."""
    net = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(seed)
    for block in net.blocks[from_block:]:
        for parameter in block.parameters():
            parameter.data.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    for parameter in net.head.parameters():
        parameter.data.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return net.eval()


@pytest.fixture(scope="module")
def base() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_classifier("efficientnet_lite0", weights="none", input_size=SIZE).eval()


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 1, SIZE, SIZE), dtype=np.uint8))


def test_shared_prefix_counts_the_blocks_every_network_holds_byte_for_byte(base) -> None:
    members = [_fine_tuned(base, 4, seed) for seed in range(3)]
    assert len(base.blocks) == 9  # stem, 7 stages, head convolution
    assert shared_prefix(members + [base]) == 4
    assert shared_prefix([_fine_tuned(base, 2, 0), base]) == 2
    assert shared_prefix([_fine_tuned(base, 0, 0), base]) == 0
    # one running statistic differing is enough to stop sharing there
    moved = copy.deepcopy(base)
    moved.blocks[1][0].bn1.running_mean[0] += 1e-3
    assert shared_prefix([moved, base]) == 1
    assert shared_prefix([base]) == 0  # nothing to share with
    # a backbone whose blocks do not compose its features is never split
    vit_like = copy.deepcopy(base)
    vit_like.sequential_blocks = False
    assert shared_prefix([vit_like, base]) == 0


def test_a_shared_graph_gives_the_numbers_of_whole_networks(base, pixels) -> None:
    ensemble = Ensemble([_fine_tuned(base, 4, seed) for seed in range(3)]).eval()
    shared = PixelNetwork(ensemble, *LITE, extractor=base, with_cam=True).eval()
    whole = PixelNetwork(ensemble, *LITE, extractor=base, with_cam=True, share_frozen_layers=False).eval()
    assert (shared.shared_blocks, whole.shared_blocks) == (4, 0)
    with torch.inference_mode():
        for a, b in zip(shared(pixels), whole(pixels)):
            assert torch.equal(a, b)


def test_an_extractor_with_its_own_normalisation_computes_alone(base, pixels) -> None:
    member = _fine_tuned(base, 4, 0)
    single = PixelNetwork(member, *LITE, extractor=base, extractor_mean=(0.4, 0.4, 0.4),
                          extractor_std=(0.3, 0.3, 0.3)).eval()
    assert single.shared_blocks == 0  # one network left in the group: nothing to share
    ensemble = Ensemble([member, _fine_tuned(base, 4, 1)]).eval()
    network = PixelNetwork(ensemble, *LITE, extractor=base, extractor_mean=(0.4, 0.4, 0.4),
                           extractor_std=(0.3, 0.3, 0.3)).eval()
    whole = PixelNetwork(ensemble, *LITE, extractor=base, extractor_mean=(0.4, 0.4, 0.4),
                         extractor_std=(0.3, 0.3, 0.3), share_frozen_layers=False).eval()
    assert network.shared_blocks == 4  # the members share; the extractor sees other numbers
    with torch.inference_mode():
        for a, b in zip(network(pixels), whole(pixels)):
            assert torch.equal(a, b)


def test_the_exported_graph_computes_the_shared_blocks_once(base, pixels, tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    import onnx

    from pneumoscan.export import export_onnx
    from pneumoscan.runtime import OnnxRunner
    from pneumoscan.spec import BundleSpec

    student = _fine_tuned(base, 4, 0)
    spec = BundleSpec(name="t", backbone="efficientnet_lite0", head="pool", input_size=SIZE,
                      mean=LITE[0], std=LITE[1], weights_dtype="float32")
    paths = {share: tmp_path / f"{share}.onnx" for share in (True, False)}
    for share, path in paths.items():
        export_onnx(student, spec, path, extractor=base, share_frozen_layers=share)
    convs = {share: sum(node.op_type == "Conv" for node in onnx.load(str(path)).graph.node)
             for share, path in paths.items()}
    stem_and_three_stages = sum(isinstance(m, torch.nn.Conv2d) for block in base.blocks[:4] for m in block.modules())
    assert convs[False] - convs[True] == stem_and_three_stages > 0
    outputs = {share: OnnxRunner(path, threads=1)(pixels.numpy()) for share, path in paths.items()}
    np.testing.assert_allclose(outputs[True][0], outputs[False][0], atol=1e-6)
    np.testing.assert_allclose(outputs[True][1], outputs[False][1], atol=1e-6)
