"""ActionPiece segmentation (spec section 8) and the inference helpers of section 10.

* :func:`spr_encode` - Set Permutation Regularization for training inputs: shuffle each
  item's feature tokens, flatten, then plain BPE by merge order (the earliest-learned rule
  among adjacent pairs is applied first, leftmost on ties). The official code rescans the
  whole sequence after every merge (quadratic); here a min-heap of candidate positions over
  a linked list, compiled with numba, makes it O(n log n) per sequence.
* :func:`none_encode` - the deterministic segmentation used for target labels.
* :func:`decode_tokens` / :func:`fuse_beams` - turn generated token sequences back into
  feature tuples and fuse the beam lists of several SPR segmentations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from modules.actionpiece._jit import njit
from modules.actionpiece.reference import RefSequence, normalize
from modules.actionpiece.vocab import _hash


# ----------------------------------------------------------------------------- rule table
def rule_table(token2feat: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Open-addressing table (keys, vals): pair key ``u << 32 | v`` (u <= v) -> merged token.

    If a pair was merged more than once (faithful mode's phantoms, or a pair that survived
    its first merge) the earliest id wins: rules apply in learning order. (The official
    code's ``rank`` dict keeps the *latest* id instead; the two differ only for such
    duplicates.)"""
    merges = [(i, t[1], t[2]) for i, t in enumerate(token2feat) if len(t) == 3]
    size = 1 << max(4, math.ceil(math.log2(2 * len(merges) + 2)))
    keys = np.full(size, -1, dtype=np.int64)
    vals = np.zeros(size, dtype=np.int64)
    _fill_rules(np.array([m[0] for m in merges], dtype=np.int64).reshape(-1),
                np.array([(min(m[1], m[2]) << 32) | max(m[1], m[2]) for m in merges],
                         dtype=np.int64).reshape(-1), keys, vals)
    return keys, vals


@njit
def _fill_rules(ids, pair_keys, keys, vals):
    mask = len(keys) - 1
    for n in range(len(ids)):
        key = pair_keys[n]
        i = _hash(key) & mask
        while keys[i] != -1 and keys[i] != key:
            i = (i + 1) & mask
        if keys[i] == -1:  # first (earliest) rule for this pair wins
            keys[i] = key
            vals[i] = ids[n]


@njit
def _rule(keys, vals, a, b):
    if a > b:
        a, b = b, a
    key = (np.int64(a) << 32) | b
    mask = len(keys) - 1
    i = _hash(key) & mask
    while True:
        k = keys[i]
        if k == key:
            return vals[i]
        if k == -1:
            return -1
        i = (i + 1) & mask


# ----------------------------------------------------------------------------- SPR
POS_BITS = 24  # heap entry = rule id << POS_BITS | position: one int64 compare = (rule, pos)


@njit
def _bpe_inplace(t, n, keys, vals, nxt, prv, heap):
    """BPE on t[:n] by rule id; compacts the result into t and returns its length."""
    hn = 0
    for i in range(n):
        nxt[i] = i + 1 if i + 1 < n else -1
        prv[i] = i - 1
    for i in range(n - 1):
        r = _rule(keys, vals, t[i], t[i + 1])
        if r >= 0:
            hn = _minheap_push(heap, hn, (r << POS_BITS) | i)
    while hn > 0:
        top = heap[0]
        hn = _minheap_pop(heap, hn)
        r = top >> POS_BITS
        i = top & ((1 << POS_BITS) - 1)
        j = nxt[i]
        if t[i] < 0 or j == -1 or _rule(keys, vals, t[i], t[j]) != r:
            continue  # stale entry: position merged away or its pair changed
        t[i] = r
        t[j] = -1
        k = nxt[j]
        nxt[i] = k
        if k != -1:
            prv[k] = i
            r2 = _rule(keys, vals, r, t[k])
            if r2 >= 0:
                hn = _minheap_push(heap, hn, (r2 << POS_BITS) | i)
        p = prv[i]
        if p != -1:
            r2 = _rule(keys, vals, t[p], r)
            if r2 >= 0:
                hn = _minheap_push(heap, hn, (r2 << POS_BITS) | p)
    m = 0
    for i in range(n):
        if t[i] >= 0:
            t[m] = t[i]
            m += 1
    return m


@njit
def _minheap_push(heap, n, x):
    i = n
    while i > 0:
        par = (i - 1) >> 1
        if heap[par] > x:
            heap[i] = heap[par]
            i = par
        else:
            break
    heap[i] = x
    return n + 1


@njit
def _minheap_pop(heap, n):
    n -= 1
    x = heap[n]
    i = 0
    while True:
        c = 2 * i + 1
        if c >= n:
            break
        if c + 1 < n and heap[c + 1] < heap[c]:
            c += 1
        if heap[c] < x:
            heap[i] = heap[c]
            i = c
        else:
            break
    heap[i] = x
    return n


@njit
def _spr_batch(history, item_tokens, rand, keys, vals, out, lengths):
    n, H = history.shape
    K = item_tokens.shape[1]
    cap = H * K
    t = np.empty(cap, dtype=np.int64)
    nxt = np.empty(cap, dtype=np.int64)
    prv = np.empty(cap, dtype=np.int64)
    heap = np.empty(4 * cap + 4, dtype=np.int64)
    for e in range(n):
        m = 0
        for h in range(H):
            item = history[e, h]
            if item < 0:
                break  # padding sits at the end
            for c in range(K):
                t[m + c] = item_tokens[item, c]
            # Fisher-Yates shuffle of this item's K tokens from the given uniforms.
            for c in range(K - 1, 0, -1):
                s = int(rand[e, h, c - 1] * (c + 1))
                tmp = t[m + c]
                t[m + c] = t[m + s]
                t[m + s] = tmp
            m += K
        m = _bpe_inplace(t, m, keys, vals, nxt, prv, heap)
        for i in range(m):
            out[e, i] = t[i]
        lengths[e] = m


@njit
def _bpe_batch(flat, offsets, keys, vals, out, lengths):
    cap = 1
    for e in range(len(offsets) - 1):
        cap = max(cap, offsets[e + 1] - offsets[e])
    t = np.empty(cap, dtype=np.int64)
    nxt = np.empty(cap, dtype=np.int64)
    prv = np.empty(cap, dtype=np.int64)
    heap = np.empty(4 * cap + 4, dtype=np.int64)
    for e in range(len(offsets) - 1):
        n = offsets[e + 1] - offsets[e]
        for i in range(n):
            t[i] = flat[offsets[e] + i]
        m = _bpe_inplace(t, n, keys, vals, nxt, prv, heap)
        for i in range(m):
            out[e, i] = t[i]
        lengths[e] = m


@dataclass
class Segmented:
    """A batch of token sequences, right-padded with ``pad`` (0)."""

    tokens: np.ndarray  # (n, max_len) int64
    lengths: np.ndarray  # (n,) int64


def spr_encode(
    history: np.ndarray,
    item_tokens: np.ndarray,
    rules: tuple[np.ndarray, np.ndarray],
    rng: np.random.Generator | int | None = None,
    pad: int = 0,
) -> Segmented:
    """SPR-segment a batch of item histories.

    Args:
        history: (n, H) int64 item ids, oldest first, padded with -1 at the end.
        item_tokens: (N, K) initial token ids of each item's K features.
        rules: :func:`rule_table` of the vocabulary.
        rng: numpy Generator or seed (the only source of randomness: same seed, same output).
    """
    history = np.ascontiguousarray(history, dtype=np.int64)
    if history.ndim != 2:
        raise ValueError(f"history must be (n, H), got shape {history.shape}")
    if history.size and history.max() >= len(item_tokens):
        raise ValueError(f"history refers to item id {history.max()} >= {len(item_tokens)} items")
    item_tokens = np.ascontiguousarray(item_tokens, dtype=np.int64)
    if (item_tokens < 0).any():
        raise ValueError("item_tokens must give every item all K features")
    rng = np.random.default_rng(rng)
    n, H = history.shape
    K = item_tokens.shape[1]
    rand = rng.random((n, H, max(K - 1, 1)))
    out = np.full((n, max(H * K, 1)), pad, dtype=np.int64)
    lengths = np.zeros(n, dtype=np.int64)
    _spr_batch(history, item_tokens, rand, rules[0], rules[1], out, lengths)
    return Segmented(out[:, : max(int(lengths.max(initial=0)), 1)], lengths)


def bpe_encode(sequences: Sequence[Sequence[int]], rules: tuple[np.ndarray, np.ndarray],
               pad: int = 0) -> Segmented:
    """Plain BPE (by rule id, leftmost on ties) of already flattened token sequences."""
    lens = np.array([len(s) for s in sequences], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    flat = np.concatenate([np.asarray(s, dtype=np.int64) for s in sequences] + [np.zeros(0, np.int64)])
    out = np.full((len(sequences), max(int(lens.max(initial=0)), 1)), pad, dtype=np.int64)
    lengths = np.zeros(len(sequences), dtype=np.int64)
    _bpe_batch(flat, offsets, rules[0], rules[1], out, lengths)
    return Segmented(out[:, : max(int(lengths.max(initial=0)), 1)], lengths)


# ----------------------------------------------------------------------------- deterministic
def none_encode(
    items: Sequence[Sequence[int]],
    rules: dict[tuple[int, int], int],
    priority: Sequence[float],
) -> list[int]:
    """Deterministic segmentation of a sequence of items (each a list of initial tokens).

    Repeatedly applies the single best applicable rule anywhere in the linked-list form,
    scored ``priority[rule] * local weight`` (2/M inside an action of M tokens; 1/(|X||Y|)
    across a gap, a context slot counting as size 1); the first location found wins ties
    (enumeration: action by action, inside pairs in node order, then the gap after it).
    Output: tokens of all nodes in list order, newest merged token first inside a node.
    """
    seq = RefSequence(items)
    acts, ctx = seq.acts, seq.ctx

    def rule(a: int, b: int) -> int:
        return rules.get((a, b) if a <= b else (b, a), -1)

    def best_inside(k: int) -> tuple[float, tuple | None]:
        node, best_score, best = acts[k], -math.inf, None
        m = len(node)
        for i in range(m):
            for j in range(i + 1, m):
                r = rule(node[i], node[j])
                if r >= 0 and priority[r] * 2 / m > best_score:
                    best_score, best = priority[r] * 2 / m, ("in", node[i], node[j], r)
        return best_score, best

    def best_gap(k: int) -> tuple[float, tuple | None]:
        a_node, b_node, c = acts[k], acts[k + 1], ctx[k]
        best_score, best = -math.inf, None
        if c is not None:
            for x in a_node:
                r = rule(x, c)
                if r >= 0 and priority[r] / len(a_node) > best_score:
                    best_score, best = priority[r] / len(a_node), ("ac", x, c, r)
            for y in b_node:
                r = rule(c, y)
                if r >= 0 and priority[r] / len(b_node) > best_score:
                    best_score, best = priority[r] / len(b_node), ("cb", c, y, r)
        else:
            for x in a_node:
                for y in b_node:
                    r = rule(x, y)
                    if r >= 0 and priority[r] / (len(a_node) * len(b_node)) > best_score:
                        best_score, best = priority[r] / (len(a_node) * len(b_node)), ("ab", x, y, r)
        return best_score, best

    # Best candidate per location, recomputed only where a merge changed something: a
    # merge at action k or gap k (plus normalisation without unlinking) touches actions
    # k..k+1 and slots k-1..k, so locations k-2..k+1 are refreshed; an unlink renumbers
    # everything and triggers a full refresh.
    inside = [best_inside(k) for k in range(len(acts))]
    gaps = [best_gap(k) for k in range(len(acts) - 1)]
    while True:
        best_score, best, where_k = -math.inf, None, -1
        for k in range(len(acts)):  # enumeration order: inside(k), then gap(k)
            if inside[k][0] > best_score:
                best_score, best, where_k = inside[k][0], inside[k][1], k
            if k < len(gaps) and gaps[k][0] > best_score:
                best_score, best, where_k = gaps[k][0], gaps[k][1], k
        if best is None:
            break
        where, x, y, r = best
        k = where_k
        if where == "in":
            acts[k].remove(x)
            acts[k].remove(y)
            acts[k].insert(0, r)
        elif where == "ac":
            acts[k].remove(x)
            ctx[k] = r
        elif where == "cb":
            acts[k + 1].remove(y)
            ctx[k] = r
        else:
            acts[k].remove(x)
            acts[k + 1].remove(y)
            ctx[k] = r
        n_before = len(acts)
        normalize(seq)
        if len(acts) != n_before:
            inside = [best_inside(j) for j in range(len(acts))]
            gaps = [best_gap(j) for j in range(len(acts) - 1)]
        else:
            for j in range(max(k - 2, 0), min(k + 2, len(acts))):
                inside[j] = best_inside(j)
                if j < len(gaps):
                    gaps[j] = best_gap(j)
    out: list[int] = []
    for k, a_node in enumerate(acts):
        out.extend(a_node)
        if k < len(ctx) and ctx[k] is not None:
            out.append(ctx[k])
    return out


# ----------------------------------------------------------------------------- decoding
def expand_table(token2feat: Sequence[Sequence[int]]) -> list[tuple[tuple[int, int], ...]]:
    """Per token, the initial (category, value) features it stands for (merges expanded)."""
    table: list[tuple[tuple[int, int], ...]] = []
    for tok, f in enumerate(token2feat):
        if len(f) == 2:
            table.append(((f[0], f[1]),) if f[0] >= 0 else ())
        else:
            if not (0 < f[1] < tok and 0 < f[2] < tok):
                raise ValueError(f"token2feat[{tok}] = {list(f)} refers to a later or invalid token")
            table.append(table[f[1]] + table[f[2]])
    return table


def decode_tokens(
    tokens: Sequence[int],
    expand: Sequence[tuple[tuple[int, int], ...]],
    n_categories: int,
    eos_id: int | None = None,
) -> tuple[int, ...] | None:
    """Feature tuple (values by category) of a generated token sequence, or None if invalid.

    Cut at the first ``eos_id``; valid iff no pad/out-of-range token and every category
    occurs exactly once."""
    values: list[int | None] = [None] * n_categories
    for tok in tokens:
        tok = int(tok)
        if eos_id is not None and tok == eos_id:
            break
        if tok <= 0 or tok >= len(expand):
            return None
        for c, v in expand[tok]:
            if values[c] is not None:
                return None
            values[c] = v
    if any(v is None for v in values):
        return None
    return tuple(values)  # type: ignore[arg-type]


@dataclass
class FusedRanking:
    items: list[tuple[int, ...]]  # best first, at most topk
    scores: list[float]
    n_invalid: int  # beams that did not decode to a valid feature tuple


def fuse_beams(
    beam_lists: Sequence[Sequence[Sequence[int]]],
    decode: Callable[[Sequence[int]], tuple[int, ...] | None],
    topk: int = 50,
) -> FusedRanking:
    """Fuse the beam lists of q segmentations (spec section 10): each valid beam at rank j
    adds 1/log2(j + 2) to its feature tuple; invalid beams are dropped and counted. Ties
    keep first-seen order (stable sort)."""
    score: dict[tuple[int, ...], float] = {}
    n_invalid = 0
    for beams in beam_lists:
        for j, beam in enumerate(beams):
            feats = decode(beam)
            if feats is None:
                n_invalid += 1
                continue
            score[feats] = score.get(feats, 0.0) + 1.0 / math.log2(j + 2)
    ranked = sorted(score.items(), key=lambda kv: -kv[1])[:topk]
    return FusedRanking([k for k, _ in ranked], [s for _, s in ranked], n_invalid)
