"""Confidence intervals over users from per-user ranks, and the ranks file beside a result JSON.

A run's test report keeps, for each user, the 0-based rank of its target in the returned
top-K list (-1: not in it; ``modules.evaluation``, ``keep_ranks``). Every metric is a mean
over users of a function of that rank, with the definitions of ``modules.evaluation``:
Recall@k is 1 when 0 <= rank < k, NDCG@k is 1 / log2(rank + 2) there (0 elsewhere).

Intervals are 95% percentile bootstraps over users: ``resamples`` (1,000) resamples of the n
users with replacement, drawn by a numpy generator seeded with ``seed`` (0), the metric's mean
on each, and the 2.5th and 97.5th percentiles of those means. The paired bootstrap of two runs
on the same users resamples users, not runs: each resample takes the same users from both, so
the difference's interval is as narrow as the runs' agreement allows. The draws depend only on
(seed, resamples, n), so swapping the two runs negates the difference and its interval.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

DEFAULT_KS = (1, 5, 10)
RESAMPLES = 1000
LEVEL = 0.95
RANKS_SUFFIX = ".ranks.npz"  # results/<name>.json -> results/<name>.ranks.npz
FORMAT = 1


def metric_keys(ks: Sequence[int] = DEFAULT_KS) -> list[str]:
    """The metric names in modules.evaluation's order: recall@k, ndcg@k for each k."""
    return [f"{m}@{k}" for k in ks for m in ("recall", "ndcg")]


def _ranks(ranks) -> np.ndarray:
    r = np.asarray(ranks)
    if r.ndim != 1 or not np.issubdtype(r.dtype, np.integer):
        raise ValueError(f"ranks must be a 1-D integer array (-1: not found), got {r.dtype} {r.shape}")
    if r.size == 0:
        raise ValueError("no users (empty ranks)")
    if (r < -1).any():
        raise ValueError(f"ranks must be >= -1, got {int(r.min())}")
    return r.astype(np.int64)


def per_user(ranks, ks: Sequence[int] = DEFAULT_KS) -> np.ndarray:
    """(n, 2 * len(ks)) float64: each user's value of every metric (columns in
    :func:`metric_keys` order)."""
    r = _ranks(ranks)
    hit = r >= 0
    gain = np.where(hit, 1.0 / np.log2(np.where(hit, r, 0) + 2.0), 0.0)
    cols = []
    for k in ks:
        within = hit & (r < k)
        cols += [within.astype(np.float64), np.where(within, gain, 0.0)]
    return np.stack(cols, axis=1)


def metrics_from_ranks(ranks, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """Mean Recall@k / NDCG@k over users: ``modules.evaluation.ranking_metrics`` of the rankings
    the ranks came from (up to float rounding)."""
    return dict(zip(metric_keys(ks), per_user(ranks, ks).mean(axis=0).tolist()))


def resampled_means(values: np.ndarray, resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """(resamples, M): column means of ``values`` (n, M) over bootstrap resamples of its rows.
    Each resample is a count per row (how often it was drawn), so memory stays at a few
    resamples x n at a time; the draws depend only on (seed, resamples, n)."""
    values = np.asarray(values, dtype=np.float64)
    n = values.shape[0]
    rng = np.random.default_rng(seed)
    chunk = max(1, min(resamples, 4_000_000 // max(n, 1)))
    out = []
    for start in range(0, resamples, chunk):
        c = min(chunk, resamples - start)
        idx = rng.integers(0, n, size=(c, n)) + (np.arange(c) * n)[:, None]
        counts = np.bincount(idx.ravel(), minlength=c * n).reshape(c, n)
        out.append(counts @ values / n)
    return np.concatenate(out, axis=0)


def _percentiles(means: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(means, [tail, 100 - tail], axis=0)
    return low, high


def bootstrap_interval(ranks, ks: Sequence[int] = DEFAULT_KS, resamples: int = RESAMPLES, seed: int = 0,
                       level: float = LEVEL) -> dict[str, list[float]]:
    """``{metric: [low, high]}``: the percentile bootstrap interval over users of each metric."""
    low, high = _percentiles(resampled_means(per_user(ranks, ks), resamples, seed), level)
    return {key: [float(lo), float(hi)] for key, lo, hi in zip(metric_keys(ks), low, high)}


def paired_bootstrap(base, other, ks: Sequence[int] = DEFAULT_KS, resamples: int = RESAMPLES, seed: int = 0,
                     level: float = LEVEL) -> dict[str, dict[str, float]]:
    """``{metric: {"diff", "low", "high"}}``: ``other`` minus ``base`` (ranks of the same users in
    the same order), its mean over users and the paired percentile bootstrap interval."""
    a, b = _ranks(base), _ranks(other)
    if a.shape != b.shape:
        raise ValueError(f"paired ranks need the same users: {a.shape[0]} vs {b.shape[0]}")
    diff = per_user(b, ks) - per_user(a, ks)
    low, high = _percentiles(resampled_means(diff, resamples, seed), level)
    return {key: {"diff": float(d), "low": float(lo), "high": float(hi)}
            for key, d, lo, hi in zip(metric_keys(ks), diff.mean(axis=0), low, high)}


# ----------------------------------------------------------------------------- the ranks file


def targets_fingerprint(user, target) -> str:
    """A hash of the (user, target) pairs in order: two runs can be paired only when equal."""
    h = hashlib.sha256()
    for a in (user, target):
        h.update(np.ascontiguousarray(a, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


@dataclass
class RunRanks:
    """A run's per-user ranks, written beside its result JSON as ``<stem>.ranks.npz``.

    ``parts``: name ("test", "valid", "test_history_removed") -> (ranks, user ids, target item
    ids), users in the order evaluated. ``split``: a fingerprint of the data split (every
    user's items, the item list, the held-out items of a cold split; not the history length,
    so runs with history 20 and 50 compare); ``dataset``: the run's ``dataset.fingerprint()``
    (which also covers the history length), for information.
    """

    split: str
    dataset: str = ""
    parts: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=dict)

    def add(self, name: str, ranks, user, target) -> None:
        ranks, user, target = np.asarray(ranks), np.asarray(user), np.asarray(target)
        if not (ranks.shape == user.shape == target.shape) or ranks.ndim != 1:
            raise ValueError(f"{name}: ranks, user and target must be (n,) alike, got "
                             f"{ranks.shape}, {user.shape}, {target.shape}")
        self.parts[name] = (ranks, user, target)

    def targets(self, name: str = "test") -> str:
        return targets_fingerprint(*self.parts[name][1:])

    def save(self, path: str | Path) -> Path:
        """Written compressed and atomically (a temporary file, then renamed)."""
        path = Path(path)
        arrays = {"format": np.asarray(FORMAT), "split": np.asarray(self.split), "dataset": np.asarray(self.dataset)}
        for name, (ranks, user, target) in self.parts.items():
            wide = ranks.size and max(int(ranks.max()), 0) >= np.iinfo(np.int16).max
            arrays[f"{name}.ranks"] = ranks.astype(np.int32 if wide else np.int16)
            arrays[f"{name}.user"] = user.astype(np.int64)
            arrays[f"{name}.target"] = target.astype(np.int64)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "RunRanks":
        with np.load(path, allow_pickle=False) as z:
            if int(z["format"]) != FORMAT:
                raise ValueError(f"{path}: ranks file format {int(z['format'])}, this code reads {FORMAT}")
            out = cls(split=str(z["split"]), dataset=str(z["dataset"]))
            names = sorted({k.rsplit(".", 1)[0] for k in z.files if k.endswith(".ranks")})
            for name in names:
                out.add(name, z[f"{name}.ranks"], z[f"{name}.user"], z[f"{name}.target"])
        return out


def ranks_path(json_path: str | Path) -> Path:
    """``results/<name>.json`` -> ``results/<name>.ranks.npz``."""
    p = Path(json_path)
    return p.with_name(p.stem + RANKS_SUFFIX)
