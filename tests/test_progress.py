"""Progress bars: drawn on stderr when it is a terminal, never when redirected or with --quiet."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
from pathlib import Path


def _run_on_a_terminal(args: list[str]) -> tuple[int, str]:
    """Run the CLI with stderr (and stdout) on a pseudo-terminal; return its status and output."""
    leader, follower = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "pneumoscan", *args], stdin=subprocess.DEVNULL,
                               stdout=follower, stderr=follower, env={**os.environ, "COLUMNS": "120"})
    os.close(follower)
    chunks = []
    while True:
        ready, _, _ = select.select([leader], [], [], 120)
        if not ready:
            process.kill()
            break
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    return process.wait(timeout=60), b"".join(chunks).decode(errors="replace")


def test_predict_draws_a_bar_on_a_terminal_and_not_when_quiet_or_redirected(tiny_bundle: Path, xray_root: Path,
                                                                          tmp_path: Path) -> None:
    folder = xray_root / "test"
    count = sum(1 for p in folder.rglob("*") if p.is_file())
    args = ["predict", "--model", str(tiny_bundle), str(folder), "--csv", str(tmp_path / "p.csv")]
    status, shown = _run_on_a_terminal(args)
    assert status == 0, shown
    assert "predicting" in shown and f"{count}/{count}" in shown  # rich's bar: description, done/total
    status, quiet = _run_on_a_terminal([*args, "--quiet"])
    assert status == 0 and "predicting" not in quiet and f"{count} result(s) written" in quiet
    redirected = subprocess.run([sys.executable, "-m", "pneumoscan", *args], capture_output=True, text=True, timeout=300)
    assert redirected.returncode == 0 and "predicting" not in redirected.stderr


def test_evaluate_draws_a_bar_on_a_terminal(tiny_bundle: Path, xray_root: Path, tmp_path: Path) -> None:
    status, shown = _run_on_a_terminal(["evaluate", "--data", str(xray_root), "--model", str(tiny_bundle),
                                        "--out", str(tmp_path / "r"), "--bootstrap", "100"])
    assert status == 0, shown
    assert "evaluating test" in shown and "report written" in shown


def test_train_draws_lightnings_rich_bar_on_a_terminal(xray_root: Path, tmp_path: Path) -> None:
    import pytest

    pytest.importorskip("lightning", reason="training needs pneumoscan[train]")
    status, shown = _run_on_a_terminal(["train", "--data", str(xray_root), "--out", str(tmp_path / "run"),
                                        "--weights", "none", "--input-size", "64", "--epochs", "1",
                                        "--frozen-epochs", "0", "--batch-size", "8"])
    assert status == 0, shown[-2000:]
    assert "Epoch 1/1" in shown and "━" in shown and "bundle ready" in shown
