"""The popularity baseline: every user gets the items most often interacted with in training."""

from __future__ import annotations

import numpy as np


def popularity_ranking(
    train_item_counts: np.ndarray,
    n_users: int,
    k: int,
    exclude: np.ndarray | None = None,
) -> np.ndarray:
    """The k most popular items for each of ``n_users`` users, int64 (n_users, k).

    Ties go to the smaller item_id. ``exclude``: item_ids never recommended, either 1-D (for
    every user) or 2-D (n_users, H) per user, e.g. a history padded with -1 (ignored). A row
    with fewer than k items left is padded with -1.
    """
    counts = np.asarray(train_item_counts)
    if counts.ndim != 1:
        raise ValueError(f"train_item_counts must be 1-D (n_items,), got shape {counts.shape}")
    if k < 1 or n_users < 0:
        raise ValueError(f"need k >= 1 and n_users >= 0, got k={k}, n_users={n_users}")
    n_items = counts.shape[0]
    order = np.argsort(-counts, kind="stable")  # stable: ties keep item_id order

    if exclude is not None:
        exclude = np.asarray(exclude)
        if exclude.size and not np.issubdtype(exclude.dtype, np.integer):
            raise ValueError(f"exclude must hold integer item_ids, got dtype {exclude.dtype}")
        exclude = exclude.astype(np.int64, copy=False)
        if exclude.size and (exclude.min() < -1 or exclude.max() >= n_items):
            raise ValueError(
                f"exclude holds item_ids outside [-1, {n_items}): "
                f"min {exclude.min()}, max {exclude.max()}"
            )
        if exclude.ndim == 1:
            keep = np.ones(n_items, dtype=bool)
            keep[exclude[exclude >= 0]] = False
            order = order[keep[order]]
            exclude = None
        elif exclude.ndim != 2 or exclude.shape[0] != n_users:
            raise ValueError(
                f"exclude must be (n_items_excluded,) or (n_users={n_users}, H), "
                f"got shape {exclude.shape}"
            )

    if exclude is None:
        top = np.full(k, -1, dtype=np.int64)
        top[: min(k, order.size)] = order[:k]
        return np.broadcast_to(top, (n_users, k)).copy()

    # Per user: at most H of the (k + H) most popular items are excluded, so the answer lies
    # among them. Mark excluded candidates by their popularity position, then take the first
    # k unmarked positions per row.
    n_cand = min(k + exclude.shape[1], order.size)
    cand = order[:n_cand]
    pos = np.full(n_items, n_cand, dtype=np.int64)
    pos[cand] = np.arange(n_cand)
    rows, cols = np.nonzero(exclude >= 0)
    p = pos[exclude[rows, cols]]
    masked = np.zeros((n_users, n_cand + 1), dtype=bool)  # column n_cand: beyond candidates
    masked[rows, p] = True
    masked = masked[:, :n_cand]
    first = np.argsort(masked, axis=1, kind="stable")[:, :k]
    out = np.full((n_users, k), -1, dtype=np.int64)
    picked = np.take_along_axis(masked, first, axis=1)
    width = first.shape[1]
    out[:, :width] = np.where(picked, -1, cand[first])
    return out
