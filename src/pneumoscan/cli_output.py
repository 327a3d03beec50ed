"""What the CLI writes: to a terminal (names escaped), to CSV (cells a spreadsheet will not run),
and to files and folders checked before any image is processed and written whole or not at all."""

from __future__ import annotations

import csv
import os
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

from pneumoscan.errors import PneumoscanError


class OutputError(PneumoscanError):
    """An output file or folder cannot be written (exit 2, one line)."""

    code = "output_error"


#: A cell starting with one of these is a formula to Excel, LibreOffice and Google Sheets
#: (OWASP "CSV injection"); a file named ``=HYPERLINK(...).png`` must stay a name.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(cell: object) -> object:
    """A CSV cell that a spreadsheet shows as text: formula-like text gets a leading apostrophe."""
    if isinstance(cell, str) and cell.startswith(_FORMULA_STARTS):
        return "'" + cell
    return cell


def terminal_safe(text: str) -> str:
    """``text`` with control characters (terminal escape sequences among them) shown as escapes,
    so a file name cannot move the cursor, retitle the window or hide itself. Line breaks stay."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() or ch == "\n" else ch.encode("unicode_escape").decode("ascii") for ch in text)


def _problem(path: Path) -> str | None:
    """Why ``path`` cannot be written as a file, or None."""
    if path.is_dir():
        return "it is a folder"
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        return f"its folder {parent} does not exist"
    if path.exists() and not os.access(path, os.W_OK):
        return "it is not writable"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"its folder {parent} is not writable"
    return None


def check_writable_file(path: Path, what: str) -> None:
    """Raises OutputError (naming ``what``) when ``path`` cannot be written: checked up front."""
    problem = _problem(path)
    if problem:
        raise OutputError(terminal_safe(f"cannot write the {what} to {path}: {problem}"))


def check_writable_folder(path: Path, what: str) -> None:
    """Create ``path`` (and parents) and check it takes files; Raises OutputError otherwise."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(terminal_safe(f"cannot create the {what} folder {path}: {exc.strerror}")) from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise OutputError(terminal_safe(f"cannot write the {what} to {path}: the folder is not writable"))


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    """Write a CSV beside ``path`` and rename it into place: on a full disk there is the old file
    or none, never an empty or cut one.

    Raises:
        OutputError: the write failed (the message says why: no space left, ...).
    """
    handle = None
    try:
        handle = tempfile.NamedTemporaryFile("w", newline="", dir=path.parent if str(path.parent) else ".",
                                             prefix=f".{path.name}.", suffix=".partial", delete=False)
        with handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            writer.writerows([spreadsheet_safe(cell) for cell in row] for row in rows)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except OSError as exc:
        if handle is not None:
            Path(handle.name).unlink(missing_ok=True)
        raise OutputError(terminal_safe(f"cannot write {path}: {exc.strerror or exc}")) from None
