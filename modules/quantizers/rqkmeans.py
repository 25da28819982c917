"""Residual k-means (RQ-KMeans, as used by GRID) and the k-means helpers shared by the quantizers.

No training loop: level l runs k-means on the residuals left by levels < l. Everything is
plain torch (matmul distances), so 12k x 384 with 3 x 256 codes takes a few seconds on CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modules.quantizers.sinkhorn import sinkhorn_assign


def sq_distances(x: Tensor, c: Tensor, x_sq: Tensor | None = None) -> Tensor:
    """Squared euclidean distances (N, K) via one matmul (cdist is slower and not needed here).
    Pass x_sq = |x|^2 (N, 1) when calling repeatedly with the same x."""
    x_sq = x.pow(2).sum(1, keepdim=True) if x_sq is None else x_sq
    return (x_sq - 2 * x @ c.T + c.pow(2).sum(1)).clamp_min_(0)


def balanced_assign(dist: Tensor, capacity: int | None = None) -> Tensor:
    """Capacity-constrained assignment: every cluster gets at most `capacity` points
    (default ceil(N / K)), so all clusters end up with near-equal sizes.

    Greedy by distance, vectorised in rounds: each unassigned point proposes its nearest
    cluster that still has room, and each cluster accepts its closest proposals up to its
    remaining capacity. A round that rejects anybody fills at least one cluster, so there are
    at most K + 1 rounds (in practice a few dozen).
    """
    n, k = dist.shape
    capacity = math.ceil(n / k) if capacity is None else capacity
    if capacity * k < n:
        raise ValueError(f"balanced_assign: capacity {capacity} x {k} clusters < {n} points")
    assign = torch.full((n,), -1, dtype=torch.long, device=dist.device)
    remaining = torch.full((k,), capacity, dtype=torch.long, device=dist.device)
    todo = torch.arange(n, device=dist.device)
    while todo.numel():
        d = dist[todo].masked_fill(remaining == 0, float("inf"))
        best, choice = d.min(1)
        # Sort proposals by (cluster, distance): two stable sorts, distance first.
        order = best.argsort(stable=True)
        order = order[choice[order].argsort(stable=True)]
        chosen = choice[order]
        counts = torch.bincount(chosen, minlength=k)
        rank = torch.arange(order.numel(), device=dist.device) - (counts.cumsum(0) - counts)[chosen]
        ok = torch.zeros(todo.numel(), dtype=torch.bool, device=dist.device)
        ok[order[rank < remaining[chosen]]] = True
        assign[todo[ok]] = choice[ok]
        remaining -= torch.bincount(choice[ok], minlength=k)
        todo = todo[~ok]
    return assign


def greedy_kmeanspp(x: Tensor, k: int, generator: torch.Generator | None = None, max_points: int = 4096) -> Tensor:
    """Greedy k-means++ seeding (as in scikit-learn): draw 2 + ln(k) candidates with
    probability ~ D^2 and keep the one that lowers the total D^2 most. Plain k-means++ often
    leaves two true clusters under one centre, which Lloyd iterations do not undo.

    Seeds come from a random subset of max(max_points, 16 k) points: each step reads all
    points once, so on CPU this loop is memory-bound and dominated the run time.
    """
    n = x.shape[0]
    limit = max(max_points, 16 * k)
    if n > limit:
        x = x[torch.randperm(n, generator=generator)[:limit].to(x.device)]
        n = limit
    x_sq = x.pow(2).sum(1, keepdim=True)
    num_candidates = 2 + int(math.log(k))
    centroids = x.new_empty(k, x.shape[1])
    d2 = torch.full((n,), float("inf"), device=x.device)
    cand = torch.randint(n, (1,), generator=generator)
    for i in range(k):
        c = x[cand.to(x.device)]  # (C, D)
        d_cand = torch.minimum(d2[:, None], (x_sq - 2 * x @ c.T + c.pow(2).sum(1)).clamp_min_(0))
        best = int(d_cand.sum(0).argmin())
        centroids[i], d2 = c[best], d_cand[:, best]
        w = d2.cpu().double()
        if w.sum() <= 0:  # every point already is a centre (n < k or duplicates)
            w = torch.ones_like(w)
        cand = torch.multinomial(w, num_candidates, replacement=True, generator=generator)
    return centroids


def kmeans(
    x: Tensor,
    k: int,
    num_iters: int = 20,
    generator: torch.Generator | None = None,
    balanced: bool = False,
    sinkhorn: tuple[float, int] | None = None,
) -> tuple[Tensor, Tensor]:
    """Greedy k-means++ seeding (greedy_kmeanspp) + Lloyd iterations. Returns (centroids (k, D), assignment (N,)).

    The returned assignment is recomputed against the returned centroids, so for
    balanced=False and sinkhorn=None it equals the nearest-centroid codes. `sinkhorn`
    = (epsilon, iters) assigns by `sinkhorn.sinkhorn_assign` (near-uniform cluster sizes)
    instead; it takes precedence over balanced. Empty clusters are re-seeded with
    the points farthest from their centroid (deterministic, and it splits big clusters).
    With fewer than k points some centroids are duplicates (those codes stay unused).
    """
    x = x.float()
    n = x.shape[0]
    if n == 0:
        raise ValueError("kmeans: got 0 points")
    x_sq = x.pow(2).sum(1, keepdim=True)
    centroids = greedy_kmeanspp(x, k, generator)

    def assign_to(c: Tensor) -> tuple[Tensor, Tensor]:
        dist = sq_distances(x, c, x_sq)
        if sinkhorn is not None:
            a = sinkhorn_assign(dist, *sinkhorn)
        else:
            a = balanced_assign(dist) if balanced else dist.argmin(1)
        return a, dist.gather(1, a[:, None]).squeeze(1)

    assign = None
    for _ in range(num_iters):
        new_assign, dist_to_own = assign_to(centroids)
        if assign is not None and torch.equal(new_assign, assign):
            break
        assign = new_assign
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        centroids = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centroids)
        empty = (counts == 0).nonzero().squeeze(1)
        if empty.numel() and n >= k:
            far = dist_to_own.topk(empty.numel()).indices
            centroids[empty] = x[far]
    assign, _ = assign_to(centroids)
    return centroids, assign


@dataclass
class RQKMeansConfig:
    """num_levels x codebook_size residual k-means. input_dim is filled in by `fit`."""

    num_levels: int = 3
    codebook_size: int = 256
    num_iters: int = 20
    normalize: bool = False  # L2-normalise inputs first (sentence embeddings are compared by cosine)
    # Equal-size clusters at fit time so codes spread (fewer collisions). Worth it for deep
    # levels: there the residuals are close to isotropic noise and plain k-means tends to put
    # most points on one near-zero centroid.
    balanced: bool = False
    # LC-Rec-style Sinkhorn-Knopp assignment of the last level at fit time (near-uniform
    # code counts, see modules/quantizers/sinkhorn.py); overrides `balanced` on that level.
    sinkhorn_last_level: bool = False
    sinkhorn_epsilon: float = 0.003
    sinkhorn_iters: int = 100
    seed: int = 0
    input_dim: int | None = None


class RQKMeans(nn.Module):
    """Residual k-means tokenizer (GRID). `fit(x) -> codes (N, L)`; `encode(x)` for new items.

    It is an nn.Module only so the centroids travel in a state dict (save/load, `.to(device)`).
    """

    def __init__(self, config: RQKMeansConfig | None = None, **kwargs):
        super().__init__()
        self.config = config if config is not None else RQKMeansConfig(**kwargs)
        c = self.config
        self.register_buffer("centroids", torch.zeros(c.num_levels, c.codebook_size, c.input_dim or 0))

    @property
    def codebook_sizes(self) -> list[int]:
        return [self.config.codebook_size] * self.config.num_levels

    def _prepare(self, x: Tensor) -> Tensor:
        x = x.float()
        return F.normalize(x, dim=-1) if self.config.normalize else x

    @torch.no_grad()
    def fit(self, x: Tensor) -> Tensor:
        """Fit all levels on x (N, D); returns the codes (N, L) of x.

        Deterministic given config.seed. With balanced=True (or sinkhorn_last_level) the
        returned codes follow the capacity constraint (the Sinkhorn plan), so they can differ
        from `encode(x)` (plain nearest centroid).
        """
        c = self.config
        if x.ndim != 2:
            raise ValueError(f"RQKMeans.fit: expected x of shape (N, D), got {tuple(x.shape)}")
        c.input_dim = x.shape[1]
        gen = torch.Generator().manual_seed(c.seed)
        residual = self._prepare(x)
        centroids, codes = [], []
        for level in range(c.num_levels):
            sinkhorn = None
            if c.sinkhorn_last_level and level == c.num_levels - 1:
                sinkhorn = (c.sinkhorn_epsilon, c.sinkhorn_iters)
            cent, assign = kmeans(residual, c.codebook_size, c.num_iters, gen, c.balanced, sinkhorn)
            residual = residual - cent[assign]
            centroids.append(cent)
            codes.append(assign)
        self.centroids = torch.stack(centroids)
        return torch.stack(codes, 1)

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """Nearest-centroid codes (N, L) for (possibly new) items."""
        if self.centroids.shape[-1] == 0:
            raise RuntimeError("RQKMeans.encode: call fit(x) first")
        residual = self._prepare(x).to(self.centroids.device)
        codes = []
        for cent in self.centroids:
            a = sq_distances(residual, cent).argmin(1)
            residual = residual - cent[a]
            codes.append(a)
        return torch.stack(codes, 1)

    @torch.no_grad()
    def decode(self, codes: Tensor) -> Tensor:
        """Sum of the centroids of the first codes.shape[1] levels (in the normalised space)."""
        codes = codes.to(self.centroids.device)
        levels = torch.arange(codes.shape[1], device=codes.device)
        return self.centroids[levels, codes].sum(1)
