"""Preprocessing and splits: property tests against naive Python references, and the k-core
and leave-one-out invariants on real MovieLens data."""

import numpy as np
import polars as pl
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from data.dataset import SeqDataset, load_tables, save_tables
from data.prepare import load_dataset
from data.preprocess import PreprocessOptions, k_core, preprocess
from data.sources import movielens
from data.sources.base import RawData, empty_items


def naive_k_core(pairs: list[tuple[str, str]], k: int, min_user: int = 0) -> set[tuple[str, str]]:
    """Remove one under-threshold user (< max(k, min_user) rows) or item (< k rows) at a time
    until none is left."""
    rows = set(pairs)
    while True:
        users, items = {}, {}
        for u, i in rows:
            users[u] = users.get(u, 0) + 1
            items[i] = items.get(i, 0) + 1
        bad = next(((0, u) for u, c in users.items() if c < max(k, min_user)), None) or \
            next(((1, i) for i, c in items.items() if c < k), None)
        if bad is None:
            return rows
        rows = {r for r in rows if r[bad[0]] != bad[1]}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 12), st.integers(0, 9)), max_size=150, unique=True), st.integers(1, 4),
       st.integers(0, 4))
def test_k_core_matches_naive(pairs, k, min_user):
    pairs = [(f"u{u}", f"i{i}") for u, i in pairs]
    df = pl.DataFrame({"user": [u for u, _ in pairs], "item": [i for _, i in pairs]},
                      schema={"user": pl.String, "item": pl.String})
    got = set(zip(*k_core(df, k, min_user).select("user", "item").to_dict(as_series=False).values()))
    assert got == naive_k_core(pairs, k, min_user)


def _raw(seqs: list[list[int]]) -> RawData:
    users, items, ts = [], [], []
    for u, seq in enumerate(seqs):
        users += [str(u)] * len(seq)
        items += [str(i) for i in seq]
        ts += list(range(len(seq)))
    events = pl.DataFrame({"user": users, "item": items, "timestamp": ts}).with_columns(
        pl.col("timestamp").cast(pl.Int64), pl.int_range(pl.len(), dtype=pl.Int64).alias("order"))
    return RawData(name="toy", events=events, items=empty_items())


@settings(max_examples=150, deadline=None)
# Few items and short histories, so that users and items sit near the thresholds (with k in
# 0..4 and longer lists the generated cases found the old one-pass filter's bug ~half as often).
@given(st.lists(st.lists(st.integers(0, 7), min_size=2, max_size=4, unique=True), min_size=3, max_size=12),
       st.integers(1, 3))
# k=2: the 2-core keeps user 1 (items 0, 1); dropping it as short leaves items 0 and 1 with one
# user each; dropping those leaves users 0 and 2 with two items, which must go too.
@example([[0, 2, 3], [0, 1], [1, 2, 3], [2, 3, 4], [2, 3, 4]], 2)
def test_preprocess_filters_users_and_items_to_a_fixed_point(seqs, k):
    """Every user keeps >= min_history (3) items and every item >= k users, together, and
    nothing more is removed than that needs (the naive one-at-a-time reference)."""
    expect = naive_k_core([(str(u), str(i)) for u, seq in enumerate(seqs) for i in seq], k, min_user=3)
    if not expect:
        with pytest.raises(ValueError, match="nothing is left"):
            preprocess(_raw(seqs), PreprocessOptions(min_count=k))
        return
    tables = preprocess(_raw(seqs), PreprocessOptions(min_count=k))
    raw_of = tables.items["raw_id"].to_list()
    rows = [(u, raw_of[i]) for u, items in zip(tables.sequences["raw_user"], tables.sequences["items"])
            for i in items]
    assert tables.sequences["items"].list.len().min() >= 3
    assert min(sum(1 for _, i in rows if i == item) for item in raw_of) >= k
    assert set(rows) == expect
    ds = SeqDataset.from_tables("toy", tables, max_history=5)  # leave-one-out works on every user
    assert len(ds.eval_examples("test")) == len(ds.eval_examples("valid")) == ds.num_users
    assert len(ds.train_examples()) == int((ds.lengths - 3).sum())


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.integers(0, 30), min_size=3, max_size=12, unique=True), min_size=1, max_size=15),
       st.integers(1, 6))
def test_splits_match_naive(seqs, max_history):
    ds = SeqDataset.from_tables("toy", preprocess(_raw(seqs), PreprocessOptions(min_count=1)), max_history)
    expect_train = []
    for u in range(ds.num_users):
        s = ds.sequence(u).tolist()
        train = s[:-2]
        for t in range(1, len(train)):
            expect_train.append((u, train[max(0, t - max_history): t], train[t]))
    ex = ds.train_examples().materialize()
    got = [(int(u), [int(x) for x in h if x >= 0], int(t)) for u, h, t in zip(ex.user, ex.history, ex.target)]
    assert got == expect_train
    for split, back in (("valid", 2), ("test", 1)):
        ev = ds.eval_examples(split)
        for u in range(ds.num_users):
            s = ds.sequence(u).tolist()
            assert ev.target[u] == s[-back]
            hist = [int(x) for x in ev.history[u] if x >= 0]
            assert hist == s[:-back][-max_history:]
            assert (ev.history[u][len(hist):] == -1).all()  # padding only at the end


@pytest.mark.parametrize("version,folder", [("100k", "ml-100k"), ("latest-small", "ml-latest-small")])
def test_movielens_k_core_and_split_invariants(shared_data, version, folder):
    raw = movielens.load(version, path=shared_data / "movielens" / folder)
    tables = preprocess(raw, PreprocessOptions(min_count=5))
    ds = SeqDataset.from_tables(version, tables, max_history=20)
    item_counts = np.bincount(ds.flat, minlength=ds.num_items)
    assert item_counts.min() >= 5 and ds.lengths.min() >= 5  # the k-core invariant
    assert tables.items["item_id"].to_list() == list(range(ds.num_items))
    assert ds.num_users == raw.events["user"].n_unique()  # MovieLens users all have >= 20 ratings
    # time order within each user, ties in file order
    ev = raw.events.with_columns(pl.col("user").cast(pl.String), pl.col("item").cast(pl.String))
    u0 = ds.raw_users[0]
    expect = ev.filter(pl.col("user") == u0).sort("timestamp", "order")["item"].to_list()
    kept = set(tables.items["raw_id"].to_list())
    raw_of = tables.items["raw_id"].to_list()
    assert [raw_of[i] for i in ds.sequence(0)] == [i for i in expect if i in kept]
    test, valid, train = ds.eval_examples("test"), ds.eval_examples("valid"), ds.train_examples()
    assert len(test) == len(valid) == ds.num_users
    assert (test.target == ds.flat[ds.offsets[1:] - 1]).all()
    assert (valid.target == ds.flat[ds.offsets[1:] - 2]).all()
    # the valid target is the last history item of the test example; no train target is a valid/test one
    last = (test.history >= 0).sum(1) - 1
    assert (test.history[np.arange(len(test)), last] == valid.target).all()
    assert len(train) == int((ds.lengths - 3).sum())


def test_load_dataset_caches_atomically(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "sequential_data.txt").write_text("1 1 2 3 4\n2 2 3 4 1\n3 1 3 4\n9 1 2\n")
    ds = load_dataset("p5", path=str(tmp_path / "data"), min_count=1, cache_dir=str(tmp_path / "cache"),
                      verbose=False)
    assert (ds.num_users, ds.num_items) == (3, 4)
    assert load_tables(ds.path) is not None
    # a corrupt cache (e.g. a truncated parquet) is not reused but rebuilt
    (ds.path / "items.parquet").write_bytes(b"garbage")
    again = load_dataset("p5", path=str(tmp_path / "data"), min_count=1, cache_dir=str(tmp_path / "cache"),
                         verbose=False)
    assert again.num_items == 4 and load_tables(again.path) is not None
    # a changed input file gives a different cache folder
    import os
    import time
    (tmp_path / "data" / "sequential_data.txt").write_text("1 1 2 3 4\n2 2 3 4 1\n")
    os.utime(tmp_path / "data" / "sequential_data.txt", (time.time() + 5, time.time() + 5))
    changed = load_dataset("p5", path=str(tmp_path / "data"), min_count=1, cache_dir=str(tmp_path / "cache"),
                           verbose=False)
    assert changed.path != ds.path and changed.num_users == 2
    leftovers = [p.name for p in (tmp_path / "cache" / "processed").iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_save_tables_never_exposes_partial_folder(tmp_path, monkeypatch):
    tables = preprocess(_raw([[1, 2, 3], [2, 3, 4]]), PreprocessOptions(min_count=1))

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(pl.DataFrame, "write_parquet", boom)
    with pytest.raises(OSError):
        save_tables(tables, tmp_path / "ds")
    assert list(tmp_path.iterdir()) == []


def test_empty_history_is_rejected():
    with pytest.raises(ValueError, match="nothing is left"):
        preprocess(_raw([[1, 2]]), PreprocessOptions(min_count=1))


@pytest.mark.parametrize("as_int", [False, True])
def test_dedup_keeps_earliest_interaction(as_int):
    cast = int if as_int else str
    events = pl.DataFrame({"user": [cast(1)] * 5, "item": [cast(x) for x in (7, 8, 7, 9, 8)],
                           "timestamp": [5, 1, 0, 9, 3]}).with_columns(
        pl.col("timestamp").cast(pl.Int64), pl.int_range(pl.len(), dtype=pl.Int64).alias("order"))
    tables = preprocess(RawData("dup", events, empty_items()), PreprocessOptions(min_count=1))
    assert tables.stats["duplicates_removed"] == 2
    raw_of = tables.items["raw_id"].to_list()
    assert [raw_of[i] for i in tables.sequences["items"][0]] == ["7", "8", "9"]  # 7@0, 8@1, 9@9


def test_examples_sample_is_a_fixed_random_subset_in_order():
    from data.dataset import Examples

    n = 50
    ex = Examples(np.arange(n), np.arange(n * 3).reshape(n, 3), np.arange(n) * 7)
    a, b = ex.sample(10, seed=3), ex.sample(10, seed=3)
    assert np.array_equal(a.user, b.user) and len(a) == 10
    assert np.all(np.diff(a.user) > 0)  # distinct, original order
    assert np.array_equal(a.history, ex.history[a.user]) and np.array_equal(a.target, ex.target[a.user])
    assert not np.array_equal(a.user, np.arange(10))  # not simply the first ten
    assert not np.array_equal(ex.sample(10, seed=4).user, a.user)
    assert ex.sample(None) is ex and ex.sample(n + 5) is ex


def _previous_csv_reader(folder):
    """The CSV releases' ratings as the reader had them before its 32-bit ids and strict null
    check: i64 columns inferred by polars, the row index as ``order``."""
    events = pl.read_csv(folder / "ratings.csv").with_row_index("order").select(
        pl.col("userId").alias("user"), pl.col("movieId").alias("item"), "timestamp", pl.col("order").cast(pl.Int64))
    return RawData(name="movielens-32m", events=events, items=movielens.load("32m", path=folder).items)


@pytest.mark.parametrize("real", [False, True])
def test_csv_reader_gives_the_previous_splits(real, tmp_path, request):
    """ML-32M's reader (narrow dtypes) must not change what the model trains and is tested on."""
    if real:
        folder = request.getfixturevalue("shared_data") / "movielens" / "ml-latest-small"
    else:  # sparse ids, rows sorted by user then movie, timestamps out of order with ties
        rng = np.random.default_rng(0)
        users = np.repeat(np.arange(1, 41) * 7, 12)
        items = np.concatenate([np.sort(rng.choice(np.arange(1, 30) * 13, 12, replace=False)) for _ in range(40)])
        folder = tmp_path
        pl.DataFrame({"userId": users, "movieId": items, "rating": rng.integers(1, 11, len(users)) / 2,
                      "timestamp": rng.integers(100, 110, len(users))}).write_csv(folder / "ratings.csv")
        pl.DataFrame({"movieId": np.arange(1, 30) * 13, "title": "Heat (1995)", "genres": "Action"}) \
            .write_csv(folder / "movies.csv")
    new = preprocess(movielens.load("32m", path=folder))
    old = preprocess(_previous_csv_reader(folder))
    assert new.sequences.equals(old.sequences) and new.items.equals(old.items)
    a, b = (SeqDataset.from_tables("ml", t, max_history=5) for t in (new, old))
    pairs = [(a.train_examples().materialize(), b.train_examples().materialize())]
    pairs += [(a.eval_examples(split), b.eval_examples(split)) for split in ("valid", "test")]
    for x, y in pairs:
        assert all(np.array_equal(u, v) for u, v in zip(x, y))
    assert a.fingerprint() == b.fingerprint() and a.num_users > 1
