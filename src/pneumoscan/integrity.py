"""A bundle directory's files, without PyTorch: the manifest, reading model.json, verification,
and writing a bundle atomically (the weights file is written by a callback, or copied).

One integrity record for a whole model bundle: ``manifest.json``, the sha256 of every file.

``model.json`` records the sha256 of the weights, the gate and the ONNX graph, but nothing
recorded ``model.json`` itself: a bundle with its class names swapped was served silently. The
manifest covers every file, ``model.json`` included, and is checked on every load; any
difference is refused in one line that names the file. The manifest's own sha256 is the
bundle's digest: ``pneumoscan serve --model-sha256`` pins it, and the packaged default bundle's
is pinned in :data:`DEFAULT_BUNDLE_DIGEST`, so that editing a bundle and its manifest together
is caught too.

No torch here: serving on ONNX Runtime reads and checks bundles with this module alone;
:mod:`pneumoscan.models.bundle` writes them and builds their networks.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from importlib import resources
from pathlib import Path
from typing import Callable

from pneumoscan.errors import BundleError
from pneumoscan.spec import BundleSpec, GateInfo, OnnxInfo, is_plain_file_name

MANIFEST_FILE = "manifest.json"
WEIGHTS_FILE = "model.safetensors"
SPEC_FILE = "model.json"
#: The digest (manifest sha256) of the packaged default bundle: editing its files and its manifest
#: together is caught too. Updated whenever the default bundle is rewritten.
DEFAULT_BUNDLE_DIGEST = "4dfc665e2735892d41e80a983112c271eaee0b75a1ae7e93bdbf70a4ebe11c7a"
#: The bundles shipped inside the package, by the name ``--model`` takes: their folder and what
#: they are. ``default`` is what runs when no ``--model`` is given (MODEL_CARD.md says why).
BUNDLED_MODELS: dict[str, tuple[str, str]] = {
    "default": ("default_model", "E13: three EfficientNet-Lite0 networks averaged (the default)"),
    "fast": ("fast_model", "D1: one EfficientNet-Lite0 distilled from E13, about half its time a film"),
}
#: The other bundled models' pinned digests (the default's is :data:`DEFAULT_BUNDLE_DIGEST`).
BUNDLED_DIGESTS: dict[str, str] = {
    "fast": "a6e84c6588b4b0873c4a18c77bb1781ec375d5383c5aa404bdf629b64aaa81c6",
}
_FORMAT = 1
#: The most a bundle's JSON files (model.json, the manifest) may hold, and how deeply they may
#: nest: a 100,000-deep model.json ended in a RecursionError traceback.
MAX_JSON_BYTES = 4_000_000
MAX_JSON_DEPTH = 32


def read_json_file(path: Path) -> object:
    """A bundle's JSON file, bounded in size and nesting before it is parsed.

    Raises:
        BundleError: too large, nested too deeply, or not JSON (the message names the file).
    """
    if path.is_symlink():
        raise BundleError(f"{path} is a symbolic link; a bundle's files must be its own")
    if path.stat().st_size > MAX_JSON_BYTES:
        raise BundleError(f"{path} is larger than {MAX_JSON_BYTES // 1_000_000} MB; refusing to read it")
    text = path.read_text(encoding="utf-8", errors="replace")
    depth = deepest = 0
    for char in re.sub(r'"(?:\\.|[^"\\])*"', '""', text):  # brackets inside strings do not nest
        if char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    if deepest > MAX_JSON_DEPTH:
        raise BundleError(f"{path} nests {deepest} levels deep; the limit is {MAX_JSON_DEPTH}")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path} is not valid JSON ({exc})") from None


#: The JSON header at the start of a .safetensors file (tensor names, shapes, offsets): a few kB
#: for any bundle file. Its length comes first, as 8 bytes; a gate claiming 2^60 was not checked.
MAX_SAFETENSORS_HEADER = 16_000_000


def check_safetensors_header(path: Path) -> None:
    """The 8-byte header length of a .safetensors file must fit the file and the limit.

    Raises:
        BundleError: it does not.
    """
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
    declared = int.from_bytes(head, "little") if len(head) == 8 else -1
    if not 2 <= declared <= min(MAX_SAFETENSORS_HEADER, size - 8):
        raise BundleError(f"{path}: its header claims {declared} bytes in a file of {size}; "
                          "not a usable .safetensors file")


def read_tensors(path: Path) -> dict:
    """A bundle's .safetensors file as numpy arrays, its header bounded before it is parsed.

    Raises:
        BundleError: a header length beyond the file or the limit, or an unreadable file.
    """
    from safetensors.numpy import load_file

    check_safetensors_header(path)
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types on malformed headers
        raise BundleError(f"{path} is not a readable .safetensors file ({type(exc).__name__})") from None


def check_name(name: object, where: str) -> str:
    """A file name a bundle lists: a plain name inside the bundle directory, nothing else. Checked
    before the file system is touched, so a name like ``../../etc/passwd`` reveals nothing.

    Raises:
        BundleError: a path with directories, ``..``, an absolute path or a hidden/odd name.
    """
    text = str(name)
    if not is_plain_file_name(name):
        raise BundleError(f"{where} lists {text[:80]!r}, which is not a plain file name inside the bundle; "
                          "refusing to load it")
    return text


def default_bundle_path() -> Path:
    """The bundle shipped inside the package (used when no --model is given)."""
    return bundled_model_path("default")


def bundled_model_path(name: str) -> Path:
    """The folder of the bundled model called ``name`` (a key of :data:`BUNDLED_MODELS`).

    Raises:
        BundleError: no bundled model has that name (the message lists those that do).
    """
    if name not in BUNDLED_MODELS:
        raise BundleError(f"no bundled model is called {name!r}; the bundled models are "
                          f"{', '.join(BUNDLED_MODELS)}")
    return Path(str(resources.files("pneumoscan") / BUNDLED_MODELS[name][0]))


def resolve_model(text: str) -> Path:
    """What ``--model`` names: a bundled model's name (``default``, ``fast``) or a bundle
    directory. A bare bundled model's name means that model even where a folder of that name
    exists here; ``./fast`` names the folder."""
    return bundled_model_path(text) if text in BUNDLED_MODELS else Path(text)


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
    record = read_json_file(path)
    try:
        files = record["files"]
        if record.get("format") != _FORMAT or not isinstance(files, dict):
            raise ValueError
        files = {name: str(digest) for name, digest in files.items()}
    except Exception:
        raise BundleError(f"{path} is not a valid bundle manifest; refusing to load the bundle") from None
    return {check_name(name, str(path)): digest for name, digest in files.items()}


def check_file(directory: Path, manifest: dict[str, str], name: str) -> None:
    """Check one file of a bundle against the manifest.

    Raises:
        BundleError: the file is not in the manifest, is missing, or differs from it.
    """
    path = Path(directory) / check_name(name, str(Path(directory) / SPEC_FILE))
    if name not in manifest:
        raise BundleError(f"{path} is not listed in {MANIFEST_FILE}; refusing to load the bundle")
    if path.is_symlink():
        raise BundleError(f"{path} is a symbolic link; a bundle's files must be its own")
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


def _expected_digest(directory: Path, expected_digest: str | None) -> str | None:
    if expected_digest is not None:
        return expected_digest
    resolved = directory.resolve()
    pinned = {"default": DEFAULT_BUNDLE_DIGEST, **BUNDLED_DIGESTS}  # read here: tests re-pin the default
    return next((digest for name, digest in pinned.items()
                 if digest and resolved == bundled_model_path(name).resolve()), None)


def _spec_of(directory: Path, manifest: dict[str, str]) -> BundleSpec:
    spec_path = directory / SPEC_FILE
    if not spec_path.is_file():
        raise BundleError(f"{directory} is not a model bundle: {SPEC_FILE} is missing")
    check_file(directory, manifest, SPEC_FILE)
    return BundleSpec.from_raw(read_json_file(spec_path), source=str(spec_path))


def _bundle_dir(directory: str | Path) -> Path:
    directory = Path(directory)
    if not directory.is_dir():
        raise BundleError(f"model bundle {directory} does not exist (expected a directory with "
                          f"{WEIGHTS_FILE} and {SPEC_FILE})")
    if not (directory / SPEC_FILE).is_file() and not (directory / MANIFEST_FILE).is_file():
        raise BundleError(f"{directory} is not a model bundle: {SPEC_FILE} is missing")
    return directory


def read_spec(directory: str | Path, *, expected_digest: str | None = None) -> BundleSpec:
    """Read and validate ``model.json`` of a bundle (checked against the manifest) without
    loading or checking the other files.

    Raises:
        BundleError: missing directory or file, no manifest, a modified model.json, or a bad spec.
    """
    directory = _bundle_dir(directory)
    return _spec_of(directory, read_manifest(directory, expected_digest=_expected_digest(directory, expected_digest)))


def verify_part(directory: Path, part: GateInfo | OnnxInfo) -> None:
    """Check one listed file of a bundle (the gate, the ONNX model) against its sha256.

    Raises:
        BundleError: the file is missing or its sha256 differs.
    """
    path = Path(directory) / part.file
    if not path.is_file() or sha256_file(path) != part.sha256:
        raise BundleError(f"{path} is missing, corrupt or was modified; refusing to load the bundle")


def verify_bundle(directory: str | Path, *, check_onnx: bool = True, expected_digest: str | None = None) -> BundleSpec:
    """Check a bundle without building the network: every file against the manifest (the ONNX
    graph only with ``check_onnx``), and that every file model.json names is listed there.

    Raises:
        BundleError: a missing, unlisted, corrupt or modified file (named), no manifest, a
            digest other than ``expected_digest``, or a bad spec.
    """
    directory = _bundle_dir(directory)
    manifest = read_manifest(directory, expected_digest=_expected_digest(directory, expected_digest))
    spec = _spec_of(directory, manifest)
    onnx = spec.onnx.file if spec.onnx is not None else None
    check_files(directory, manifest, skip=() if check_onnx or onnx is None else (onnx,))
    for name, sha in _recorded(spec, check_onnx=check_onnx).items():
        if name not in manifest:
            raise BundleError(f"{directory / name} is missing from {MANIFEST_FILE}; refusing to load the bundle")
        if manifest[name] != sha:
            raise BundleError(f"{directory / name}: its sha256 in {SPEC_FILE} and in {MANIFEST_FILE} differ; "
                              "refusing to load the bundle")
    return spec


def _recorded(spec: BundleSpec, *, check_onnx: bool = True) -> dict[str, str]:
    """``{file: sha256}`` of every file model.json names."""
    recorded = {WEIGHTS_FILE: spec.weights_sha256}
    if spec.gate is not None:
        recorded[spec.gate.file] = spec.gate.sha256
        if spec.gate.extractor_file:
            recorded[spec.gate.extractor_file] = spec.gate.extractor_sha256
    if spec.onnx is not None and check_onnx:
        recorded[spec.onnx.file] = spec.onnx.sha256
    return recorded


def seal_bundle(directory: str | Path) -> str:
    """Write the manifest of a bundle that has none (made before manifests existed), after
    checking every file model.json records; returns the new digest.

    Raises:
        BundleError: not a bundle, already sealed, or a file that differs from model.json.
    """
    directory = _bundle_dir(directory)
    if (directory / MANIFEST_FILE).exists():
        raise BundleError(f"{directory} is already sealed ({MANIFEST_FILE} exists)")
    spec = BundleSpec.from_json((directory / SPEC_FILE).read_text(), source=str(directory / SPEC_FILE))
    for name, sha in _recorded(spec).items():
        if not (directory / name).is_file() or sha256_file(directory / name) != sha:
            raise BundleError(f"{directory / name} is missing or differs from {SPEC_FILE}; not sealing the bundle")
    return write_manifest(directory)


def rewrite_bundle(source: str | Path, spec: BundleSpec, directory: str | Path, *,
                   extra_files: dict[str, Path] | None = None, drop: tuple[str, ...] = ()) -> BundleSpec:
    """Write ``spec`` as a new bundle that keeps ``source``'s weights file byte for byte, and its
    other files (split list, input gate, ONNX model) but those in ``drop``, with ``extra_files``
    added or replacing them."""
    source = Path(source)
    kept = {item.name: item for item in source.iterdir()
            if item.is_file() and item.name not in (WEIGHTS_FILE, SPEC_FILE, MANIFEST_FILE, *drop)}
    return write_bundle(Path(directory), spec, lambda path: shutil.copyfile(source / WEIGHTS_FILE, path),
                         {**kept, **(extra_files or {})})


def write_bundle(directory: Path, spec: BundleSpec, write_weights: Callable[[Path], object],
                  extra_files: dict[str, Path] | None) -> BundleSpec:
    """Fill a temporary sibling directory, then rename it into place (replacing any old bundle)."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a bundle is meant to be shared and served
    try:
        write_weights(tmp / WEIGHTS_FILE)
        spec = spec.replace(weights_sha256=sha256_file(tmp / WEIGHTS_FILE))
        (tmp / SPEC_FILE).write_text(spec.to_json())
        for name, source in (extra_files or {}).items():
            shutil.copyfile(source, tmp / name)
        write_manifest(tmp)  # last: it covers every file above
        for item in tmp.iterdir():
            item.chmod(0o644)
            with open(item, "rb") as handle:
                os.fsync(handle.fileno())
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            directory.rename(old)
            tmp.rename(directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return spec
