"""The test report of a trained next-item recommender, shared by train_decoder.py,
train_joint.py, train_actionpiece.py and train_grpo.py: validation and test metrics of the
selected (best-validation) model, the invalid-ID rate of unconstrained search, the most-popular
baseline and, under a cold-start or zero-shot protocol, the cold / warm user groups apart; 95%
bootstrap intervals over users, the test ranked with each user's history items removed, and the
per-user ranks that ``modules.training.print_result`` writes beside the result JSON
(``result.ranks.npz``)."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Callable

import gin
import numpy as np

from modules.evaluation import (
    combine_metrics, evaluate_groups, keeping_ranks, popularity_ranking, ranking_metrics, target_ranks,
)
from modules.intervals import RunRanks, bootstrap_interval
from modules.training import print_result

REPORT_KEYS = ("recall@1", "recall@5", "recall@10", "ndcg@5", "ndcg@10")
# How many training jobs shared the machine while a run trained (its result's
# machine.jobs_sharing_machine; bench/leaderboard.sh sets it, e.g. 2 for two runs on two cores).
JOBS_ENV = "SIDREC_JOBS"


def stopped_result(checkpoint_dir, step: int, **extra) -> dict:
    """The result of a run stopped on purpose (``stop_after_steps``): the step and the checkpoint
    it resumes from (``checkpoint_dir/last.pt``), printed as the last stdout line."""
    result = {"stopped_at_step": step, **extra, "checkpoint": str(Path(checkpoint_dir) / "last.pt")}
    print_result(result)
    return result


def split_fingerprint(dataset) -> str:
    """The data split two runs must share to be compared user by user: every user's items in
    order, the item list and the held-out (cold) items. Unlike ``dataset.fingerprint()`` it
    leaves out the history length, which changes the model, not the split."""
    h = hashlib.sha256()
    for a in (dataset.flat, dataset.offsets):
        h.update(np.ascontiguousarray(a, dtype=np.int64).tobytes())
    h.update("\n".join(map(str, dataset.items["raw_id"].to_list())).encode())
    if dataset.cold is not None:
        h.update(b"\ncold:")
        h.update(np.flatnonzero(dataset.cold).astype(np.int64).tobytes())
    return h.hexdigest()[:16]


def _in_user_order(in_group: np.ndarray, group: dict | None, rest: dict | None) -> dict:
    """The ``ranks`` and ``history_removed`` of :func:`evaluate_groups`' two halves, put back
    together over all users in their order (the halves' metrics are user-weighted averages)."""
    halves = [(m, p) for m, p in ((in_group, group), (~in_group, rest)) if p is not None]
    if not all("ranks" in p for _, p in halves):
        return {}
    ranks = np.full(len(in_group), -1, dtype=np.result_type(*(p["ranks"] for _, p in halves)))
    out = {"ranks": ranks}
    for mask, p in halves:
        ranks[mask] = p["ranks"]
    if all("history_removed" in p for _, p in halves):
        removed = np.full(len(in_group), -1, dtype=np.result_type(*(p["history_removed"]["ranks"] for _, p in halves)))
        for mask, p in halves:
            removed[mask] = p["history_removed"]["ranks"]
        out["history_removed"] = {**combine_metrics([{**p["history_removed"], "users": p["users"]} for _, p in halves]),
                                  "ranks": removed}
    return out


def _keys(metrics: dict) -> dict:
    return {k: metrics[k] for k in REPORT_KEYS}


def cold_report(dataset, test, test_cold: dict | None, test_warm: dict | None, popular: np.ndarray) -> dict:
    """The cold-start / zero-shot part of the result (``load_dataset.cold_items`` or
    ``holdout_domain``): test metrics on the users whose test target is cold and on the rest,
    with user counts, and popularity on each. Training counts give cold items nothing, so
    ``popularity_in_cold`` ranks the cold items by how often they occur in the test histories
    (what is known of them at test time; no test target counts), on the cold users."""
    is_cold = dataset.test_is_cold()[test.user]  # test may be a sample of the users (max_users)

    def report(metrics):
        return None if metrics is None else {**_keys(metrics), "users": int(metrics["users"])}

    def pop_on(ranked, mask):
        if not mask.any():
            return None
        return report({**ranking_metrics(ranked[mask], test.target[mask], ks=(1, 5, 10)), "users": mask.sum()})

    in_cold = popularity_ranking(dataset.observed_item_counts(), len(test), 10, exclude=np.flatnonzero(~dataset.cold))
    return {"protocol": dataset.protocol, "test_cold": report(test_cold), "test_warm": report(test_warm),
            "popularity_cold": pop_on(popular, is_cold), "popularity_warm": pop_on(popular, ~is_cold),
            "popularity_in_cold": pop_on(in_cold, is_cold)}


def reported_examples(valid, test, max_users: int | None):
    """The ``valid`` and ``test`` examples that :func:`test_report` evaluates under ``max_users``:
    all of them (None), or a fixed random sample of that many users each (seed 0)."""
    if max_users is None:
        return valid, test
    return valid.sample(max_users, seed=0), test.sample(max_users, seed=0)


def bound_max_users() -> int | None:
    """``test_report.max_users`` as bound in gin (None: unbound), for a script whose other final
    evaluations must test the report's users (train_grpo.py's SFT start: a smoke run must not
    rank every Beauty user there either, and its figures stay comparable with the report's)."""
    return gin.get_bindings(test_report).get("max_users")


@gin.configurable(denylist=["dataset", "evaluate", "valid", "test", "unconstrained", "exact", "valid_evaluate",
                            "extra"])
def test_report(dataset, evaluate: Callable[..., dict], valid, test, unconstrained: bool = True,
                exact: bool = False, max_users: int | None = None,
                valid_evaluate: Callable[..., dict] | None = None,
                extra: Callable[[dict, dict], dict] | None = None) -> dict:
    """Evaluate the model behind ``evaluate(examples, unconstrained=False) -> metrics`` (load the
    selected weights first) on all ``valid`` and ``test`` examples: ``valid``, ``test``, with
    ``unconstrained`` also ``unconstrained_test`` (search without the item trie) and its
    ``invalid_rate`` (else 0 for ``exact`` ranking, which returns items only, and None, not
    measured, for a search whose unconstrained pass was skipped), ``popularity`` (the
    most-popular baseline, cold items excluded under a cold split), the cold / warm groups
    when ``dataset.cold`` is set (``test`` is then their union), and ``eval_users_per_second``.

    The evaluations of ``valid`` and ``test`` run inside ``modules.evaluation.keeping_ranks``:
    evaluators that keep per-user ranks (``evaluate_generative``, ``evaluate_exact_topk``,
    ``evaluate_actionpiece``) add ``test_history_removed`` (the test ranked with each user's
    history items removed, HSTU's protocol; ``test`` stays the headline, as
    TIGER and ActionPiece report it), ``intervals`` (``{"valid" | "test" |
    "test_history_removed" | "popularity": {metric: [low, high]}}``, 95% percentile bootstrap
    over users, 1,000 resamples, seed 0: ``modules.intervals``) and ``ranks``, a
    ``modules.intervals.RunRanks`` (every test user's rank, in test order, also under a cold
    split) that ``print_result`` writes to ``result.ranks.npz`` and leaves out of the JSON.

    ``max_users`` is for smoke runs (``bench/check_docs.py``'s tiny overrides bind it): valid and
    test on a fixed random sample of that many users each instead of every user, said in the
    report as ``"test_users"``; its figures are not comparable with a full test's.

    For an evaluator of its own kind (train_actionpiece.py): ``valid_evaluate`` evaluates
    ``valid`` instead of ``evaluate`` (ActionPiece validates with one segmentation per user and
    tests with several), and ``extra(valid_metrics, test_metrics)`` returns keys added to the
    report last, replacing any of the same name (its metrics beyond the headline ones: both
    scorings, err@10, the invalid rate of its only search; ``test_metrics`` is the union's under a
    cold split, each number a user-weighted mean of the groups')."""
    valid, test = reported_examples(valid, test, max_users)
    with keeping_ranks():
        valid_metrics = (valid_evaluate or evaluate)(valid)
        if dataset.cold is None:
            test_metrics = evaluate(test)
        else:  # cold-start / zero-shot: cold-target users and the rest apart; "test" is their union
            is_cold = dataset.test_is_cold()[test.user]
            test_cold, test_warm = evaluate_groups(evaluate, test, is_cold)
            test_metrics = {**combine_metrics([test_cold, test_warm]), **_in_user_order(is_cold, test_cold, test_warm)}
    free = evaluate(test, unconstrained=True) if unconstrained else None
    popular = popularity_ranking(dataset.train_item_counts(), len(test), 10,
                                 exclude=None if dataset.cold is None else np.flatnonzero(dataset.cold))
    pop_metrics = ranking_metrics(popular, test.target, ks=(1, 5, 10))
    report = {
        "valid": _keys(valid_metrics),
        "test": _keys(test_metrics),
        **({} if free is None else {"unconstrained_test": _keys(free)}),
        "invalid_rate": free["invalid_rate"] if free is not None else 0.0 if exact else None,
        "popularity": _keys(pop_metrics),
        **({} if dataset.cold is None else cold_report(dataset, test, test_cold, test_warm, popular)),
        "eval_users_per_second": round(test_metrics["users_per_second"], 1),
        **({} if max_users is None else {"test_users": len(test)}),
        **({} if extra is None else extra(valid_metrics, test_metrics)),
    }
    if "ranks" not in test_metrics or "ranks" not in valid_metrics:  # an evaluator that keeps none
        return report
    ranks = RunRanks(split=split_fingerprint(dataset), dataset=dataset.fingerprint())
    ranks.add("test", test_metrics["ranks"], test.user, test.target)
    ranks.add("valid", valid_metrics["ranks"], valid.user, valid.target)
    removed = test_metrics.get("history_removed")
    if removed is not None:
        report["test_history_removed"] = _keys(removed)
        ranks.add("test_history_removed", removed["ranks"], test.user, test.target)
    pop_ranks = target_ranks(popular, test.target).numpy()
    report["intervals"] = {name: _interval(r) for name, r in (
        ("valid", valid_metrics["ranks"]), ("test", test_metrics["ranks"]),
        *((("test_history_removed", removed["ranks"]),) if removed is not None else ()),
        ("popularity", pop_ranks))}
    report["ranks"] = ranks
    return report


def _interval(ranks) -> dict:
    """The bootstrap interval of each of the REPORT_KEYS."""
    every = bootstrap_interval(ranks)
    return {k: every[k] for k in REPORT_KEYS}


def run_facts(dev, amp, t_start: float) -> dict:
    """A train script's result entries on where and how long it ran: ``device`` (the GPU's name
    on CUDA), ``seconds`` since ``t_start`` (a ``time.time()``) and ``machine`` (:func:`machine_record`
    of the training precision ``amp``; RESULTS.md's columns, bench/results_table.py)."""
    import torch

    return {"device": str(dev) if dev.type != "cuda" else torch.cuda.get_device_name(dev),
            "seconds": round(time.time() - t_start, 1), "machine": machine_record(amp)}


def machine_record(amp=None) -> dict:
    """Where and how a run trained, for its result JSON's ``machine`` (RESULTS.md's columns):
    the CPU model, its core count, the torch threads, the training precision (``amp``: the
    autocast dtype of ``modules.training.autocast_dtype``, None = fp32), the clock that
    ``max_train_minutes`` counted (``training_clock.kind``: 'process' CPU seconds or 'wall') and
    ``jobs_sharing_machine``, read from ``$SIDREC_JOBS`` (None when unset: not recorded)."""
    import time

    import torch

    from modules.training import _cpu_name, training_clock

    jobs = os.environ.get(JOBS_ENV, "").strip()
    clock = training_clock()
    return {"cpu": _cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "precision": "bf16" if amp == torch.bfloat16 else "fp32" if amp is None else str(amp).replace("torch.", ""),
            "clock": {time.time: "wall", time.process_time: "process"}.get(clock, getattr(clock, "__name__", "?")),
            "jobs_sharing_machine": (int(jobs) if jobs.isdigit() else jobs) or None}
