"""The docs cannot go stale: every ``pneumoscan`` command line in README.md and docs/ names a
command that exists and only options that command takes; every page in the site's nav exists."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "MODEL_CARD.md", *sorted((ROOT / "docs").glob("*.md"))]


def _command_lines(text: str) -> list[str]:
    """``pneumoscan ...`` lines of the page's bash blocks, continuation lines joined."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            match = re.match(r"^(?:\.venv(?:-light)?/bin/)?pneumoscan\s+(.*)$", line)
            if match:
                lines.append(match.group(1))
    return lines


def _commands():
    import typer.main

    from pneumoscan.cli import app
    import pneumoscan.cli_model  # noqa: F401 - registers train, calibrate, ...

    return typer.main.get_command(app).commands


CASES = [(page.name, line) for page in PAGES for line in _command_lines(page.read_text())]


def test_the_docs_show_commands() -> None:
    assert len(CASES) >= 20  # the parser found them (28 when written)


@pytest.mark.parametrize(("page", "line"), CASES)
def test_every_documented_command_and_option_exists(page: str, line: str) -> None:
    commands = _commands()
    words = shlex.split(line.replace("...", ""))
    name = words[0]
    assert name in commands or name.startswith("-"), f"{page}: 'pneumoscan {name}' is not a command"
    if name.startswith("-"):
        return  # pneumoscan --version
    known = {opt for param in commands[name].params for opt in (*param.opts, *param.secondary_opts)}
    for word in words[1:]:
        flag = word.split("=")[0]
        if flag.startswith("--"):
            assert flag in known, f"{page}: 'pneumoscan {name}' has no option {flag}"


def test_every_page_in_the_nav_exists() -> None:
    nav = re.findall(r":\s*([\w-]+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), flags=re.M)
    generated = {"index.md", "model-card.md"}  # README.md and MODEL_CARD.md, added by the hooks
    assert nav and all((ROOT / "docs" / page).is_file() or page in generated for page in nav)
