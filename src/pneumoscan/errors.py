"""Exceptions raised by pneumoscan.

    PneumoscanError            every error a user can cause; the CLI prints its message, no traceback
    ├── DatasetError           missing dataset folder, class folder, empty class, no images
    ├── InvalidImageError      a file that is not an image pneumoscan can read (http_status 415 or 422)
    ├── BundleError            missing, corrupt or tampered model bundle
    ├── WeightsUnavailableError pretrained weights that cannot be found offline
    ├── ConfigError            a bad option value or backbone name
    └── TrainingInterrupted    SIGTERM or SIGINT stopped training; a resumable checkpoint was saved
"""

from __future__ import annotations


class PneumoscanError(Exception):
    """Base class: an error with a message meant for the user."""

    code: str = "error"
    http_status: int = 400


class DatasetError(PneumoscanError):
    """The dataset folder is missing, malformed or empty."""

    code = "dataset_error"


class InvalidImageError(PneumoscanError):
    """A file that cannot be decoded as a supported image."""

    code = "invalid_image"
    http_status = 422

    def __init__(self, message: str, *, code: str = "invalid_image", http_status: int = 422) -> None:
        super().__init__(message)
        self.code = code
        self.http_status = http_status


class BundleError(PneumoscanError):
    """A model bundle that is missing, corrupt, tampered with or of an unknown format."""

    code = "bundle_error"


class WeightsUnavailableError(PneumoscanError):
    """Pretrained weights were asked for but are not available offline."""

    code = "weights_unavailable"


class ConfigError(PneumoscanError):
    """An option value that makes no sense (unknown backbone, bad fraction, ...)."""

    code = "config_error"


class TrainingInterrupted(PneumoscanError):
    """SIGTERM or SIGINT stopped a training run after saving a checkpoint it can resume from.

    ``exit_code`` is what a scheduler should see: 143 (128 + SIGTERM) or 130 (128 + SIGINT).
    """

    code = "training_interrupted"

    def __init__(self, message: str, *, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code
