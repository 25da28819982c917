"""Fast ActionPiece vocabulary construction (spec sections 4-7 of
``shared/design/actionpiece.md``).

What makes ``correct`` mode fast compared with the official code (1 h, 2.2 GB on Beauty):

* **Exact integer counts.** Every weight is ``2/M`` (inside an action of M tokens) or
  ``1/(|A||B|)`` (across a gap, a context slot counting as size 1) with ``M, |A|, |B| <= K``
  (K = most features per item), so multiplying by ``S = lcm(1..K)**2`` (3600 for K = 5)
  makes all counts int64. Ties are therefore decided exactly (count desc, then the smaller
  ``(u, v)``), independently of summation order, and the result is reproducible and equal to
  :mod:`modules.actionpiece.reference` (exact fractions) merge for merge.
* **Position-local updates.** A merge only walks the sequences that contain the pair (an
  inverted index pair -> sequences), and only re-counts the *regions* it touched: a region
  is an action node (its inside pairs) or a context slot (the pairs across its gap). Before
  a node changes, the regions depending on it are subtracted; after the merge and the
  empty-node normalisation they are added back. A (sequence, pair) -> count hash map tells
  when a pair appears in or vanishes from a sequence (inverted index upkeep).
* **Lazy max-heap** of ``(count, pair)`` with validity check against the current total.
* **numba** compiles the kernel (see ``_jit.py``); state lives in flat numpy arrays
  (linked list of nodes, open-addressing hash tables, heap) that Python grows when the
  kernel asks for room, so the kernel never has to reallocate.

Modes: ``correct`` subtracts pairs that vanish from a sequence (the algorithm as meant).
``faithful`` gives the official code's vocabulary merge for merge, ``token2feat`` and
``priority`` bit for bit (its oracle is :mod:`modules.actionpiece.official_port`, whose
docstring lists the behaviours involved): the stale-count quirk (a sequence's diff is taken
only over the pairs still present in it, so vanished pairs keep their count and may later
be merged as "phantom" tokens), float counts summed in the official order (ties between
pairs equal in exact arithmetic are decided by rounding), the never-shrinking inverted index
walked in CPython's set order, the 1e-12 heap tolerance. It runs a separate kernel (see the
"faithful mode" section) that does the official work per merge minus the sequences a merge
leaves unchanged and minus re-summing pairs it did not touch. An exact-arithmetic imitation
of the quirk (this module before) departs from the official vocabulary within the first
hundred merges on Beauty.

Beauty train split, 40k vocabulary, 2 shared cores: correct mode ~12-37 s and ~0.6-1 GB peak
RSS (``bench/bench_actionpiece.py``), against about an hour and 2.2 GB for the official code;
faithful mode: see ``bench/compare_actionpiece_official.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from modules.actionpiece._jit import njit

# Node kinds.
ACTION, SLOT, DEAD = 0, 1, 2
# Columns of the node table `ninfo`.
NI_SIZE, NI_PREV, NI_NEXT, NI_KIND, NI_DSTAMP = 0, 1, 2, 3, 4
# Columns of the sequence table `sinfo`: head node, node count at start (bounds work), stamp.
SI_HEAD, SI_NNODES, SI_STAMP = 0, 1, 2
# Columns of the per-pair table `P` (row = dense pair id "pid").
P_KEY, P_TOTAL, P_OCC, P_SDELTA, P_SSTAMP, P_GDIFF, P_GSTAMP = 0, 1, 2, 3, 4, 5, 6
N_PCOL = 7
# Slots of the `meta` scalar array shared between Python and the kernel.
(M_NPIDS, M_SPCOUNT, M_OCCUSED, M_HEAPSIZE, M_PHASE, M_LI, M_LLEN, M_GTLLEN, M_CURPID,
 M_CURW, M_MSTAMP, M_SSTAMP, M_NDONE, M_NEED, M_MODE, M_SCALE, M_NINIT, M_DLEN, M_STLLEN,
 M_BUILD, M_K, M_NFREE, M_AFFN) = range(23)
N_META = 23
# Kernel return codes and "need room" flags.
ST_OK, ST_EXHAUSTED, ST_GROW = 0, 1, 2
NEED_PAIRS, NEED_SP, NEED_OCC, NEED_HEAP, NEED_PTAB = 1, 2, 4, 8, 16
# What marking a region dirty does: subtract its integer counts (correct mode) or note its
# pairs for a float re-sum (faithful mode).
TRACK_COUNTS, TRACK_PAIRS = 1, 2
# Open-addressing tables grow past these load factors (linear probing degrades beyond).
MAX_LOAD_SP, MAX_LOAD_PTAB = 0.7, 0.6

MODES = ("correct", "faithful")


# ----------------------------------------------------------------------------- hashing
@njit
def _hash(key):
    # Multiply two 31-bit halves by 31-bit odd constants: no int64 overflow, so numba and
    # the plain-Python fallback compute the same value. Masked by a power-of-two table
    # size it gives the home slot.
    lo = key & 0x7FFFFFFF
    hi = (key >> 31) & 0x7FFFFFFF
    h = lo * 0x5BD1E995 + hi * 0x27D4EB2F
    return h ^ (h >> 29)


@njit
def _pair_find(ptk, ptv, key):
    mask = len(ptk) - 1
    i = _hash(key) & mask
    while True:
        k = ptk[i]
        if k == key:
            return ptv[i]
        if k == -1:
            return -1
        i = (i + 1) & mask


@njit
def _pair_get(ptk, ptv, P, free, meta, key):
    """Dense id of pair `key`, created (with zero total) on first sight."""
    mask = len(ptk) - 1
    i = _hash(key) & mask
    while True:
        k = ptk[i]
        if k == key:
            return ptv[i]
        if k == -1:
            if meta[M_NFREE] > 0:
                meta[M_NFREE] -= 1
                pid = free[meta[M_NFREE]]
            else:
                pid = meta[M_NPIDS]
                meta[M_NPIDS] = pid + 1
            ptk[i] = key
            ptv[i] = pid
            P[pid, P_KEY] = key
            P[pid, P_TOTAL] = 0
            P[pid, P_OCC] = -1
            P[pid, P_SDELTA] = 0
            P[pid, P_SSTAMP] = -1
            P[pid, P_GDIFF] = 0
            P[pid, P_GSTAMP] = -1
            return pid
        i = (i + 1) & mask


@njit
def _pair_rehash(ptk, ptv, new_k, new_v):
    mask = len(new_k) - 1
    for j in range(len(ptk)):
        key = ptk[j]
        if key != -1:
            i = _hash(key) & mask
            while new_k[i] != -1:
                i = (i + 1) & mask
            new_k[i] = key
            new_v[i] = ptv[j]


@njit
def _sp_lookup(spk, key):
    """Slot holding `key` in the (sequence, pid) -> count map, or the empty slot for it."""
    mask = len(spk) - 1
    i = _hash(key) & mask
    while spk[i] != -1 and spk[i] != key:
        i = (i + 1) & mask
    return i


@njit
def _table_delete(spk, spv, i):
    """Linear-probing deletion by backward shift (no tombstones, so lookups stay short)."""
    mask = len(spk) - 1
    j = i
    while True:
        j = (j + 1) & mask
        if spk[j] == -1:
            break
        home = _hash(spk[j]) & mask
        # Keep spk[j] where it is if its home lies cyclically in (i, j].
        if i <= j:
            if i < home <= j:
                continue
        elif home > i or home <= j:
            continue
        spk[i] = spk[j]
        spv[i] = spv[j]
        i = j
    spk[i] = -1


# ----------------------------------------------------------------------------- heap
@njit
def _better(c1, k1, c2, k2):
    return c1 > c2 or (c1 == c2 and k1 < k2)


@njit
def _heap_push(hp, n, c, k):
    i = n
    while i > 0:
        par = (i - 1) >> 1
        if _better(c, k, hp[par, 0], hp[par, 1]):
            hp[i, 0] = hp[par, 0]
            hp[i, 1] = hp[par, 1]
            i = par
        else:
            break
    hp[i, 0] = c
    hp[i, 1] = k
    return n + 1


@njit
def _heap_pop(hp, n):
    """Remove the top of a heap of size n; returns (count, key). Caller shrinks n."""
    c = hp[0, 0]
    k = hp[0, 1]
    n -= 1
    lc = hp[n, 0]
    lk = hp[n, 1]
    i = 0
    while True:
        left = 2 * i + 1
        if left >= n:
            break
        best = left
        right = left + 1
        if right < n and _better(hp[right, 0], hp[right, 1], hp[left, 0], hp[left, 1]):
            best = right
        if _better(hp[best, 0], hp[best, 1], lc, lk):
            hp[i, 0] = hp[best, 0]
            hp[i, 1] = hp[best, 1]
            i = best
        else:
            break
    hp[i, 0] = lc
    hp[i, 1] = lk
    return c, k


@njit
def _heap_compact(hp, n, P, ptk, ptv):
    """Drop entries that no longer match their pair's total, then re-heapify.

    Correct mode only: there every live pair keeps a valid entry, so stale entries are
    dead weight. (In faithful mode a stale entry becomes valid again when a total returns
    to an old value, which the official heap would then pop: they must stay.)"""
    m = 0
    for i in range(n):
        c = hp[i, 0]
        pid = _pair_find(ptk, ptv, hp[i, 1])
        if c > 0 and pid != -1 and P[pid, P_TOTAL] == c:
            hp[m, 0] = c
            hp[m, 1] = hp[i, 1]
            m += 1
    for start in range((m - 2) // 2, -1, -1):  # bottom-up heapify
        i = start
        c = hp[i, 0]
        k = hp[i, 1]
        while True:
            left = 2 * i + 1
            if left >= m:
                break
            best = left
            if left + 1 < m and _better(hp[left + 1, 0], hp[left + 1, 1], hp[left, 0], hp[left, 1]):
                best = left + 1
            if _better(hp[best, 0], hp[best, 1], c, k):
                hp[i, 0] = hp[best, 0]
                hp[i, 1] = hp[best, 1]
                i = best
            else:
                break
        hp[i, 0] = c
        hp[i, 1] = k
    return m


@njit
def _occ_rebuild(spk, occ, P, npids):
    """Rebuild the pair -> sequences lists from the live (sequence, pair) entries, dropping
    the stale ones left behind by pairs that vanished from a sequence."""
    for pid in range(npids):
        P[pid, P_OCC] = -1
    o = 0
    for i in range(len(spk)):
        key = spk[i]
        if key != -1:
            pid = key & 0xFFFFFFFF
            occ[o, 0] = key >> 32
            occ[o, 1] = P[pid, P_OCC]
            P[pid, P_OCC] = o
            o += 1
    return o


# ----------------------------------------------------------------------------- node ops
@njit
def _find(ntok, ninfo, x, t):
    for i in range(ninfo[x, NI_SIZE]):
        if ntok[x, i] == t:
            return i
    return -1


@njit
def _remove_at(ntok, ninfo, x, i):
    n = ninfo[x, NI_SIZE]
    for j in range(i, n - 1):
        ntok[x, j] = ntok[x, j + 1]
    ninfo[x, NI_SIZE] = n - 1


@njit
def _insert_front(ntok, ninfo, x, t):
    n = ninfo[x, NI_SIZE]
    for j in range(n, 0, -1):
        ntok[x, j] = ntok[x, j - 1]
    ntok[x, 0] = t
    ninfo[x, NI_SIZE] = n + 1


# ----------------------------------------------------------------------------- counting
@njit
def _addpair(a, b, d, ptk, ptv, P, free, stl, meta):
    """Accumulate `d` for pair {a, b} in the current sequence's delta buffer."""
    a = np.int64(a)
    b = np.int64(b)
    if a > b:
        a, b = b, a
    pid = _pair_get(ptk, ptv, P, free, meta, (a << 32) | b)
    s = meta[M_SSTAMP]
    if P[pid, P_SSTAMP] != s:
        P[pid, P_SSTAMP] = s
        P[pid, P_SDELTA] = 0
        stl[meta[M_STLLEN]] = pid
        meta[M_STLLEN] += 1
    P[pid, P_SDELTA] += d


@njit
def _add_region(r, sign, ntok, ninfo, ptk, ptv, P, free, stl, meta):
    """Add sign * (the weighted pairs of region r) to the delta buffer.

    Region r is an action node (pairs inside it) or a slot (pairs across its gap)."""
    S = meta[M_SCALE]
    if ninfo[r, NI_KIND] == ACTION:
        m = ninfo[r, NI_SIZE]
        if m >= 2:
            wgt = sign * (2 * S // m)
            for i in range(m):
                for j in range(i + 1, m):
                    _addpair(ntok[r, i], ntok[r, j], wgt, ptk, ptv, P, free, stl, meta)
        return
    a = ninfo[r, NI_PREV]
    b = ninfo[r, NI_NEXT]
    na = ninfo[a, NI_SIZE]
    nb = ninfo[b, NI_SIZE]
    if ninfo[r, NI_SIZE] == 1:
        c = ntok[r, 0]
        if na > 0:
            wgt = sign * (S // na)
            for i in range(na):
                _addpair(ntok[a, i], c, wgt, ptk, ptv, P, free, stl, meta)
        if nb > 0:
            wgt = sign * (S // nb)
            for i in range(nb):
                _addpair(c, ntok[b, i], wgt, ptk, ptv, P, free, stl, meta)
    elif na > 0 and nb > 0:
        wgt = sign * (S // (na * nb))
        for i in range(na):
            for j in range(nb):
                _addpair(ntok[a, i], ntok[b, j], wgt, ptk, ptv, P, free, stl, meta)


@njit
def _mark(r, track, ntok, ninfo, ptk, ptv, P, free, stl, dlist, meta, aff, affv, tmark):
    """First change to region r in this sequence update: subtract its old pairs (track ==
    TRACK_COUNTS) or note them as affected (TRACK_PAIRS, faithful mode)."""
    if ninfo[r, NI_DSTAMP] != meta[M_SSTAMP]:
        ninfo[r, NI_DSTAMP] = meta[M_SSTAMP]
        dlist[meta[M_DLEN]] = r
        meta[M_DLEN] += 1
        if track == TRACK_COUNTS:
            _add_region(r, -1, ntok, ninfo, ptk, ptv, P, free, stl, meta)
        else:
            _note_region(r, ntok, ninfo, meta, aff, affv, tmark)


@njit
def _touch(track, x, ntok, ninfo, ptk, ptv, P, free, stl, dlist, meta, aff, affv, tmark):
    """Call before node x changes (content or links): every region reading x goes dirty."""
    _mark(x, track, ntok, ninfo, ptk, ptv, P, free, stl, dlist, meta, aff, affv, tmark)
    if ninfo[x, NI_KIND] == ACTION:
        p = ninfo[x, NI_PREV]
        if p != -1:
            _mark(p, track, ntok, ninfo, ptk, ptv, P, free, stl, dlist, meta, aff, affv, tmark)
        n = ninfo[x, NI_NEXT]
        if n != -1:
            _mark(n, track, ntok, ninfo, ptk, ptv, P, free, stl, dlist, meta, aff, affv, tmark)


@njit
def _apply_rule(h, u, v, w, track, ntok, ninfo, sinfo, ptk, ptv, P, free, stl, dlist, stack, meta,
                aff, affv, tmark):
    """Apply merge {u, v} -> w to sequence h in place (spec section 7); every region is
    marked dirty (see `_mark`) before it changes. Returns whether the sequence changed."""
    changed = False
    nst = 0
    # The left-to-right merge walk of spec section 7.
    A = sinfo[h, SI_HEAD]
    while A != -1:
        if u != v:
            iu = _find(ntok, ninfo, A, u)
            if iu >= 0 and _find(ntok, ninfo, A, v) >= 0:
                _touch(track, A, ntok, ninfo, ptk, ptv, P, free, stl, dlist, meta, aff, affv, tmark)
                changed = True
                _remove_at(ntok, ninfo, A, iu)
                _remove_at(ntok, ninfo, A, _find(ntok, ninfo, A, v))
                _insert_front(ntok, ninfo, A, w)
        C = ninfo[A, NI_NEXT]
        if C == -1:
            break
        B = ninfo[C, NI_NEXT]
        if ninfo[C, NI_SIZE] == 1:
            for side in range(2):  # (A_k, C_k) first, then (A_{k+1}, C_k)
                X = A if side == 0 else B
                c = ntok[C, 0]
                i = -1
                if c == u:
                    i = _find(ntok, ninfo, X, v)
                elif c == v:
                    i = _find(ntok, ninfo, X, u)
                if i >= 0:
                    _touch(track, X, ntok, ninfo, ptk, ptv, P, free, stl, dlist, meta, aff, affv, tmark)
                    _touch(track, C, ntok, ninfo, ptk, ptv, P, free, stl, dlist, meta, aff, affv, tmark)
                    changed = True
                    _remove_at(ntok, ninfo, X, i)
                    ntok[C, 0] = w
                    stack[nst] = X
                    nst += 1
        else:
            ia = _find(ntok, ninfo, A, u)
            ib = _find(ntok, ninfo, B, v) if ia >= 0 else -1
            if ib < 0:
                ia = _find(ntok, ninfo, A, v)
                ib = _find(ntok, ninfo, B, u) if ia >= 0 else -1
            if ib >= 0:
                _touch(track, A, ntok, ninfo, ptk, ptv, P, free, stl, dlist, meta, aff, affv, tmark)
                _touch(track, B, ntok, ninfo, ptk, ptv, P, free, stl, dlist, meta, aff, affv, tmark)
                _touch(track, C, ntok, ninfo, ptk, ptv, P, free, stl, dlist, meta, aff, affv, tmark)
                changed = True
                _remove_at(ntok, ninfo, A, ia)
                _remove_at(ntok, ninfo, B, ib)
                ntok[C, 0] = w
                ninfo[C, NI_SIZE] = 1
                stack[nst] = A
                stack[nst + 1] = B
                nst += 2
        A = B
    # Empty-node normalisation. Only nodes emptied above (and, by cascade, their
    # neighbours) can be affected; the rules are confluent, so a worklist gives the
    # same result as the reference's repeated left-to-right passes.
    while nst > 0:
        nst -= 1
        A = stack[nst]
        if ninfo[A, NI_KIND] != ACTION or ninfo[A, NI_SIZE] != 0:
            continue
        Pn = ninfo[A, NI_PREV]
        Nn = ninfo[A, NI_NEXT]
        if Pn != -1 and ninfo[Pn, NI_SIZE] == 1:
            # Not the first action and the slot before holds a token: move it in.
            _touch(track, A, ntok, ninfo, ptk, ptv, P, free, stl, dlist, meta, aff, affv, tmark)
            ntok[A, 0] = ntok[Pn, 0]
            ninfo[A, NI_SIZE] = 1
            ninfo[Pn, NI_SIZE] = 0
            pa = ninfo[Pn, NI_PREV]
            stack[nst] = pa  # its following slot just emptied
            nst += 1
        elif Nn != -1 and ninfo[Nn, NI_SIZE] == 0:
            # Followed by an empty slot: unlink the action and the slot.
            _touch(track, A, ntok, ninfo, ptk, ptv, P, free, stl, dlist, meta, aff, affv, tmark)
            B = ninfo[Nn, NI_NEXT]
            if Pn == -1:
                sinfo[h, SI_HEAD] = B
                ninfo[B, NI_PREV] = -1
            else:
                ninfo[Pn, NI_NEXT] = B
                ninfo[B, NI_PREV] = Pn
            ninfo[A, NI_KIND] = DEAD
            ninfo[Nn, NI_KIND] = DEAD
            stack[nst] = B
            nst += 1
            if Pn != -1:
                stack[nst] = ninfo[Pn, NI_PREV]
                nst += 1
    return changed


@njit
def _growth_needed(bound, meta, P, ptk, spk, occ):
    """NEED_* flags of the tables that could overflow while a sequence adds up to ``bound``
    pairs (both kernels check before processing a sequence; 0: nothing to grow)."""
    need = 0
    if meta[M_NPIDS] + bound > P.shape[0]:
        need |= NEED_PAIRS
    if meta[M_NPIDS] + bound > MAX_LOAD_PTAB * len(ptk):
        need |= NEED_PTAB
    if meta[M_SPCOUNT] + bound > MAX_LOAD_SP * len(spk):
        need |= NEED_SP
    if meta[M_OCCUSED] + bound > occ.shape[0]:
        need |= NEED_OCC
    return need


@njit
def _process_seq(h, build, u, v, w, ntok, ninfo, sinfo, ptk, ptv, P, free, spk, spv, occ,
                 gtl, dlist, stack, stl, meta, aff, affv, tmark):
    """Apply merge {u, v} -> w to sequence h (or, if build, count it from scratch) and fold
    the change of its pair counts into the per-merge global diff."""
    meta[M_SSTAMP] += 1
    meta[M_DLEN] = 0
    meta[M_STLLEN] = 0
    if build:
        x = sinfo[h, SI_HEAD]
        while x != -1:
            ninfo[x, NI_DSTAMP] = meta[M_SSTAMP]
            dlist[meta[M_DLEN]] = x
            meta[M_DLEN] += 1
            x = ninfo[x, NI_NEXT]
    else:
        _apply_rule(h, u, v, w, TRACK_COUNTS, ntok, ninfo, sinfo, ptk, ptv, P, free, stl, dlist, stack,
                    meta, aff, affv, tmark)
    # Add the new pairs of every dirty region that still exists.
    for i in range(meta[M_DLEN]):
        r = dlist[i]
        if ninfo[r, NI_KIND] != DEAD:
            _add_region(r, 1, ntok, ninfo, ptk, ptv, P, free, stl, meta)
    # Fold the per-sequence deltas into the (sequence, pair) counts and the global diff.
    g = meta[M_MSTAMP]
    hk = np.int64(h) << 32
    for i in range(meta[M_STLLEN]):
        pid = stl[i]
        d = P[pid, P_SDELTA]
        if d == 0:
            continue
        key = hk | pid
        j = _sp_lookup(spk, key)
        old = spv[j] if spk[j] == key else 0
        new = old + d
        if new < 0:
            raise AssertionError("negative per-sequence pair count (bug)")
        if new == 0:
            _table_delete(spk, spv, j)
            meta[M_SPCOUNT] -= 1
        elif old == 0:
            spk[j] = key
            spv[j] = new
            meta[M_SPCOUNT] += 1
            o = meta[M_OCCUSED]
            occ[o, 0] = h
            occ[o, 1] = P[pid, P_OCC]
            P[pid, P_OCC] = o
            meta[M_OCCUSED] = o + 1
        else:
            spv[j] = new
        if P[pid, P_GSTAMP] != g:
            P[pid, P_GSTAMP] = g
            P[pid, P_GDIFF] = 0
            gtl[meta[M_GTLLEN]] = pid
            meta[M_GTLLEN] += 1
        P[pid, P_GDIFF] += d


@njit
def _run(max_merges, n_target, ntok, ninfo, sinfo, ptk, ptv, P, free, spk, spv, occ, hp, gtl,
         L, dlist, stack, stl, meta, out, aff, affv, tmark):
    """Advance the correct-mode construction by up to `max_merges` merges.

    Returns ST_OK (stopped on the count or the target), ST_EXHAUSTED (no pair left) or
    ST_GROW (meta[M_NEED] says which arrays need room; call again after growing them: the
    kernel resumes exactly where it stopped)."""
    K = meta[M_K]
    done = 0
    while True:
        phase = meta[M_PHASE]
        if phase == 0:  # select the next pair
            if meta[M_NDONE] >= n_target or done >= max_merges:
                return ST_OK
            found = False
            c = np.int64(0)
            k = np.int64(0)
            pid = -1
            while meta[M_HEAPSIZE] > 0:
                c, k = _heap_pop(hp, meta[M_HEAPSIZE])
                meta[M_HEAPSIZE] -= 1
                pid = _pair_find(ptk, ptv, k)
                if c > 0 and pid != -1 and P[pid, P_TOTAL] == c:
                    found = True
                    break
            if not found:
                return ST_EXHAUSTED
            n = meta[M_NDONE]
            out[n, 0] = k
            out[n, 1] = c
            meta[M_CURPID] = pid
            meta[M_CURW] = meta[M_NINIT] + n
            meta[M_MSTAMP] += 1
            meta[M_GTLLEN] = 0
            stamp = meta[M_MSTAMP]
            nl = 0
            j = P[pid, P_OCC]
            while j != -1:
                h = occ[j, 0]
                if sinfo[h, SI_STAMP] != stamp:
                    sinfo[h, SI_STAMP] = stamp
                    key = (np.int64(h) << 32) | pid
                    if spk[_sp_lookup(spk, key)] == key:
                        L[nl] = h
                        nl += 1
                j = occ[j, 1]
            out[n, 2] = nl == 0  # the pair occurs nowhere: a faithful-mode phantom
            meta[M_LLEN] = nl
            meta[M_LI] = 0
            meta[M_PHASE] = 1
        elif phase == 1:  # apply the merge (or the initial count) sequence by sequence
            build = meta[M_BUILD] == 1
            key = P[meta[M_CURPID], P_KEY] if not build else 0
            u = key >> 32
            v = key & 0xFFFFFFFF
            w = meta[M_CURW]
            while meta[M_LI] < meta[M_LLEN]:
                h = L[meta[M_LI]]
                need = _growth_needed(sinfo[h, SI_NNODES] * K * K + K * K, meta, P, ptk, spk, occ)
                if need:
                    meta[M_NEED] = need
                    return ST_GROW
                _process_seq(h, build, u, v, w, ntok, ninfo, sinfo, ptk, ptv, P, free, spk,
                             spv, occ, gtl, dlist, stack, stl, meta, aff, affv, tmark)
                meta[M_LI] += 1
            meta[M_PHASE] = 2
        else:  # publish the diff: update totals, push changed pairs
            if meta[M_HEAPSIZE] + meta[M_GTLLEN] + 1 > hp.shape[0]:
                meta[M_NEED] = NEED_HEAP
                return ST_GROW
            g = meta[M_MSTAMP]
            n = meta[M_HEAPSIZE]
            for i in range(meta[M_GTLLEN]):
                pid = gtl[i]
                dv = P[pid, P_GDIFF]
                if dv != 0:
                    P[pid, P_TOTAL] += dv
                    if P[pid, P_TOTAL] == 0:
                        # The pair is gone from every sequence (no (seq, pair) entry refers
                        # to it), so its id can be recycled; its heap entries turn invalid
                        # because the key is no longer found.
                        _table_delete(ptk, ptv, _sp_lookup(ptk, P[pid, P_KEY]))
                        free[meta[M_NFREE]] = pid
                        meta[M_NFREE] += 1
                    else:
                        n = _heap_push(hp, n, P[pid, P_TOTAL], P[pid, P_KEY])
            if meta[M_BUILD] == 1:
                meta[M_BUILD] = 0
            else:
                cp = meta[M_CURPID]
                if P[cp, P_TOTAL] > 0 and (P[cp, P_GSTAMP] != g or P[cp, P_GDIFF] == 0):
                    # Keep "every live pair has a valid heap entry": the popped entry is
                    # gone, so re-push a pair that survived unchanged.
                    n = _heap_push(hp, n, P[cp, P_TOTAL], P[cp, P_KEY])
                meta[M_NDONE] += 1
                done += 1
            meta[M_HEAPSIZE] = n
            meta[M_PHASE] = 0


# ----------------------------------------------------------------------------- faithful mode
# The official code's vocabulary, bit for bit (official_port.py lists what that takes):
# float counts summed in its order, a sequence's diff over its new count's keys only, an
# inverted index that never shrinks and is walked in CPython's set order, a lazy heap with
# a 1e-12 tolerance. The official code re-merges and fully recounts every indexed sequence
# on every merge; here an unchanged sequence is skipped (its recount would give the same
# floats: every diff +0.0, which changes nothing) and a changed one re-sums only the pairs
# that occur in a region the merge touched, each over all its contributions in list order
# (the other pairs' contributions, hence their floats, are unchanged).
F_TOTAL, F_GDIFF = 0, 1
N_FCOL = 2
# Columns of the per-sequence "affected pairs" table `aff`: key, stamp; column 2 lists the
# slots in use (in insertion order).
A_KEY, A_STAMP, A_LIST = 0, 1, 2
EPS_OFFICIAL = 1e-12
PY_LINEAR_PROBES = 9  # CPython Objects/setobject.c
PY_PERTURB_SHIFT = 5


@njit
def _fbetter(c1, k1, c2, k2):
    # Python's order of (-count, (u, v)) tuples, smallest first.
    return c1 > c2 or (c1 == c2 and k1 < k2)


@njit
def _fheap_push(hc, hk, n, c, k):
    i = n
    while i > 0:
        par = (i - 1) >> 1
        if _fbetter(c, k, hc[par], hk[par]):
            hc[i] = hc[par]
            hk[i] = hk[par]
            i = par
        else:
            break
    hc[i] = c
    hk[i] = k
    return n + 1


@njit
def _fheap_pop(hc, hk, n):
    """Remove the top of a heap of size n; returns (count, key). Caller shrinks n."""
    c = hc[0]
    k = hk[0]
    n -= 1
    lc = hc[n]
    lk = hk[n]
    i = 0
    while True:
        left = 2 * i + 1
        if left >= n:
            break
        best = left
        right = left + 1
        if right < n and _fbetter(hc[right], hk[right], hc[left], hk[left]):
            best = right
        if _fbetter(hc[best], hk[best], lc, lk):
            hc[i] = hc[best]
            hk[i] = hk[best]
            i = best
        else:
            break
    hc[i] = lc
    hk[i] = lk
    return c, k


@njit
def _pyset_insert_clean(tab, mask, key):
    """CPython's set_insert_clean for a non-negative int (hash = value), no dummies."""
    perturb = key
    i = key & mask
    while True:
        if tab[i] == -1:
            tab[i] = key
            return
        if i + PY_LINEAR_PROBES <= mask:
            for j in range(i + 1, i + PY_LINEAR_PROBES + 1):
                if tab[j] == -1:
                    tab[j] = key
                    return
        perturb >>= PY_PERTURB_SHIFT
        i = (i * 5 + 1 + perturb) & mask


@njit
def _pyset_resize(tab, size, tmp, minused):
    """set_table_resize: rehash tab[:size] (in slot order) into a table > minused, in tab."""
    newsize = 8
    while newsize <= minused:
        newsize <<= 1
    for i in range(newsize):
        tmp[i] = -1
    for i in range(size):
        if tab[i] != -1:
            _pyset_insert_clean(tmp, newsize - 1, tab[i])
    for i in range(newsize):
        tab[i] = tmp[i]
    return newsize


@njit
def _pyset_copy_order(keys, n, tab, tmp, out):
    """Iteration order of ``s.copy()`` where s = set() got s.add(keys[n-1]), ...,
    s.add(keys[0]) (distinct non-negative ints, no removals), as in CPython 3.7-3.13:
    set_add_entry (9 linear probes, then perturbation; at 60% fill a resize to > 4x used),
    then set_merge into a fresh set (one resize to > 2x used, then a slot-for-slot copy if
    the sizes agree, else clean re-insertion in the source's slot order). Writes out[:n]."""
    size = 8
    for i in range(size):
        tab[i] = -1
    used = 0
    for idx in range(n - 1, -1, -1):
        key = keys[idx]
        mask = size - 1
        perturb = key
        i = key & mask
        placed = False
        while not placed:
            last = i + PY_LINEAR_PROBES if i + PY_LINEAR_PROBES <= mask else i
            for j in range(i, last + 1):
                if tab[j] == -1:
                    tab[j] = key
                    placed = True
                    break
            if not placed:
                perturb >>= PY_PERTURB_SHIFT
                i = (i * 5 + 1 + perturb) & mask
        used += 1
        if used * 5 >= mask * 3:
            size = _pyset_resize(tab, size, tmp, used * 2 if used > 50000 else used * 4)
    csize = 8
    if used * 5 >= 7 * 3:
        while csize <= used * 2:
            csize <<= 1
    src = tab
    if csize != size:
        for i in range(csize):
            tmp[i] = -1
        for i in range(size):
            if tab[i] != -1:
                _pyset_insert_clean(tmp, csize - 1, tab[i])
        src = tmp
    m = 0
    for i in range(csize):
        if src[i] != -1:
            out[m] = src[i]
            m += 1
    return m


@njit
def _note_pair(a, b, meta, aff, affv, tmark):
    """Add pair {a, b} to this sequence update's affected pairs (sum starts at 0.0)."""
    a = np.int64(a)
    b = np.int64(b)
    if a > b:
        a, b = b, a
    s = meta[M_SSTAMP]
    tmark[a] = s
    tmark[b] = s
    key = (a << 32) | b
    mask = len(aff) - 1
    i = _hash(key) & mask
    while aff[i, A_STAMP] == s:
        if aff[i, A_KEY] == key:
            return
        i = (i + 1) & mask
    aff[i, A_KEY] = key
    aff[i, A_STAMP] = s
    affv[i] = 0.0
    aff[meta[M_AFFN], A_LIST] = i
    meta[M_AFFN] += 1


@njit
def _note_region(r, ntok, ninfo, meta, aff, affv, tmark):
    """Note every pair of region r (the same pairs `_add_region` counts)."""
    if ninfo[r, NI_KIND] == ACTION:
        m = ninfo[r, NI_SIZE]
        for i in range(m):
            for j in range(i + 1, m):
                _note_pair(ntok[r, i], ntok[r, j], meta, aff, affv, tmark)
        return
    a = ninfo[r, NI_PREV]
    b = ninfo[r, NI_NEXT]
    if ninfo[r, NI_SIZE] == 1:
        c = ntok[r, 0]
        for i in range(ninfo[a, NI_SIZE]):
            _note_pair(ntok[a, i], c, meta, aff, affv, tmark)
        for i in range(ninfo[b, NI_SIZE]):
            _note_pair(c, ntok[b, i], meta, aff, affv, tmark)
    else:
        for i in range(ninfo[a, NI_SIZE]):
            for j in range(ninfo[b, NI_SIZE]):
                _note_pair(ntok[a, i], ntok[b, j], meta, aff, affv, tmark)


@njit
def _sum_pair(a, b, wgt, meta, aff, affv, tmark):
    """Add `wgt` to the running sum of pair {a, b} if it is an affected pair."""
    s = meta[M_SSTAMP]
    if tmark[a] != s or tmark[b] != s:
        return
    a = np.int64(a)
    b = np.int64(b)
    if a > b:
        a, b = b, a
    key = (a << 32) | b
    mask = len(aff) - 1
    i = _hash(key) & mask
    while aff[i, A_STAMP] == s:
        if aff[i, A_KEY] == key:
            affv[i] += wgt
            return
        i = (i + 1) & mask


@njit
def _sum_between(x, y, ntok, ninfo, meta, aff, affv, tmark):
    """Pairs across nodes x, y, weight 1/(|x||y|). The official code sums each gap on its
    own first, so a pair met in both orientations adds w + w in one go, not w, then w."""
    nx = ninfo[x, NI_SIZE]
    ny = ninfo[y, NI_SIZE]
    if nx == 0 or ny == 0:
        return
    s = meta[M_SSTAMP]
    wgt = 1.0 / (nx * ny)
    for i in range(nx):
        a = ntok[x, i]
        if tmark[a] != s:
            continue
        for j in range(ny):
            b = ntok[y, j]
            if tmark[b] != s:
                continue
            if a != b:
                ib = _find(ntok, ninfo, x, b)
                if ib >= 0 and _find(ntok, ninfo, y, a) >= 0:
                    if ib > i:  # the first of the two orientations
                        _sum_pair(a, b, wgt + wgt, meta, aff, affv, tmark)
                    continue
            _sum_pair(a, b, wgt, meta, aff, affv, tmark)


@njit
def _sum_sequence(h, ntok, ninfo, sinfo, meta, aff, affv, tmark):
    """Float count of every affected pair of sequence h: its contributions added in list
    order, region by region, as the official recount adds them."""
    x = sinfo[h, SI_HEAD]
    s = meta[M_SSTAMP]
    while x != -1:
        m = ninfo[x, NI_SIZE]
        if m >= 2:
            wgt = 2.0 / m
            for i in range(m):
                if tmark[ntok[x, i]] == s:
                    for j in range(i + 1, m):
                        _sum_pair(ntok[x, i], ntok[x, j], wgt, meta, aff, affv, tmark)
        C = ninfo[x, NI_NEXT]
        if C == -1:
            break
        B = ninfo[C, NI_NEXT]
        if ninfo[C, NI_SIZE] == 1:
            _sum_between(x, C, ntok, ninfo, meta, aff, affv, tmark)
            _sum_between(C, B, ntok, ninfo, meta, aff, affv, tmark)
        else:
            _sum_between(x, B, ntok, ninfo, meta, aff, affv, tmark)
        x = B


@njit
def _fprocess_seq(h, build, u, v, w, ntok, ninfo, sinfo, ptk, ptv, P, PF, free, spk, spf, occ,
                  gtl, dlist, stack, stl, meta, aff, affv, tmark):
    """Official per-sequence update: merge, recount, diff over the new keys only, index
    only grows, diff added to the per-merge total diff (in call order = set order).

    spk's (h, pid) entries are the official inverted index (never removed); spf holds the
    pair's count in h, 0.0 once it vanished (absent from the official per-sequence dict).
    Returns how many pairs re-appeared in h (where the official code's assert fails)."""
    meta[M_SSTAMP] += 1
    meta[M_DLEN] = 0
    meta[M_AFFN] = 0
    if build:
        x = sinfo[h, SI_HEAD]
        while x != -1:
            _note_region(x, ntok, ninfo, meta, aff, affv, tmark)
            x = ninfo[x, NI_NEXT]
    else:
        if not _apply_rule(h, u, v, w, TRACK_PAIRS, ntok, ninfo, sinfo, ptk, ptv, P, free, stl,
                           dlist, stack, meta, aff, affv, tmark):
            return 0
        for i in range(meta[M_DLEN]):
            r = dlist[i]
            if ninfo[r, NI_KIND] != DEAD:
                _note_region(r, ntok, ninfo, meta, aff, affv, tmark)
    _sum_sequence(h, ntok, ninfo, sinfo, meta, aff, affv, tmark)
    g = meta[M_MSTAMP]
    hk = np.int64(h) << 32
    reappear = 0
    for i in range(meta[M_AFFN]):
        slot = aff[i, A_LIST]
        new = affv[slot]
        pid = _pair_get(ptk, ptv, P, free, meta, aff[slot, A_KEY])
        key = hk | pid
        j = _sp_lookup(spk, key)
        if new == 0.0:  # no contribution left: gone from the new dict, no diff
            if spk[j] == key:
                spf[j] = 0.0
            continue
        old = 0.0
        if spk[j] == key:
            if spf[j] == 0.0:
                reappear += 1  # indexed already: the official set.add asserts here
            old = spf[j]
        else:
            spk[j] = key
            meta[M_SPCOUNT] += 1
            o = meta[M_OCCUSED]
            occ[o, 0] = h
            occ[o, 1] = P[pid, P_OCC]
            P[pid, P_OCC] = o
            meta[M_OCCUSED] = o + 1
        spf[j] = new
        d = new - old
        if P[pid, P_GSTAMP] != g:
            P[pid, P_GSTAMP] = g
            PF[pid, F_GDIFF] = d
            gtl[meta[M_GTLLEN]] = pid
            meta[M_GTLLEN] += 1
        else:
            PF[pid, F_GDIFF] += d
    return reappear


@njit
def _run_faithful(max_merges, n_target, ntok, ninfo, sinfo, ptk, ptv, P, PF, free, spk, spf, occ,
                  hc, hk, gtl, L, buf, tab, tmp, dlist, stack, stl, meta, aff, affv, tmark, out,
                  outf):
    """Faithful-mode counterpart of `_run` (same phases, return codes and growth protocol).
    out[n] = (key, unused, phantom, re-appearances); outf[n] = the official priority."""
    K = meta[M_K]
    done = 0
    while True:
        phase = meta[M_PHASE]
        if phase == 0:  # pop until an entry is within 1e-12 of its pair's total
            if meta[M_NDONE] >= n_target or done >= max_merges:
                return ST_OK
            found = False
            c = 0.0
            k = np.int64(0)
            pid = -1
            while meta[M_HEAPSIZE] > 0:
                c, k = _fheap_pop(hc, hk, meta[M_HEAPSIZE])
                meta[M_HEAPSIZE] -= 1
                pid = _pair_find(ptk, ptv, k)
                if not abs(c - PF[pid, F_TOTAL]) > EPS_OFFICIAL:
                    found = True
                    break
            if not found:
                return ST_EXHAUSTED
            n = meta[M_NDONE]
            out[n, 0] = k
            out[n, 3] = 0
            outf[n] = c
            meta[M_CURPID] = pid
            meta[M_CURW] = meta[M_NINIT] + n
            meta[M_MSTAMP] += 1
            meta[M_GTLLEN] = 0
            nb = 0  # the index list is newest first
            j = P[pid, P_OCC]
            present = False
            while j != -1:
                h = occ[j, 0]
                buf[nb] = h
                nb += 1
                if not present:
                    present = spf[_sp_lookup(spk, (np.int64(h) << 32) | pid)] > 0.0
                j = occ[j, 1]
            out[n, 2] = not present  # occurs nowhere: a phantom merge
            meta[M_LLEN] = _pyset_copy_order(buf, nb, tab, tmp, L)
            meta[M_LI] = 0
            meta[M_PHASE] = 1
        elif phase == 1:  # re-merge the indexed sequences, in set order
            build = meta[M_BUILD] == 1
            key = P[meta[M_CURPID], P_KEY] if not build else 0
            u = key >> 32
            v = key & 0xFFFFFFFF
            w = meta[M_CURW]
            while meta[M_LI] < meta[M_LLEN]:
                h = L[meta[M_LI]]
                need = _growth_needed(sinfo[h, SI_NNODES] * K * K + K * K, meta, P, ptk, spk, occ)
                if need:
                    meta[M_NEED] = need
                    return ST_GROW
                r = _fprocess_seq(h, build, u, v, w, ntok, ninfo, sinfo, ptk, ptv, P, PF, free,
                                  spk, spf, occ, gtl, dlist, stack, stl, meta, aff, affv, tmark)
                if not build:
                    out[meta[M_NDONE], 3] += r
                meta[M_LI] += 1
            meta[M_PHASE] = 2
        else:  # official _update_pq: skip |diff| < 1e-12, else add it and push the total
            if meta[M_HEAPSIZE] + meta[M_GTLLEN] + 1 > len(hc):
                meta[M_NEED] = NEED_HEAP
                return ST_GROW
            n = meta[M_HEAPSIZE]
            for i in range(meta[M_GTLLEN]):
                pid = gtl[i]
                dv = PF[pid, F_GDIFF]
                if abs(dv) >= EPS_OFFICIAL:
                    PF[pid, F_TOTAL] += dv
                    n = _fheap_push(hc, hk, n, PF[pid, F_TOTAL], P[pid, P_KEY])
            if meta[M_BUILD] == 1:
                meta[M_BUILD] = 0
            else:
                meta[M_NDONE] += 1
                done += 1
            meta[M_HEAPSIZE] = n
            meta[M_PHASE] = 0


@njit
def _sp_rehash_float(spk, spf, new_k, new_f):
    mask = len(new_k) - 1
    for j in range(len(spk)):
        key = spk[j]
        if key != -1:
            i = _hash(key) & mask
            while new_k[i] != -1:
                i = (i + 1) & mask
            new_k[i] = key
            new_f[i] = spf[j]


# ----------------------------------------------------------------------------- Python API
@dataclass
class MergeResult:
    """Learned merge rules in learning order.

    ``pairs[i] = (u, v)`` (u <= v) is merged into token ``n_init_tokens + i``;
    ``counts[i]`` is its global weighted count at merge time times ``scale`` (exact in
    correct mode; in faithful mode the official float count rounded to that grid)."""

    pairs: np.ndarray  # (n, 2) int64
    counts: np.ndarray  # (n,) int64
    scale: int
    n_init_tokens: int
    mode: str
    phantom: np.ndarray  # (n,) bool: the pair occurred in no sequence (faithful mode only)
    # Faithful mode: the official priority (float count of the popped heap entry), bit for
    # bit, and per merge how many pairs re-appeared in a sequence they had vanished from
    # (each one a failed assertion in the official code, which only runs on under -O).
    float_priorities: np.ndarray | None = None
    reappearances: np.ndarray | None = None

    @property
    def priorities(self) -> np.ndarray:
        if self.float_priorities is not None:
            return self.float_priorities
        return self.counts / self.scale

    def __len__(self) -> int:
        return len(self.pairs)


def weight_scale(max_item_size: int) -> int:
    """Smallest S making 2/M and 1/(a*b) integers for all M, a, b in 1..max_item_size."""
    lcm = math.lcm(*range(1, max(max_item_size, 1) + 1))
    return lcm * lcm


class _State:
    """The kernel's arrays, with the growth the kernel asks for."""

    def __init__(self, item_tokens: np.ndarray, sequences: Sequence[np.ndarray], n_init: int,
                 n_target: int, mode: str, initial_capacity: int = 1 << 16):
        K = item_tokens.shape[1]
        lengths = np.array([len(s) for s in sequences], dtype=np.int64)
        if (lengths <= 0).any():
            h = int(np.flatnonzero(lengths <= 0)[0])
            raise ValueError(f"sequences[{h}] is empty")
        flat = np.concatenate([np.asarray(s, dtype=np.int64) for s in sequences])
        if flat.min() < 0 or flat.max() >= len(item_tokens):
            raise ValueError(f"sequences refer to item ids outside item_tokens [0, {len(item_tokens)})")
        n_nodes_seq = 2 * lengths - 1
        n_nodes = int(n_nodes_seq.sum())
        seq_start = np.concatenate([[0], np.cumsum(n_nodes_seq)[:-1]])
        # Node ids: sequence h occupies [seq_start[h], seq_start[h] + 2 len - 1), actions at
        # even offsets, slots at odd ones.
        seq_of_node = np.repeat(np.arange(len(sequences)), n_nodes_seq)
        offset = np.arange(n_nodes) - seq_start[seq_of_node]
        is_action = offset % 2 == 0
        self.ntok = np.full((n_nodes, K), -1, dtype=np.int32)
        toks = item_tokens[flat]  # flat lists the items in the order of the action nodes
        sizes = (toks >= 0).sum(1)
        # Left-align the tokens of each item (padding -1 may sit anywhere).
        order = np.argsort(toks < 0, axis=1, kind="stable")
        self.ntok[is_action] = np.take_along_axis(toks, order, 1)
        self.ninfo = np.zeros((n_nodes, 5), dtype=np.int64)
        self.ninfo[is_action, NI_SIZE] = sizes
        self.ninfo[:, NI_KIND] = np.where(is_action, ACTION, SLOT)
        idx = np.arange(n_nodes)
        self.ninfo[:, NI_PREV] = np.where(offset == 0, -1, idx - 1)
        self.ninfo[:, NI_NEXT] = np.where(offset == n_nodes_seq[seq_of_node] - 1, -1, idx + 1)
        self.ninfo[:, NI_DSTAMP] = -1
        self.sinfo = np.zeros((len(sequences), 3), dtype=np.int64)
        self.sinfo[:, SI_HEAD] = seq_start
        self.sinfo[:, SI_NNODES] = n_nodes_seq
        self.sinfo[:, SI_STAMP] = -1

        # Initial sizes from the number of pair contributions (pairs per item and per gap).
        n_contrib = int((sizes * (sizes - 1) // 2).sum() + K * K * (len(flat) - len(sequences)))
        pair_cap = initial_capacity
        self.P = np.zeros((pair_cap, N_PCOL), dtype=np.int64)
        self.gtl = np.zeros(pair_cap, dtype=np.int64)
        self.free = np.zeros(pair_cap, dtype=np.int64)  # recycled pair ids (a stack)
        self.ptk = np.full(2 * pair_cap, -1, dtype=np.int64)
        self.ptv = np.zeros(2 * pair_cap, dtype=np.int64)
        # Pre-size the tables that scale with the corpus from its pair contributions, unless
        # a tiny initial_capacity asks to exercise the growth paths (tests).
        presize = n_contrib if initial_capacity >= 1 << 16 else 0
        sp_cap = max(initial_capacity, 1 << int(math.ceil(math.log2(presize / MAX_LOAD_SP + 1))))
        self.spk = np.full(sp_cap, -1, dtype=np.int64)
        self.spv = np.zeros(sp_cap, dtype=np.int64)
        self.occ = np.zeros((max(initial_capacity, presize + presize // 4), 2), dtype=np.int32)
        self.hp = np.zeros((initial_capacity, 2), dtype=np.int64)
        self.L = np.arange(len(sequences), dtype=np.int64)
        max_nodes = int(n_nodes_seq.max())
        self.dlist = np.zeros(max_nodes + 1, dtype=np.int64)
        self.stack = np.zeros(4 * max_nodes + 8, dtype=np.int64)
        # Pairs touched by one sequence update: old and new pairs of at most all its regions.
        self.stl = np.zeros(2 * (max_nodes + 1) * K * K + 1, dtype=np.int64)
        self.out = np.zeros((max(n_target, 1), 4), dtype=np.int64)
        self.meta = np.zeros(N_META, dtype=np.int64)
        m = self.meta
        m[M_MODE] = MODES.index(mode)
        m[M_SCALE] = weight_scale(K)
        m[M_NINIT] = n_init
        m[M_K] = K
        m[M_CURW] = -1
        m[M_MSTAMP] = 1
        # Start in the "apply" phase over all sequences with BUILD set: the initial count.
        m[M_BUILD] = 1
        m[M_PHASE] = 1
        m[M_LLEN] = len(sequences)
        total_weight = (K + 2) * len(flat) * m[M_SCALE]
        if total_weight >= 2**62:
            raise ValueError(f"{K} features per item: integer-scaled counts would overflow int64")
        self.faithful = mode == "faithful"
        if self.faithful:
            n_seqs = len(sequences)
            self.PF = np.zeros((pair_cap, N_FCOL), dtype=np.float64)
            self.spf = np.zeros(sp_cap, dtype=np.float64)  # takes the place of spv
            self.spv = np.zeros(0, dtype=np.int64)
            self.hp = np.zeros((0, 2), dtype=np.int64)
            self.hc = np.zeros(initial_capacity, dtype=np.float64)
            self.hk = np.zeros(initial_capacity, dtype=np.int64)
            self.buf = np.zeros(n_seqs, dtype=np.int64)
            # Largest emulated CPython set table: a resize asks for > 4 * used slots.
            tab_size = 8
            while tab_size <= 4 * n_seqs:
                tab_size <<= 1
            self.tab = np.zeros(tab_size, dtype=np.int64)
            self.tmp = np.zeros(tab_size, dtype=np.int64)
            self.outf = np.zeros(max(n_target, 1), dtype=np.float64)
            # Affected pairs of one sequence update: at most old + new pairs of all regions.
            aff_size = 1 << int(math.ceil(math.log2(4 * (max_nodes + 1) * K * K + 16)))
            self.aff = np.full((aff_size, 3), -1, dtype=np.int64)
            self.affv = np.zeros(aff_size, dtype=np.float64)
            self.tmark = np.full(n_init + max(n_target, 1) + 1, -1, dtype=np.int64)
        else:  # unused by the correct-mode kernel
            self.aff = np.zeros((1, 3), dtype=np.int64)
            self.affv = np.zeros(1, dtype=np.float64)
            self.tmark = np.zeros(1, dtype=np.int64)

    def grow(self, need: int) -> None:
        m = self.meta
        if need & NEED_PAIRS:  # 1.5x: these rows are the largest table
            extra = self.P.shape[0] // 2
            self.P = np.concatenate([self.P, np.zeros((extra, N_PCOL), dtype=np.int64)])
            self.gtl = np.concatenate([self.gtl, np.zeros(extra, dtype=np.int64)])
            self.free = np.concatenate([self.free, np.zeros(extra, dtype=np.int64)])
            if self.faithful:
                self.PF = np.concatenate([self.PF, np.zeros((extra, N_FCOL), dtype=np.float64)])
        if need & NEED_PTAB:
            self.ptk, self.ptv = _rehashed(self.ptk, self.ptv)
        if need & NEED_SP:
            if self.faithful:
                new_k = np.full(2 * len(self.spk), -1, dtype=np.int64)
                new_f = np.zeros(2 * len(self.spk), dtype=np.float64)
                _sp_rehash_float(self.spk, self.spf, new_k, new_f)
                self.spk, self.spf = new_k, new_f
            else:
                self.spk, self.spv = _rehashed(self.spk, self.spv)
        if need & NEED_OCC:
            # Faithful mode: the lists are the official index, which never drops an entry,
            # in insertion order: never rebuilt.
            if not self.faithful and m[M_OCCUSED] > 2 * m[M_SPCOUNT]:
                m[M_OCCUSED] = _occ_rebuild(self.spk, self.occ, self.P, m[M_NPIDS])
            else:
                self.occ = np.concatenate([self.occ, np.zeros_like(self.occ)])
        if need & NEED_HEAP:
            if self.faithful:  # stale entries may turn valid again: never compacted
                self.hc = np.concatenate([self.hc, np.zeros_like(self.hc)])
                self.hk = np.concatenate([self.hk, np.zeros_like(self.hk)])
            else:
                m[M_HEAPSIZE] = _heap_compact(self.hp, m[M_HEAPSIZE], self.P, self.ptk, self.ptv)
                if m[M_HEAPSIZE] + m[M_GTLLEN] + 1 > 0.75 * self.hp.shape[0]:
                    self.hp = np.concatenate([self.hp, np.zeros_like(self.hp)])

    def run(self, max_merges: int, n_target: int) -> int:
        while True:
            if self.faithful:
                status = _run_faithful(
                    max_merges, n_target, self.ntok, self.ninfo, self.sinfo, self.ptk, self.ptv,
                    self.P, self.PF, self.free, self.spk, self.spf, self.occ, self.hc, self.hk,
                    self.gtl, self.L, self.buf, self.tab, self.tmp, self.dlist, self.stack,
                    self.stl, self.meta, self.aff, self.affv, self.tmark, self.out, self.outf)
            else:
                status = _run(max_merges, n_target, self.ntok, self.ninfo, self.sinfo, self.ptk,
                              self.ptv, self.P, self.free, self.spk, self.spv, self.occ, self.hp,
                              self.gtl, self.L, self.dlist, self.stack, self.stl, self.meta, self.out,
                              self.aff, self.affv, self.tmark)
            if status != ST_GROW:
                return status
            self.grow(int(self.meta[M_NEED]))
            self.meta[M_NEED] = 0


def _rehashed(keys: np.ndarray, vals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    new_k = np.full(2 * len(keys), -1, dtype=np.int64)
    new_v = np.zeros(2 * len(keys), dtype=np.int64)
    _pair_rehash(keys, vals, new_k, new_v)  # both tables use the same probing scheme
    return new_k, new_v


def learn_merges(
    item_tokens: np.ndarray,
    sequences: Sequence[Sequence[int]],
    n_init_tokens: int,
    n_merges: int,
    mode: str = "correct",
    progress: bool | None = None,
    initial_capacity: int = 1 << 16,
) -> MergeResult:
    """Learn up to ``n_merges`` ActionPiece merge rules.

    Args:
        item_tokens: (N, K) ints, the initial token ids of each item's features (-1 = none).
        sequences: per training sequence, the item indices (rows of ``item_tokens``), oldest
            first.
        n_init_tokens: id of the first merged token (= number of initial tokens incl. pad).
        n_merges: how many rules to learn (fewer if no pair is left).
        mode: ``"correct"`` or ``"faithful"`` (the official code's vocabulary and float
            priorities, stale counts included; slower, more memory).
        progress: tqdm bar (None = only on a TTY).
        initial_capacity: starting size of the growable tables (a power of two; tests use
            a tiny one so that every growth and compaction path runs).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    item_tokens = np.asarray(item_tokens, dtype=np.int64)
    if item_tokens.ndim != 2:
        raise ValueError(f"item_tokens must be (N, K), got shape {item_tokens.shape}")
    if item_tokens.max(initial=-1) >= n_init_tokens:
        raise ValueError(f"item_tokens has ids >= n_init_tokens={n_init_tokens}")
    for row, toks in enumerate(item_tokens):
        t = toks[toks >= 0]
        if len(np.unique(t)) != len(t):
            raise ValueError(f"item_tokens[{row}] repeats a token: {toks.tolist()}")
    if initial_capacity < 2 or initial_capacity & (initial_capacity - 1):
        raise ValueError(f"initial_capacity must be a power of two >= 2, got {initial_capacity}")
    state = _State(item_tokens, sequences, n_init_tokens, n_merges, mode, initial_capacity)
    disable = None if progress is None else not progress
    with tqdm(total=n_merges, desc=f"ActionPiece merges ({mode})", disable=disable) as bar:
        state.run(0, n_merges)  # initial counting
        done = 0
        while done < n_merges:
            status = state.run(200, n_merges)
            now = int(state.meta[M_NDONE])
            bar.update(now - done)
            done = now
            if status == ST_EXHAUSTED:
                break
    keys = state.out[:done, 0]
    pairs = np.stack([keys >> 32, keys & 0xFFFFFFFF], axis=1)
    scale = int(state.meta[M_SCALE])
    phantom = state.out[:done, 2] == 1
    if state.faithful:
        pri = state.outf[:done].copy()
        return MergeResult(pairs=pairs, counts=np.rint(pri * scale).astype(np.int64), scale=scale,
                           n_init_tokens=n_init_tokens, mode=mode, phantom=phantom,
                           float_priorities=pri, reappearances=state.out[:done, 3].copy())
    return MergeResult(pairs=pairs, counts=state.out[:done, 1].copy(), scale=scale,
                       n_init_tokens=n_init_tokens, mode=mode, phantom=phantom)
