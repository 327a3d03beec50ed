"""What runs the network: ONNX Runtime, OpenVINO or PyTorch, behind one interface.

A runner is called with uint8 pixels ``B x 1 x S x S`` (what :class:`~pneumoscan.imaging.Preprocessing`
makes) and returns ``(log_odds B, pooled features B x C)`` as float numpy arrays: the
uncalibrated logit of pneumonia and the features the input gate measures. Both runners compute
:class:`pneumoscan.models.PixelNetwork`; the ONNX graph is that module, exported.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from pneumoscan.errors import BundleError, ConfigError
from pneumoscan.spec import BundleSpec

if TYPE_CHECKING:
    from pneumoscan.models import Classifier, Ensemble, PixelNetwork

log = logging.getLogger(__name__)

BACKENDS = ("auto", "onnxruntime", "openvino", "torch")
#: What installs PyTorch and the rest of the training stack.
TRAIN_EXTRA = "pip install 'pneumoscan[train]'"
#: What installs the optional OpenVINO backend.
OPENVINO_EXTRA = "pip install 'pneumoscan[openvino]'"


def require_torch(what: str) -> None:
    """Raises:
        ConfigError: PyTorch is not installed (the light install); the message names the extra.
    """
    if importlib.util.find_spec("torch") is None:
        raise ConfigError(f"{what} needs PyTorch, which this install does not have: {TRAIN_EXTRA}")


class Runner(Protocol):
    """uint8 ``B x 1 x S x S`` -> (log-odds ``B``, pooled features ``B x C``)."""

    name: str

    def __call__(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


def usable_cores() -> int:
    """Cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_threads() -> int:
    """ONNX Runtime's threads: ``PNEUMOSCAN_INFERENCE_THREADS``, else every usable core.

    Raises:
        ConfigError: the variable is not a positive whole number.
    """
    configured = os.environ.get("PNEUMOSCAN_INFERENCE_THREADS")
    if configured:
        if not configured.isdigit() or int(configured) < 1:
            raise ConfigError(f"PNEUMOSCAN_INFERENCE_THREADS must be a positive whole number, got {configured!r}")
        return int(configured)
    return usable_cores()


def session_options(threads: int, *, optimization: str = "ORT_ENABLE_ALL", arena: bool = True):
    """ONNX Runtime session options: ``threads`` intra-op threads, one operator at a time.
    The defaults are what serving uses (``bench/ort_settings.py`` compares the others)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, optimization)
    options.enable_cpu_mem_arena = arena
    return options


class OnnxRunner:
    """An ONNX Runtime session over the exported graph, sized for a small CPU."""

    name = "onnxruntime"

    def __init__(self, path: Path, *, threads: int | None = None) -> None:
        """Raises:
            ConfigError: onnxruntime is not installed.
            BundleError: the file is not a usable ONNX model.
        """
        try:
            import onnxruntime as ort
        except ImportError:
            raise ConfigError("onnxruntime is not installed (pip install onnxruntime)") from None
        try:
            self.session = ort.InferenceSession(str(path), sess_options=session_options(threads or default_threads()),
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise BundleError(f"{path} is not a usable ONNX model: {str(exc).splitlines()[0]}") from None
        self.has_cam = "cam" in {output.name for output in self.session.get_outputs()}

    def __call__(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        log_odds, features = self.session.run(["log_odds", "features"],
                                              {"pixels": np.ascontiguousarray(pixels, dtype=np.uint8)})
        return log_odds.astype(np.float64), features

    def cam(self, pixels: np.ndarray) -> np.ndarray:
        """Each member's raw class activation map of the log-odds (``B x K x h x w``; graphs
        exported with a pool head only, see :attr:`has_cam`)."""
        return self.session.run(["cam"], {"pixels": np.ascontiguousarray(pixels, dtype=np.uint8)})[0]


class OpenVinoRunner:
    """OpenVINO's CPU runtime over the same exported graph, in float32.

    On this project's 2-core machine it ran the bundled ensemble 1.3-1.4x faster than ONNX Runtime
    with log-odds within 4e-6 (``bench/ort_settings.py``). float32 is forced: OpenVINO's default
    on CPUs with bfloat16 is 2x faster still but moves log-odds by 0.03, which would change
    answers near the threshold.
    """

    name = "openvino"

    def __init__(self, path: Path, *, threads: int | None = None) -> None:
        """Raises:
            ConfigError: openvino is not installed.
            BundleError: the file is not a model OpenVINO can compile.
        """
        try:
            import openvino as ov
        except ImportError:
            raise ConfigError(f"the openvino backend needs the openvino package: {OPENVINO_EXTRA}") from None
        try:
            self.compiled = ov.Core().compile_model(str(path), "CPU", {
                "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads or default_threads(),
                "INFERENCE_PRECISION_HINT": "f32",
                # Pinned, every gunicorn worker's thread lands on the same first core(s).
                "ENABLE_CPU_PINNING": False})
        except Exception as exc:
            raise BundleError(f"{path} could not be compiled by OpenVINO: {str(exc).strip().splitlines()[0]}") from None
        names = {name for output in self.compiled.outputs for name in output.get_names()}
        self.has_cam = "cam" in names
        self._request = self.compiled.create_infer_request()
        self._lock = threading.Lock()  # one infer request: one inference at a time

    def _infer(self, pixels: np.ndarray, names: tuple[str, ...]) -> list[np.ndarray]:
        with self._lock:
            outputs = self._request.infer({"pixels": np.ascontiguousarray(pixels, dtype=np.uint8)})
            return [np.array(outputs[self.compiled.output(name)]) for name in names]

    def __call__(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        log_odds, features = self._infer(pixels, ("log_odds", "features"))
        return log_odds.astype(np.float64), features

    def cam(self, pixels: np.ndarray) -> np.ndarray:
        """As :meth:`OnnxRunner.cam`."""
        return self._infer(pixels, ("cam",))[0]


class TorchRunner:
    """The PyTorch network (eval mode, no gradients)."""

    name = "torch"

    def __init__(self, network: "PixelNetwork") -> None:
        self.network = network.eval()
        self.model = network.net

    @classmethod
    def for_bundle(cls, model: "Classifier | Ensemble", spec: BundleSpec, *,
                   extractor: "Classifier | None" = None, with_cam: bool = False,
                   share_frozen_layers: bool = True) -> "TorchRunner":
        """The runner of a bundle's network (and of its gate's extractor, if it has one)."""
        from pneumoscan.models import PixelNetwork, backbone_info

        info = backbone_info(spec.gate.extractor) if extractor is not None and spec.gate is not None else None
        return cls(PixelNetwork(model.eval(), spec.mean, spec.std, extractor=extractor,
                                extractor_mean=info.mean if info else None,
                                extractor_std=info.std if info else None, with_cam=with_cam,
                                share_frozen_layers=share_frozen_layers))

    def __call__(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import torch

        with torch.inference_mode():
            log_odds, features = self.network(torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.uint8)))[:2]
        return log_odds.double().numpy(), features.numpy()


def check_has_graph(directory: Path, spec: BundleSpec, backend: str = "auto") -> None:
    """Raises ConfigError, with the one command that fixes it, when ``backend`` cannot run a bundle
    for want of its ONNX graph (asked for by name, or the light install, which has no PyTorch).
    ``serve`` asks before forking, so its workers never fail to boot over it."""
    if spec.onnx is None and (backend in ("onnxruntime", "openvino") or importlib.util.find_spec("torch") is None):
        # the fix is one command in the training install, not 6 GB of PyTorch here
        raise ConfigError(f"{directory} has no ONNX model, which this install needs to run it: run "
                          f"'pneumoscan export --model {directory}' where PyTorch is installed "
                          f"(the training install, {TRAIN_EXTRA})")


def open_runner(directory: Path, spec: BundleSpec, model: "Classifier | Ensemble | None" = None, *,
                backend: str = "auto", allow_torch_fallback: bool = False) -> Runner:
    """The runner ``backend`` asks for: ``onnxruntime``, ``openvino`` (optional, the same graph),
    ``torch``, or ``auto`` (ONNX Runtime when the bundle has an exported graph and onnxruntime is
    installed, PyTorch otherwise).

    With ``allow_torch_fallback``, an ONNX file that is tampered or unusable gives a warning and
    the PyTorch runner; without it, an error. ``model`` is the bundle's network if already built;
    the PyTorch runner builds it otherwise (only it imports torch).

    Raises:
        ConfigError: an unknown backend, ``onnxruntime`` or ``openvino`` when the bundle has no
            ONNX model or the package is not installed, or the PyTorch runner without PyTorch.
        BundleError: the ONNX file is tampered or unusable, and fallback is not allowed.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"unknown inference backend '{backend}'; choose one of {', '.join(BACKENDS)}")

    def torch_runner() -> TorchRunner:
        # The network and the gate's extractor are built only here: the ONNX graph holds both.
        require_torch(f"running {directory} on PyTorch" + ("" if spec.onnx else " (it has no ONNX model)"))
        from pneumoscan.models import build_network, load_gate_extractor

        # ``spec`` comes from a bundle the caller verified: its files are not hashed again.
        network = model if model is not None else build_network(directory, spec)
        return TorchRunner.for_bundle(network, spec, extractor=load_gate_extractor(directory, spec))

    if backend == "torch":
        return torch_runner()
    if spec.onnx is None:
        check_has_graph(directory, spec, backend)
        return torch_runner()
    from pneumoscan.integrity import verify_part

    if backend == "openvino":
        verify_part(directory, spec.onnx)  # no fallback: the user asked for this runtime by name
        return OpenVinoRunner(directory / spec.onnx.file)
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        if backend == "onnxruntime":
            raise ConfigError("the onnxruntime backend needs the onnxruntime package (pip install onnxruntime)") from None
        return torch_runner()
    try:
        verify_part(directory, spec.onnx)
        return OnnxRunner(directory / spec.onnx.file)
    except BundleError as exc:
        if not allow_torch_fallback:
            raise
        log.warning("%s; running the network on PyTorch instead", exc)
        return torch_runner()
