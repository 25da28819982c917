import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modules.evaluation import MetricAccumulator, popularity_ranking, ranking_metrics


def naive_metrics(ranked, target, ks):
    """Slow per-user reference straight from the definitions."""
    ranked = np.asarray(ranked)
    target = np.asarray(target)
    out = {}
    for k in ks:
        rec, ndcg = [], []
        for row, t in zip(ranked, target):
            r = None
            for i, item in enumerate(row[:k]):
                if item >= 0 and item == t:
                    r = i
                    break
            rec.append(0.0 if r is None else 1.0)
            ndcg.append(0.0 if r is None else 1.0 / math.log2(r + 2))
        out[f"recall@{k}"] = sum(rec) / len(rec)
        out[f"ndcg@{k}"] = sum(ndcg) / len(ndcg)
    return out


def assert_close(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == pytest.approx(b[key], abs=1e-12), key


def test_single_user_known_answers():
    ranked = np.array([[7, 1, 2, 3, 4]])
    assert ranking_metrics(ranked, [7], ks=(1, 5)) == {
        "recall@1": 1.0, "ndcg@1": 1.0, "recall@5": 1.0, "ndcg@5": 1.0,
    }
    m = ranking_metrics(ranked, [2], ks=(1, 5))  # rank 2 -> 1/log2(4) = 0.5
    assert m == {"recall@1": 0.0, "ndcg@1": 0.0, "recall@5": 1.0, "ndcg@5": 0.5}
    m = ranking_metrics(ranked, [9], ks=(1, 5))  # missing
    assert m == {"recall@1": 0.0, "ndcg@1": 0.0, "recall@5": 0.0, "ndcg@5": 0.0}


def test_three_users_by_hand():
    ranked = torch.tensor(
        [
            [5, 0, 1, 2, 3, 4, 6, 7, 8, 9],  # target 5 at rank 0
            [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],  # target 3 at rank 3
            [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],  # target 7 at rank 7
        ]
    )
    m = ranking_metrics(ranked, torch.tensor([5, 3, 7]))
    assert list(m) == ["recall@1", "ndcg@1", "recall@5", "ndcg@5", "recall@10", "ndcg@10"]
    assert m["recall@1"] == pytest.approx(1 / 3)
    assert m["ndcg@1"] == pytest.approx(1 / 3)
    assert m["recall@5"] == pytest.approx(2 / 3)
    assert m["ndcg@5"] == pytest.approx((1 + 1 / math.log2(5)) / 3)  # (1 + 0.430677) / 3
    assert m["ndcg@5"] == pytest.approx(0.476892, abs=1e-6)
    assert m["recall@10"] == pytest.approx(1.0)
    assert m["ndcg@10"] == pytest.approx((1 + 1 / math.log2(5) + 1 / math.log2(9)) / 3)
    assert m["ndcg@10"] == pytest.approx(0.582047, abs=1e-6)


def test_minus_one_never_hits_and_first_occurrence_counts():
    ranked = np.array([[-1, -1, 4], [3, 3, -1]])
    m = ranking_metrics(ranked, np.array([4, 3]), ks=(1, 3))
    assert m["recall@1"] == 0.5 and m["ndcg@1"] == 0.5
    assert m["recall@3"] == 1.0
    assert m["ndcg@3"] == pytest.approx((0.5 + 1.0) / 2)
    with pytest.raises(ValueError, match="target"):
        ranking_metrics(ranked, np.array([-1, 3]), ks=(1,))


def test_wider_ranking_ignores_extra_columns():
    ranked = np.array([[1, 2, 3]])
    assert ranking_metrics(ranked, [3], ks=(2,)) == {"recall@2": 0.0, "ndcg@2": 0.0}


@pytest.mark.parametrize(
    "ranked, target, ks, match",
    [
        (np.zeros((3, 4), dtype=np.int64), np.zeros(3, dtype=np.int64), (1, 5), "K=4"),
        (np.zeros((3, 5), dtype=np.int64), np.zeros(2, dtype=np.int64), (1, 5), "target"),
        (np.zeros((3, 5), dtype=np.int64), np.zeros((3, 1), dtype=np.int64), (1,), "target"),
        (np.zeros(5, dtype=np.int64), np.zeros(5, dtype=np.int64), (1,), r"\(n, K\)"),
        (np.zeros((0, 5), dtype=np.int64), np.zeros(0, dtype=np.int64), (1,), "n == 0"),
        (np.zeros((3, 5)), np.zeros(3, dtype=np.int64), (1,), "integer"),
        (np.zeros((3, 5), dtype=np.int64), np.zeros(3, dtype=np.int64), (), "ks"),
        (np.zeros((3, 5), dtype=np.int64), np.zeros(3, dtype=np.int64), (0, 1), "ks"),
    ],
)
def test_bad_input_raises(ranked, target, ks, match):
    with pytest.raises(ValueError, match=match):
        ranking_metrics(ranked, target, ks=ks)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 30),
    n_items=st.integers(1, 15),
    extra=st.integers(0, 3),
    seed=st.integers(0, 2**32 - 1),
    as_torch=st.booleans(),
)
def test_matches_naive_reference(n, n_items, extra, seed, as_torch):
    rng = np.random.default_rng(seed)
    ks = (1, 3, 5)
    # Items from -1..n_items-1 with repeats: exercises "no item" and duplicate entries.
    ranked = rng.integers(-1, n_items, size=(n, max(ks) + extra))
    target = rng.integers(0, n_items, size=n)
    expected = naive_metrics(ranked, target, ks)
    if as_torch:
        ranked, target = torch.from_numpy(ranked), torch.from_numpy(target)
    assert_close(ranking_metrics(ranked, target, ks=ks), expected)


def test_accumulator_equals_one_shot():
    rng = np.random.default_rng(0)
    ranked = rng.integers(-1, 50, size=(1000, 10))
    target = rng.integers(0, 50, size=1000)
    ranked[::7, 3] = target[::7]  # make some hits certain
    acc = MetricAccumulator(ks=(1, 5, 10))
    for start in range(0, 1000, 137):  # uneven batches, last one short
        acc.update(torch.from_numpy(ranked[start : start + 137]), target[start : start + 137])
    assert acc.count == 1000
    one_shot = ranking_metrics(ranked, target)
    assert_close(acc.compute(), one_shot)
    assert_close(one_shot, naive_metrics(ranked, target, (1, 5, 10)))
    assert one_shot["recall@5"] > 0.1
    acc.reset()
    with pytest.raises(ValueError, match="update"):
        acc.compute()


def test_popularity_known_answer_and_ties():
    counts = np.array([3, 5, 5, 0, 3, 1])
    top = popularity_ranking(counts, n_users=2, k=4)
    assert top.dtype == np.int64
    np.testing.assert_array_equal(top, [[1, 2, 0, 4], [1, 2, 0, 4]])
    # Fewer items than k: padded with -1, which the metrics treat as "no item".
    np.testing.assert_array_equal(popularity_ranking(np.array([1, 2]), 1, 3), [[1, 0, -1]])


def test_popularity_exclude_global_and_per_user():
    counts = np.array([3, 5, 5, 0, 3, 1])
    np.testing.assert_array_equal(
        popularity_ranking(counts, 2, 3, exclude=np.array([2, 4])), [[1, 0, 5], [1, 0, 5]]
    )
    history = np.array([[1, 2, -1], [-1, -1, -1], [0, 1, 2], [3, 5, 4]])
    np.testing.assert_array_equal(
        popularity_ranking(counts, 4, 3, exclude=history),
        [[0, 4, 5], [1, 2, 0], [4, 5, 3], [1, 2, 0]],
    )
    # Everything excluded but two items: padded with -1.
    np.testing.assert_array_equal(
        popularity_ranking(counts, 1, 3, exclude=np.array([[0, 1, 2, 4]])), [[5, 3, -1]]
    )


@settings(max_examples=60, deadline=None)
@given(
    n_users=st.integers(0, 8),
    n_items=st.integers(1, 12),
    h=st.integers(0, 6),
    k=st.integers(1, 8),
    seed=st.integers(0, 2**32 - 1),
)
def test_popularity_matches_naive(n_users, n_items, h, k, seed):
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 4, size=n_items)  # small range: many ties
    exclude = rng.integers(-1, n_items, size=(n_users, h))
    got = popularity_ranking(counts, n_users, k, exclude=exclude)
    ordered = sorted(range(n_items), key=lambda i: (-counts[i], i))
    for u in range(n_users):
        row = [i for i in ordered if i not in set(exclude[u].tolist())][:k]
        assert got[u].tolist() == row + [-1] * (k - len(row))
    assert got.shape == (n_users, k)


def test_popularity_bad_input():
    with pytest.raises(ValueError, match="n_users"):
        popularity_ranking(np.ones(5), 3, 2, exclude=np.zeros((2, 2), dtype=np.int64))
    with pytest.raises(ValueError, match="outside"):
        popularity_ranking(np.ones(5), 1, 2, exclude=np.array([5]))
    with pytest.raises(ValueError, match="k >= 1"):
        popularity_ranking(np.ones(5), 1, 0)
