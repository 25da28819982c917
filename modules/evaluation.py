"""Evaluating recommenders on held-out examples: a semantic-ID model by beam search
(:func:`evaluate_generative`), an item-ID model that scores every item by its exact top k
(:func:`evaluate_exact_topk`), each sharded over the ranks under torchrun; the user groups of a
cold-start split evaluated apart (:func:`evaluate_groups`, :class:`RestrictedScores`).

The metrics themselves (Recall@k, NDCG@k, per-user ranks) are modules/ranking_metrics.py's and
the popularity baseline modules/popularity.py's; both are importable from here as well.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager

import numpy as np
import torch

from modules import distributed
from modules.popularity import popularity_ranking  # noqa: F401  (re-exported: callers import it from here)
from modules.ranking_metrics import (  # noqa: F401  (re-exported: callers import them from here)
    DEFAULT_KS, MetricAccumulator, combine_metrics, drop_items, ranking_metrics, target_ranks,
)

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
