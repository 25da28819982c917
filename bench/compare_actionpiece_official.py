"""Faithful-mode ActionPiece vocabulary vs the plain-Python port of the official code.

    python bench/compare_actionpiece_official.py                # Beauty, 10,000 merges
    python bench/compare_actionpiece_official.py --merges 500

Learns ``--merges`` rules on the Beauty train split (each user's sequence minus its last 2
items, spec section 1) with seeded pseudo-random 4 x 256 codes + 64 hash buckets (as
``bench_actionpiece.py``), once with ``learn_merges(mode="faithful")`` and once with
``modules.actionpiece.official_port``, and compares what the tokenizer stores: ``token2feat``
(the rule pairs) and ``priority`` (bit for bit). The port costs about what the official code
does (spec section 14: ~1,400 s for 10,000 merges on 2 cores; measured here: 939 s). The
last line printed is one JSON object; ``first_divergence`` is the index of the first
differing merge (null if none).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_actionpiece import DEFAULT_SEQ, load_sequences  # noqa: E402
from modules.actionpiece import features as F  # noqa: E402
from modules.actionpiece.official_port import official_merges  # noqa: E402
from modules.actionpiece.tokenizer import ActionPieceTokenizer  # noqa: E402
from modules.actionpiece.vocab import learn_merges  # noqa: E402


def first_divergence(pairs_a, pri_a, pairs_b, pri_b) -> int | None:
    for i, (pa, qa, pb, qb) in enumerate(zip(pairs_a, pri_a, pairs_b, pri_b)):
        if tuple(pa) != tuple(pb) or qa != qb:  # floats compared exactly
            return i
    return None if len(pairs_a) == len(pairs_b) else min(len(pairs_a), len(pairs_b))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sequences", type=Path, default=DEFAULT_SEQ)
    ap.add_argument("--merges", type=int, default=10000)
    ap.add_argument("--n-hash-buckets", type=int, default=64)
    ap.add_argument("--seed", type=int, default=12345)
    args = ap.parse_args()

    seqs, n_items = load_sequences(args.sequences)
    train = [s[:-2] for s in seqs if len(s) > 2]
    feats = F.random_item_features(n_items, n_hash_buckets=args.n_hash_buckets, seed=args.seed)
    token2feat, n_init = ActionPieceTokenizer.initial_vocab(feats)
    items = ActionPieceTokenizer._feature_tokens(token2feat, feats)

    learn_merges(np.array([[1, 2], [1, 3]]), [[0, 1, 0]], 4, 2, mode="faithful", progress=False)  # JIT
    t0 = time.perf_counter()
    fast = learn_merges(items, train, n_init, args.merges, mode="faithful")
    faithful_seconds = time.perf_counter() - t0

    t0 = time.perf_counter()
    port = official_merges([[tuple(items[i].tolist()) for i in s] for s in train], n_init, args.merges)
    port_seconds = time.perf_counter() - t0

    fast_pairs = [tuple(int(x) for x in p) for p in fast.pairs]
    div = first_divergence(fast_pairs, fast.priorities.tolist(), port.pairs, port.priorities)
    print(json.dumps({
        "merges_compared": min(len(fast_pairs), len(port.pairs)),
        "first_divergence": div,
        "port_seconds": round(port_seconds, 1),
        "faithful_seconds": round(faithful_seconds, 2),
        "phantom_merges": int(fast.phantom.sum()),
        "port_phantom_merges": int(sum(port.phantom)),
        "official_assert_failures": len(port.reappearances),
        "first_official_assert_merge": port.reappearances[0][0] if port.reappearances else None,
        "train_sequences": len(train),
        "n_init_feats": n_init,
        "features": "random",
    }))


if __name__ == "__main__":
    main()
