"""ML-32M at full size: data preparation (seconds, peak RSS) and T5 training throughput.

    OMP_NUM_THREADS=1 python bench/bench_ml32m.py                 # 32,000,000 rows
    OMP_NUM_THREADS=1 python bench/bench_ml32m.py --rows 2000000  # a quicker, smaller run

The real ml-32m.zip cannot be fetched here, so a synthetic file in its exact layout is made
once per (rows, seed) under ``$SIDREC_CACHE/bench`` (default ``/tmp/sidrec-bench``) and reused:
``ratings.csv`` (``userId,movieId,rating,timestamp``, header, rows sorted by user then movie
as in the release, ratings 0.5..5.0 in 0.5 steps with ml-latest-small's frequencies) and
``movies.csv`` (``movieId,title,genres``, quoted titles with commas, years in the title,
pipe-separated genres, some titles without a year and some "(no genres listed)"). Shape:
~200k users with >= 20 ratings each and a heavy tail (lognormal), ~87.6k sparse movie ids with
Zipf-Mandelbrot popularity (p ∝ (rank + 500)^-2: the top movie rated by ~1 in 4 users, and
a long tail that the 5-core filter trims), no repeated (user, movie) pair, each user's
timestamps a non-decreasing timeline (sessions of seconds-apart ratings, with ties, separated
by weeks) handed out to the user's movies in random order, since the file is sorted by movie.

Three stages, each in its own child process so that one's memory never counts for another:
1. generate (skipped when the files exist);
2. prepare: ``data.prepare.load_dataset`` on the folder with the ml32m config's options
   (``configs/data/ml32m.gin``: 5-core, history 20) into a fresh cache, then the leave-one-out
   splits (train examples, valid and test): wall seconds and the child's peak RSS;
3. train: ``train_decoder.py``'s T5 training step (sliding windows, ``configs/decoder_ml32m.gin``
   sizes, batch, chunking, AdamW, grad clip) on the prepared dataset, with RANDOM unique
   4-level item codes (no tokenizer is trained here): examples/s in fp32 and bf16 autocast,
   reported for the faster one, as ``train_decoder.precision = 'auto'`` would pick.

The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repo's packages (data, modules) for the stages run as children
ML32M = dict(rows=32_000_204, users=200_948, items=87_585, max_movie_id=292_757)
# ml-latest-small's rating frequencies for 0.5, 1.0, ..., 5.0
RATING_SHARES = np.array([1370, 2811, 1791, 7551, 5550, 20047, 13136, 26818, 8551, 13211], dtype=np.float64)
GENRES = ["Action", "Adventure", "Animation", "Children", "Comedy", "Crime", "Documentary", "Drama", "Fantasy",
          "Film-Noir", "Horror", "IMAX", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western"]
FIRST_TS, LAST_TS = 789_652_009, 1_697_164_242  # ML-32M's first and last rating


def default_workdir() -> Path:
    cache = os.environ.get("SIDREC_CACHE")
    return Path(cache) / "bench" if cache else Path(tempfile.gettempdir()) / "sidrec-bench"


# --------------------------------------------------------------------------------------------
# 1. the synthetic ml-32m folder


def _user_counts(rng: np.random.Generator, rows: int, n_users: int, cap: int) -> np.ndarray:
    """Ratings per user: >= 20 (as in MovieLens), a lognormal tail, at most ``cap``, summing to ``rows``."""
    counts = np.full(n_users, 20, dtype=np.int64)
    weight = rng.lognormal(mean=4.1, sigma=1.3, size=n_users)  # ML-32M: mean ~159, median ~70
    left = rows - counts.sum()
    while left > 0:  # hand out what is left by weight; users at the cap take no more
        w = np.where(counts < cap, weight, 0.0)
        counts += np.minimum(rng.multinomial(left, w / w.sum()), cap - counts)
        left = rows - counts.sum()
    return counts


def _distinct_items(rng: np.random.Generator, counts: np.ndarray, n_items: int) -> tuple[np.ndarray, np.ndarray]:
    """(user, item) rows, sorted by user then item, ``counts[u]`` distinct items per user drawn
    by popularity (without replacement). Draws with replacement and tops up what repeats cost;
    each round oversamples a user by the inverse of its last hit rate (a user with 20,000
    ratings hits a new movie in 1 of ~40 draws by the end), keeping a random ``need`` of them."""
    rank = np.arange(n_items, dtype=np.float64)
    cdf = np.cumsum((rank + 500.0) ** -2.0)
    cdf /= cdf[-1]
    popular = rng.permutation(n_items)  # popularity rank -> item index
    chunks: list[np.ndarray] = []  # disjoint sorted arrays of user * n_items + item
    need = counts.copy()
    draws_per_hit = np.ones(len(counts))
    for _ in range(60):
        draws = np.ceil(need * draws_per_hit).astype(np.int64)
        users = np.repeat(np.arange(len(need), dtype=np.int64), draws)
        items = popular[np.searchsorted(cdf, rng.random(len(users)), side="right").clip(max=n_items - 1)]
        new = np.unique(users * n_items + items)
        for chunk in chunks:  # drop pairs of earlier rounds (no re-sort of the big first one)
            pos = np.searchsorted(chunk, new).clip(max=len(chunk) - 1)
            new = new[chunk[pos] != new]
        got = np.bincount(new // n_items, minlength=len(need))
        if (got > need).any():  # oversampled: keep a random ``need`` of each user's new items
            user = new // n_items
            order = np.lexsort((rng.random(len(new)), user))
            rank_in_user = np.arange(len(new)) - np.searchsorted(user, user[order])
            new = np.sort(new[order][rank_in_user < need[user[order]]])
            got = np.minimum(got, need)
        chunks.append(new)
        draws_per_hit = np.clip(draws / np.maximum(got, 1), 1.0, 100.0) * 1.2
        need -= got
        if not need.any():
            keys = np.sort(np.concatenate(chunks))
            return keys // n_items, keys % n_items
    raise RuntimeError("bench_ml32m: could not draw distinct items (too many ratings per user for the catalogue)")


def _timestamps(rng: np.random.Generator, user: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Per user a non-decreasing timeline (gaps of seconds within a session, ties included, and of
    weeks between sessions, 1 in 10 ratings starts one) inside ML-32M's time range, handed out
    to the user's rows in random order."""
    n = len(user)
    gaps = np.where(rng.random(n) < 0.1, rng.exponential(30 * 86400.0, n), rng.exponential(6.0, n)).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    gaps[starts] = 0
    timeline = np.cumsum(gaps)
    timeline -= np.repeat(timeline[starts], counts)  # each user's timeline starts at 0
    span = timeline[np.cumsum(counts) - 1]
    # Heavy users' sessions would outlast the release: squeeze their timelines into its range.
    squeeze = np.minimum(1.0, (LAST_TS - FIRST_TS) / np.maximum(span, 1))
    timeline = (timeline * np.repeat(squeeze, counts)).astype(np.int64)
    span = np.minimum(span, LAST_TS - FIRST_TS)
    first = FIRST_TS + (rng.random(len(counts)) * (LAST_TS - FIRST_TS - span)).astype(np.int64)
    timeline += np.repeat(first, counts)
    order = np.lexsort((rng.random(n), user))  # rows of each user in a random order
    out = np.empty(n, dtype=np.int64)
    out[order] = timeline
    return out


def _movies(rng: np.random.Generator, movie_ids: np.ndarray):
    import polars as pl

    n = len(movie_ids)
    years = rng.integers(1902, 2024, n)
    kind = rng.random(n)
    # Titles as in movies.csv: "Name (1995)", "Name, The (1995)" (needs quoting), alternative
    # titles in parentheses, a few without a year, series with a year range, trailing spaces.
    base = [f"Movie {i}" for i in movie_ids]
    titles = []
    for i, (b, y, k) in enumerate(zip(base, years, kind)):
        if k < 0.15:
            titles.append(f"{b}, The ({y})")
        elif k < 0.20:
            titles.append(f"{b} (Film {i}, La) ({y})")
        elif k < 0.21:
            titles.append(b)
        elif k < 0.215:
            titles.append(f"{b} ({y}–{y + 2})")
        elif k < 0.22:
            titles.append(f"{b} ({y}) ")
        else:
            titles.append(f"{b} ({y})")
    n_genres = rng.integers(1, 4, n)
    genre_idx = rng.integers(0, len(GENRES), (n, 3))
    genres = ["|".join(dict.fromkeys(GENRES[g] for g in row[:k])) for row, k in zip(genre_idx, n_genres)]
    genres = ["(no genres listed)" if r < 0.08 else g for g, r in zip(genres, rng.random(n))]
    return pl.DataFrame({"movieId": movie_ids, "title": titles, "genres": genres})


def make_synthetic_ml32m(folder: Path, rows: int, seed: int = 0) -> dict:
    """Write the folder (atomically: a temp folder renamed at the end); return its shape."""
    import polars as pl

    done = folder / "shape.json"
    if done.is_file():
        return json.loads(done.read_text())
    t0 = time.time()
    rng = np.random.default_rng(seed)
    scale = rows / ML32M["rows"]
    n_users = max(10, round(ML32M["users"] * scale))
    n_items = max(200, round(ML32M["items"] * min(1.0, scale) ** 0.5))
    movie_ids = np.sort(rng.choice(np.arange(1, round(n_items * ML32M["max_movie_id"] / ML32M["items"]) + 1),
                                   n_items, replace=False))  # sparse ids, as in the release
    counts = _user_counts(rng, rows, n_users, cap=n_items // 4)
    user, item = _distinct_items(rng, counts, n_items)
    timestamp = _timestamps(rng, user, counts)
    rating = rng.choice(np.arange(1, 11), size=rows, p=RATING_SHARES / RATING_SHARES.sum()) / 2.0
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        pl.DataFrame({"userId": (user + 1).astype(np.int32), "movieId": movie_ids[item].astype(np.int32),
                      "rating": rating, "timestamp": timestamp}).write_csv(tmp / "ratings.csv")
        del user, item, timestamp, rating
        _movies(rng, movie_ids).write_csv(tmp / "movies.csv")
        shape = {"rows": rows, "users": n_users, "movies": n_items, "seed": seed,
                 "ratings_csv_bytes": (tmp / "ratings.csv").stat().st_size,
                 "generate_seconds": round(time.time() - t0, 1)}
        (tmp / "shape.json").write_text(json.dumps(shape))
        if folder.exists():  # a stale incomplete folder under our name
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return shape


# --------------------------------------------------------------------------------------------
# 2. data preparation, 3. training throughput (each run as a child: --stage prepare|train)


def _dataset_bindings(folder: Path, cache: Path) -> list[str]:
    """The ml32m configs' load_dataset, pointed at the synthetic folder and a bench cache."""
    return [f"load_dataset.path = '{folder}'", f"load_dataset.cache_dir = '{cache}'", "load_dataset.verbose = False"]


def stage_prepare(folder: Path, cache: Path) -> dict:
    import gin

    from data.prepare import load_dataset

    gin.parse_config_files_and_bindings([str(ROOT / "configs/data/ml32m.gin")], _dataset_bindings(folder, cache))
    t0, cpu0 = time.perf_counter(), _cpu_seconds()
    ds = load_dataset()  # read, dedup, 5-core, sort, remap, parquet cache
    train, valid, test = ds.train_examples(), ds.eval_examples("valid"), ds.eval_examples("test")
    seconds = time.perf_counter() - t0
    return {"prep_seconds": round(seconds, 1), "prep_cpu_seconds": round(_cpu_seconds() - cpu0, 1),
            "users": ds.num_users, "items": ds.num_items,
            "interactions": int(len(ds.flat)), "train_examples": len(train), "valid_users": len(valid),
            "test_users": len(test), "peak_rss_gb": round(_maxrss_gb(), 2)}


def _bound(name: str, fn):
    """A train_decoder parameter as the gin config binds it (macros resolved), else its default."""
    import inspect

    import gin

    try:
        value = gin.query_parameter(f"{fn.__name__}.{name}")
    except ValueError:
        return inspect.signature(fn).parameters[name].default
    return value.scoped_configurable_fn() if isinstance(value, gin.config.ConfigurableReference) else value


def stage_train(folder: Path, cache: Path, steps: int, warmup: int) -> dict:
    import gin
    import torch

    import train_decoder as td
    from bench_decoder import synthetic_codes
    from data.prepare import load_dataset
    from modules.decoder_models import build_model
    from modules.objectives import sliding_window_loss
    from modules.tokens import TokenLayout
    from modules.training import make_optimizer, warmup_cosine

    gin.parse_config_files_and_bindings([str(ROOT / "configs/decoder_ml32m.gin")], _dataset_bindings(folder, cache))
    fn = td.train_decoder
    if _bound("architecture", fn) != "t5" or _bound("train_mode", fn) != "sliding":
        raise SystemExit("bench_ml32m: configs/decoder_ml32m.gin no longer trains a sliding-window T5; "
                         "update the bench")
    batch_size, chunk = _bound("batch_size", fn), _bound("train_chunk", fn)
    torch.manual_seed(0)
    ds = load_dataset()  # the cache stage 2 wrote
    # What train_rqvae.py makes with configs/tokenizer: 3 levels of 256 codes + a 256-code dedup level.
    sizes = (256, 256, 256, 256)
    codes = synthetic_codes(ds.num_items, sizes, torch.Generator().manual_seed(0))
    layout = TokenLayout(sizes, num_user_buckets=_bound("num_user_buckets", fn))
    model = build_model("t5", layout, ds)
    optimizer = make_optimizer(model, _bound("lr", fn), _bound("weight_decay", fn))
    scheduler = warmup_cosine(optimizer, _bound("warmup_steps", fn), _bound("max_steps", fn))
    train = ds.train_examples()
    rng = np.random.default_rng(0)
    grad_clip = _bound("grad_clip", fn)

    def step(amp) -> None:  # train_decoder.py's sliding-window step and modules/training.py's update
        batch = train.batch(rng.choice(len(train), batch_size, replace=False))
        total, count = sliding_window_loss(model, layout, codes, torch.as_tensor(batch.history),
                                           torch.as_tensor(batch.target), torch.as_tensor(batch.user), amp, chunk)
        optimizer.zero_grad(set_to_none=True)
        (total / count).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        scheduler.step()

    model.train()
    out = {"train_batch_size": batch_size, "train_chunk": chunk, "train_steps_timed": steps,
           "parameters": sum(p.numel() for p in model.parameters()), "torch_threads": torch.get_num_threads()}
    for name, amp in (("fp32", None), ("bf16", torch.bfloat16)):
        for _ in range(warmup):
            step(amp)
        t0 = time.perf_counter()
        for _ in range(steps):
            step(amp)
        out[f"examples_per_second_{name}"] = round(steps * batch_size / (time.perf_counter() - t0), 1)
    return out


def _cpu_seconds() -> float:
    """CPU time of this process, all threads: on a shared machine a steadier figure than wall time."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _maxrss_gb() -> float:
    """This process's peak RSS. A stage reports its own: the parent's RUSAGE_CHILDREN would be
    the maximum over all children, the generator's included."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux


def _child(stage: str, args: list[str]) -> dict:
    """Run one stage in a fresh interpreter (the parent stays small: it imports numpy only);
    its last stdout line, JSON."""
    proc = subprocess.run([sys.executable, __file__, "--stage", stage, *args], cwd=ROOT, stdout=subprocess.PIPE,
                          text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench_ml32m: stage {stage} failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine() -> dict:
    import polars as pl

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    except (OSError, StopIteration, ValueError):
        mem_gb = None
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": None if mem_gb is None else round(mem_gb, 1),
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "python": platform.python_version(), "polars": pl.__version__, "numpy": np.__version__}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=32_000_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=default_workdir(), help="where the synthetic files live")
    ap.add_argument("--train-steps", type=int, default=20, help="timed T5 steps per precision")
    ap.add_argument("--train-warmup", type=int, default=3, help="untimed steps before them")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--stage", choices=["generate", "prepare", "train"], help=argparse.SUPPRESS)
    ap.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.stage == "generate":
        print(json.dumps(make_synthetic_ml32m(a.folder, a.rows, a.seed)))
        return
    if a.stage == "prepare":
        print(json.dumps(stage_prepare(a.folder, a.cache)))
        return
    if a.stage == "train":
        print(json.dumps(stage_train(a.folder, a.cache, a.train_steps, a.train_warmup)))
        return

    folder = a.workdir / f"ml-32m-synthetic-{a.rows}-seed{a.seed}"
    shape = _child("generate", ["--folder", str(folder), "--rows", str(a.rows), "--seed", str(a.seed)])
    out: dict = {"rows": shape["rows"], "synthetic": True, "folder": str(folder)}
    cache = Path(tempfile.mkdtemp(prefix="prep-", dir=a.workdir))  # fresh: the preparation really runs
    try:
        prep = _child("prepare", ["--folder", str(folder), "--cache", str(cache)])
        out.update(prep_seconds=prep.pop("prep_seconds"), peak_rss_gb=prep.pop("peak_rss_gb"), **prep)
        if not a.skip_train:
            train = _child("train", ["--folder", str(folder), "--cache", str(cache), "--train-steps",
                                        str(a.train_steps), "--train-warmup", str(a.train_warmup)])
            best = max(("fp32", "bf16"), key=lambda p: train[f"examples_per_second_{p}"])
            out.update(examples_per_second=train[f"examples_per_second_{best}"], train_precision=best,
                       train_item_codes="random unique 256x256x256x256 codes (no tokenizer trained)", **train)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    out.update(generate_seconds=shape["generate_seconds"], ratings_csv_mb=round(shape["ratings_csv_bytes"] / 1e6),
               machine=machine())
    print(json.dumps(out))


if __name__ == "__main__":
    main()
