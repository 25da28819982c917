"""Rewards of a group of G candidate items for one held-out target, for GRPO fine-tuning.

All take ``items`` (n, G) item_ids and ``target`` (n,) and return float32 (n, G); they are
combined by summing (:func:`group_rewards`):

- ``'rule'``: 1 when the candidate is the target, else 0 (MiniOneRec's rule-based reward);
- ``'rank'``: MiniOneRec's ranking penalty. In a group that contains the target, the misses,
  ranked by the policy (rank 0 = most likely), get ``-(1/log2(i+2)) / sum_j 1/log2(j+2)`` for a
  miss at rank i, the sum running over the ranks j of the group's misses (so the penalties of
  a group sum to -1: a likely wrong item costs more than an unlikely one). Ranks are those of
  the group's distinct items, so repeated samples of one wrong item share one penalty value. Hits and every
  candidate of a group without the target get 0. MiniOneRec's ranking reward is
  ``'rule' + 'rank'``;
- ``'semantic'``: ``alpha`` x the cosine between the candidate's and the target's item
  embeddings (``data.prepare.load_item_embeddings``), a soft partial credit for near misses.
"""

from __future__ import annotations

import torch

REWARDS = ("rule", "rank", "semantic")


def rule_reward(items: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (items == target[:, None]).float()


def item_ranks(items: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
    """Ranks of the group's distinct items: each candidate gets the 0-based rank, among its
    group's distinct items, of its item, the items ordered by their best (lowest) ``rank``
    (dense: equal ranks stay equal, no gaps). Repeated samples of one item thus share one rank,
    whatever order the policy's ties were broken in; distinct items ranked 0..G-1 keep theirs."""
    same = items[:, :, None] == items[:, None, :]  # (n, G, G)
    best = torch.where(same, rank[:, None, :], torch.iinfo(torch.long).max).min(-1).values.long()  # per candidate
    # The distinct best ranks below each candidate's: count each value at its first column only.
    first = ~torch.tril(best[:, :, None] == best[:, None, :], diagonal=-1).any(-1)  # (n, G)
    return ((best[:, None, :] < best[:, :, None]) & first[:, None, :]).sum(-1)


def rank_reward(items: torch.Tensor, target: torch.Tensor, rank: torch.Tensor | None = None) -> torch.Tensor:
    """``rank`` (n, G): each candidate's 0-based rank in its group by the policy (None: the
    column order, e.g. beam search's best-first output). The penalty goes by the rank of the
    candidate's item among the group's distinct items (:func:`item_ranks`): equal ranks, and
    repeated samples of one item, share one penalty value; each copy of a wrong item pays it
    (the group's penalties still sum to -1)."""
    hit = items == target[:, None]
    if rank is None:
        rank = torch.arange(items.shape[1], device=items.device).expand_as(items)
    rank = item_ranks(items, rank.to(items.device))
    weight = (1.0 / torch.log2(rank.double() + 2.0)).masked_fill(hit, 0.0)
    total = weight.sum(dim=1, keepdim=True)
    penalty = -weight / total.clamp(min=1e-300)
    return torch.where(hit.any(dim=1, keepdim=True), penalty, 0.0).float()


def semantic_reward(items: torch.Tensor, target: torch.Tensor, item_embeddings: torch.Tensor,
                    alpha: float = 0.5) -> torch.Tensor:
    """``alpha`` x cosine(embedding[candidate], embedding[target]); ``item_embeddings`` (N, D)."""
    unit = torch.nn.functional.normalize(item_embeddings.float(), dim=-1)
    return alpha * (unit[items] * unit[target][:, None]).sum(-1)


def group_rewards(kinds, items: torch.Tensor, target: torch.Tensor, rank: torch.Tensor | None = None,
                  item_embeddings: torch.Tensor | None = None, alpha: float = 0.5) -> torch.Tensor:
    """The sum of the rewards named in ``kinds`` (a subset of :data:`REWARDS`)."""
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    unknown = [k for k in kinds if k not in REWARDS]
    if not kinds or unknown:
        raise ValueError(f"modules/rewards.py: rewards must be a non-empty subset of {REWARDS}, got {kinds}")
    if (items < 0).any():
        raise ValueError("modules/rewards.py: a candidate is no item (-1): generate valid items only")
    total = torch.zeros(items.shape, device=items.device)
    if "rule" in kinds:
        total = total + rule_reward(items, target)
    if "rank" in kinds:
        total = total + rank_reward(items, target, rank)
    if "semantic" in kinds:
        if item_embeddings is None:
            raise ValueError("modules/rewards.py: the 'semantic' reward needs item_embeddings")
        total = total + semantic_reward(items, target, item_embeddings, alpha)
    return total
