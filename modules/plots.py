"""Small PNG plots drawn with numpy (matplotlib is not a dependency): training curves of the
train loops and the size histogram of semantic-ID collision groups. The codebook-usage plot
(modules/semantic_ids.py) uses the same primitives. Files are written atomically."""

from __future__ import annotations

import os
import struct
import uuid
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

# 3x5 pixel glyphs (rows top to bottom) for titles; characters without one draw as a space.
_GLYPHS = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001001001001",
    "8": "111101111101111", "9": "111101111001111", "L": "100100100100111", "/": "001001010100100",
    " ": "000000000000000", "u": "000101101101111", "s": "000011110011110", "e": "010101111100011",
    "d": "001011101101011", "m": "000110111101101", "a": "000110011101011", "x": "000101010101101",
    "b": "100100110101110", "c": "000011100100011", "f": "011010111010010", "g": "011101011001110",
    "h": "100100110101101", "i": "010000010010010", "k": "100101110101101", "l": "110010010010111",
    "n": "000110101101101", "o": "000010101101010", "p": "000110101110100", "r": "000101110100100",
    "t": "010111010010011", "v": "000101101101010", "w": "000101101111101", "y": "000101011001110",
    "z": "000111001010111", ".": "000000000000010", "@": "111101111100011", "-": "000000111000000",
    ":": "000010000010000", "=": "000111000111000", ",": "000000000010100", "q": "000011101011001",
}
BLUE, RED, GREY = (40, 90, 200), (220, 30, 30), (120, 120, 120)


def draw_text(img: np.ndarray, text: str, y: int, x: int, scale: int = 2, color=(0, 0, 0)) -> None:
    for ch in text:
        if x + 3 * scale > img.shape[1] or y + 5 * scale > img.shape[0]:
            return  # a title longer than the image is cut
        bits = np.array([int(b) for b in _GLYPHS.get(ch, _GLYPHS[" "])], dtype=bool).reshape(5, 3)
        img[y : y + 5 * scale, x : x + 3 * scale][bits.repeat(scale, 0).repeat(scale, 1)] = color
        x += 4 * scale


def png_bytes(rgb: np.ndarray) -> bytes:
    """Minimal PNG encoder: 8-bit RGB, filter 0 on every row, one zlib IDAT chunk."""
    h, w, _ = rgb.shape
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rgb.reshape(h, w * 3)], 1).tobytes()

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")


def write_png(rgb: np.ndarray, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_bytes(png_bytes(rgb))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def plot_curves(panels: Sequence[tuple[str, Sequence[float], Sequence[float]]], path: str | Path,
                width: int = 640, panel_h: int = 120) -> Path:
    """One panel per (title, steps, values): the values joined by straight lines, the x axis
    from the first to the last step, the y axis from the panel's min to its max (both written
    in the title, with the step of the max). Empty series leave an empty panel."""
    title_h, margin = 16, 8
    step_h = title_h + panel_h + 2 * margin
    img = np.full((len(panels) * step_h + margin, width + 2 * margin, 3), 255, np.uint8)
    for k, (title, xs, ys) in enumerate(panels):
        top = k * step_h + margin
        base = top + title_h + panel_h  # the x axis row
        img[base, margin : margin + width] = GREY
        xs, ys = np.asarray(xs, float), np.asarray(ys, float)
        ok = np.isfinite(ys)
        xs, ys = xs[ok], ys[ok]
        if len(ys) == 0:
            draw_text(img, f"{title}: no data", top, margin)
            continue
        best = int(np.argmax(ys))
        draw_text(img, f"{title}  min {_fmt(ys.min())}  max {_fmt(ys.max())} at {int(xs[best])}", top, margin)
        span_x = max(xs.max() - xs.min(), 1e-12)
        span_y = max(ys.max() - ys.min(), 1e-12)
        px = margin + np.round((xs - xs.min()) / span_x * (width - 1)).astype(int)
        py = base - 1 - np.round((ys - ys.min()) / span_y * (panel_h - 1)).astype(int)
        if len(px) == 1:
            img[py[0] - 1 : py[0] + 2, px[0] - 1 : px[0] + 2] = BLUE
            continue
        for (x0, y0), (x1, y1) in zip(zip(px[:-1], py[:-1]), zip(px[1:], py[1:])):
            n = max(abs(x1 - x0), abs(y1 - y0)) + 1
            cols = np.round(np.linspace(x0, x1, n)).astype(int)
            rows = np.round(np.linspace(y0, y1, n)).astype(int)
            img[rows, cols] = BLUE
            img[np.minimum(rows + 1, base - 1), cols] = BLUE  # 2 px thick
    return write_png(img, path)


def plot_group_sizes(group_sizes: Sequence[int], path: str | Path, width: int = 640, panel_h: int = 120) -> Path:
    """Histogram of collision-group sizes: bar s = how many items share their code with s - 1
    others (size 1: unique codes), scaled to the largest bar; the title gives the counts."""
    sizes = np.asarray(group_sizes, dtype=np.int64)
    sizes = sizes[sizes > 0]
    items_per_size = np.bincount(sizes, weights=sizes).astype(np.int64)[1:] if len(sizes) else np.zeros(1, int)
    title_h, margin = 16, 8
    img = np.full((title_h + panel_h + 2 * margin + 6, width + 2 * margin, 3), 255, np.uint8)
    n_items = int(items_per_size.sum())
    unique = int(items_per_size[0]) if len(items_per_size) else 0
    draw_text(img, f"items by group size 1..{len(items_per_size)}: {unique} of {n_items} unique", margin, margin)
    base = margin + title_h + panel_h
    img[base, margin : margin + width] = GREY
    k = len(items_per_size)
    edges = np.linspace(0, width, k + 1).round().astype(int)
    heights = np.round(items_per_size / max(int(items_per_size.max()), 1) * panel_h).astype(int)
    for s in range(k):
        lo, hi = margin + edges[s], margin + edges[s + 1] - (1 if edges[s + 1] - edges[s] >= 3 else 0)
        img[base - heights[s] : base, lo:hi] = RED if s > 0 else BLUE
    return write_png(img, path)
