"""Paired comparison of two runs on the same test users: B minus A, per metric, with its paired
bootstrap 95% interval over users (modules/intervals.py).

    python bench/compare_runs.py A.json B.json [--part test|valid|test_history_removed]

Each result JSON's per-user ranks are read from ``<json stem>.ranks.npz`` beside it (what a
train script writes as ``result.ranks.npz`` and ``results/<name>.ranks.npz`` holds for a
committed ``results/<name>.json``), else from the file its ``ranks_file`` names (relative to
the JSON's folder). Runs on another split (other data, another held-out item set), other users
or other targets cannot be paired: the script says why and exits with code 2 (as it does when a
ranks file is missing). A difference whose interval excludes 0 is B better (above 0) or worse.
The last stdout line is one JSON object: ``{"ndcg@10": {"diff": d, "low": l, "high": h}, ...}``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modules.intervals import RESAMPLES, RunRanks, metrics_from_ranks, paired_bootstrap, ranks_path  # noqa: E402

REFUSED = 2


class Refused(Exception):
    pass


def load_run(json_path: str | Path) -> RunRanks:
    json_path = Path(json_path)
    if not json_path.is_file():
        raise Refused(f"{json_path}: no such result JSON")
    beside = ranks_path(json_path)
    if beside.is_file():
        return RunRanks.load(beside)
    named = json.loads(json_path.read_text()).get("ranks_file")
    if named and (json_path.parent / named).is_file():
        return RunRanks.load(json_path.parent / named)
    raise Refused(f"{json_path}: no per-user ranks ({beside.name} beside it"
                  f"{'' if not named else f', nor {named} named by its ranks_file'}); runs before ranks "
                  "files existed cannot be paired")


def paired_parts(a: RunRanks, b: RunRanks, part: str, names=("A", "B")) -> tuple[np.ndarray, np.ndarray]:
    """The two runs' ranks of ``part``, after checking that they rank the same users' same targets
    on the same split (else :class:`Refused`)."""
    for run, name in zip((a, b), names):
        if part not in run.parts:
            raise Refused(f"{name} has no '{part}' ranks (it has: {', '.join(sorted(run.parts))})")
    if a.split != b.split:
        raise Refused(f"different data split: A's split fingerprint {a.split}, B's {b.split} (other data or "
                      "another held-out item set); their users' ranks cannot be paired")
    (ra, ua, ta), (rb, ub, tb) = a.parts[part], b.parts[part]
    if len(ua) != len(ub) or not np.array_equal(ua, ub):
        raise Refused(f"different {part} users: A has {len(ua):,}, B has {len(ub):,}"
                      f"{' (same count, other users or order)' if len(ua) == len(ub) else ''}")
    if not np.array_equal(ta, tb):
        raise Refused(f"different {part} targets for the same users ({int((ta != tb).sum()):,} of {len(ta):,} differ)")
    return ra, rb


def compare(a_json, b_json, part: str = "test", resamples: int = RESAMPLES, seed: int = 0):
    """(B - A per metric with its interval, A's metrics, B's metrics, user count) from the ranks."""
    ra, rb = paired_parts(load_run(a_json), load_run(b_json), part)
    return (paired_bootstrap(ra, rb, resamples=resamples, seed=seed), metrics_from_ranks(ra),
            metrics_from_ranks(rb), len(ra))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", help="result JSON of run A (the base)")
    ap.add_argument("b", help="result JSON of run B (the difference is B - A)")
    ap.add_argument("--part", default="test", choices=("test", "valid", "test_history_removed"))
    ap.add_argument("--resamples", type=int, default=RESAMPLES)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        diff, ma, mb, n = compare(args.a, args.b, args.part, args.resamples, args.seed)
    except Refused as e:
        print(f"compare_runs: refused: {e}", file=sys.stderr)
        return REFUSED
    print(f"{args.part}, {n:,} users, B - A with paired bootstrap 95% intervals ({args.resamples} resamples, "
          f"seed {args.seed})\n  A = {args.a}\n  B = {args.b}")
    for k, d in diff.items():
        sign = "B better" if d["low"] > 0 else "A better" if d["high"] < 0 else "no difference shown"
        print(f"  {k:>10}: A {ma[k]:.4f}  B {mb[k]:.4f}  B - A {d['diff']:+.4f} "
              f"[{d['low']:+.4f}, {d['high']:+.4f}]  {sign}")
    print(json.dumps(diff), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
