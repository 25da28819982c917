"""Benchmark of RPG (modules/rpg.py) against SASRec at the same batch, and of its two ways to rank.

    python bench/bench_rpg.py --threads 1                      # training step: RPG vs SASRec
    python bench/bench_rpg.py --threads 1 --run runs/beauty/rpg  # + exact vs graph decoding of a trained run

(a) Training: seconds per optimizer step (forward + backward + AdamW) of SASRec (the Beauty
    recipe's sizes, configs/sasrec_amazon.gin) and of RPG (``--rpg-d``, ``--codebooks``) on the
    same batches: ``--batch-size`` random Beauty-shaped segments (12,101 items, lengths drawn
    like Beauty's: geometric, mean ~7, at most 21), interleaved model by model so that machine
    noise hits both alike; median over steps, in fp32 and bf16 autocast.
(b) With ``--run``: the run's best checkpoint on its own dataset (the gin config stored in the
    checkpoint is parsed again, so pass the same .gin files as the run): exact scoring users/s
    over all validation users, graph decoding users/s (graph build time apart), and the recall
    of graph decoding's top 10 against exact's top 10 (share of exact's items it finds).
The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modules.objectives import full_softmax_loss  # noqa: E402
from modules.rpg import RPG, RPGConfig, rpg_loss  # noqa: E402
from modules.rpg_graph import graph_decode, item_graph  # noqa: E402
from modules.sasrec import SASRec, SASRecConfig  # noqa: E402
from modules.training import _cpu_name  # noqa: E402 - the CPU model, as the precision cache keys it


def beauty_like_segments(rng, batch: int, items: int, width: int = 21) -> torch.Tensor:
    x = np.full((batch, width), -1, dtype=np.int64)
    for r in range(batch):
        length = min(width, int(rng.geometric(1 / 6)) + 2)
        x[r, :length] = rng.choice(items, length, replace=False)
    return torch.as_tensor(x)


def step_seconds(models: dict, batches, amp, warmup: int = 2) -> dict[str, float]:
    """Median seconds per optimizer step of each model, steps interleaved across models."""
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-3) for k, (m, _) in models.items()}
    times: dict[str, list[float]] = {k: [] for k in models}
    for i, batch in enumerate(batches):
        for name, (model, loss_fn) in models.items():
            model.train()
            t = time.perf_counter()
            total, count = loss_fn(model, batch, amp, 64)
            (total / count).backward()
            opts[name].step()
            opts[name].zero_grad(set_to_none=True)
            if i >= warmup:
                times[name].append(time.perf_counter() - t)
    return {k: float(np.median(v)) for k, v in times.items()}


@torch.no_grad()
def decoding(run: str, configs: list[str], users: int, batch: int) -> dict:
    import gin

    import modules.decoder_models  # noqa: F401 - registers the model configs the run's configs bind
    from data.prepare import load_dataset
    from modules.recommender import build_model, record_of

    # The configs give the data settings (load_dataset.*); their train_decoder.* bindings are the
    # training script's, not needed here (the model comes from the run's record).
    gin.parse_config_files_and_bindings(configs, [], skip_unknown=["train_decoder"])  # (finalizes)
    state = torch.load(Path(run) / "best.pt", map_location="cpu", weights_only=False)
    config = record_of(Path(run) / "best.pt", state)["config"]  # the run's model config; its item codes: weights
    dataset = load_dataset()
    model = build_model("rpg", config["model_config"])
    model.load_state_dict(state["model"])
    model.eval()
    valid = dataset.eval_examples("valid")
    history = torch.as_tensor(valid.history[:users])
    t = time.perf_counter()
    exact = torch.cat([model.scores(history[s:s + batch]).topk(10, dim=1).indices for s in range(0, len(history), batch)])
    exact_seconds = time.perf_counter() - t
    t = time.perf_counter()
    graph = item_graph(model, n_edges=100)
    graph_seconds = time.perf_counter() - t
    gen = torch.Generator().manual_seed(0)
    t = time.perf_counter()
    found = []
    for s in range(0, len(history), batch):
        log_probs = model.token_log_probs(model.last_states(history[s:s + batch]))
        found.append(graph_decode(model, log_probs, graph, beams=10, steps=3, top_k=10, generator=gen)[0])
    graph_decode_seconds = time.perf_counter() - t
    found = torch.cat(found)
    recall = float(np.mean([len(set(a.tolist()) & set(b.tolist())) / 10 for a, b in zip(exact, found)]))
    return {"users": len(history), "exact_users_per_second": round(len(history) / exact_seconds, 1),
            "graph_build_seconds": round(graph_seconds, 1),
            "graph_users_per_second": round(len(history) / graph_decode_seconds, 1),
            "graph_recall_of_exact_top10": round(recall, 4), "graph": {"n_edges": 100, "beams": 10, "steps": 3},
            "model_config": config["model_config"], "best_step": state.get("step")}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--items", type=int, default=12101)
    p.add_argument("--codebooks", type=int, default=32)
    p.add_argument("--rpg-d", type=int, default=128)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--run", help="a train_decoder.py RPG run folder: also time exact vs graph decoding")
    p.add_argument("--config", action="append", default=[], help="the run's .gin files (with --run)")
    p.add_argument("--users", type=int, default=22363)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    batches = [beauty_like_segments(rng, a.batch_size, a.items) for _ in range(a.steps + 2)]
    result: dict = {"threads": torch.get_num_threads(), "batch_size": a.batch_size, "items": a.items,
                    "cpu": _cpu_name()}
    for precision, amp in (("fp32", None), ("bf16", torch.bfloat16)):
        models = {
            "sasrec": (SASRec(SASRecConfig(num_items=a.items, max_len=21, d_model=64, num_heads=1, d_ff=256,
                                           dropout=0.3)), full_softmax_loss),
            "rpg": (RPG(RPGConfig(num_items=a.items, num_codebooks=a.codebooks, max_len=21, d_model=a.rpg_d,
                                  num_heads=2, d_ff=4 * a.rpg_d),
                        torch.randint(0, 256, (a.items, a.codebooks))), rpg_loss),
        }
        secs = step_seconds(models, batches, amp)
        result[precision] = {"sasrec_step_seconds": round(secs["sasrec"], 4), "rpg_step_seconds": round(secs["rpg"], 4),
                             "rpg_over_sasrec": round(secs["rpg"] / secs["sasrec"], 3)}
        print(f"[bench_rpg] {precision}: {result[precision]}", file=sys.stderr)
    result["rpg"] = {"codebooks": a.codebooks, "d_model": a.rpg_d}
    if a.run:
        result["decoding"] = decoding(a.run, a.config, a.users, 256)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
