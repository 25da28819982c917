"""Time the data pipeline: real Beauty (P5 + item file) and a synthetic ML-32M-size ratings.csv.

    python bench/bench_data.py                    # Beauty from ../shared/data + 32M synthetic rows
    python bench/bench_data.py --rows 2000000     # smaller synthetic run

The synthetic file has ML-32M's shape (32,000,204 rows, 200,948 users, 87,585 movies, the
real CSV header, heavy-tailed user activity and item popularity, no duplicate pairs), made
once with a fixed seed into a temp folder and reused. Each pipeline run (parse -> dedup ->
5-core -> remap -> leave-one-out -> parquet cache) happens in a fresh child process with a
fresh cache, so its peak RSS is measured alone. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parents[1]
BEAUTY = ROOT.parent / "shared" / "data" / "amazon2014" / "beauty"
ML32M = dict(rows=32_000_204, users=200_948, items=87_585)


def make_synthetic_ml(folder: Path, rows: int, seed: int = 0) -> Path:
    """ratings.csv + movies.csv in the ML-32M layout; skipped when already made."""
    done = folder / "DONE"
    if done.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    scale = rows / ML32M["rows"]
    n_users, n_items = max(100, int(ML32M["users"] * scale ** 0.5)), max(100, int(ML32M["items"] * scale ** 0.5))
    # user activity: at least 20 ratings (as in MovieLens), lognormal tail
    activity = 20 + rng.lognormal(mean=3.5, sigma=1.2, size=n_users)
    # oversample by 25%, drop duplicate pairs, then keep exactly ``rows`` of them at random
    per_user = np.minimum(np.round(activity / activity.sum() * rows * 1.25).astype(np.int64), n_items // 2)
    users = np.repeat(np.arange(1, n_users + 1, dtype=np.int64), per_user)
    popularity = 1.0 / np.arange(1, n_items + 1) ** 0.9
    items = rng.choice(n_items, size=len(users), p=popularity / popularity.sum()) + 1
    # drop duplicate (user, item) pairs as MovieLens has none, keeping file order by user
    key = np.unique(users * (n_items + 1) + items)
    if len(key) > rows:
        key = np.sort(rng.choice(key, size=rows, replace=False))
    users, items = key // (n_items + 1), key % (n_items + 1)
    ratings = rng.integers(1, 11, size=len(users)) / 2.0
    timestamps = rng.integers(789_652_009, 1_697_164_242, size=len(users))
    pl.DataFrame({"userId": users, "movieId": items, "rating": ratings, "timestamp": timestamps}) \
        .write_csv(folder / "ratings.csv")
    movie_ids = np.arange(1, n_items + 1)
    pl.DataFrame({"movieId": movie_ids, "title": [f"Movie {i} ({1950 + i % 70})" for i in movie_ids],
                  "genres": ["Drama|Comedy" if i % 2 else "Action" for i in movie_ids]}) \
        .write_csv(folder / "movies.csv")
    done.write_text(json.dumps({"rows": len(users), "users": n_users, "items": n_items, "seed": seed}))
    return folder


def run_child(code: str) -> tuple[dict, float]:
    """Run ``code`` in a fresh Python; return its last-line JSON and its peak RSS (MB)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"child failed with code {proc.returncode}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # max over finished children, in KB
    return json.loads(proc.stdout.strip().splitlines()[-1]), max(peak, before) / 1024


PIPELINE = """
import json, time, warnings
warnings.simplefilter("ignore")
from data.prepare import load_dataset
t0 = time.time()
ds = load_dataset({source!r}, path={path!r}, items={items!r}, version={version!r}, cache_dir={cache!r}, verbose=False)
n_train = len(ds.train_examples()); ds.eval_examples("test")
print(json.dumps(dict(seconds=time.time() - t0, users=ds.num_users, items=ds.num_items,
                      interactions=int(len(ds.flat)), train_examples=n_train)))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=ML32M["rows"])
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "sidrec-bench-data"))
    ap.add_argument("--skip-beauty", action="store_true")
    a = ap.parse_args()
    work = Path(a.workdir)
    out: dict = {"machine_cores": os.cpu_count()}

    if not a.skip_beauty and BEAUTY.is_dir():
        with tempfile.TemporaryDirectory() as cache:
            res, rss = run_child(PIPELINE.format(source="p5", path=str(BEAUTY), version=None, cache=cache,
                                                 items=str(BEAUTY / "Amazon_Beauty.item.gz")))
        out.update(beauty_seconds=round(res["seconds"], 2), beauty_peak_rss_mb=round(rss),
                   beauty_users=res["users"], beauty_items=res["items"], beauty_interactions=res["interactions"])

    t0 = time.time()
    folder = make_synthetic_ml(work / f"ml32m-synth-{a.rows}", a.rows)
    out["ml32m_generate_seconds"] = round(time.time() - t0, 2)
    with tempfile.TemporaryDirectory(dir=work) as cache:
        res, rss = run_child(PIPELINE.format(source="movielens", path=str(folder), items=None, version="32m",
                                             cache=cache))
    out.update(ml32m_rows=json.loads((folder / "DONE").read_text())["rows"], ml32m_seconds=round(res["seconds"], 2),
               ml32m_peak_rss_mb=round(rss), ml32m_users=res["users"], ml32m_items=res["items"],
               ml32m_interactions=res["interactions"], ml32m_train_examples=res["train_examples"])
    print(json.dumps(out))


if __name__ == "__main__":
    main()
