"""The test report of a trained next-item recommender, shared by train_decoder.py and
train_joint.py: validation and test metrics of the selected (best-validation) model, the
invalid-ID rate of unconstrained search, the most-popular baseline and, under a cold-start or
zero-shot protocol, the cold / warm user groups apart."""

from __future__ import annotations

from typing import Callable

import numpy as np

from modules.evaluation import combine_metrics, evaluate_groups, popularity_ranking, ranking_metrics

REPORT_KEYS = ("recall@1", "recall@5", "recall@10", "ndcg@5", "ndcg@10")


def _keys(metrics: dict) -> dict:
    return {k: metrics[k] for k in REPORT_KEYS}


def cold_report(dataset, test, test_cold: dict | None, test_warm: dict | None, popular: np.ndarray) -> dict:
    """The cold-start / zero-shot part of the result (``load_dataset.cold_items`` or
    ``holdout_domain``): test metrics on the users whose test target is cold and on the rest,
    with user counts, and popularity on each. Training counts give cold items nothing, so
    ``popularity_in_cold`` ranks the cold items by how often they occur in the test histories
    (what is known of them at test time; no test target counts), on the cold users."""
    is_cold = dataset.test_is_cold()

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


def test_report(dataset, evaluate: Callable[..., dict], valid, test, unconstrained: bool = True,
                exact: bool = False) -> dict:
    """Evaluate the model behind ``evaluate(examples, unconstrained=False) -> metrics`` (load the
    selected weights first) on all ``valid`` and ``test`` examples: ``valid``, ``test``, with
    ``unconstrained`` also ``unconstrained_test`` (search without the item trie) and its
    ``invalid_rate`` (else 0 for ``exact`` ranking, which returns items only, and None, not
    measured, for a search whose unconstrained pass was skipped), ``popularity`` (the
    most-popular baseline, cold items excluded under a cold split), the cold / warm groups
    when ``dataset.cold`` is set (``test`` is then their union), and ``eval_users_per_second``."""
    valid_metrics = evaluate(valid)
    if dataset.cold is None:
        test_metrics = evaluate(test)
    else:  # cold-start / zero-shot: cold-target users and the rest apart; "test" is their union
        test_cold, test_warm = evaluate_groups(evaluate, test, dataset.test_is_cold())
        test_metrics = combine_metrics([test_cold, test_warm])
    free = evaluate(test, unconstrained=True) if unconstrained else None
    popular = popularity_ranking(dataset.train_item_counts(), len(test), 10,
                                 exclude=None if dataset.cold is None else np.flatnonzero(dataset.cold))
    pop_metrics = ranking_metrics(popular, test.target, ks=(1, 5, 10))
    return {
        "valid": _keys(valid_metrics),
        "test": _keys(test_metrics),
        **({} if free is None else {"unconstrained_test": _keys(free)}),
        "invalid_rate": free["invalid_rate"] if free is not None else 0.0 if exact else None,
        "popularity": _keys(pop_metrics),
        **({} if dataset.cold is None else cold_report(dataset, test, test_cold, test_warm, popular)),
        "eval_users_per_second": round(test_metrics["users_per_second"], 1),
    }
