"""Top-k ranking metrics shared by all recommenders, and the popularity baseline.

One relevant item per user (next-item prediction): Recall@k is 1 when the target is among the
first k ranked items, NDCG@k is 1 / log2(rank + 2) for its 0-based rank < k (the ideal DCG is
1). ``-1`` in a ranking means "no item" and never hits. If a ranking repeats the target, its
first position counts.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from contextlib import contextmanager

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


_KEEP_RANKS = [False]


@contextmanager
def keeping_ranks(keep: bool = True):
    """Within it, the evaluators (``keep_ranks=None``) also return per-user ranks and the
    history-removed report (see :func:`evaluate_generative`): how ``modules.reporting.test_report``
    asks for them through a train script's own ``evaluate`` closure. Training-time validation
    (outside it) returns the plain metrics."""
    before = _KEEP_RANKS[0]
    _KEEP_RANKS[0] = bool(keep)
    try:
        yield
    finally:
        _KEEP_RANKS[0] = before


def wants_ranks(keep_ranks: bool | None) -> bool:
    """An evaluator's ``keep_ranks`` argument resolved: None means "inside :func:`keeping_ranks`"."""
    return _KEEP_RANKS[0] if keep_ranks is None else bool(keep_ranks)


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


class UsersProgress:
    """A plain line at least every ``every`` seconds while users are evaluated, when stderr is
    not a terminal (CI, nohup, cluster logs): testing 22k Beauty users takes minutes. Under
    torchrun rank 0 alone prints, counting its own users."""

    def __init__(self, total: int, desc: str = "eval", every: float = 30.0):
        self.total, self.desc, self.every = total, desc, every
        self.enabled = not sys.stderr.isatty() and distributed.is_main()
        self.start = self.last = time.time()

    def update(self, done: int) -> None:
        now = time.time()
        if not self.enabled or now - self.last < self.every or done >= self.total:
            return
        rate = done / max(now - self.start, 1e-9)
        print(f"[{self.desc}] {done:,}/{self.total:,} users, {rate:,.0f} users/s, "
              f"~{(self.total - done) / max(rate, 1e-9) / 60:.1f} min left", file=sys.stderr, flush=True)
        self.last = now


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


# ------------------------------------------------------------------ generative recommenders


def eval_batches(n: int, batch_size: int, sharded: bool | None = None) -> list[int]:
    """The start rows of the evaluation batches of ``n`` examples this process runs: all of
    them, or under torchrun (``sharded`` None or True) every world_size-th batch. Ranks run whole
    batches, cut as one process cuts them, so each batch's figures are the same bits."""
    starts = list(range(0, n, batch_size))
    if sharded is False or not distributed.active():
        return starts
    return [starts[b] for b in distributed.my_batches(len(starts))]


def _seconds_over_ranks(seconds: float, sharded: bool | None) -> float:
    """The evaluation's wall time: the slowest rank's when sharded."""
    if sharded is False or not distributed.active():
        return seconds
    return max(distributed.all_gather_object(seconds))


@torch.no_grad()
def evaluate_generative(model, examples, item_codes: torch.Tensor, layout, trie, *, beam_size: int,
                        top_k: int = 10, batch_size: int = 256, use_user: bool = False, ks=DEFAULT_KS,
                        unconstrained: bool = False, device: torch.device | str = "cpu",
                        sharded: bool | None = None, cold_trie=None, cold_slots: int = 0,
                        keep_ranks: bool | None = None) -> dict:
    """Recall/NDCG of a semantic-ID recommender by beam search over ``examples``.

    ``examples``: ``data.dataset.Examples`` (history, target, user), one held-out target each.
    ``unconstrained``: search without the item trie and also report ``invalid_rate`` (beams
    that are no item count as misses, as a real deployment would see them).
    ``cold_slots`` > 0 (TIGER's cold-start share): ``trie`` holds the items trained on and
    ``cold_trie`` the held-out ones; a second search over ``cold_trie`` fills ``cold_slots`` of
    the ``top_k`` with its best items, ranked among the others by score
    (``modules.beam_search.merge_reserved``). A model never trained to generate a cold item's
    codes rarely ranks one high on its own; this reserves room for them.
    Returns the metrics plus ``users`` and ``users_per_second``. Beams are ranked in fp32
    whatever precision the model trained in (see modules/beam_search.py).

    ``keep_ranks`` (None: whether inside :func:`keeping_ranks`): also return ``ranks``, each
    user's target position in its returned top-``top_k`` list (0-based; -1: not among its first
    max(``ks``), the items the metrics see; int16, in the order of ``examples``), and, unless
    ``unconstrained``, ``history_removed``: the metrics and ``ranks`` of the same search's list
    with the user's history items (the input window ``examples.history``) removed before cutting
    to ``top_k``, as HSTU's evaluator ranks (RecBole's removes the whole training history: the
    same where it fits the window). No second search: the search returns all its ``beam_size``
    beams (the first ``top_k`` are exactly the headline list) and the history items are dropped
    from them, so with ``beam_size`` 20 and ``top_k`` 10 up to 10 history items can go and 10
    items still remain; where more go the list is padded with -1 (never a hit). A target that is
    itself in the history (a repeat) is then a miss. With ``cold_slots``, both searches' lists
    lose the history items before they are merged.

    Under torchrun (``sharded`` None: whenever a process group is up; ``False``: this process
    evaluates everything alone) every rank must call it: each runs its share of the batches and
    the per-batch results are gathered and added in batch order, so every rank returns exactly
    the figures of a single-process evaluation.
    """
    from modules.beam_search import beam_search, merge_reserved  # they import modules.tokens, not this module

    if cold_slots and (cold_trie is None or unconstrained or not cold_slots <= top_k):
        raise ValueError("modules/evaluation.py: cold_slots needs a cold_trie, constrained search and "
                         f"cold_slots <= top_k ({top_k}), got cold_slots={cold_slots}")

    keep = wants_ranks(keep_ranks)
    wide = keep and not unconstrained  # the history-removed list, from the same search's beams
    was_training = model.training
    model.eval()
    n = len(examples.target)
    acc, invalid, t0 = MetricAccumulator(ks, keep_ranks=keep), [], time.perf_counter()
    removed = MetricAccumulator(ks, keep_ranks=True) if wide else None
    progress = UsersProgress(n)
    for start in eval_batches(n, batch_size, sharded):
        sl = slice(start, min(n, start + batch_size))
        user = torch.as_tensor(examples.user[sl], device=device) if use_user else None
        history = torch.as_tensor(examples.history[sl], device=device)
        input_ids, mask = layout.encode_history(history, item_codes, user)
        # invalid_rate is measured over the top_k returned beams: unconstrained keeps top_k.
        out = beam_search(model, input_ids, mask, trie, layout, beam_size=beam_size,
                          top_k=beam_size if wide else top_k, unconstrained=unconstrained)
        items = out.items[:, :top_k]
        if cold_slots:
            cold = beam_search(model, input_ids, mask, cold_trie, layout, beam_size=beam_size,
                               top_k=beam_size if wide else cold_slots)
            items = merge_reserved(out, cold, top_k, cold_slots)
        target = torch.as_tensor(examples.target[sl], device=device)
        acc.update(items, target, key=start)
        if wide:
            if cold_slots:
                kept = []
                for beams in (out, cold):
                    kept_ids, kept_scores = drop_items(beams.items, history, beams.scores)
                    kept.append(beams._replace(items=kept_ids, scores=kept_scores))
                kept_items = merge_reserved(kept[0], kept[1], top_k, cold_slots)
            else:
                kept_items = drop_items(out.items, history)[:, :top_k]
            removed.update(kept_items, target, key=start)
        progress.update(sl.stop)
        if unconstrained:
            invalid.append((start, out.invalid_rate * (sl.stop - sl.start)))
    if sharded is not False:
        acc.merge_ranks()
        if wide:
            removed.merge_ranks()
        invalid = distributed.gather_keyed(invalid) if unconstrained else invalid
    seconds = _seconds_over_ranks(time.perf_counter() - t0, sharded)
    model.train(was_training)
    result = acc.compute()
    if unconstrained:
        total = 0.0
        for _, v in invalid:  # added in batch order, as one process adds them
            total += v
        result["invalid_rate"] = total / max(1, n)
    result.update(users=n, users_per_second=n / max(seconds, 1e-9))
    if keep:
        result["ranks"] = acc.ranks()
    if wide:
        result["history_removed"] = {**removed.compute(), "ranks": removed.ranks()}
    return result


# ------------------------------------------------------------------ item-ID recommenders


@torch.no_grad()
def evaluate_exact_topk(model, examples, *, top_k: int = 10, batch_size: int = 256, ks=DEFAULT_KS,
                        device: torch.device | str = "cpu", sharded: bool | None = None,
                        keep_ranks: bool | None = None) -> dict:
    """Recall/NDCG of a model that scores every item (``model.scores(history) -> (n, num_items)``,
    e.g. :class:`modules.sasrec.SASRec`): the exact top ``top_k`` items by score, in fp32.

    ``examples``: ``data.dataset.Examples``. No item is excluded (the generative models'
    beam search excludes none either). Returns the metrics plus ``users`` and ``users_per_second``.
    Under torchrun, sharded over the ranks and gathered exactly as :func:`evaluate_generative`.
    ``keep_ranks`` (None: whether inside :func:`keeping_ranks`): also ``ranks`` and
    ``history_removed`` as :func:`evaluate_generative` returns them; here the history items'
    scores are set to -inf before the top ``top_k`` (a -inf history item that still makes the
    list, in a catalogue of fewer than ``top_k`` other items, becomes -1).
    """
    keep = wants_ranks(keep_ranks)
    was_training = model.training
    model.eval()
    n = len(examples.target)
    acc, t0 = MetricAccumulator(ks, keep_ranks=keep), time.perf_counter()
    removed = MetricAccumulator(ks, keep_ranks=True) if keep else None
    progress = UsersProgress(n)
    for start in eval_batches(n, batch_size, sharded):
        sl = slice(start, min(n, start + batch_size))
        history = torch.as_tensor(examples.history[sl], device=device)
        scores = model.scores(history).float()
        target = torch.as_tensor(examples.target[sl], device=device)
        k = min(top_k, scores.shape[1])
        # One top-k serves both reports: with at most H history items removed, the top k of the
        # rest lie within the top k + H of all items (no (n, num_items) mask, no second search).
        top = scores.topk(min(k + history.shape[1] if keep else k, scores.shape[1]), dim=1).indices
        acc.update(top[:, :k], target, key=start)
        if keep:
            in_history = (top[:, :, None] == history[:, None, :]).any(-1)
            first = torch.argsort(in_history.to(torch.int8), dim=1, stable=True)[:, :k]  # non-history first, in order
            removed.update(top.gather(1, first).masked_fill(in_history.gather(1, first), -1), target, key=start)
        progress.update(sl.stop)
    if sharded is not False:
        acc.merge_ranks()
        if keep:
            removed.merge_ranks()
    seconds = _seconds_over_ranks(time.perf_counter() - t0, sharded)
    model.train(was_training)
    result = acc.compute()
    result.update(users=n, users_per_second=n / max(seconds, 1e-9))
    if keep:
        result["ranks"] = acc.ranks()
        result["history_removed"] = {**removed.compute(), "ranks": removed.ranks()}
    return result


# ------------------------------------------------------------------ cold-start / zero-shot


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


def evaluate_groups(evaluate, examples, in_group: np.ndarray) -> tuple[dict | None, dict | None]:
    """``evaluate`` (Examples -> metrics with ``users``) on the examples where ``in_group`` is
    True and on the rest, separately: (group, rest), None for an empty side. ``examples`` is a
    NamedTuple of per-example arrays (``data.dataset.Examples``)."""
    in_group = np.asarray(in_group, dtype=bool)
    if in_group.shape != (len(examples.target),):
        raise ValueError(f"in_group must be a bool mask of shape ({len(examples.target)},), got {in_group.shape}")
    out = []
    for mask in (in_group, ~in_group):
        idx = np.flatnonzero(mask)
        out.append(evaluate(type(examples)(*(a[idx] for a in examples))) if len(idx) else None)
    return out[0], out[1]


class RestrictedScores:
    """A scoring model (``scores(history) -> (n, num_items)``) whose items outside ``allowed``
    score -inf, for :func:`evaluate_exact_topk`: an item-ID model ranks only the items it was
    trained on (under a cold split it has no representation of the others; its cold items'
    embeddings only ever served as negatives)."""

    def __init__(self, model, allowed: np.ndarray):
        self.model = model
        self.allowed = torch.as_tensor(np.asarray(allowed, dtype=bool))

    @property
    def training(self) -> bool:
        return self.model.training

    def eval(self):
        self.model.eval()
        return self

    def train(self, mode: bool = True):
        self.model.train(mode)
        return self

    def scores(self, history: torch.Tensor) -> torch.Tensor:
        scores = self.model.scores(history)
        return scores.masked_fill(~self.allowed.to(scores.device), float("-inf"))
