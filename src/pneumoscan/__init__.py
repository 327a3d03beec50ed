"""pneumoscan: pneumonia detection on paediatric chest X-rays.

Train a classifier on the Kermany chest X-ray set, evaluate it with confidence intervals,
and serve it through a Flask app and JSON API. The only thing that crosses from training to
serving is a model bundle (``model.safetensors`` + ``model.json``).
"""

from pneumoscan.errors import (
    BundleError,
    DatasetError,
    InvalidImageError,
    PneumoscanError,
    WeightsUnavailableError,
)

__version__ = "0.1.0"

__all__ = [
    "BundleError",
    "DatasetError",
    "InvalidImageError",
    "PneumoscanError",
    "WeightsUnavailableError",
    "__version__",
]
