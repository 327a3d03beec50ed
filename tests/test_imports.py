"""Import direction: each layer imports only the layers below it.

Two checks: a static one that reads every module's imports (lazy ones inside functions too),
and a live one that imports the serving side in a fresh interpreter and looks at sys.modules.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "pneumoscan"

#: (modules, what they must never import). Prefixes match submodules.
FORBIDDEN = [
    (("pneumoscan.training",), ("pneumoscan.evaluation", "pneumoscan.inference", "pneumoscan.bundle_tools",
                                "pneumoscan.web", "pneumoscan.export", "pneumoscan.runtime")),
    (("pneumoscan.web", "pneumoscan.inference", "pneumoscan.runtime", "pneumoscan.dicom", "pneumoscan.cli_dicom"),
     ("pneumoscan.training", "pneumoscan.export", "lightning", "pytorch_lightning")),
    (("pneumoscan.evaluation",), ("pneumoscan.training", "pneumoscan.export", "pneumoscan.bundle_tools",
                                  "pneumoscan.web", "lightning")),
    (("pneumoscan.stats", "pneumoscan.calibration", "pneumoscan.spec", "pneumoscan.imaging", "pneumoscan.gate",
      "pneumoscan.integrity", "pneumoscan.dicom.pixels", "pneumoscan.dicom.codestreams",
      "pneumoscan.plots"), ("pneumoscan.models", "pneumoscan.inference", "pneumoscan.training", "torch", "lightning")),
    (("pneumoscan.models", "pneumoscan.data", "pneumoscan.bundle_tools", "pneumoscan.export", "pneumoscan.card"),
     ("pneumoscan.training", "pneumoscan.web", "lightning")),
]
MAX_LINES = 400


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _matches(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_arrows_point_one_way(module: str) -> None:
    imported = _imports(MODULES[module])
    for owners, forbidden in FORBIDDEN:
        if _matches(module, owners):
            bad = sorted(name for name in imported if _matches(name, forbidden))
            assert not bad, f"{module} imports {bad}"


def test_the_rules_would_catch_a_wrong_arrow(tmp_path: Path) -> None:
    """The static check reads lazy imports inside functions, where a wrong arrow likes to hide."""
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from pneumoscan.training.fit import train\n    import lightning.pytorch\n")
    assert {"pneumoscan.training.fit", "lightning.pytorch"} <= _imports(sample)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_is_over_the_size_limit(module: str) -> None:
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{module} has {lines} lines (limit {MAX_LINES})"


def _loaded_after(imports: str, forbidden: str) -> subprocess.CompletedProcess:
    code = (f"import sys, {imports}; bad = [m for m in sys.modules if {forbidden}]; "
            "print(bad); sys.exit(1 if bad else 0)")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_serving_imports_no_training_lightning_or_exporter() -> None:
    result = _loaded_after("pneumoscan.web, pneumoscan.inference, pneumoscan.evaluation, pneumoscan.bundle_tools",
                           "m.split('.')[0] in ('lightning', 'pytorch_lightning') "
                           "or m.startswith('pneumoscan.training') or m == 'pneumoscan.export'")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_cli_starts_without_torch() -> None:
    """Its train options come from TrainConfig, which imports neither torch nor Lightning."""
    result = _loaded_after("pneumoscan.cli", "m.split('.')[0] in ('torch', 'lightning', 'torchvision')")
    assert result.returncode == 0, result.stdout + result.stderr
