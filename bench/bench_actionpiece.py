"""Benchmark ActionPiece: vocabulary construction, SPR and deterministic segmentation.

    python bench/bench_actionpiece.py                       # Beauty, random 4x256 codes
    python bench/bench_actionpiece.py --embeddings emb.npy  # real OPQ features
    python bench/bench_actionpiece.py --mode faithful --out /tmp/actionpiece.json

Train split = each user's sequence minus its last 2 items (spec section 1). Without
``--features`` / ``--embeddings`` the item features are seeded pseudo-random 4 x 256 codes +
hash buckets (the shapes the spec's measurement of the official code used); the JSON then
says ``"features": "random"``. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.sources.p5 import read_sequences  # noqa: E402
from modules.actionpiece import features as F  # noqa: E402
from modules.actionpiece.tokenizer import ActionPieceTokenizer  # noqa: E402
from modules.actionpiece.vocab import learn_merges  # noqa: E402

DEFAULT_SEQ = Path(__file__).resolve().parents[2] / "shared/data/amazon2014/beauty/sequential_data.txt.gz"
MAX_HISTORY = 20


def load_sequences(path: Path) -> tuple[list[np.ndarray], int]:
    """P5 lines ``user item item ...`` -> per-user item_id arrays (P5 item id - 1)."""
    events = read_sequences(path)
    per_user = (events.with_columns(pl.col("item").cast(pl.Int64) - 1)
                .group_by("user", maintain_order=True).agg(pl.col("item")))
    seqs = [np.asarray(s, dtype=np.int64) for s in per_user["item"].to_list()]
    return seqs, int(max(s.max() for s in seqs)) + 1


def load_feature_json(path: Path, n_items: int) -> np.ndarray:
    obj = json.loads(Path(path).read_text())
    rows = {}
    for key, val in obj.items():
        if not str(key).isdigit():
            raise ValueError(f"{path}: item id {key!r} is not a P5 integer id")
        rows[int(key) - 1] = val
    missing = [i + 1 for i in range(n_items) if i not in rows]
    if missing:
        raise ValueError(f"{path}: no features for item {missing[0]} (and {len(missing) - 1} more)")
    width = {len(v) for v in rows.values()}
    if len(width) != 1:
        raise ValueError(f"{path}: items have different feature counts {sorted(width)}")
    return np.array([rows[i] for i in range(n_items)], dtype=np.int64)


def training_histories(train: list[np.ndarray]) -> np.ndarray:
    """Sliding windows of spec section 9: history s[max(0, i+1-20) : i+1] for each target."""
    rows = []
    for s in train:
        for i in range(len(s) - 1):
            h = s[max(0, i + 1 - MAX_HISTORY): i + 1]
            rows.append(np.pad(h, (0, MAX_HISTORY - len(h)), constant_values=-1))
    return np.stack(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sequences", type=Path, default=DEFAULT_SEQ)
    ap.add_argument("--features", type=Path, help="JSON {item id: [feature values]}")
    ap.add_argument("--embeddings", type=Path, help=".npy item text embeddings, row i = P5 item i+1")
    ap.add_argument("--mode", choices=["correct", "faithful"], default="correct")
    ap.add_argument("--vocab-size", type=int, default=40000)
    ap.add_argument("--out", type=Path, help="write the tokenizer JSON here")
    ap.add_argument("--n-hash-buckets", type=int, default=64)
    ap.add_argument("--seed", type=int, default=12345)
    ap.add_argument("--n-deterministic", type=int, default=2000,
                    help="test histories for the deterministic-segmentation timing")
    args = ap.parse_args()

    seqs, n_items = load_sequences(args.sequences)
    train = [s[:-2] for s in seqs if len(s) > 2]
    train_items = np.unique(np.concatenate(train))
    if args.features:
        feats, source = load_feature_json(args.features, n_items), str(args.features)
    elif args.embeddings:
        emb = np.load(args.embeddings)
        if len(emb) < n_items:
            raise ValueError(f"{args.embeddings}: {len(emb)} rows for {n_items} items")
        t0 = time.perf_counter()
        feats = F.item_features_from_embeddings(emb[:n_items], train_items, args.n_hash_buckets, seed=args.seed)
        print(f"features from embeddings: {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        source = str(args.embeddings)
    else:
        feats, source = F.random_item_features(n_items, n_hash_buckets=args.n_hash_buckets, seed=args.seed), "random"

    # Compile (or load from numba's cache) on a toy corpus so the timing below is the
    # algorithm's; the JIT cost is reported on its own.
    t0 = time.perf_counter()
    learn_merges(np.array([[1, 2], [1, 3]]), [[0, 1, 0]], 4, 2, progress=False)
    jit_seconds = time.perf_counter() - t0

    t0 = time.perf_counter()
    tok = ActionPieceTokenizer.train(feats, train, args.vocab_size, mode=args.mode,
                                     config={"features": source})
    vocab_seconds = time.perf_counter() - t0
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.out:
        tok.save_json(args.out)

    hist = training_histories(train)
    tok.spr(hist[:256], rng=0)  # compile
    t0 = time.perf_counter()
    seg = tok.spr(hist, rng=args.seed)
    spr_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    for start in range(0, len(hist), 256):
        tok.spr(hist[start:start + 256], rng=rng)
    spr_batched_seconds = time.perf_counter() - t0

    t0 = time.perf_counter()
    targets = [tok.encode_target(i) for i in range(n_items)]
    target_seconds = time.perf_counter() - t0
    test_hist = [s[-MAX_HISTORY - 1:-1] for s in seqs[: args.n_deterministic]]
    t0 = time.perf_counter()
    for h in test_hist:
        tok.encode_deterministic(h)
    det_seconds = time.perf_counter() - t0

    result = {
        "vocab_size": tok.vocab_size,
        "vocab_seconds": round(vocab_seconds, 2),
        "jit_seconds": round(jit_seconds, 2),
        "peak_rss_mb": round(peak_rss_mb, 1),
        "spr_examples_per_second": round(len(hist) / spr_seconds),
        "spr_batch256_examples_per_second": round(len(hist) / spr_batched_seconds),
        "spr_examples": len(hist),
        "spr_mean_tokens": round(float(seg.lengths.mean()), 2),
        "target_encodings_per_second": round(n_items / target_seconds),
        "mean_target_tokens": round(float(np.mean([len(t) for t in targets])), 3),
        "deterministic_histories_per_second": round(len(test_hist) / det_seconds, 1),
        "features": source,
        "mode": args.mode,
        "phantom_merges": tok.config["phantom_merges"],
        "n_init_feats": tok.n_init_feats,
        "train_sequences": len(train),
        "train_actions": int(sum(len(s) for s in train)),
        "n_items": n_items,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
