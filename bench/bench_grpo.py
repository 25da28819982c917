"""Benchmark of GRPO candidate generation: candidates per second at G = 16 per user.

TIGER-size T5 (random weights, eval mode, fp32), synthetic Beauty-sized codes as in
bench/bench_decoder.py (12,101 items, 4 levels of 256/256/256/8), 20-item random histories,
hashed user tokens (2000 buckets). Times (a) trie-constrained sampling (temperature 1, no
top-k) and (b) constrained beam search of width G, each on ``--users`` users x G, and one
full GRPO step (generation + teacher-forced policy and reference passes + backward) for scale.

    OMP_NUM_THREADS=1 python bench/bench_grpo.py [--device cpu|cuda] [--users 32] [--group 16]

The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_decoder import keep_freed_memory, synthetic_codes  # noqa: E402
from modules.beam_search import PrefixTrie  # noqa: E402
from modules.grpo import grpo_batch_loss  # noqa: E402
from modules.sampling import beam_candidates, sample_items  # noqa: E402
from modules.tokens import TokenLayout  # noqa: E402
from modules.transformers.t5 import T5, T5Config  # noqa: E402


def timed(fn, repeats: int) -> float:
    """Median seconds of ``repeats`` calls after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--users", type=int, default=32)
    ap.add_argument("--group", type=int, default=16)
    ap.add_argument("--items", type=int, default=12_101)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    keep_freed_memory()
    dev = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    sizes = (256, 256, 256, 8)
    codes = synthetic_codes(args.items, sizes, g).to(dev)
    layout = TokenLayout(sizes, num_user_buckets=2000)
    trie = PrefixTrie(codes, sizes).to(dev)
    torch.manual_seed(0)
    model = T5(T5Config(vocab_size=layout.vocab_size, output_vocab_size=layout.output_vocab_size)).to(dev).eval()
    reference = copy.deepcopy(model).requires_grad_(False)
    history = torch.randint(0, args.items, (args.users, 20), generator=g).to(dev)
    user = torch.arange(args.users, device=dev)
    target = torch.randint(0, args.items, (args.users,), generator=g).to(dev)
    input_ids, mask = layout.encode_history(history, codes, user)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def sample():
        sample_items(model, input_ids, mask, trie, layout, args.group)
        sync()

    def beam():
        beam_candidates(model, input_ids, mask, trie, layout, args.group)
        sync()

    def step():
        grpo_batch_loss(model, reference, layout, codes, trie, history, target, user, mode="sample",
                        group_size=args.group).loss.backward()
        sync()

    n = args.users * args.group
    t_sample, t_beam, t_step = (timed(f, args.repeats) for f in (sample, beam, step))
    print(json.dumps({
        "device": str(dev) if dev.type != "cuda" else torch.cuda.get_device_name(dev),
        "threads": torch.get_num_threads(), "users": args.users, "group_size": args.group, "items": args.items,
        "sample_candidates_per_s": round(n / t_sample, 1), "beam_candidates_per_s": round(n / t_beam, 1),
        "grpo_step_seconds": round(t_step, 3), "grpo_step_candidates_per_s": round(n / t_step, 1),
    }), flush=True)


if __name__ == "__main__":
    main()
