"""The web app's settings: defaults, overridden by ``PNEUMOSCAN_*`` environment variables.

Kept free of torch so that ``pneumoscan serve``'s master process can check them before forking.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from flask import Config

from pneumoscan.errors import ConfigError
from pneumoscan.runtime import BACKENDS

#: Every setting, each also read from a ``PNEUMOSCAN_<NAME>`` environment variable.
DEFAULTS: dict[str, Any] = {
    "MODEL_DIR": None,  # None: the bundled default model
    "MODEL_SHA256": None,  # the bundle's digest (sha256 of its manifest.json) to insist on; None: any sealed bundle
    "MAX_CONTENT_LENGTH": 20 * 1024 * 1024,  # bytes per request
    "MAX_FILES": 32,  # files per request
    "REQUEST_TIMEOUT": 30,  # seconds to receive a request's body (slow uploads get a 408) and decode it (503)
    "DECODE_CONCURRENCY": 1,  # images one worker process decodes at once (each at most 64 MB decoded)
    "AUDIT_LOG": None,  # path of the JSON-lines audit log; None: no audit log
    "BACKEND": "auto",  # auto (ONNX Runtime when the bundle has an ONNX model), onnxruntime, openvino or torch
    "ALLOW_TORCH_FALLBACK": False,  # a tampered/unusable ONNX file: PyTorch with a warning, not an error
    "API_KEYS": "",  # comma-separated keys required on /api/ (off when empty)
    "RATE_LIMIT": "",  # e.g. "60/minute" per client (flask-limiter syntax; off when empty)
    "AUTH_FAILURE_LIMIT": "10/minute",  # wrong keys per client address before a 429 (keys on)
    "SECRET_KEY": None,  # signs the session cookie that carries the form's CSRF token; random if unset
    "SESSION_COOKIE_SAMESITE": "Lax",
    "SESSION_COOKIE_SECURE": False,  # true behind HTTPS: the browser then sends the cookie over HTTPS only
    "WTF_CSRF_TIME_LIMIT": None,  # the token lives as long as the browser session
}


def load_config(test_config: Mapping[str, Any] | None = None) -> Config:
    """Defaults, then ``PNEUMOSCAN_*`` environment variables, then ``test_config``; checked.

    Raises:
        ConfigError: a setting has a value that cannot work.
    """
    config = Config("")
    config.from_mapping(DEFAULTS)
    config.from_prefixed_env("PNEUMOSCAN")
    if test_config is not None:
        config.update(test_config)
    for key in ("MAX_CONTENT_LENGTH", "MAX_FILES", "DECODE_CONCURRENCY"):
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"PNEUMOSCAN_{key} must be a positive whole number, got {value!r}")
    timeout = config["REQUEST_TIMEOUT"]
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ConfigError(f"PNEUMOSCAN_REQUEST_TIMEOUT must be a positive number of seconds, got {timeout!r}")
    from limits import parse, parse_many

    if config["RATE_LIMIT"]:
        try:
            parse_many(str(config["RATE_LIMIT"]))
        except ValueError:
            raise ConfigError(f"PNEUMOSCAN_RATE_LIMIT must look like '60/minute' or '10/second;500/hour', "
                              f"got {config['RATE_LIMIT']!r}") from None
    try:
        parse(str(config["AUTH_FAILURE_LIMIT"]))
    except ValueError:
        raise ConfigError(f"PNEUMOSCAN_AUTH_FAILURE_LIMIT must look like '10/minute', "
                          f"got {config['AUTH_FAILURE_LIMIT']!r}") from None
    digest = config["MODEL_SHA256"]
    if digest is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", str(digest)):
        raise ConfigError(f"PNEUMOSCAN_MODEL_SHA256 must be 64 hexadecimal digits (a bundle digest), got {str(digest)[:80]!r}")
    if config["BACKEND"] not in BACKENDS:
        raise ConfigError(f"PNEUMOSCAN_BACKEND must be one of {', '.join(BACKENDS)}, got {config['BACKEND']!r}")
    if not isinstance(config["ALLOW_TORCH_FALLBACK"], bool):
        raise ConfigError("PNEUMOSCAN_ALLOW_TORCH_FALLBACK must be true or false, "
                          f"got {config['ALLOW_TORCH_FALLBACK']!r}")
    return config
