"""MkDocs hooks: the repository's README and MODEL_CARD become the site's home and model-card
pages (one copy of each, in the repository root), with their links rewritten for the site."""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]  # scripts/ -> the repository
#: Root files shown as pages: (source, page).
PAGES = {"README.md": "index.md", "MODEL_CARD.md": "model-card.md"}


def on_files(files, config):
    for source, page in PAGES.items():
        files.append(File.generated(config, page, abs_src_path=str(ROOT / source)))
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri == "index.md":
        # README links point into docs/ from the root; on the site they are siblings
        markdown = markdown.replace("](docs/", "](").replace("](MODEL_CARD.md)", "](model-card.md)")
        markdown = markdown.replace("[`docs/`]()", "`docs/`")
    # links from the root files to repository files outside the site become plain text
    return re.sub(r"\]\((?!https?:|#|[\w./-]+\.md\b|[\w./-]+\.png\b)([^)]+)\)", r"] (`\1`)", markdown)
