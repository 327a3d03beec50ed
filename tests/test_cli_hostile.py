"""The CLI looks before it reads, and checks where it writes before any image is predicted:
FIFOs, devices and huge files get one line each; output that cannot be written is one error line
(exit 2) up front or a whole file; CSV cells and terminal output cannot be turned against the user."""

from __future__ import annotations

import csv
import errno
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import image_bytes, make_xray, write_kaggle_layout


def run_cli(*args: str, timeout: float = 300, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pneumoscan", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


@pytest.fixture()
def good(tmp_path: Path) -> Path:
    path = tmp_path / "good.png"
    path.write_bytes(image_bytes(make_xray(3)))
    return path


def test_fifos_devices_and_huge_files_get_one_line_each_without_being_read(exported_bundle: Path, tmp_path: Path,
                                                                          good: Path) -> None:
    fifo = tmp_path / "pipe.jpeg"
    os.mkfifo(fifo)  # opening it for reading would wait for a writer for ever
    device = tmp_path / "zero.jpeg"
    device.symlink_to("/dev/zero")  # endless: read whole, it ran to a MemoryError
    sparse = tmp_path / "sparse.png"
    with open(sparse, "wb") as handle:
        handle.truncate(3_000_000_000)  # 3 GB that take no disk
    started = time.monotonic()
    done = run_cli("predict", "--model", str(exported_bundle), str(fifo), str(device), str(sparse), str(good),
                   timeout=120)
    assert time.monotonic() - started < 60
    assert done.returncode == 1 and "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert any("pipe.jpeg: is a FIFO (named pipe), not an image file" in line for line in errors)
    assert any("zero.jpeg: is a character device, not an image file" in line for line in errors)
    assert any("sparse.png: the file is 3000 MB; the limit is 80 MB" in line for line in errors)
    assert "1 predicted" in done.stderr


# root writes through file modes, so the read-only case runs for other users only
@pytest.mark.parametrize("where", ["folder", "missing-folder", "under-a-file"] + (["read-only"] if os.geteuid() else []))
def test_an_unwritable_csv_is_refused_before_any_image_is_predicted(exported_bundle: Path, tmp_path: Path,
                                                                   good: Path, where: str) -> None:
    target = {"folder": tmp_path, "missing-folder": tmp_path / "nope" / "out.csv",
              "under-a-file": good / "out.csv", "read-only": tmp_path / "ro" / "out.csv"}[where]
    if where == "read-only":
        target.parent.mkdir()
        target.parent.chmod(stat.S_IRUSR | stat.S_IXUSR)
    done = run_cli("predict", "--model", str(exported_bundle), str(good), "--csv", str(target))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [done.stderr.strip().splitlines()[0]]
    assert done.stderr.startswith("error: cannot write the CSV to ") and "predicted" not in done.stderr


def test_a_full_disk_leaves_no_empty_csv_and_exits_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pneumoscan import cli_output

    target = tmp_path / "out.csv"
    target.write_text("the previous results\n")

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cli_output.os, "fsync", no_space)
    with pytest.raises(cli_output.OutputError, match="cannot write .*out.csv: No space left on device"):
        cli_output.write_csv(target, ["path"], [["a.png"]])
    assert target.read_text() == "the previous results\n"  # the old file, not an empty one
    assert [p.name for p in tmp_path.iterdir()] == ["out.csv"]  # no partial file left behind


def test_csv_cells_and_terminal_output_are_escaped(exported_bundle: Path, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    formula = folder / "=HYPERLINK(evil).png"
    formula.write_bytes(b"not an image")  # the name shows up in the path and the error columns
    escape = folder / "\x1b]0;owned\x07\x1b[2J.png"
    escape.write_bytes(image_bytes(make_xray(4)))
    out = tmp_path / "out.csv"
    # relative names, as a user in that folder types them: the cell then starts with the name
    done = run_cli("predict", "--model", str(exported_bundle), formula.name, escape.name, "--csv", str(out), cwd=folder)
    assert done.returncode == 1
    rows = list(csv.DictReader(out.open()))
    bad = next(r for r in rows if "HYPERLINK" in r["path"])
    assert not bad["path"].startswith(("=", "+", "-", "@")) and bad["path"].startswith("'")
    assert not bad["error"].startswith(("=", "+", "-", "@"))
    shown = run_cli("predict", "--model", str(exported_bundle), str(escape))
    assert "\x1b" not in shown.stdout + shown.stderr and "\x07" not in shown.stdout
    assert "\\x1b]0;owned\\x07" in shown.stdout


def test_evaluate_refuses_a_class_with_too_few_readable_images(exported_bundle: Path, tmp_path: Path) -> None:
    root = write_kaggle_layout(tmp_path / "data", per_class={"test": 6})
    for path in (root / "test" / "NORMAL").iterdir():
        path.write_bytes(b"broken")
    done = run_cli("evaluate", "--model", str(exported_bundle), "--data", str(root), "--out", str(tmp_path / "r"),
                   "--bootstrap", "100")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "NORMAL: 0 of 6 image(s) readable in test; at least 5 readable images per class" in done.stderr
    assert not (tmp_path / "r" / "metrics.json").exists()


def test_explain_draws_on_the_film_at_display_size(exported_bundle: Path, tmp_path: Path) -> None:
    from PIL import Image

    film = tmp_path / "wide.png"
    film.write_bytes(image_bytes(make_xray(5, size=(2400, 2000))))
    done = run_cli("explain", "--model", str(exported_bundle), str(film), "--out", str(tmp_path / "o"), "--no-gate")
    assert done.returncode == 0, done.stderr
    with Image.open(tmp_path / "o" / "wide.gradcam.png") as overlay:
        assert overlay.width == 512  # not 2400: the overlay's float copies are the display's
