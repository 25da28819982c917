"""RPG's graph-constrained decoding (Hou et al., KDD 2025, section 3.3): for catalogues where
scoring every item per user is too costly, a k-nearest-neighbour graph between items by
semantic-ID similarity is built once, and each user's search walks it.

- Graph: the similarity of items i and j is the mean over codebooks k of the cosine between
  the (learned, input) embeddings of their k-th tokens, mapped to [0, 1]; each item keeps its
  ``n_edges`` most similar items (itself included). Built in row chunks with one gather per
  codebook, never an (N, N, n) tensor.
- Search: ``beams`` start items drawn at random; each step scores the beams' neighbours (and
  the beams themselves) by the sum of their tokens' log-probabilities and keeps the best
  ``beams``; after ``steps`` steps the top ``top_k`` of the last step's candidates are returned.

Departures: the paper's beams are sampled per user without a seed; here a seeded generator
makes evaluation reproducible. Candidates are scored once per step with duplicates removed
by sorting (the reference loops over users with ``torch.unique``): the same result,
vectorised over the batch. The current beams are kept among the candidates, so a step never
loses its best item.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from modules.rpg import RPG


@torch.no_grad()
def item_graph(model: RPG, n_edges: int, chunk: int = 512) -> torch.Tensor:
    """(num_items, n_edges) neighbours of each item, most similar first (see the module doc)."""
    cfg = model.config
    n, K, N = cfg.num_codebooks, cfg.codebook_size, cfg.num_items
    if not 1 <= n_edges <= N:
        raise ValueError(f"modules/rpg_graph.py: n_edges must be in [1, {N}] (the catalogue), got {n_edges}")
    table = F.normalize(model.token_embed.weight.float(), dim=-1).view(n, K, -1)
    token_sims = (1.0 + table @ table.transpose(1, 2)) / 2  # (n, K, K) in [0, 1]
    codes = (model.item_tokens % K).T.contiguous()  # (n, N)
    out = torch.empty(N, n_edges, dtype=torch.long, device=codes.device)
    for start in range(0, N, chunk):
        rows = slice(start, min(N, start + chunk))
        sim = torch.zeros(rows.stop - start, N, device=codes.device)
        for k in range(n):  # rows of codebook k's token similarities, then the catalogue's columns
            sim += token_sims[k][codes[k, rows]][:, codes[k]]
        out[rows] = sim.topk(n_edges, dim=1).indices
    return out


def _candidate_scores(model: RPG, log_probs: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """(B, n, K) log-probabilities, (B, C) item ids -> (B, C) sums of their tokens' log-probabilities."""
    codes = (model.item_tokens[items] % model.config.codebook_size).transpose(1, 2)  # (B, n, C)
    return log_probs.gather(2, codes).sum(1)


@torch.no_grad()
def graph_decode(model: RPG, log_probs: torch.Tensor, graph: torch.Tensor, *, beams: int, steps: int,
                 top_k: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Walk ``graph`` (:func:`item_graph`) for each user's (n, K) log-probabilities: returns the
    top ``top_k`` (B, top_k) item ids and their scores, best first (-1 / -inf where fewer
    distinct items were visited)."""
    if beams < 1 or steps < 1 or top_k < 1:
        raise ValueError(f"modules/rpg_graph.py: beams, steps and top_k must be >= 1, got {beams}, {steps}, {top_k}")
    B, N = len(log_probs), graph.shape[0]
    nodes = torch.randint(0, N, (B, beams), generator=generator, device=graph.device)
    for step in range(steps):
        cand = torch.cat([nodes, graph[nodes].flatten(1)], dim=1).sort(dim=1).values
        scores = _candidate_scores(model, log_probs, cand)
        repeated = torch.zeros_like(cand, dtype=torch.bool)
        repeated[:, 1:] = cand[:, 1:] == cand[:, :-1]  # sorted: a repeat sits right after its first
        scores = scores.masked_fill(repeated, float("-inf"))
        keep = min(top_k if step == steps - 1 else beams, cand.shape[1])
        top = scores.topk(keep, dim=1)
        nodes = cand.gather(1, top.indices)
    found = torch.isfinite(top.values)
    items = nodes.masked_fill(~found, -1)
    if keep < top_k:
        pad = top_k - keep
        items = torch.cat([items, items.new_full((B, pad), -1)], 1)
        top_values = torch.cat([top.values, top.values.new_full((B, pad), float("-inf"))], 1)
        return items, top_values
    return items, top.values


class GraphScores:
    """``scores(history)`` for :func:`modules.evaluation.evaluate_exact_topk` from graph decoding:
    (B, num_items) with the found items' scores and -inf elsewhere. The graph is built from the
    model's current weights on first use (so build it after loading the weights to evaluate)."""

    def __init__(self, model: RPG, *, n_edges: int = 100, graph_beams: int = 10, propagation_steps: int = 3,
                 top_k: int = 10, seed: int = 0):
        # Defaults: the paper's Beauty settings (100 edges, 10 beams, 3 steps).
        self.model, self.n_edges, self.top_k = model, n_edges, top_k
        self.beams, self.steps = graph_beams, propagation_steps
        self.seed = seed
        self.graph: torch.Tensor | None = None

    @property
    def training(self) -> bool:
        return self.model.training

    def eval(self):
        self.model.eval()
        return self

    def train(self, mode: bool = True):
        self.model.train(mode)
        return self

    @torch.no_grad()
    def scores(self, history: torch.Tensor) -> torch.Tensor:
        if self.graph is None:
            self.graph = item_graph(self.model, self.n_edges)
        # One generator per batch, seeded by the batch's first history: reproducible and the
        # same whatever batches came before (sharded evaluation).
        gen = torch.Generator(device=history.device).manual_seed(self.seed + int(history[0].sum()))
        log_probs = self.model.token_log_probs(self.model.last_states(history))
        items, values = graph_decode(self.model, log_probs, self.graph, beams=self.beams, steps=self.steps,
                                     top_k=self.top_k, generator=gen)
        out = torch.full((len(history), self.model.config.num_items), float("-inf"), device=history.device)
        found = items >= 0
        rows = torch.arange(len(history), device=history.device)[:, None].expand_as(items)
        out[rows[found], items[found]] = values[found]
        return out


__all__ = ["item_graph", "graph_decode", "GraphScores"]
