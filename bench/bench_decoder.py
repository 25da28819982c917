"""Benchmark of the TIGER-size T5 recommender: training throughput and constrained beam search.

Synthetic Beauty-sized inputs (12,101 items with random unique 4-level codes of sizes
256/256/256/8, or the item_codes of ``--codes``), 20-item random histories, hashed user
tokens (2000 buckets). Measures
  (a) training: examples/s of forward + backward + AdamW step at ``--batch-size``;
  (b) constrained beam search: users/s at beam 20 (top 10) and beam 50 (top 20), eval mode,
      ``--users`` users per call;
and the peak RSS (after beam 20, after beam 50, and at the end: they run in that order), and how
idle the machine's CPUs were just before and after (other processes distort CPU timings).

    python bench/bench_decoder.py [--device cpu|cuda] [--batch-size 256] [--users 256]
    python bench/bench_decoder.py --prune-after 2 --keep-ratio 1/3   # with RASTP token pruning

The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import platform
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modules.beam_search import PrefixTrie, beam_search  # noqa: E402
from modules.tokens import TokenLayout  # noqa: E402
from modules.training import autocast_dtype  # noqa: E402
from modules.transformers.generation import shift_right  # noqa: E402
from modules.transformers.t5 import T5, T5Config, keep_fraction  # noqa: E402


def keep_freed_memory() -> None:
    """Ask glibc to reuse freed blocks instead of returning them to the OS.

    Activations of a few MB each are allocated and freed every step; by default glibc serves
    them with fresh mmaps, and the page faults cost more than the matmuls that fill them
    (measured: up to 1.7x slower steps on 2 cores). Process-wide, so it belongs to a main.
    """
    if platform.system() != "Linux":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 1 << 30)
    libc.mallopt(m_trim_threshold, 1 << 31)


def synthetic_codes(num_items: int, sizes: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Random unique code rows (the first num_items distinct rows of a random draw)."""
    rows = torch.stack([torch.randint(0, s, (num_items * 2,), generator=generator) for s in sizes], dim=1)
    key = torch.zeros(len(rows), dtype=torch.long)
    for level, s in enumerate(sizes):
        key = key * s + rows[:, level]
    _, inverse = torch.unique(key, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), len(rows)).scatter_reduce(0, inverse, torch.arange(len(rows)), "amin")
    first = first.sort().values[:num_items]
    if len(first) < num_items:
        raise ValueError("bench/bench_decoder.py: code space too small for --items")
    return rows[first]


def load_codes(path: str) -> torch.Tensor:
    if path.endswith(".npy"):
        import numpy as np

        return torch.from_numpy(np.load(path)).long()
    codes = torch.load(path, map_location="cpu")
    if isinstance(codes, dict):
        codes = codes["item_codes"]
    return torch.as_tensor(codes).long()


def cpu_idle_percent(seconds: float = 1.0) -> float | None:
    """Share of all CPUs idle over ``seconds`` (Linux): other processes on the machine make
    timings, especially multi-threaded ones, much slower; this records how busy it was."""
    def read():
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        return fields[3] + fields[4], sum(fields)  # idle + iowait, total

    try:
        idle0, total0 = read()
        time.sleep(seconds)
        idle1, total1 = read()
    except OSError:
        return None
    return 100.0 * (idle1 - idle0) / max(1, total1 - total0)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_train(model, batches, device, steps: int, warmup: int, amp, micro_batch: int) -> float:
    """Examples/s of full optimizer steps; a step may accumulate the gradients of micro-batches
    (same update as one pass over the batch, smaller activations)."""
    model.train()
    # fused: one kernel per parameter instead of ~10 small ops (torch >= 2.4 has it on CPU too).
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, fused=True)
    vocab = model.config.output_vocab_size

    def one_step(batch):
        opt.zero_grad(set_to_none=True)
        size = batch[0].shape[0]
        for start in range(0, size, micro_batch):
            input_ids, mask, labels = (t[start : start + micro_batch] for t in batch)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                logits = model(input_ids, mask, shift_right(labels))
            loss = F.cross_entropy(logits.float().reshape(-1, vocab), labels.reshape(-1), reduction="sum")
            (loss / labels.numel()).mul(labels.shape[0] / size).backward()
        opt.step()

    for i in range(warmup):
        one_step(batches[i % len(batches)])
    sync(device)
    start = time.perf_counter()
    for i in range(steps):
        one_step(batches[i % len(batches)])
    sync(device)
    return steps * batches[0][0].shape[0] / (time.perf_counter() - start)


def bench_beam(model, batches, trie, layout, beam: int, top_k: int, device, calls: int) -> float:
    model.eval()
    with torch.inference_mode():  # fp32: beam search turns autocast off (exact rankings)
        beam_search(model, *batches[0], trie, layout, beam_size=beam, top_k=top_k)  # warm-up
        sync(device)
        start = time.perf_counter()
        users = 0
        for i in range(calls):
            input_ids, mask = batches[i % len(batches)]
            out = beam_search(model, input_ids, mask, trie, layout, beam_size=beam, top_k=top_k)
            users += input_ids.shape[0]
        sync(device)
        elapsed = time.perf_counter() - start
    assert (out.items >= 0).all(), "constrained beam search returned an invalid item"
    return users / elapsed


def bench_gpt_epochs(sizes, item_codes, device, batch_size: int, steps: int, amp, data_config: str) -> dict:
    """Seconds per epoch of a TIGER-size GPT trained on one sliding window per target against
    all positions of each sequence segment (train_decoder.train_mode), on the real Beauty
    sequences (``data_config``: gin bindings of load_dataset): the median time of ``steps``
    optimizer steps on random batches of each mode times its steps per epoch."""
    import gin
    import numpy as np

    from data.prepare import load_dataset
    from modules.objectives import all_positions_loss, sliding_window_loss
    from modules.transformers.gpt import GPT, GPTConfig

    gin.parse_config_files_and_bindings([data_config], [])
    dataset = load_dataset(verbose=False)
    gin.clear_config()
    if len(item_codes) != dataset.num_items:  # synthetic codes sized for this catalogue
        item_codes = synthetic_codes(dataset.num_items, sizes, torch.Generator().manual_seed(0))
    layout = TokenLayout(sizes, num_user_buckets=2000)
    codes = item_codes.to(device)
    rng = np.random.default_rng(0)
    out = {}
    for mode, data in (("sliding", dataset.train_examples()), ("all_positions", dataset.train_segments())):
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=layout.vocab_size, output_vocab_size=layout.output_vocab_size)).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        times, tokens = [], 0
        for i in range(steps + 1):  # the first step warms up
            idx = rng.choice(len(data), batch_size, replace=False)
            sync(device)
            start = time.perf_counter()
            if mode == "sliding":
                b = data.batch(idx)
                history = torch.as_tensor(b.history, device=device)
                target, user = torch.as_tensor(b.target, device=device), torch.as_tensor(b.user, device=device)
                total, count = sliding_window_loss(model, layout, codes, history, target, user, amp, 64)
                used = int((history >= 0).sum()) + 2 * len(idx)  # + target items, user tokens (in items)
            else:
                user, items = data.batch(idx)
                items = torch.as_tensor(items, device=device)
                total, count = all_positions_loss(model, layout, codes, items, torch.as_tensor(user, device=device),
                                                  amp, 64)
                used = int((items >= 0).sum()) + len(idx)
            opt.zero_grad(set_to_none=True)
            (total / count).backward()
            opt.step()
            sync(device)
            if i:
                times.append(time.perf_counter() - start)
                tokens += used * layout.num_levels
        per_epoch = -(-len(data) // batch_size)
        out[f"epoch_seconds_{mode}"] = float(np.median(times)) * per_epoch
        out[f"epoch_tokens_{mode}"] = int(tokens / steps * per_epoch)
        out[f"epoch_steps_{mode}"] = per_epoch
    out["epoch_speedup_all_positions"] = out["epoch_seconds_sliding"] / out["epoch_seconds_all_positions"]
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=256, help="training batch size")
    p.add_argument("--micro-batch", type=int, default=None, help="accumulate gradients over micro-batches of this size")
    p.add_argument("--users", type=int, default=256, help="users per beam-search call")
    p.add_argument("--codes", help="item_codes file (.pt/.npy, (N, L) ints) instead of synthetic codes")
    p.add_argument("--items", type=int, default=12101)
    p.add_argument("--history", type=int, default=20, help="items per history")
    p.add_argument("--train-steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--beam-calls", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="training autocast (auto: bf16 on CUDA, fp32 on a CPU; train_decoder measures both "
                        "instead). Beam search always ranks in fp32, whatever this says")
    p.add_argument("--prune-after", type=int, default=None,
                   help="RASTP: prune the encoder sequence after this encoder layer (1-based; default off)")
    p.add_argument("--keep-ratio", default="1/3",
                   help="RASTP: share of real tokens kept, a number or a fraction such as 1/3, read as the nearest "
                        "fraction with denominator <= 100 (0.333 is 1/3: 81 tokens keep 27)")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--epochs-data", default=None, metavar="GIN",
                   help="also time a TIGER-size GPT epoch, sliding windows vs all positions, on this dataset "
                        "(e.g. bench/configs/beauty_local.gin)")
    p.add_argument("--epoch-steps", type=int, default=5, help="timed optimizer steps per mode for --epochs-data")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    amp = autocast_dtype(device, args.precision)  # bf16 or None
    g = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)

    if args.codes:
        item_codes = load_codes(args.codes)
        sizes = tuple(int(m) + 1 for m in item_codes.max(0).values)
    else:
        sizes = (256, 256, 256, 8)
        item_codes = synthetic_codes(args.items, sizes, g)
    layout = TokenLayout(sizes, num_user_buckets=2000)
    trie = PrefixTrie(item_codes, sizes).to(device)
    num_items = item_codes.shape[0]
    model = T5(T5Config(vocab_size=layout.vocab_size, output_vocab_size=layout.output_vocab_size,
                        prune_after_layer=args.prune_after, keep_ratio=args.keep_ratio)).to(device)

    def make_inputs(n):
        history = torch.randint(0, num_items, (n, args.history), generator=g)
        user = torch.randint(0, 22363, (n,), generator=g)
        ids, mask = layout.encode_history(history, item_codes, user=user)
        return ids.to(device), mask.to(device), user

    beam_batches = [make_inputs(args.users)[:2] for _ in range(2)]
    result = {"device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "autocast": str(amp).replace("torch.", "") if amp is not None else "fp32",
              "cpu_idle_percent_before": cpu_idle_percent(), "items": num_items,
              "params": sum(p.numel() for p in model.parameters()),
              "history_tokens": beam_batches[0][0].shape[1], "users_per_call": args.users,
              "prune_after_layer": args.prune_after,
              "keep_ratio": str(keep_fraction(args.keep_ratio)) if args.prune_after else None}
    # Beam 20 first, so that the peak RSS read after it is its own (ru_maxrss only grows).
    result["beam20_users_per_second"] = bench_beam(model, beam_batches, trie, layout, 20, 10, device, args.beam_calls)
    result["beam20_peak_rss_mb"] = peak_rss_mb()
    result["beam50_users_per_second"] = bench_beam(model, beam_batches, trie, layout, 50, 20, device, args.beam_calls)
    result["beam_peak_rss_mb"] = peak_rss_mb()
    if device.type == "cuda":
        result["beam_peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20

    if not args.skip_train:
        train_batches = []
        for _ in range(2):
            ids, mask, _ = make_inputs(args.batch_size)
            target = torch.randint(0, num_items, (args.batch_size,), generator=g)
            train_batches.append((ids, mask, layout.encode_target(target, item_codes).to(device)))
        micro = args.micro_batch or args.batch_size
        result["train_batch_size"], result["train_micro_batch"] = args.batch_size, micro
        result["train_examples_per_second"] = bench_train(model, train_batches, device, args.train_steps,
                                                          args.warmup, amp, micro)
    if args.epochs_data:
        result.update(bench_gpt_epochs(sizes, item_codes, device, args.batch_size, args.epoch_steps, amp,
                                       args.epochs_data))
    result["peak_rss_mb"] = peak_rss_mb()
    result["cpu_idle_percent_after"] = cpu_idle_percent()
    if device.type == "cuda":
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    result = {k: round(v, 2) if isinstance(v, float) else v for k, v in result.items()}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
