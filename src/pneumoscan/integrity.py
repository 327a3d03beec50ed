"""One integrity record for a whole model bundle: ``manifest.json``, the sha256 of every file.

``model.json`` records the sha256 of the weights, the gate and the ONNX graph, but nothing
recorded ``model.json`` itself: a bundle with its class names swapped was served silently. The
manifest covers every file, ``model.json`` included, and is checked on every load; any
difference is refused in one line that names the file. The manifest's own sha256 is the
bundle's digest: ``pneumoscan serve --model-sha256`` pins it, and the packaged default bundle's
is pinned in :data:`pneumoscan.models.bundle.DEFAULT_BUNDLE_DIGEST`, so that editing a bundle
and its manifest together is caught too.

No torch here: serving checks bundles with it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pneumoscan.errors import BundleError

MANIFEST_FILE = "manifest.json"
_FORMAT = 1


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: Path) -> str:
    """Record the sha256 of every file in ``directory`` in its manifest; returns the bundle digest."""
    files = {item.name: sha256_file(item) for item in sorted(Path(directory).iterdir())
             if item.is_file() and item.name != MANIFEST_FILE}
    text = json.dumps({"format": _FORMAT, "algorithm": "sha256", "files": files}, indent=2) + "\n"
    (Path(directory) / MANIFEST_FILE).write_text(text)
    return hashlib.sha256(text.encode()).hexdigest()


def bundle_digest(directory: Path) -> str:
    """The sha256 of the bundle's manifest (which covers every other file)."""
    return sha256_file(Path(directory) / MANIFEST_FILE)


def read_manifest(directory: Path, *, expected_digest: str | None = None) -> dict[str, str]:
    """The manifest's ``{file name: sha256}``, after checking the manifest itself.

    Raises:
        BundleError: no manifest, an unreadable one, or a digest other than ``expected_digest``.
    """
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        raise BundleError(f"{directory} has no {MANIFEST_FILE}, so its files cannot be checked; if you trust it "
                          f"(a bundle from pneumoscan before 0.2), seal it with: pneumoscan seal --model {directory}")
    if expected_digest is not None and (actual := sha256_file(path)) != expected_digest.lower():
        raise BundleError(f"{path} was modified: the bundle's digest is {actual[:16]}..., "
                          f"but {expected_digest[:16]}... was expected; refusing to load it")
    try:
        record = json.loads(path.read_text())
        files = record["files"]
        if record.get("format") != _FORMAT or not isinstance(files, dict):
            raise ValueError
        return {str(name): str(digest) for name, digest in files.items()}
    except Exception:
        raise BundleError(f"{path} is not a valid bundle manifest; refusing to load the bundle") from None


def check_file(directory: Path, manifest: dict[str, str], name: str) -> None:
    """Check one file of a bundle against the manifest.

    Raises:
        BundleError: the file is not in the manifest, is missing, or differs from it.
    """
    path = Path(directory) / name
    if name not in manifest:
        raise BundleError(f"{path} is not listed in {MANIFEST_FILE}; refusing to load the bundle")
    if not path.is_file():
        raise BundleError(f"{path} is missing; refusing to load the bundle")
    if sha256_file(path) != manifest[name]:
        raise BundleError(f"{path} is corrupt or was modified (its sha256 differs from {MANIFEST_FILE}); "
                          "refusing to load the bundle")


def check_files(directory: Path, manifest: dict[str, str], *, skip: tuple[str, ...] = ()) -> None:
    """Check every file the manifest lists (but ``skip``), and that nothing it lists is missing.

    Raises:
        BundleError: a file is missing or differs; the message names it.
    """
    for name in manifest:
        if name not in skip:
            check_file(directory, manifest, name)
