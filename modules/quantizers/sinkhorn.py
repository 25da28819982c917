"""Sinkhorn-Knopp balanced assignment (LC-Rec / ETEGRec's last RQ level).

A batch of N points is assigned to K codes by the entropic optimal-transport plan between
the points (mass 1/N each) and the codes (mass 1/K each): every code receives about N/K
points, so items that would all fall on one nearest code are spread over several. LC-Rec
(`index/models/layers.py: sinkhorn_algorithm`, `vq.py`) does the same on the last level:
distances scaled to [-1, 1] over the batch, epsilon 0.003, up to 100 iterations, float64,
code = argmax of the plan's row.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def normalize_cost(dist: Tensor, eps: float = 1e-5) -> Tensor:
    """Affinely map the batch's distances (N, K) onto [-1, 1] (min -> -1, max -> 1).

    Why: epsilon is then relative to the batch's spread of distances, so one value (LC-Rec:
    0.003) works whatever the scale of the latents. `eps` keeps a constant matrix finite.
    """
    lo, hi = dist.min(), dist.max()
    mid = (hi + lo) / 2
    return (dist - mid) / (hi - mid + eps)


@torch.no_grad()
def sinkhorn_knopp(
    cost: Tensor,
    epsilon: float,
    iters: int,
    row_marginals: Tensor | None = None,
    col_marginals: Tensor | None = None,
) -> Tensor:
    """Entropic optimal-transport plan P (N, K), float64, for `cost` (N, K).

    P = diag(u) exp(-cost / epsilon) diag(v), with u, v found by `iters` rounds of
    Sinkhorn-Knopp scaling (rows, then columns) so that P's rows sum to `row_marginals`
    (default 1/N each) and its columns to `col_marginals` (default 1/K each). The last round
    fixes the columns, so those hold exactly; the rows converge with the iterations (fast
    for a large epsilon, slower as epsilon -> 0, where P approaches the unregularised plan).

    Computed in the log domain: exp(-cost / epsilon) underflows for epsilon 0.003 and
    cost ~1 (e^-333), and LC-Rec's direct-scaling version then divides 0 by 0.
    The two marginals must have the same total mass.
    """
    if cost.ndim != 2:
        raise ValueError(f"modules/quantizers/sinkhorn.py: cost must be (N, K), got {tuple(cost.shape)}")
    if epsilon <= 0 or iters < 1:
        raise ValueError(f"modules/quantizers/sinkhorn.py: need epsilon > 0 and iters >= 1, got {epsilon}, {iters}")
    n, k = cost.shape
    log_kernel = -cost.double() / epsilon
    if row_marginals is None:
        log_a = torch.full((n,), -math.log(n), dtype=torch.float64, device=cost.device)
    else:
        log_a = row_marginals.to(log_kernel).log()
    if col_marginals is None:
        log_b = torch.full((k,), -math.log(k), dtype=torch.float64, device=cost.device)
    else:
        log_b = col_marginals.to(log_kernel).log()
    if not math.isclose(float(log_a.exp().sum()), float(log_b.exp().sum()), rel_tol=1e-6):
        raise ValueError("modules/quantizers/sinkhorn.py: row_marginals and col_marginals must have equal sums")
    g = torch.zeros(k, dtype=torch.float64, device=cost.device)
    for _ in range(iters):
        f = log_a - torch.logsumexp(log_kernel + g, dim=1)
        g = log_b - torch.logsumexp(log_kernel + f[:, None], dim=0)
    return (log_kernel + f[:, None] + g).exp()


@torch.no_grad()
def sinkhorn_assign(dist: Tensor, epsilon: float = 0.003, iters: int = 100) -> Tensor:
    """Balanced codes (N,) for distances (N, K): argmax over each row of the Sinkhorn plan
    of the [-1, 1]-normalised distances with uniform marginals (LC-Rec's assignment).

    Near-uniform code counts within the batch, not a hard capacity (see
    `rqkmeans.balanced_assign` for that); as epsilon grows the codes approach argmin.
    """
    plan = sinkhorn_knopp(normalize_cost(dist.detach().double()), epsilon, iters)
    return plan.argmax(1)
