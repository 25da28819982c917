"""Statistics of a table of semantic IDs (N items x L codes): TIGER's dedup level, collision
groups, per-level codebook usage and perplexity, and a dependency-free codebook-usage plot.
They only read code tables; modules/semantic_ids.py (the saveable tokenizer and the item <-> code
lookup) re-exports them."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from modules.plots import draw_text, write_png


def _check_codes(codes: Tensor, name: str = "codes") -> Tensor:
    if codes.ndim != 2 or codes.dtype.is_floating_point:
        raise ValueError(f"{name}: expected an integer tensor (N, L), got {codes.dtype} {tuple(codes.shape)}")
    if codes.numel() and int(codes.min()) < 0:
        raise ValueError(f"{name}: codes must be >= 0, found {int(codes.min())}")
    return codes.long()


def _groups(codes: Tensor) -> tuple[Tensor, Tensor]:
    """(group id per item, group sizes) where a group = items with the same full code row."""
    _, inverse, counts = torch.unique(codes, dim=0, return_inverse=True, return_counts=True)
    return inverse, counts


def add_dedup_level(codes: Tensor, max_size: int | None = None) -> Tensor:
    """Append TIGER's dedup code: the rank of each item (by item_id) among the items that share
    its L-code prefix, so the (N, L+1) rows are unique. max_size is the dedup level's codebook
    size; None means "as large as needed" (largest group size)."""
    codes = _check_codes(codes)
    n = codes.shape[0]
    if n == 0:
        return codes.new_zeros(0, codes.shape[1] + 1)
    group, counts = _groups(codes)
    largest = int(counts.max())
    if max_size is not None and largest > max_size:
        raise ValueError(
            f"add_dedup_level: largest group has {largest} items sharing one {codes.shape[1]}-code prefix "
            f"but the dedup level has only {max_size} codes; raise max_size or lower collisions "
            f"(train the quantizer longer, larger codebooks, dead-code replacement, balanced RQ-KMeans)"
        )
    # Stable sort by group keeps item_id order inside a group; rank = position - group start.
    order = torch.argsort(group, stable=True)
    starts = counts.cumsum(0) - counts
    rank = torch.empty_like(group)
    rank[order] = torch.arange(n, device=codes.device) - starts[group[order]]
    return torch.cat([codes, rank[:, None]], 1)


def with_dedup_level(codes: Tensor, codebook_sizes: Sequence[int], dedup_size: int | None
                     ) -> tuple[Tensor, list[int], int]:
    """The item IDs a tokenizer saves: (item codes, codebook sizes per level, dedup level size).
    ``dedup_size`` 0: the codes alone (no dedup level, shared IDs stay shared: RPG's unordered
    OPQ codes); None: a dedup level as large as the largest group; else add_dedup_level's max_size."""
    if dedup_size == 0:
        return codes, list(codebook_sizes), 0
    item_codes = add_dedup_level(codes, max_size=dedup_size)
    level_size = dedup_size or int(item_codes[:, -1].max()) + 1
    return item_codes, [*codebook_sizes, level_size], level_size


def collision_group_sizes(codes: Tensor) -> list[int]:
    """The size of every group of items that share a full code row (1: a unique ID)."""
    return _groups(_check_codes(codes))[1].tolist()


def collision_stats(codes: Tensor) -> dict:
    """collision_rate: fraction of items whose full code row is shared with another item;
    items_in_collisions: their count; max_group: largest number of items on one row;
    num_groups: number of distinct rows."""
    codes = _check_codes(codes)
    n = codes.shape[0]
    if n == 0:
        return {"collision_rate": 0.0, "max_group": 0, "num_groups": 0, "items_in_collisions": 0}
    group, counts = _groups(codes)
    in_collision = int((counts[group] > 1).sum())
    return {
        "collision_rate": in_collision / n,
        "max_group": int(counts.max()),
        "num_groups": int(counts.numel()),
        "items_in_collisions": in_collision,
    }


def _level_counts(codes: Tensor, codebook_sizes: Sequence[int] | None) -> list[Tensor]:
    codes = _check_codes(codes)
    if codebook_sizes is None:
        codebook_sizes = [int(codes[:, l].max()) + 1 if len(codes) else 1 for l in range(codes.shape[1])]
    if len(codebook_sizes) != codes.shape[1]:
        raise ValueError(f"codebook_sizes: {len(codebook_sizes)} sizes for {codes.shape[1]} code levels")
    out = []
    for level, size in enumerate(codebook_sizes):
        if len(codes) and int(codes[:, level].max()) >= size:
            raise ValueError(f"codes[:, {level}]: code {int(codes[:, level].max())} >= codebook size {size}")
        out.append(torch.bincount(codes[:, level], minlength=size))
    return out


def codebook_usage(codes: Tensor, codebook_sizes: Sequence[int]) -> list[float]:
    """Per level: fraction of the codebook that at least one item uses."""
    return [float((c > 0).sum()) / c.numel() for c in _level_counts(codes, codebook_sizes)]


def codebook_perplexity(codes: Tensor, codebook_sizes: Sequence[int] | None = None) -> list[float]:
    """Per level: exp(entropy) of the code distribution (= number of equally used codes)."""
    out = []
    for c in _level_counts(codes, codebook_sizes):
        p = c.double() / max(int(c.sum()), 1)
        p = p[p > 0]
        out.append(float(torch.exp(-(p * p.log()).sum())))
    return out


# ----------------------------------------------------------------------------- plot


def plot_codebook_usage(codes: Tensor, codebook_sizes: Sequence[int], path: str | Path, width: int = 768) -> Path:
    """PNG with one bar chart per level: number of items per code (x = code index, bar height
    relative to the level's most used code). Unused codes get a red tick under the axis; when
    a level has more codes than pixels, a column shows the max over its codes. Returns path."""
    counts = [c.cpu().numpy() for c in _level_counts(codes, codebook_sizes)]
    panel_h, title_h, margin = 100, 16, 8
    step = title_h + panel_h + 2 * margin
    img = np.full((len(counts) * step + margin, width + 2 * margin, 3), 255, np.uint8)
    for level, cnt in enumerate(counts):
        k = len(cnt)
        top = level * step + margin
        draw_text(img, f"L{level} used {(cnt > 0).sum()}/{k} max {cnt.max()}", top, margin)
        base = top + title_h + panel_h  # first row below the bars
        starts = (np.arange(width) * k) // width  # first code shown in each pixel column
        tall = np.maximum.reduceat(cnt, starts)
        unused = np.minimum.reduceat(cnt, starts) == 0
        heights = np.round(tall / max(cnt.max(), 1) * panel_h).astype(int)
        gaps = np.zeros(width, bool)
        if width // k >= 3:  # room for a white pixel between neighbouring bars
            gaps[:-1] = starts[1:] != starts[:-1]
        rows = np.arange(top + title_h, base)[:, None]
        bars = (rows >= base - heights[None, :]) & ~gaps[None, :]
        img[top + title_h : base, margin : margin + width][bars] = (40, 90, 200)
        img[base, margin : margin + width] = (120, 120, 120)
        img[base + 1 : base + 4, margin : margin + width][:, unused] = (220, 30, 30)
    path = Path(path)
    return write_png(img, path)
