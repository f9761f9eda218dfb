"""PNGs: model-input slices with keypoints, and grids of stage-2 crops (Pillow).

Images are upscaled by an integer factor with nearest-neighbour sampling, so every model
pixel stays a visible block: model pixel ``(row, col)`` (centres at integers) is drawn at
``((col + 0.5) * s - 0.5, (row + 0.5) * s - 0.5)``. Captions and legends go *below* the
image, so the image keeps its origin at the PNG's top-left corner.

Markers: colour = level (`LEVEL_COLOURS`, L1/L2 ... L5/S1), shape = side (circle: spinal,
triangle: left, square: right), filled and outlined in black for predictions (in white when
the point lies off the drawn slice, further than half a slice of the input); a thin x for the
ground truth (labels), drawn last.
"""

from __future__ import annotations

import math
import textwrap
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..constants import LEVEL_TO_COORD_LEVEL, LEVELS
from ..output import atomic_write

if TYPE_CHECKING:
    from PIL import Image, ImageDraw, ImageFont

    from .frames import CropGrid, Frame, Mark

#: One colour per level, cranial to caudal (distinct under common colour blindness).
LEVEL_COLOURS: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (245, 130, 48), (255, 225, 25), (60, 180, 75), (0, 130, 200),
)
GRADE_COLOURS: tuple[tuple[int, int, int], ...] = ((90, 200, 90), (245, 165, 40), (235, 60, 60))
GRADE_SHORT: tuple[str, ...] = ("N/M", "Mod", "Sev")
SHAPES: dict[Any, str] = {None: "circle", 0: "triangle", 1: "square"}
BACKGROUND = (24, 24, 24)
TEXT = (235, 235, 235)
MUTED = (150, 150, 150)


@lru_cache(maxsize=8)
def font(size: int = 12) -> "ImageFont.ImageFont":
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable font
    except TypeError:  # older Pillow: the fixed bitmap font
        return ImageFont.load_default()


def display_scale(h: int, w: int, target: int = 256, max_scale: int = 8) -> int:
    """Integer upscaling so the longer side reaches about ``target`` pixels."""
    return int(max(1, min(max_scale, math.ceil(target / max(1, h, w)))))


def to_display(row: float, col: float, scale: int) -> tuple[float, float]:
    """Model-input pixel (row, col) -> PNG (x, y)."""
    return (col + 0.5) * scale - 0.5, (row + 0.5) * scale - 0.5


def _gray(image: np.ndarray, scale: int) -> "Image.Image":
    from PIL import Image

    h, w = image.shape
    return Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8), "L").resize((w * scale, h * scale), Image.NEAREST).convert("RGB")


def _marker(draw: "ImageDraw.ImageDraw", x: float, y: float, r: float, colour: tuple[int, int, int], shape: str,
            outline: tuple[int, int, int] = (0, 0, 0)) -> None:
    if shape == "triangle":
        pts = [(x, y - 1.25 * r), (x + 1.15 * r, y + 0.85 * r), (x - 1.15 * r, y + 0.85 * r)]
        draw.polygon(pts, fill=colour, outline=outline)
    elif shape == "square":
        draw.rectangle([x - r, y - r, x + r, y + r], fill=colour, outline=outline)
    else:
        draw.ellipse([x - r, y - r, x + r, y + r], fill=colour, outline=outline)


def _plus(draw: "ImageDraw.ImageDraw", x: float, y: float, arm: float, width: int, colour: tuple[int, int, int]) -> None:
    for w, c in ((width + 2, (0, 0, 0)), (width, colour)):
        draw.line([(x - arm, y), (x + arm, y)], fill=c, width=w)
        draw.line([(x, y - arm), (x, y + arm)], fill=c, width=w)


def _cross(draw: "ImageDraw.ImageDraw", x: float, y: float, arm: float, colour: tuple[int, int, int]) -> None:
    """The ground-truth marker: a thin x (outlined), so a prediction under it stays visible."""
    for w, c in ((3, (0, 0, 0)), (1, colour)):
        draw.line([(x - arm, y - arm), (x + arm, y + arm)], fill=c, width=w)
        draw.line([(x - arm, y + arm), (x + arm, y - arm)], fill=c, width=w)
    draw.point((round(x), round(y)), fill=colour)


def _legend(draw: "ImageDraw.ImageDraw", x0: int, y0: int, width: int, caption: str, with_truth: bool) -> int:
    """Caption, level colours and marker shapes below an image; returns the height used."""
    f = font(11)
    y = y0 + 3
    for line in textwrap.wrap(caption, width=max(20, width // 6)):
        draw.text((x0 + 3, y), line, fill=TEXT, font=f)
        y += 13
    x = x0 + 3
    for lv, colour in enumerate(LEVEL_COLOURS):
        draw.rectangle([x, y + 2, x + 9, y + 11], fill=colour)
        label = LEVEL_TO_COORD_LEVEL[LEVELS[lv]]
        draw.text((x + 12, y), label, fill=TEXT, font=f)
        x += 14 + int(draw.textlength(label, font=f)) + 6
    y += 15
    x = x0 + 8
    items = [("circle", "spinal"), ("triangle", "left"), ("square", "right")] + ([("cross", "truth")] if with_truth else [])
    for shape, label in items:
        if shape == "cross":
            _cross(draw, x, y + 6, 5, (220, 220, 220))
        else:
            _marker(draw, x, y + 6, 4, (220, 220, 220), shape)
        draw.text((x + 8, y), label, fill=TEXT, font=f)
        x += 16 + int(draw.textlength(label, font=f)) + 8
    y += 15
    _marker(draw, x0 + 8, y + 6, 4, (120, 120, 120), "circle", outline=(255, 255, 255))
    draw.text((x0 + 16, y), "white outline: off this slice", fill=TEXT, font=f)
    return y + 16 - y0


def _legend_height(caption: str, width: int) -> int:
    return 3 + 13 * len(textwrap.wrap(caption, width=max(20, width // 6))) + 15 + 15 + 16


def render_frame(frame: "Frame", path: str | Path, target: int = 256) -> dict[str, Any]:
    """Write ``frame`` with its marks as a PNG; returns what was drawn where (display pixels)."""
    from PIL import Image, ImageDraw

    h, w = frame.image.shape
    s = display_scale(h, w, target)
    img = _gray(frame.image, s)
    width = max(img.width, 240)
    caption = frame.label
    canvas = Image.new("RGB", (width, img.height + _legend_height(caption, width)), BACKGROUND)
    canvas.paste(img, (0, 0))
    draw = ImageDraw.Draw(canvas)
    r = max(3.0, 1.1 * s)
    marks: list[Mark] = sorted(frame.marks, key=lambda m: m.truth)  # predictions first, truth on top
    f = font(10)
    for lv in sorted({m.level for m in marks}):  # one level label per level, right of its rightmost mark
        xs = [to_display(m.row, m.col, s) for m in marks if m.level == lv]
        x, y = max(xs)
        draw.text((x + r + 3, y - 6), LEVEL_TO_COORD_LEVEL[LEVELS[lv]].split("/")[0], fill=TEXT, font=f,
                  stroke_width=1, stroke_fill=(0, 0, 0))
    drawn = []
    for m in marks:  # after the labels, so no text ever covers a marker's centre
        x, y = to_display(m.row, m.col, s)
        colour = LEVEL_COLOURS[m.level]
        if m.truth:
            _cross(draw, x, y, r + 3, colour)
        else:
            _marker(draw, x, y, r, colour, SHAPES[m.side], outline=(255, 255, 255) if m.dz > frame.slab + 1e-6 else (0, 0, 0))
        drawn.append({"kind": m.kind, "index": m.index, "name": m.name, "truth": m.truth, "x": round(x, 3), "y": round(y, 3),
                      "row": round(m.row, 3), "col": round(m.col, 3), "dz_slices": round(m.dz, 3),
                      "confidence": round(m.confidence, 4), "provenance": m.provenance,
                      "colour": list(colour), "shape": "cross" if m.truth else SHAPES[m.side]})
    _legend(draw, 0, img.height, width, caption, any(m.truth for m in marks))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda fh: canvas.save(fh, format="PNG"), binary=True)
    return {"scale": s, "size": [h, w], "marks": drawn}


def grade_line(targets: list[tuple[int, int]], probs: np.ndarray | None, coverage: np.ndarray | None) -> list[tuple[str, tuple[int, int, int]]]:
    """Per target of a tile: ``('Mod .62', colour)``, or ``('prior', grey)`` where no model predicted it."""
    out = []
    sides = len(targets) > 1
    for c, lv in targets:
        prefix = ("L " if c == 3 else "R ") if sides else ""
        if probs is None or (coverage is not None and not bool(coverage[c, lv])):
            out.append((prefix + "prior", MUTED))
            continue
        p = np.asarray(probs[c, lv], dtype=np.float64)
        k = int(np.argmax(p))
        out.append((f"{prefix}{GRADE_SHORT[k]} {p[k]:.2f}", GRADE_COLOURS[k]))
    return out


def render_grid(grid: "CropGrid", probs: np.ndarray | None, coverage: np.ndarray | None, path: str | Path,
                tile_target: int = 112) -> dict[str, Any]:
    """Every crop of ``grid`` (its centre slice) titled with its target and predicted grade."""
    from PIL import Image, ImageDraw

    shapes = [t.image.shape for _, tiles in grid.rows for t in tiles if t.image is not None]
    h, w = shapes[0] if shapes else (32, 32)
    s = display_scale(h, w, tile_target)
    tw, th = max(w * s, 120), h * s
    pad, title_h, row_h = 6, 30, 16
    n_cols = max((len(tiles) for _, tiles in grid.rows), default=1)
    head = 34
    width = pad + n_cols * (tw + pad)
    height = head + len(grid.rows) * (row_h + title_h + th + pad) + pad
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, 4), f"{grid.group}: {', '.join(grid.members)}", fill=TEXT, font=font(12))
    draw.text((pad, 19), f"centre slice of {grid.n_slices} per crop; + = the keypoint; grade = the blended prediction",
              fill=MUTED, font=font(10))
    y = head
    f, fs = font(11), font(10)
    n_tiles = 0
    for row_name, tiles in grid.rows:
        draw.text((pad, y + 1), row_name, fill=TEXT, font=f)
        y += row_h
        for j, t in enumerate(tiles):
            x = pad + j * (tw + pad)
            draw.text((x, y), t.title, fill=TEXT, font=f)
            gx = x
            for text, colour in grade_line(t.targets, probs, coverage):
                draw.text((gx, y + 14), text, fill=colour, font=fs)
                gx += int(draw.textlength(text, font=fs)) + 6
            if t.image is None:
                draw.rectangle([x, y + title_h, x + tw - 1, y + title_h + th - 1], fill=(60, 60, 60))
                draw.text((x + 6, y + title_h + th // 2 - 6), "no crop", fill=MUTED, font=f)
                continue
            tile = _gray(t.image, s)
            canvas.paste(tile, (x, y + title_h))
            n_tiles += 1
            if t.center is not None:
                cx, cy = to_display(t.center[0], t.center[1], s)
                _plus(draw, x + cx, y + title_h + cy, 4, 1, LEVEL_COLOURS[t.level])
        y += title_h + th + pad
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda fh: canvas.save(fh, format="PNG"), binary=True)
    return {"scale": s, "tiles": n_tiles, "rows": [name for name, _ in grid.rows]}

