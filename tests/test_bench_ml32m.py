"""bench/bench_ml32m.py's synthetic ML-32M: the file must be in the real release's layout, or
its figures say nothing about the real file."""

import importlib.util
from pathlib import Path

import numpy as np
import polars as pl

from data.sources import movielens

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_ml32m.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_ml32m", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_synthetic_ml32m_has_the_release_layout(tmp_path):
    bench = _bench()
    shape = bench.make_synthetic_ml32m(tmp_path / "ml", rows=30_000, seed=1)
    folder = tmp_path / "ml"
    assert bench.make_synthetic_ml32m(folder, rows=30_000, seed=1) == shape  # made once, then reused
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ml"]  # no temp folder left behind
    lines = (folder / "ratings.csv").read_text().splitlines()
    assert lines[0] == "userId,movieId,rating,timestamp" and len(lines) == 30_001
    r = pl.read_csv(folder / "ratings.csv")
    assert r.select(pl.struct("userId", "movieId").is_unique().all()).item()  # no repeated pair
    assert r.equals(r.sort("userId", "movieId"))  # sorted by user, then movie, as released
    assert set(r["rating"].unique().to_list()) <= {x / 2 for x in range(1, 11)}
    assert r.group_by("userId").len()["len"].min() >= 20
    assert r["timestamp"].is_between(bench.FIRST_TS, bench.LAST_TS).all()
    # timestamps are not in file order within a user (the real file is sorted by movie), with ties
    by_time = r.sort("userId", "timestamp")
    assert not r["timestamp"].equals(by_time["timestamp"])
    same_user = by_time["userId"].diff().fill_null(1) == 0
    assert ((by_time["timestamp"].diff().fill_null(1) == 0) & same_user).any()
    raw = movielens.load("32m", path=folder)  # what the pipeline reads
    assert raw.events.height == 30_000 and raw.items.height == shape["movies"]
    items = raw.items
    assert items["title"].is_not_null().all() and not items["title"].str.contains(r"\(\d{4}\)$").any()
    assert items["year"].is_null().any() and items["year"].is_not_null().mean() > 0.9
    assert items["title"].str.starts_with("The ").any() and items["genres"].is_null().any()
    assert np.isin(raw.events["item"].unique().to_numpy(), items["raw_id"].cast(pl.Int64).to_numpy()).all()
