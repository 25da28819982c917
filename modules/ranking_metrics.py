"""Top-k ranking metrics shared by all recommenders: Recall@k and NDCG@k of rankings, their
streaming accumulator (sharded under torchrun), per-user target ranks, rankings with given
items removed, and metrics of disjoint user groups combined.

One relevant item per user (next-item prediction): Recall@k is 1 when the target is among the
first k ranked items, NDCG@k is 1 / log2(rank + 2) for its 0-based rank < k (the ideal DCG is
1). ``-1`` in a ranking means "no item" and never hits. If a ranking repeats the target, its
first position counts.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from modules import distributed

DEFAULT_KS = (1, 5, 10)


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive cut-offs, got {ks}")
    return ks


def _as_long(x, name: str, device: torch.device | None = None) -> torch.Tensor:
    t = torch.from_numpy(np.asarray(x)) if not isinstance(x, torch.Tensor) else x
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        # Scores passed where item_ids belong would "work" silently otherwise.
        raise ValueError(f"{name} must hold integer item_ids, got dtype {t.dtype}")
    return t.to(device=device if device is not None else t.device, dtype=torch.long)


def _metric_sums(ranked, target, ks: tuple[int, ...]) -> tuple[list[float], int]:
    """Per-metric sums over users (order: recall@k, ndcg@k for each k) and the user count."""
    ranked = _as_long(ranked, "ranked")
    target = _as_long(target, "target", ranked.device)
    if ranked.ndim != 2:
        raise ValueError(f"ranked must be (n, K), got shape {tuple(ranked.shape)}")
    if target.ndim != 1 or target.shape[0] != ranked.shape[0]:
        raise ValueError(
            f"target must be (n,) = ({ranked.shape[0]},), got shape {tuple(target.shape)}"
        )
    n, width = ranked.shape
    if n == 0:
        raise ValueError("no users to evaluate (n == 0)")
    max_k = max(ks)
    if width < max_k:
        raise ValueError(f"ranked has K={width} columns, fewer than max(ks)={max_k}")
    if (target < 0).any():
        bad = int(torch.nonzero(target < 0)[0, 0])
        raise ValueError(f"target[{bad}] = {int(target[bad])}: targets must be item_ids >= 0")

    hits = ranked[:, :max_k] == target[:, None]  # target >= 0, so -1 entries never hit
    found = hits.any(dim=1)
    # argmax returns the first maximum: the first position of the target.
    rank = torch.where(found, hits.to(torch.uint8).argmax(dim=1), max_k)
    gain = 1.0 / torch.log2(rank.to(torch.float64) + 2.0)
    cols = []
    for k in ks:
        within = rank < k
        cols.append(within.to(torch.float64))
        cols.append(torch.where(within, gain, 0.0))
    sums = torch.stack(cols, dim=1).sum(dim=0)
    return sums.tolist(), n  # one device sync for all metrics


def target_ranks(ranked: torch.Tensor | np.ndarray, target) -> torch.Tensor:
    """The 0-based position of each user's target in its ranking ``ranked`` (n, K), its first
    one if repeated, over all K columns; -1 where it is absent. int64 (n,), on ranked's device."""
    ranked = _as_long(ranked, "ranked")
    target = _as_long(target, "target", ranked.device)
    if ranked.ndim != 2 or target.shape != (ranked.shape[0],):
        raise ValueError(f"need ranked (n, K) and target (n,), got {tuple(ranked.shape)} and {tuple(target.shape)}")
    if (target < 0).any():
        raise ValueError("targets must be item_ids >= 0")
    hits = ranked == target[:, None]  # target >= 0: -1 entries never hit
    return torch.where(hits.any(dim=1), hits.to(torch.uint8).argmax(dim=1), -1)


def drop_items(ranked: torch.Tensor | np.ndarray, exclude, scores: torch.Tensor | None = None):
    """``ranked`` (n, K) with each row's items in ``exclude`` (n, H; -1 entries are padding)
    removed, the others moved up in order and the row padded with -1 at the end (same width):
    a ranking "with the user's history items removed". -1 entries of ``ranked`` keep their
    place among the others. With ``scores`` (n, K) aligned with ``ranked``, returns
    (items, scores), the removed positions' scores -inf."""
    ranked = _as_long(ranked, "ranked")
    exclude = _as_long(exclude, "exclude", ranked.device)
    drop = ((ranked[:, :, None] == exclude[:, None, :]) & (exclude[:, None, :] >= 0)).any(dim=2)
    order = drop.to(torch.uint8).argsort(dim=1, stable=True)  # kept first, in their order
    gone = drop.gather(1, order)
    items = ranked.gather(1, order).masked_fill(gone, -1)
    if scores is None:
        return items
    return items, scores.gather(1, order).masked_fill(gone, float("-inf"))


def _rank_dtype(width: int):
    return np.int16 if width < np.iinfo(np.int16).max else np.int32


def _keys(ks: tuple[int, ...]) -> list[str]:
    return [f"{m}@{k}" for k in ks for m in ("recall", "ndcg")]


def ranking_metrics(
    ranked: torch.Tensor | np.ndarray, target, ks: Sequence[int] = DEFAULT_KS
) -> dict[str, float]:
    """Mean Recall@k and NDCG@k over users for rankings ``ranked`` (n, K) of item_ids."""
    ks = _check_ks(ks)
    sums, n = _metric_sums(ranked, target, ks)
    return {key: s / n for key, s in zip(_keys(ks), sums)}


class MetricAccumulator:
    """Streams :func:`ranking_metrics` over batches: ``update`` per batch, ``compute`` at the end.

    Sums are kept in float64 so the result equals the one-shot mean up to rounding.
    Sharded evaluation (torchrun): each rank updates with its batches, keyed by batch number,
    then :meth:`merge_ranks` re-adds every rank's per-batch sums in key order, which is
    bit-for-bit what one process updating with all batches in that order computes.
    ``keep_ranks``: also keep each user's :func:`target_ranks` (its target's 0-based position
    in the first max(ks) items of the ranking it was updated with, -1 if not there: -1 exactly
    where every metric counts a miss), returned by :meth:`ranks` in key order (the examples'
    order when keys are batch starts or numbers), gathered over ranks too.
    """

    def __init__(self, ks: Sequence[int] = DEFAULT_KS, keep_ranks: bool = False):
        self.ks = _check_ks(ks)
        self.keep_ranks = keep_ranks
        self.reset()

    def reset(self) -> None:
        self._sums = [0.0] * (2 * len(self.ks))
        self.count = 0
        self._parts: list[tuple[int, list[float], int]] = []  # (key, sums, users) per update
        self._ranks: list[tuple[int, np.ndarray]] = []  # (key, ranks) per update, with keep_ranks

    def _add(self, sums: list[float], n: int) -> None:
        self._sums = [a + b for a, b in zip(self._sums, sums)]
        self.count += n

    def update(self, ranked: torch.Tensor | np.ndarray, target, key: int | None = None) -> None:
        """One batch; ``key`` (default: the update's number) orders it for :meth:`merge_ranks`."""
        sums, n = _metric_sums(ranked, target, self.ks)
        key = len(self._parts) if key is None else key
        self._add(sums, n)
        self._parts.append((key, sums, n))
        if self.keep_ranks:  # within the first max(ks) columns, the ones the metrics see
            width = min(np.shape(ranked)[1], max(self.ks))
            ranks = target_ranks(ranked[:, :width], target)
            self._ranks.append((key, ranks.cpu().numpy().astype(_rank_dtype(width))))

    def merge_ranks(self) -> None:
        """Collective under torchrun (every rank calls it): afterwards every rank holds the sums
        over all ranks' updates, added in the order of their keys (distinct over ranks), and
        with ``keep_ranks`` every rank's per-user ranks."""
        if not distributed.active():
            return
        parts = distributed.gather_keyed((key, (sums, n)) for key, sums, n in self._parts)
        ranks = distributed.gather_keyed(self._ranks) if self.keep_ranks else []
        self.reset()
        for key, (sums, n) in parts:
            self._add(sums, n)
            self._parts.append((key, sums, n))
        self._ranks = ranks

    def ranks(self) -> np.ndarray:
        """Every user's rank (int16; int32 past 32,766), in key order."""
        if not self.keep_ranks:
            raise ValueError("MetricAccumulator.ranks() needs keep_ranks=True")
        parts = [r for _, r in sorted(self._ranks, key=lambda p: p[0])]
        if not parts:
            return np.zeros(0, dtype=np.int16)
        return np.concatenate(parts).astype(np.result_type(*parts), copy=False)

    def compute(self) -> dict[str, float]:
        if self.count == 0:
            raise ValueError("MetricAccumulator.compute() before any update()")
        return {key: s / self.count for key, s in zip(_keys(self.ks), self._sums)}


def combine_metrics(parts: Sequence[dict | None]) -> dict:
    """The metrics over the union of disjoint user groups, from each group's metrics (means over
    its ``users``): their user-weighted average. ``users_per_second`` is recomputed from the
    groups' times; ``None`` parts (empty groups) are skipped. Only numbers are combined (per-user
    ``ranks`` and nested reports are not: ``modules.reporting`` puts those together in user order)."""
    parts = [p for p in parts if p is not None and p.get("users", 0) > 0]
    if not parts:
        raise ValueError("combine_metrics: no user in any group")
    n = sum(p["users"] for p in parts)
    keys = [k for k in parts[0] if k not in ("users", "users_per_second") and all(k in p for p in parts)
            and all(isinstance(p[k], (int, float, np.number)) for p in parts)]  # not ranks, not sub-reports
    out = {k: sum(p[k] * p["users"] for p in parts) / n for k in keys}
    out["users"] = n
    if all("users_per_second" in p for p in parts):
        out["users_per_second"] = n / max(sum(p["users"] / max(p["users_per_second"], 1e-9) for p in parts), 1e-9)
    return out
