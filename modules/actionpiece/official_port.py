"""Plain-Python port of the official ActionPiece vocabulary construction.

What it is: a slow, line-by-line-in-spirit re-implementation (our own code, not a copy) of
``ActionPieceCore._build`` / ``_train_step`` of the official implementation
(``google-deepmind/action_piece``, ``genrec/models/ActionPiece/core.py``, Apache-2.0; identical
in the first author's fork ``hyp1231/action_piece``), see ``shared/design/actionpiece.md``
sections 4-7.

Why it exists: it is the oracle for ``vocab.learn_merges(mode="faithful")``, whose job is to
give the very vocabulary (``token2feat`` and ``priority``) that the official code gives. The
official behaviour depends on details that an exact-arithmetic re-implementation does not
have, and all of them are kept here on purpose:

* **float counts, official summation order.** A sequence's count of a pair is the float sum
  of its contributions in list order, each node/gap region first summed on its own (so a
  pair seen twice across one gap adds ``w + w`` in one go). The global total is the sum of
  the per-sequence counts in sequence order, then updated by per-merge diffs.
* **the diff of a sequence is taken over the keys of its new count only**: a pair that
  vanishes from a sequence is never subtracted from the total (stale counts).
* **the inverted index pair -> sequences never shrinks** (the "vanished" branch cannot fire),
  so merges revisit sequences that no longer hold the pair.
* **per-merge diffs are summed over those sequences in the iteration order of a copy of a
  Python ``set`` of ints** (CPython's hash-table order, which depends on the insertion
  history): float sums depend on that order. A diff ``|d| < 1e-12`` is dropped.
* **a lazy min-heap of ``(-count, (u, v))``** (the official ``queue.PriorityQueue`` is
  ``heapq`` behind a lock; ``heapq`` pops the same entries): ties in count go to the smaller
  pair; an entry is valid iff ``|count - total| <= 1e-12``; stale entries are skipped, never
  deleted, and a stale entry that matches the total again is valid. The recorded priority is
  the popped entry's count, and a popped pair that occurs nowhere any more is still merged
  ("phantom" token).

Two places where the official code fails, and what the port does instead:

* A pair that vanished from a sequence and later re-appears in it trips the official
  ``assert head_id not in pair2head_ids[pair]`` (the crash reported against the DeepMind
  repository). By default the port continues as the official code does under ``python -O``
  (the ``set.add`` is a no-op) and counts the event; ``strict=True`` raises like the
  official code.
* When the heap runs empty the official code crashes (it appends a rule ``(-1, None,
  None)``); the port stops early.

Cost: like the official code (939 s for 10,000 merges on the Beauty train split, 2 shared
cores); it is meant for tests on small corpora and ``bench/compare_actionpiece_official.py``.
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Sequence

from tqdm.auto import tqdm

Pair = tuple[int, int]
EPS = 1e-12  # the official tolerance for "same count" and "no change"


class OfficialReappearError(AssertionError):
    """Raised (``strict=True``) where the official code's assertion would fail."""


class _Seq:
    """One sequence: ``acts[k]`` the token list of action k, ``ctx[k]`` the context slot
    between actions k and k+1 (an empty list or one token), as the official linked list."""

    __slots__ = ("acts", "ctx")

    def __init__(self, items: Sequence[Sequence[int]]):
        self.acts = [list(item) for item in items]
        self.ctx: list[list[int]] = [[] for _ in range(len(self.acts) - 1)]


def _inside(state: list[int]) -> dict[Pair, float]:
    sub: dict[Pair, float] = defaultdict(float)
    for i, a in enumerate(state):
        for b in state[i + 1:]:
            sub[(min(a, b), max(a, b))] += 2 / len(state)
    return sub


def _between(s1: list[int], s2: list[int]) -> dict[Pair, float]:
    sub: dict[Pair, float] = defaultdict(float)
    for a in s1:
        for b in s2:
            sub[(min(a, b), max(a, b))] += 1 / (len(s1) * len(s2))
    return sub


def _fold(acc: dict[Pair, float], sub: dict[Pair, float]) -> None:
    for k, v in sub.items():
        acc[k] += v


def count_pairs(seq: _Seq) -> dict[Pair, float]:
    """Float pair counts of one sequence, regions added in list order (official order)."""
    acc: dict[Pair, float] = defaultdict(float)
    acts, ctx = seq.acts, seq.ctx
    for k, act in enumerate(acts):
        _fold(acc, _inside(act))
        if k == len(acts) - 1:
            break
        if ctx[k]:
            _fold(acc, _between(act, ctx[k]))
            _fold(acc, _between(ctx[k], acts[k + 1]))
        else:
            _fold(acc, _between(act, acts[k + 1]))
    return acc


def _state_context(state: list[int], slot: list[int], u: int, v: int, w: int) -> None:
    c = slot[0]
    if c == u:
        if v in state:
            state.remove(v)
            slot[0] = w
    elif c == v:
        if u in state:
            state.remove(u)
            slot[0] = w


def merge_rule(seq: _Seq, u: int, v: int, w: int) -> None:
    """Apply rule ``(u, v) -> w`` in place: the official left-to-right walk, then the
    official empty-node passes."""
    acts, ctx = seq.acts, seq.ctx
    for k, act in enumerate(acts):
        if u != v and u in act and v in act:
            acts[k] = act = [w] + [t for t in act if t != u and t != v]
        if k == len(acts) - 1:
            break
        nxt = acts[k + 1]
        if ctx[k]:
            _state_context(act, ctx[k], u, v, w)
            _state_context(nxt, ctx[k], u, v, w)
        elif u in act and v in nxt:
            act.remove(u)
            nxt.remove(v)
            ctx[k] = [w]
        elif v in act and u in nxt:
            act.remove(v)
            nxt.remove(u)
            ctx[k] = [w]
    _merge_empty_nodes(seq)


def _merge_empty_nodes(seq: _Seq) -> None:
    acts, ctx = seq.acts, seq.ctx
    updated = True
    while updated:
        updated = False
        # Pass 1: an empty action (not the first) takes the token of the slot before it.
        for k in range(1, len(acts)):
            if not acts[k] and ctx[k - 1]:
                acts[k] = ctx[k - 1]
                ctx[k - 1] = []
                updated = True
        # Pass 2: drop every empty action that is followed by an empty slot, left to right.
        k = 0
        while k < len(acts) - 1:
            if not acts[k] and not ctx[k]:
                del acts[k]
                del ctx[k]
                updated = True
            else:
                k += 1


@dataclass
class OfficialResult:
    pairs: list[Pair]
    priorities: list[float]  # the popped entry's count, as the official ``priority`` list
    phantom: list[bool]  # the pair occurred in no sequence when it was merged
    reappearances: list[tuple[int, int, Pair]] = field(default_factory=list)
    """(merge index, sequence, pair) where the official assertion would have failed."""


def official_merges(
    sequences: Sequence[Sequence[Sequence[int]]],
    n_init_tokens: int,
    n_merges: int,
    strict: bool = False,
    progress: bool | None = None,
) -> OfficialResult:
    """Learn up to ``n_merges`` rules exactly as the official code does.

    ``sequences[h][k]`` lists the initial token ids of the k-th item of sequence h (the
    official code's token corpus, features in category order); merged tokens get ids
    ``n_init_tokens, n_init_tokens + 1, ...``."""
    seqs = [_Seq(s) for s in sequences]
    for h, s in enumerate(seqs):
        if not s.acts:
            raise ValueError(f"sequences[{h}] is empty")
    # _build
    seq_cnt: list[dict[Pair, float]] = []
    heads_of: dict[Pair, set[int]] = defaultdict(set)
    total: dict[Pair, float] = defaultdict(float)
    for h, s in enumerate(seqs):
        cnt = count_pairs(s)
        _fold(total, cnt)
        for p in cnt:
            heads_of[p].add(h)
        seq_cnt.append(cnt)
    heap = [(-c, p) for p, c in total.items()]
    heapq.heapify(heap)

    out = OfficialResult([], [], [])
    disable = None if progress is None else not progress
    for n in tqdm(range(n_merges), desc="ActionPiece merges (official port)", disable=disable):
        # _train_step: pop until an entry matches the current total.
        while heap:
            negc, p = heapq.heappop(heap)
            if not abs(-negc - total[p]) > EPS:
                break
        else:
            break  # the official code would crash here
        u, v = p
        w = n_init_tokens + n
        heads = heads_of[p].copy()
        out.pairs.append(p)
        out.priorities.append(-negc)
        out.phantom.append(not any(p in seq_cnt[h] for h in heads))
        all_diff: dict[Pair, float] = defaultdict(int)  # type: ignore[arg-type]
        for h in heads:
            merge_rule(seqs[h], u, v, w)
            new = count_pairs(seqs[h])
            old = seq_cnt[h]
            diff = {k: c - old.get(k, 0) for k, c in new.items()}
            for k, d in diff.items():
                if d > 0 and abs(old.get(k, 0.0)) < EPS:
                    if h in heads_of[k]:
                        if strict:
                            raise OfficialReappearError(f"head_id {h} already in pair2head_ids[{k}]")
                        out.reappearances.append((n, h, k))
                    heads_of[k].add(h)
                elif d < 0 and abs(old.get(k, 0.0) + d) < EPS:  # never true; kept as in the original
                    heads_of[k].discard(h)
            seq_cnt[h] = new
            _fold(all_diff, diff)
        for k, d in all_diff.items():
            if abs(d) < EPS:
                continue
            total[k] += d
            heapq.heappush(heap, (-total[k], k))
    return out
