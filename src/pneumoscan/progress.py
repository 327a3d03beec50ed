"""Progress bars on stderr, shown only when stderr is a terminal (rich; torch-free).

Commands that work through many files (``predict``, ``evaluate``) take a ``progress`` callback;
the CLI passes :func:`bar`'s. Training uses Lightning's rich bar with the same rule
(:func:`shows_progress`). Redirected or ``--quiet`` runs print no bar at all, so logs and CSVs
piped elsewhere stay clean.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator


def shows_progress(quiet: bool = False) -> bool:
    """Whether a bar should be drawn: not ``quiet`` and stderr is a terminal."""
    return not quiet and sys.stderr.isatty()


@contextlib.contextmanager
def bar(total: int, description: str, *, quiet: bool = False) -> Iterator[Callable[[int], None]]:
    """A bar of ``total`` steps on stderr; yields ``advance(n)``. A no-op when not shown."""
    if not shows_progress(quiet) or total <= 0:
        yield lambda n=1: None
        return
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("eta"), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=False) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n=1: progress.advance(task, n)
