"""A labelled contact sheet of images (Pillow): one row per row label, one column per column label,
and, when given, a caption under each cell.

Small images are enlarged by a whole factor (nearest neighbour, so no detail is invented) until a
cell is at least MIN_CELL pixels on its short side, which leaves room for readable labels. The
layout is stored in the PNG's text chunk "copylora-grid" (JSON), so tests and tools can find every
cell again: cell (r, c) has its top left corner at origin + (c * column_step, r * row_step).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from copylora.errors import CopyloraError

MIN_CELL = 128
PAD = 6
BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)
METADATA_KEY = "copylora-grid"


def _font():
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=14)  # Pillow >= 10.1 with FreeType
    except TypeError:
        return ImageFont.load_default()


def contact_sheet(cells: list[list[Path]], row_labels: list[str], column_labels: list[str], path: Path,
                  captions: list[list[str]] | None = None) -> Path:
    """Write the sheet to path (temp file + os.replace) and return it; captions: one line under each cell."""
    from PIL import Image, ImageDraw, PngImagePlugin

    if len(cells) != len(row_labels) or any(len(row) != len(column_labels) for row in cells):
        raise ValueError("one label per row and per column")
    if captions is not None and [len(row) for row in captions] != [len(row) for row in cells]:
        raise ValueError("one caption per cell")
    pictures = [[Image.open(p).convert("RGB") for p in row] for row in cells]
    width = max(image.width for row in pictures for image in row)
    height = max(image.height for row in pictures for image in row)
    scale = max(1, -(-MIN_CELL // min(width, height)))  # ceil
    cell_w, cell_h = width * scale, height * scale

    font = _font()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def text_size(text: str) -> tuple[int, int]:
        left, top, right, bottom = measure.multiline_textbbox((0, 0), text, font=font)
        return right - left, bottom - top

    label_w = max(text_size(label)[0] for label in row_labels) + 2 * PAD
    header_h = max(text_size(label)[1] for label in column_labels) + 2 * PAD
    caption_h = max(text_size(text)[1] for row in captions for text in row) + PAD if captions else 0
    x0, y0 = label_w, header_h
    column_step, row_step = cell_w + PAD, cell_h + caption_h + PAD
    sheet = Image.new("RGB", (x0 + len(column_labels) * column_step, y0 + len(row_labels) * row_step), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for c, label in enumerate(column_labels):
        w, _ = text_size(label)
        draw.text((x0 + c * column_step + (cell_w - w) // 2, PAD), label, fill=INK, font=font)
    for r, label in enumerate(row_labels):
        _, h = text_size(label)
        draw.multiline_text((PAD, y0 + r * row_step + (cell_h - h) // 2), label, fill=INK, font=font)
        for c, image in enumerate(pictures[r]):
            if image.size != (width, height):
                image = image.resize((width, height), Image.Resampling.LANCZOS)
            sheet.paste(image.resize((cell_w, cell_h), Image.Resampling.NEAREST),
                        (x0 + c * column_step, y0 + r * row_step))
            if captions:
                w, _ = text_size(captions[r][c])
                draw.text((x0 + c * column_step + (cell_w - w) // 2, y0 + r * row_step + cell_h + PAD // 2),
                          captions[r][c], fill=INK, font=font)

    layout = {"rows": row_labels, "columns": column_labels, "origin": [x0, y0], "cell": [cell_w, cell_h],
              "pad": PAD, "column_step": column_step, "row_step": row_step, "scale": scale,
              "images": [[str(p) for p in row] for row in cells], "captions": captions}
    info = PngImagePlugin.PngInfo()
    info.add_text(METADATA_KEY, json.dumps(layout, ensure_ascii=False))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        sheet.save(tmp, pnginfo=info)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def read_layout(path: Path) -> dict:
    """The layout a contact sheet was written with."""
    from PIL import Image

    with Image.open(path) as image:
        text = image.info.get(METADATA_KEY)
    if text is None:
        raise CopyloraError(f"{path}: not a copylora contact sheet (no {METADATA_KEY} text)")
    return json.loads(text)
