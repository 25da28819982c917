"""The processed dataset in memory, and its leave-one-out splits as typed arrays.

Sequences are stored flat (all item_ids user after user, each in time order) with
per-user offsets, so every split is a handful of numpy gathers.

Split (leave-one-out): for a user with items s[0..n-1],
  test:  history = s[:n-1] (last ``max_history``), target = s[n-1]
  valid: history = s[:n-2],                          target = s[n-2]
  train: s[:n-2]; sliding-window examples history = s[max(0,t-H):t], target = s[t] for t >= 1.

Cold-start / zero-shot view (``SeqDataset.with_cold_items``): a set of "cold" items is held out
of training entirely. Their interactions are dropped from every training part (examples,
segments, the sequences and counts tokenizers learn on), as if those purchases never happened;
test histories and test targets are untouched (the test asks for items never trained on, from
their text-derived IDs); validation keeps its histories but drops users whose validation
target is cold, so model selection never rewards an item held out of training. The processed
tables (the cache) are the same; the view is part of ``fingerprint()``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import polars as pl

from data.preprocess import ProcessedTables


class Examples(NamedTuple):
    user: np.ndarray  # (n,) int64 user_id
    history: np.ndarray  # (n, H) int64 item_ids, oldest first, -1 padding at the end
    target: np.ndarray  # (n,) int64 item_id

    def __len__(self) -> int:
        return len(self.target)

    def sample(self, n: int | None, seed: int = 0) -> "Examples":
        """A fixed random subset of n examples in their original order (all when n is None or
        >= len). For validating on part of the users: the first n users are not a fair sample
        (on Beauty the first 2,000 score NDCG@10 ~0.010 where all score ~0.019)."""
        if n is None or n >= len(self):
            return self
        idx = np.sort(np.random.default_rng(seed).choice(len(self), n, replace=False))
        return Examples(self.user[idx], self.history[idx], self.target[idx])


class TrainExamples(NamedTuple):
    """Sliding-window training examples, stored as positions into the flat sequence array so
    that ML-32M's 31M examples cost 24 bytes each instead of a materialised (n, H) history."""

    user: np.ndarray  # (n,) int64
    target_pos: np.ndarray  # (n,) int64 index into ``flat`` of each target
    start: np.ndarray  # (n,) int64 index into ``flat`` where the user's sequence begins
    flat: np.ndarray
    max_history: int

    def __len__(self) -> int:
        return len(self.target_pos)

    @property
    def target(self) -> np.ndarray:
        return self.flat[self.target_pos]

    def batch(self, indices: np.ndarray) -> Examples:
        pos = self.target_pos[indices]
        history = _windows(self.flat, self.start[indices], pos, self.max_history)
        return Examples(self.user[indices], history, self.flat[pos])

    def materialize(self) -> Examples:
        return self.batch(np.arange(len(self)))


class TrainSegments(NamedTuple):
    """Each user's training part cut into segments of at most ``max_history + 1`` items, for
    models that predict every next item of a sequence in one causal pass: the targets are a
    segment's items after its first, each with at most ``max_history`` items of context, and
    every sliding-window target occurs in exactly one segment (with the same context when the
    training part has at most ``max_history + 1`` items, as almost all Beauty users do)."""

    user: np.ndarray  # (n,) int64
    start: np.ndarray  # (n,) int64 index into ``flat`` of the segment's first item
    end: np.ndarray  # (n,) int64 index into ``flat`` one past its last item
    flat: np.ndarray
    width: int  # max_history + 1

    def __len__(self) -> int:
        return len(self.user)

    def batch(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(user (n,), items (n, width) oldest first, -1 padded at the end)."""
        return self.user[indices], _windows(self.flat, self.start[indices], self.end[indices], self.width)

    @property
    def num_targets(self) -> int:
        return int((self.end - self.start - 1).sum())


def _windows(flat: np.ndarray, start: np.ndarray, end: np.ndarray, width: int) -> np.ndarray:
    """Rows ``flat[max(start, end-width):end]`` left-aligned, padded with -1."""
    lo = np.maximum(start, end - width)
    idx = lo[:, None] + np.arange(width)[None, :]
    out = flat[np.minimum(idx, len(flat) - 1)]
    out[idx >= end[:, None]] = -1
    return out


@dataclass
class SeqDataset:
    name: str
    items: pl.DataFrame  # item_id, raw_id, text fields (row i = item i)
    flat: np.ndarray  # int64, all users' items concatenated
    offsets: np.ndarray  # int64 (num_users + 1,)
    raw_users: list[str]
    max_history: int = 20
    stats: dict | None = None
    path: Path | None = None  # the cache folder it was loaded from
    # Cold-start / zero-shot view: bool (num_items,), True = held out of training (None: no split),
    # and a JSON-able description of how it was drawn (reported with the results).
    cold: np.ndarray | None = None
    protocol: dict | None = None

    @property
    def num_items(self) -> int:
        return self.items.height

    @property
    def num_users(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def fingerprint(self) -> str:
        """A content hash of what a model trains and is tested on: every user's items in order,
        the item list (raw ids) and the history length. Checkpoints store it so that a run
        never resumes onto other data."""
        h = hashlib.sha256()
        for a in (self.flat, self.offsets, np.asarray(self.max_history)):
            h.update(np.ascontiguousarray(a, dtype=np.int64).tobytes())
        h.update("\n".join(map(str, self.items["raw_id"].to_list())).encode())
        if self.cold is not None:  # another held-out set trains on other data: another run
            h.update(b"\ncold:")
            h.update(np.flatnonzero(self.cold).astype(np.int64).tobytes())
        return h.hexdigest()[:16]

    def with_cold_items(self, cold: np.ndarray, protocol: dict | None = None) -> "SeqDataset":
        """This dataset with the items where ``cold`` is True held out of training (see the
        module docstring); ``protocol`` describes the split for the results."""
        cold = np.asarray(cold)
        if cold.dtype != bool or cold.shape != (self.num_items,):
            raise ValueError(f"{self.name}: cold must be a bool mask of shape ({self.num_items},), "
                             f"got {cold.dtype} {cold.shape}")
        return replace(self, cold=cold.copy(), protocol=dict(protocol or {}))

    def _train_parts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(flat, start, end): each user's training part is ``flat[start[u]:end[u]]``. Without a
        cold split that is ``self.flat`` itself (no copy: ML-32M); with one, a compacted copy
        without the cold items."""
        starts, ends = self.offsets[:-1], self.offsets[1:] - 2
        if self.cold is None:
            return self.flat, starts, ends
        user = np.repeat(np.arange(self.num_users, dtype=np.int64), self.lengths)
        in_train = np.arange(len(self.flat)) < ends[user]
        keep = in_train & ~self.cold[self.flat]
        counts = np.bincount(user[keep], minlength=self.num_users).astype(np.int64)
        new_starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        return self.flat[keep], new_starts, new_starts + counts

    def sequence(self, user: int) -> np.ndarray:
        return self.flat[self.offsets[user]: self.offsets[user + 1]]

    def train_sequences(self) -> list[np.ndarray]:
        """Each user's training part ``s[:-2]`` (what tokenizers such as ActionPiece learn on),
        without cold items under a cold split."""
        flat, starts, ends = self._train_parts()
        return [flat[a: b] for a, b in zip(starts, ends)]

    def train_item_counts(self) -> np.ndarray:
        """How often each item occurs in the training parts (for the popularity baseline)."""
        if self.cold is not None:  # cold items: 0
            return np.bincount(self._train_parts()[0], minlength=self.num_items)
        mask = np.ones(len(self.flat), dtype=bool)
        mask[self.offsets[1:] - 1] = False
        mask[self.offsets[1:] - 2] = False
        return np.bincount(self.flat[mask], minlength=self.num_items)

    def train_item_mask(self) -> np.ndarray:
        return self.train_item_counts() > 0

    def train_examples(self) -> TrainExamples:
        flat, starts, ends = self._train_parts()  # training part flat[start:end]
        n_per_user = np.maximum(ends - starts - 1, 0)  # targets s[1..], one example each
        user = np.repeat(np.arange(self.num_users, dtype=np.int64), n_per_user)
        # position of each target in ``flat``: start+1, ..., end-1 for each user
        first = np.repeat(starts + 1 - np.concatenate([[0], np.cumsum(n_per_user)[:-1]]), n_per_user)
        target_pos = first + np.arange(len(user))
        return TrainExamples(user, target_pos, starts[user], flat, self.max_history)

    def train_segments(self) -> TrainSegments:
        """The training parts as segments for all-positions training (see TrainSegments).

        Segments end at the end of the training part and step back by ``max_history`` items,
        so consecutive segments share one item (the context of the next one's first target);
        the first segment of a long user may be shorter. Training parts of one item have no
        target and give no segment."""
        flat, starts, ends = self._train_parts()
        step = self.max_history
        n_targets = np.maximum(ends - starts - 1, 0)
        n_seg = -(-n_targets // step)  # ceil: each segment holds up to `step` targets
        user = np.repeat(np.arange(self.num_users, dtype=np.int64), n_seg)
        k = np.arange(len(user)) - np.repeat(np.cumsum(n_seg) - n_seg, n_seg)  # 0 = the last segment
        seg_end = ends[user] - k * step
        seg_start = np.maximum(starts[user], seg_end - step - 1)
        order = np.lexsort((seg_start, user))  # oldest segment first within a user
        return TrainSegments(user[order], seg_start[order], seg_end[order], flat, step + 1)

    def eval_examples(self, split: str) -> Examples:
        """One example per user. Under a cold split, validation leaves out the users whose
        validation target is cold (see the module docstring); the test keeps every user."""
        if split not in ("valid", "test"):
            raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
        back = 2 if split == "valid" else 1
        target_pos = self.offsets[1:] - back
        user = np.arange(self.num_users, dtype=np.int64)
        if split == "valid" and self.cold is not None:
            warm = ~self.cold[self.flat[target_pos]]
            target_pos, user = target_pos[warm], user[warm]
        history = _windows(self.flat, self.offsets[:-1][user], target_pos, self.max_history)
        return Examples(user, history, self.flat[target_pos])

    def test_is_cold(self) -> np.ndarray:
        """bool (num_users,): the user's test target is a cold item (all False without a split)."""
        target = self.flat[self.offsets[1:] - 1]
        return np.zeros(self.num_users, dtype=bool) if self.cold is None else self.cold[target]

    def observed_item_counts(self) -> np.ndarray:
        """How often each item occurs in the test histories (everything before the test targets,
        untruncated): what is known at test time, e.g. of items held out of training."""
        mask = np.ones(len(self.flat), dtype=bool)
        mask[self.offsets[1:] - 1] = False
        return np.bincount(self.flat[mask], minlength=self.num_items)

    # ---- cache I/O -------------------------------------------------------------------------
    @classmethod
    def from_tables(cls, name: str, tables: ProcessedTables, max_history: int = 20, path=None) -> "SeqDataset":
        seqs = tables.sequences
        lengths = seqs["items"].list.len().to_numpy().astype(np.int64)
        flat = seqs["items"].explode().to_numpy().astype(np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        if (lengths < 3).any():
            raise ValueError(f"{name}: user {int(np.argmax(lengths < 3))} has fewer than 3 items; "
                             "leave-one-out needs a train, a valid and a test item")
        return cls(name=name, items=tables.items, flat=flat, offsets=offsets,
                   raw_users=seqs["raw_user"].to_list(), max_history=max_history, stats=tables.stats, path=path)


def cold_item_mask(num_items: int, fraction: float, seed: int = 0) -> np.ndarray:
    """bool (num_items,): a seeded random ``round(fraction * num_items)`` items, for the
    cold-start protocol."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"load_dataset.cold_items: a fraction of the items in [0, 1), got {fraction}")
    mask = np.zeros(num_items, dtype=bool)
    mask[np.random.default_rng(seed).choice(num_items, int(round(fraction * num_items)), replace=False)] = True
    return mask


def item_domains(items: pl.DataFrame, field: str = "categories", level: int = 1) -> list[str | None]:
    """Each item's domain: element ``level`` of its category path in ``field`` (a string such as
    'Beauty, Makeup, Face, Concealers', elements separated by commas, quotes stripped, or a list
    column). None where the item has no such element."""
    if field not in items.columns:
        raise ValueError(f"load_dataset.domain_field: the item table has no field {field!r} "
                         f"(fields: {', '.join(items.columns)})")
    out = []
    for value in items[field].to_list():
        parts = value if isinstance(value, list) else ([] if value is None else str(value).split(","))
        parts = [str(p).strip().strip("'\"").strip() for p in parts]
        out.append(parts[level] if level < len(parts) and parts[level] else None)
    return out


def domain_item_mask(items: pl.DataFrame, domain: str, field: str = "categories", level: int = 1) -> np.ndarray:
    """bool (num_items,): the items of ``domain`` (see ``item_domains``), for the zero-shot
    protocol; an unknown domain is an error that lists the known ones."""
    domains = item_domains(items, field, level)
    mask = np.array([d == domain for d in domains], dtype=bool)
    if not mask.any():
        counts = sorted({d: domains.count(d) for d in set(domains) if d is not None}.items(), key=lambda x: -x[1])
        raise ValueError(f"load_dataset.holdout_domain = {domain!r}: no item has it as element {level} of its "
                         f"{field!r} field; domains there: {', '.join(f'{d} ({n})' for d, n in counts) or 'none'}")
    if mask.all():
        raise ValueError(f"load_dataset.holdout_domain = {domain!r}: every item is in it, nothing left to train on "
                         f"(choose another domain_level than {level})")
    return mask


def save_tables(tables: ProcessedTables, folder: Path) -> Path:
    """Write the processed tables into ``folder`` atomically (temp folder, then rename).

    ``meta.json`` is written last inside the temp folder, so a folder that exists under its
    final name is always complete.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        tables.items.write_parquet(tmp / "items.parquet")
        tables.sequences.write_parquet(tmp / "sequences.parquet")
        with open(tmp / "meta.json", "w") as f:
            json.dump(tables.stats, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        if folder.exists():  # a stale or foreign folder under our name: replace it
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_tables(folder: Path) -> ProcessedTables | None:
    """Processed tables from a cache folder, or None if it is missing or incomplete."""
    folder = Path(folder)
    try:
        stats = json.loads((folder / "meta.json").read_text())
        items = pl.read_parquet(folder / "items.parquet")
        sequences = pl.read_parquet(folder / "sequences.parquet")
    except (OSError, ValueError, pl.exceptions.PolarsError):
        return None
    if items.height != stats.get("items") or sequences.height != stats.get("users"):
        return None
    return ProcessedTables(items=items, sequences=sequences, stats=stats)
