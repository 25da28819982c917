"""modules/intervals.py: metrics from per-user ranks, bootstrap intervals over users, the
paired bootstrap of two runs, the ranks file; bench/compare_runs.py on top of them."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from modules.evaluation import MetricAccumulator, ranking_metrics, target_ranks
from modules.intervals import (
    RunRanks, bootstrap_interval, metric_keys, metrics_from_ranks, paired_bootstrap, ranks_path, resampled_means,
)

ROOT = Path(__file__).resolve().parents[1]
KEYS = metric_keys()


def test_all_hits_and_no_hits_give_degenerate_intervals():
    assert bootstrap_interval(np.zeros(50, dtype=np.int16)) == {k: [1.0, 1.0] for k in KEYS}
    assert bootstrap_interval(np.full(50, -1)) == {k: [0.0, 0.0] for k in KEYS}
    # A hit at rank 7 counts at @10 only, always with the same gain.
    iv = bootstrap_interval(np.full(20, 7))
    assert iv["recall@5"] == [0.0, 0.0] and iv["recall@10"] == [1.0, 1.0]
    assert iv["ndcg@10"] == pytest.approx([1 / math.log2(9)] * 2, abs=1e-15)


def test_metrics_from_ranks_by_hand():
    m = metrics_from_ranks([0, 4, -1, 9])
    assert list(m) == ["recall@1", "ndcg@1", "recall@5", "ndcg@5", "recall@10", "ndcg@10"]
    assert m["recall@1"] == m["ndcg@1"] == 0.25
    assert m["recall@5"] == 0.5 and m["ndcg@5"] == pytest.approx((1 + 1 / math.log2(6)) / 4)
    assert m["recall@10"] == 0.75 and m["ndcg@10"] == pytest.approx((1 + 1 / math.log2(6) + 1 / math.log2(11)) / 4)
    with pytest.raises(ValueError, match=">= -1"):
        metrics_from_ranks([0, -2])
    with pytest.raises(ValueError, match="integer"):
        metrics_from_ranks([0.0, 1.0])


def test_small_cases_by_hand():
    # Two users, one hit: a resample holds 0, 1 or 2 copies of the hit (1/4, 1/2, 1/4), so the
    # mean is 0, 0.5 or 1 and both tails (1/4 each) are beyond 2.5%: the interval is [0, 1].
    iv = bootstrap_interval([0, -1])
    assert iv["recall@1"] == [0.0, 1.0] and iv["ndcg@10"] == [0.0, 1.0]
    # The resampled means take exactly those three values, in about those proportions.
    means = resampled_means(np.array([[1.0], [0.0]]), resamples=4000)[:, 0]
    assert set(means.tolist()) == {0.0, 0.5, 1.0}
    assert np.mean(means == 0.5) == pytest.approx(0.5, abs=0.03)
    # Three users, one hit: P(mean = 1) = 1/27 = 3.7% > 2.5% and P(mean = 0) = 8/27.
    assert bootstrap_interval([-1, 3, -1])["recall@5"] == [0.0, 1.0]
    # 10,000 users, 30% hits at rank 0: the normal approximation 0.3 +- 1.96 sqrt(0.21 / n).
    ranks = np.where(np.arange(10_000) % 10 < 3, 0, -1)
    low, high = bootstrap_interval(ranks)["recall@1"]
    half = 1.96 * math.sqrt(0.3 * 0.7 / 10_000)
    assert low == pytest.approx(0.3 - half, abs=0.0015) and high == pytest.approx(0.3 + half, abs=0.0015)


def test_seeded_and_reproducible():
    ranks = np.random.default_rng(0).integers(-1, 10, 500)
    assert bootstrap_interval(ranks) == bootstrap_interval(ranks)
    assert bootstrap_interval(ranks, seed=1) != bootstrap_interval(ranks)
    est = metrics_from_ranks(ranks)
    for k, (lo, hi) in bootstrap_interval(ranks).items():
        assert lo <= est[k] <= hi and hi - lo < 0.2


@pytest.mark.parametrize("seed", range(5))
def test_metrics_from_ranks_equal_ranking_metrics(seed):
    rng = np.random.default_rng(seed)
    n = 300
    ranked = rng.integers(-1, 25, size=(n, 10))  # repeats and -1 entries
    target = rng.integers(0, 25, size=n)
    ranked[::5, 2] = target[::5]
    ranks = target_ranks(torch.from_numpy(ranked), target).numpy()
    expected = ranking_metrics(ranked, target)
    got = metrics_from_ranks(ranks)
    assert got.keys() == expected.keys()
    for k in got:
        assert got[k] == pytest.approx(expected[k], abs=1e-12), k
    # The accumulator keeps the same ranks, batch by batch.
    acc = MetricAccumulator(keep_ranks=True)
    for start in range(0, n, 64):
        acc.update(ranked[start:start + 64], target[start:start + 64], key=start)
    np.testing.assert_array_equal(acc.ranks(), ranks)
    assert acc.ranks().dtype == np.int16


def test_paired_difference_is_antisymmetric():
    rng = np.random.default_rng(3)
    a = rng.integers(-1, 10, 2000)
    b = np.where(rng.random(2000) < 0.3, rng.integers(-1, 3, 2000), a)  # correlated, b better
    ab, ba = paired_bootstrap(a, b), paired_bootstrap(b, a)
    assert list(ab) == KEYS
    for k in KEYS:
        assert ab[k]["diff"] == pytest.approx(-ba[k]["diff"], abs=1e-15)
        assert ab[k]["low"] == pytest.approx(-ba[k]["high"], abs=1e-12)
        assert ab[k]["high"] == pytest.approx(-ba[k]["low"], abs=1e-12)
        ma, mb = metrics_from_ranks(a)[k], metrics_from_ranks(b)[k]
        assert ab[k]["diff"] == pytest.approx(mb - ma, abs=1e-12)  # other minus base
        assert ab[k]["low"] <= ab[k]["diff"] <= ab[k]["high"]


def test_paired_difference_known_cases():
    a = np.random.default_rng(4).integers(-1, 10, 400)
    same = paired_bootstrap(a, a.copy())
    assert all(v == {"diff": 0.0, "low": 0.0, "high": 0.0} for v in same.values())
    # 12 misses turned into hits at rank 0, nothing worse: every per-user difference is >= 0.
    b = a.copy()
    b[np.flatnonzero(a == -1)[:12]] = 0
    up = paired_bootstrap(a, b)
    assert up["recall@1"]["diff"] == pytest.approx(12 / 400) and up["recall@1"]["low"] > 0
    # Pairing matters: the unpaired intervals of a and b overlap, the paired one excludes 0.
    assert bootstrap_interval(a)["ndcg@10"][1] > bootstrap_interval(b)["ndcg@10"][0]
    assert up["ndcg@10"]["low"] > 0
    with pytest.raises(ValueError, match="same users"):
        paired_bootstrap(a, b[:-1])


def _run_ranks(ranks, split="s1", target=None) -> RunRanks:
    n = len(ranks)
    out = RunRanks(split=split, dataset="d1")
    out.add("test", np.asarray(ranks, dtype=np.int16), np.arange(n), np.arange(n) % 7 if target is None else target)
    return out


def test_ranks_file_round_trip(tmp_path):
    rr = _run_ranks(np.array([0, -1, 3, 9]))
    rr.add("valid", np.array([1, -1], dtype=np.int16), np.array([5, 6]), np.array([2, 2]))
    path = rr.save(tmp_path / "result.ranks.npz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.ranks.npz"]  # no temporary left
    back = RunRanks.load(path)
    assert back.split == "s1" and back.dataset == "d1" and set(back.parts) == {"test", "valid"}
    for name in rr.parts:
        for x, y in zip(rr.parts[name], back.parts[name]):
            np.testing.assert_array_equal(x, y)
    assert back.parts["test"][0].dtype == np.int16 and back.targets() == rr.targets()
    assert ranks_path("results/x.json") == Path("results/x.ranks.npz")


# ---------------------------------------------------------------- bench/compare_runs.py


def _write_run(folder: Path, name: str, ranks: RunRanks) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    ranks.save(ranks_path(folder / f"{name}.json"))
    (folder / f"{name}.json").write_text(json.dumps({"test": metrics_from_ranks(ranks.parts["test"][0])}))
    return folder / f"{name}.json"


def _compare(*args):
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "compare_runs.py"), *map(str, args)],
                       capture_output=True, text=True, cwd=ROOT)
    return p.returncode, p.stdout, p.stderr


def test_compare_runs_is_antisymmetric_and_refuses_other_splits(tmp_path):
    rng = np.random.default_rng(5)
    a = rng.integers(-1, 10, 800)
    b = np.where(rng.random(800) < 0.4, 0, a)
    ja, jb = _write_run(tmp_path, "a", _run_ranks(a)), _write_run(tmp_path, "b", _run_ranks(b))
    code, out, err = _compare(ja, jb)
    assert code == 0, err
    ab = json.loads(out.strip().splitlines()[-1])
    code, out, _ = _compare(jb, ja)
    ba = json.loads(out.strip().splitlines()[-1])
    assert set(ab) == set(KEYS) and ab == paired_bootstrap(a, b)
    for k in ab:
        assert ab[k]["diff"] == pytest.approx(-ba[k]["diff"], abs=1e-15)
        assert (ab[k]["low"], ab[k]["high"]) == pytest.approx((-ba[k]["high"], -ba[k]["low"]), abs=1e-12)
    assert ab["recall@1"]["low"] > 0

    # Another split, other targets, other users, a missing ranks file: exit code 2, said why.
    other_split = _write_run(tmp_path / "s", "c", _run_ranks(b, split="s2"))
    other_targets = _write_run(tmp_path / "t", "c", _run_ranks(b, target=np.arange(800) % 5))
    fewer = _write_run(tmp_path / "u", "c", _run_ranks(b[:-1]))
    for other, why in ((other_split, "split"), (other_targets, "target"), (fewer, "users")):
        code, out, err = _compare(ja, other)
        assert code == 2 and why in err and out.strip() == "", (why, err)
    (tmp_path / "lonely.json").write_text("{}")
    code, _, err = _compare(ja, tmp_path / "lonely.json")
    assert code == 2 and "ranks" in err


def test_compare_runs_reads_ranks_file_named_in_the_json(tmp_path):
    rng = np.random.default_rng(6)
    a, b = rng.integers(-1, 10, 100), rng.integers(-1, 10, 100)
    ja = _write_run(tmp_path, "a", _run_ranks(a))
    _run_ranks(b).save(tmp_path / "elsewhere.npz")
    jb = tmp_path / "result.json"
    jb.write_text(json.dumps({"ranks_file": "elsewhere.npz"}))
    code, out, err = _compare(ja, jb)
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1]) == paired_bootstrap(a, b)


# ---------------------------------------------------------------- test_report and print_result


class SumScorer(torch.nn.Module):
    """scores(history): a fixed random item table, the history's rows summed (no training)."""

    def __init__(self, num_items):
        super().__init__()
        self.table = torch.nn.Embedding(num_items, 8)
        torch.nn.init.normal_(self.table.weight, generator=torch.Generator().manual_seed(0))

    def scores(self, hist):
        h = self.table(hist.clamp(min=0)) * (hist >= 0)[..., None]
        return h.sum(1) @ self.table.weight.T


def small_dataset(cold: bool):
    import polars as pl

    from data.dataset import SeqDataset

    rng = np.random.default_rng(7)
    num_items, seqs = 30, [rng.integers(0, 30, int(rng.integers(3, 15))) for _ in range(60)]
    items = pl.DataFrame({"item_id": np.arange(num_items), "raw_id": [f"i{i}" for i in range(num_items)]})
    ds = SeqDataset(name="random", items=items, flat=np.concatenate(seqs).astype(np.int64),
                    offsets=np.concatenate([[0], np.cumsum([len(s) for s in seqs])]).astype(np.int64),
                    raw_users=[f"u{u}" for u in range(len(seqs))], max_history=5)
    return ds.with_cold_items(np.arange(num_items) % 4 == 0, {"kind": "test"}) if cold else ds


def exact_setup(cold: bool):
    """The small dataset, its valid / test examples, and an exact top-k evaluator over it (cold
    items left out of the ranking under a cold split), as test_report takes it."""
    from modules.evaluation import RestrictedScores, evaluate_exact_topk

    ds = small_dataset(cold)
    scorer = SumScorer(ds.num_items) if not cold else RestrictedScores(SumScorer(ds.num_items), ~ds.cold)

    def evaluate(examples, unconstrained=False):
        return evaluate_exact_topk(scorer, examples, batch_size=7)

    return ds, ds.eval_examples("valid"), ds.eval_examples("test"), scorer, evaluate


@pytest.mark.parametrize("cold", [False, True])
def test_report_keeps_every_test_users_rank_in_order(cold, tmp_path, capsys):
    from modules.evaluation import evaluate_exact_topk
    from modules.reporting import REPORT_KEYS, split_fingerprint, test_report
    from modules.training import print_result

    ds, valid, test, scorer, evaluate = exact_setup(cold)

    report = test_report(ds, evaluate, valid, test, unconstrained=False, exact=True)
    whole = evaluate_exact_topk(scorer, test, batch_size=7, keep_ranks=True)  # all test users at once
    ranks = report["ranks"]
    test_ranks, user, target = ranks.parts["test"]
    np.testing.assert_array_equal(user, np.arange(ds.num_users))  # every test user, in test order
    np.testing.assert_array_equal(target, test.target)
    np.testing.assert_array_equal(test_ranks, whole["ranks"])
    np.testing.assert_array_equal(ranks.parts["test_history_removed"][0], whole["history_removed"]["ranks"])
    np.testing.assert_array_equal(ranks.parts["valid"][1], valid.user)
    assert ranks.split == split_fingerprint(ds) and ranks.dataset == ds.fingerprint()
    assert (cold and len(valid) < ds.num_users) or (not cold and len(valid) == ds.num_users)
    for name, part in (("test", "test"), ("test_history_removed", "test_history_removed"), ("valid", "valid")):
        from_ranks = metrics_from_ranks(ranks.parts[part][0])
        for k in REPORT_KEYS:
            assert report[name][k] == pytest.approx(from_ranks[k], abs=1e-12), (name, k)
            low, high = report["intervals"][name][k]
            assert low <= report[name][k] <= high
    assert set(report["intervals"]) == {"valid", "test", "test_history_removed", "popularity"}
    assert report["test_history_removed"] == {k: pytest.approx(whole["history_removed"][k]) for k in REPORT_KEYS}
    if cold:
        assert report["test_cold"]["users"] + report["test_warm"]["users"] == ds.num_users

    # print_result: the ranks go to result.ranks.npz, not into the JSON or the printed line.
    result = {"dataset": ds.name, **report}
    print_result(result, tmp_path)
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    saved = json.loads((tmp_path / "result.json").read_text())
    assert "ranks" not in printed and "ranks" not in saved and saved["ranks_file"] == "result.ranks.npz"
    assert saved["intervals"] == printed["intervals"] == json.loads(json.dumps(report["intervals"]))
    back = RunRanks.load(ranks_path(tmp_path / "result.json"))
    np.testing.assert_array_equal(back.parts["test"][0], test_ranks)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json", "result.ranks.npz"]
    assert isinstance(result["ranks"], RunRanks)  # the caller's dict is left as it was


@pytest.mark.parametrize("cold", [False, True])
def test_report_max_users_tests_a_fixed_sample_and_says_so(cold):
    # bench/check_docs.py's smoke runs bind test_report.max_users: the same users as a full
    # report's ranks at those users, the cold / warm split of the sample, and "test_users".
    from modules.reporting import test_report

    ds, valid, test, scorer, evaluate = exact_setup(cold)

    full = test_report(ds, evaluate, valid, test, unconstrained=False, exact=True)
    part = test_report(ds, evaluate, valid, test, unconstrained=False, exact=True, max_users=20)
    assert part["test_users"] == 20 and "test_users" not in full
    ranks, users, _ = part["ranks"].parts["test"]
    assert len(users) == 20 and np.all(np.diff(users) > 0)
    full_ranks, full_users, _ = full["ranks"].parts["test"]
    np.testing.assert_array_equal(ranks, full_ranks[np.searchsorted(full_users, users)])
    if cold:
        is_cold = ds.test_is_cold()[users]
        assert part["test_cold"]["users"] == is_cold.sum() and part["test_warm"]["users"] == (~is_cold).sum()


def test_report_valid_evaluate_and_extra():
    # train_actionpiece.py's use: its own evaluator for valid (one segmentation per user), and
    # its extra metric keys from the raw metrics; under a cold split "test" is the union of the
    # groups, each extra number their user-weighted mean.
    from modules.evaluation import RestrictedScores, evaluate_exact_topk
    from modules.reporting import test_report

    ds = small_dataset(True)
    valid, test = ds.eval_examples("valid"), ds.eval_examples("test")
    scorer = RestrictedScores(SumScorer(ds.num_items), ~ds.cold)
    calls, seen = [], {}

    def evaluate(examples, unconstrained=False):
        calls.append(("test", len(examples.user)))
        cold_share = float(ds.test_is_cold()[examples.user].mean())  # 1 on the cold group, 0 on the warm one
        return {**evaluate_exact_topk(scorer, examples, batch_size=7), "cold_share": cold_share}

    def valid_evaluate(examples):
        calls.append(("valid", len(examples.user)))
        return evaluate_exact_topk(scorer, examples, batch_size=7)

    def extra(valid_metrics, test_metrics):
        seen.update(valid=valid_metrics, test=test_metrics)
        return {"valid_users": valid_metrics["users"], "invalid_rate": test_metrics["cold_share"]}

    report = test_report(ds, evaluate, valid, test, unconstrained=False, exact=True, valid_evaluate=valid_evaluate,
                         extra=extra)
    is_cold = ds.test_is_cold()[test.user]
    assert calls == [("valid", len(valid)), ("test", is_cold.sum()), ("test", (~is_cold).sum())]
    assert report["valid_users"] == len(valid) and seen["test"]["users"] == len(test)
    assert report["invalid_rate"] == pytest.approx(is_cold.mean())  # replaces exact ranking's 0.0
    assert set(report["intervals"]) == {"valid", "test", "test_history_removed", "popularity"}
    np.testing.assert_array_equal(report["ranks"].parts["valid"][0], seen["valid"]["ranks"])


def test_bound_max_users_reads_the_binding():
    import gin

    from modules.reporting import bound_max_users, reported_examples

    gin.clear_config()
    try:
        assert bound_max_users() is None
        gin.parse_config("test_report.max_users = 12")
        assert bound_max_users() == 12
    finally:
        gin.clear_config()
    ds = small_dataset(False)
    valid, test = ds.eval_examples("valid"), ds.eval_examples("test")
    assert all(a is b for a, b in zip(reported_examples(valid, test, None), (valid, test)))  # all, as given
    v, t = reported_examples(valid, test, 12)
    np.testing.assert_array_equal(t.user, test.sample(12, seed=0).user)
    assert len(v.user) == len(t.user) == 12
