"""Slow, obviously-correct ActionPiece vocabulary construction (small corpora only).

This is the yardstick for :mod:`modules.actionpiece.vocab`. It follows the spec
(``shared/design/actionpiece.md`` sections 4-7) literally:

* a sequence is a plain list of action nodes (lists of token ids, newest merged token first)
  and a list of context slots (``None`` or one token) between consecutive actions;
* after every merge *every* sequence is recounted from scratch;
* counts are exact :class:`fractions.Fraction` values, so ties between pairs whose float
  counts would differ only by rounding are decided exactly (count desc, then the smaller
  ``(u, v)`` tuple), the same rule the fast code applies to its integer-scaled counts.

Two modes:

``correct``
    the next merge is the argmax over the current exact global counts (pairs with a
    positive count only).
``faithful``
    the official code's vocabulary, stale counts, float sums and all: delegated to
    :mod:`modules.actionpiece.official_port` (an exact-arithmetic imitation of the quirk
    breaks ties differently from the official code, see that module).
"""

from __future__ import annotations

from fractions import Fraction
from typing import Iterable, Sequence

from modules.actionpiece.official_port import official_merges

Pair = tuple[int, int]


class RefSequence:
    """One training sequence as ``acts`` (token lists) and ``ctx`` (slot contents)."""

    def __init__(self, items: Iterable[Sequence[int]]):
        self.acts: list[list[int]] = [list(item) for item in items]
        self.ctx: list[int | None] = [None] * max(len(self.acts) - 1, 0)

    def copy(self) -> "RefSequence":
        out = RefSequence([])
        out.acts = [list(a) for a in self.acts]
        out.ctx = list(self.ctx)
        return out


def _key(a: int, b: int) -> Pair:
    return (a, b) if a <= b else (b, a)


def count_sequence(seq: RefSequence) -> dict[Pair, Fraction]:
    """Weighted co-occurrence counts of one sequence (spec section 5)."""
    cnt: dict[Pair, Fraction] = {}

    def add(a: int, b: int, weight: Fraction) -> None:
        k = _key(a, b)
        cnt[k] = cnt.get(k, Fraction(0)) + weight

    t = len(seq.acts)
    for k, act in enumerate(seq.acts):
        m = len(act)
        for i in range(m):
            for j in range(i + 1, m):
                add(act[i], act[j], Fraction(2, m))
        if k == t - 1:
            break
        nxt = seq.acts[k + 1]
        c = seq.ctx[k]
        if c is not None:
            for a in act:
                add(a, c, Fraction(1, len(act)))
            for b in nxt:
                add(c, b, Fraction(1, len(nxt)))
        else:
            for a in act:
                for b in nxt:
                    add(a, b, Fraction(1, len(act) * len(nxt)))
    return cnt


def apply_merge(seq: RefSequence, u: int, v: int, w: int) -> None:
    """Replace occurrences of the pair ``{u, v}`` by ``w`` in place (spec section 7)."""
    acts, ctx = seq.acts, seq.ctx
    t = len(acts)
    for k in range(t):
        a = acts[k]
        if u != v and u in a and v in a:
            a.remove(u)
            a.remove(v)
            a.insert(0, w)
        if k == t - 1:
            break
        b = acts[k + 1]
        if ctx[k] is not None:
            for node in (a, b):  # (A_k, C_k) first, then (A_{k+1}, C_k)
                c = ctx[k]
                if c == u and v in node:
                    node.remove(v)
                    ctx[k] = w
                elif c == v and u in node:
                    node.remove(u)
                    ctx[k] = w
        else:
            if u in a and v in b:
                a.remove(u)
                b.remove(v)
                ctx[k] = w
            elif v in a and u in b:
                a.remove(v)
                b.remove(u)
                ctx[k] = w
    normalize(seq)


def normalize(seq: RefSequence) -> None:
    """Spec section 7's empty-node rules, applied one at a time until none applies."""
    acts, ctx = seq.acts, seq.ctx
    changed = True
    while changed:
        changed = False
        for k in range(len(acts)):
            if acts[k]:
                continue
            if k > 0 and ctx[k - 1] is not None:
                acts[k] = [ctx[k - 1]]
                ctx[k - 1] = None
                changed = True
                break
            if k < len(acts) - 1 and ctx[k] is None:
                del acts[k]
                del ctx[k]
                changed = True
                break


def _total(counts: Iterable[dict[Pair, Fraction]]) -> dict[Pair, Fraction]:
    total: dict[Pair, Fraction] = {}
    for cnt in counts:
        for p, c in cnt.items():
            total[p] = total.get(p, Fraction(0)) + c
    return total


def reference_merges(
    sequences: Sequence[Sequence[Sequence[int]]],
    n_init_tokens: int,
    n_merges: int,
    mode: str = "correct",
) -> tuple[list[Pair], list[Fraction] | list[float]]:
    """Learn up to ``n_merges`` rules; returns ``(pairs, counts at merge time)``: exact
    fractions in correct mode, the official float priorities in faithful mode.

    ``sequences[h][k]`` is the tuple of initial token ids of the k-th item of sequence h;
    merged tokens get ids ``n_init_tokens, n_init_tokens + 1, ...``. Stops early when no
    pair is left.
    """
    if mode not in ("correct", "faithful"):
        raise ValueError(f"mode must be 'correct' or 'faithful', got {mode!r}")
    if mode == "faithful":
        res = official_merges(sequences, n_init_tokens, n_merges)
        return res.pairs, res.priorities
    seqs = [RefSequence(s) for s in sequences]
    pairs: list[Pair] = []
    counts: list[Fraction] = []
    while len(pairs) < n_merges:
        total = _total(count_sequence(s) for s in seqs)
        live = [(c, p) for p, c in total.items() if c > 0]
        if not live:
            break
        c, p = min(live, key=lambda cp: (-cp[0], cp[1]))
        w = n_init_tokens + len(pairs)
        pairs.append(p)
        counts.append(c)
        for s in seqs:
            apply_merge(s, p[0], p[1], w)
    return pairs, counts
