"""Synthetic images that are not chest X-rays: text pages and greyscale application windows.

Made offline and deterministically (PIL and numpy only). They pass every image check (grey,
contrasty, page- or screen-shaped), so only the feature gate can refuse them: ``fit-gate``
measures a newly fitted gate on them, and ``bench/nonxray.py`` adds natural pictures.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFont

WORDS = ("patient report result normal findings the of and chest lung radiograph invoice total amount date "
         "page section table figure summary account meeting notes agenda item price quantity").split()


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _document(rng: np.random.Generator) -> Image.Image:
    width = int(rng.integers(600, 900))
    page = Image.new("L", (width, int(width * 1.41)), int(rng.integers(225, 256)))
    draw = ImageDraw.Draw(page)
    size = int(rng.integers(14, 26))
    y = int(rng.integers(30, 80))
    draw.text((40, y), " ".join(rng.choice(WORDS, 4)).title(), fill=0, font=_font(size + 10))
    y += size + 30
    while y < page.height - 60:
        if rng.random() < 0.15:  # a table
            rows, cols = int(rng.integers(3, 7)), int(rng.integers(2, 5))
            cell_w, cell_h = (width - 80) // cols, size + 12
            for r in range(rows):
                for c in range(cols):
                    box = (40 + c * cell_w, y + r * cell_h, 40 + (c + 1) * cell_w, y + (r + 1) * cell_h)
                    draw.rectangle(box, outline=40)
                    draw.text((box[0] + 4, box[1] + 4), str(rng.choice(WORDS)), fill=20, font=_font(size - 2))
            y += rows * cell_h + 20
        else:
            words = rng.choice(WORDS, int(rng.integers(5, 12)))
            draw.text((40, y), " ".join(words), fill=int(rng.integers(0, 60)), font=_font(size))
            y += int(size * 1.6)
    return page


def _screenshot(rng: np.random.Generator) -> Image.Image:
    width, height = int(rng.integers(800, 1400)), int(rng.integers(500, 900))
    screen = Image.new("L", (width, height), int(rng.integers(200, 250)))
    draw = ImageDraw.Draw(screen)
    draw.rectangle((0, 0, width, 36), fill=int(rng.integers(30, 90)))  # title bar
    draw.text((12, 8), " ".join(rng.choice(WORDS, 3)), fill=255, font=_font(18))
    sidebar = int(rng.integers(150, 260))
    draw.rectangle((0, 36, sidebar, height), fill=int(rng.integers(150, 200)))
    for i in range(int(rng.integers(6, 14))):
        draw.text((14, 50 + i * 30), str(rng.choice(WORDS)).title(), fill=20, font=_font(16))
    for _ in range(int(rng.integers(3, 9))):  # panels, buttons, images
        x0, y0 = int(rng.integers(sidebar + 10, width - 200)), int(rng.integers(50, height - 120))
        x1, y1 = x0 + int(rng.integers(80, 400)), y0 + int(rng.integers(30, 200))
        draw.rectangle((x0, y0, min(x1, width - 10), min(y1, height - 10)), fill=int(rng.integers(0, 255)),
                       outline=int(rng.integers(0, 120)))
        draw.text((x0 + 8, y0 + 8), " ".join(rng.choice(WORDS, 2)), fill=int(rng.integers(0, 255)), font=_font(16))
    return screen


def documents(count: int = 40, seed: int = 0) -> dict[str, bytes]:
    rng = np.random.default_rng(seed)
    return {f"document/{i:03d}": png_bytes(_document(rng)) for i in range(count)}


def screenshots(count: int = 40, seed: int = 1) -> dict[str, bytes]:
    rng = np.random.default_rng(seed)
    return {f"screenshot/{i:03d}": png_bytes(_screenshot(rng)) for i in range(count)}


def synthetic_non_xrays() -> dict[str, bytes]:
    """40 documents and 40 screenshots as PNG bytes, keyed ``kind/NNN``."""
    return {**documents(), **screenshots()}
