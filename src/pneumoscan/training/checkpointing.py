"""Checkpoints that a crash cannot leave half-written.

Lightning's own writer goes through fsspec, which stages the file in the system temporary
directory and then moves it; across file systems that move is a copy, so a kill at the wrong
moment leaves a truncated ``last.ckpt``. Here the file is written beside its target, synced,
and renamed over it: the old checkpoint or the new one, never a mixture. SIGINT and SIGTERM are
held while it is written, so a signal finishes the write rather than breaking it.

Checkpoints are read with ``weights_only=True``, always: a ``last.ckpt`` from elsewhere is a
pickle, and with ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` in the environment torch's default lets
a crafted one run code (``os.system`` ran on ``train --resume``). torch lets that variable
override only a call that did not say ``weights_only`` itself.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import threading
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from pneumoscan.errors import ConfigError


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to a temporary sibling, fsync, then ``os.replace`` onto the target; loads
    with ``weights_only=True`` whatever the environment says."""

    def load_checkpoint(self, path: Any, map_location: Any = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as exc:
            raise ConfigError(f"{path} holds more than tensors and plain values, so it is not loaded "
                              f"(checkpoints are read with weights_only=True): {str(exc).splitlines()[0][:200]}") from None

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
        try:
            with _signals_held(), open(partial, "wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
        directory = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # the rename itself survives a power cut
        finally:
            os.close(directory)


@contextlib.contextmanager
def _signals_held():
    """SIGINT and SIGTERM wait until the write is done (they are delivered right after): a
    handler that raises mid-``torch.save`` would leave a broken file and a RuntimeError."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
