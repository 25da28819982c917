"""GRPO (DeepSeekMath's Group Relative Policy Optimization) for a generative recommender.

One user's group is G candidate items (``modules/sampling.py``) with rewards
(``modules/rewards.py``); the objective per candidate o with advantage A is

    min(ratio * A, clip(ratio, 1 - clip_eps, 1 + clip_eps) * A) - beta * KL
    ratio = exp(log pi(o) - log pi_old(o)),   A = (r - mean_G r) / (std_G r + eps)

with log pi(o) the item's sequence log-probability (its L code tokens summed, teacher-forced)
and KL the k3 estimator ``exp(d) - d - 1``, d = log pi_ref - log pi, per token, summed over
the item's tokens. The loss is minus its mean over the n x G candidates.

Also the bookkeeping of train_grpo.py's runs: :data:`STAT_KEYS` and :func:`mean_stats` (the
per-step statistics it logs and reports), :func:`sft_metrics` (its SFT start's metrics, once).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from modules import distributed
from modules.beam_search import PrefixTrie
from modules.rewards import group_rewards
from modules.sampling import generate_candidates
from modules.tokens import TokenLayout
from modules.transformers.generation import shift_right, target_log_probs


class GRPOLoss(NamedTuple):
    loss: torch.Tensor  # scalar, to minimise
    kl: torch.Tensor  # mean k3 estimate per candidate (summed over its tokens), detached
    clip_fraction: torch.Tensor  # fraction of candidates whose clipped term is the one taken, detached


class GRPOStats(NamedTuple):
    loss: torch.Tensor
    reward: float  # mean reward of the candidates
    hit_rate: float  # in-group hit rate: fraction of the candidates that are the target
    group_hit: float  # fraction of groups that contain the target at least once
    kl: float
    clip_fraction: float
    entropy: float  # mean per-token entropy (nats) of the policy's next-code distribution, unconstrained


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """(n, G) rewards -> group-normalised advantages ``(r - mean) / (std + eps)`` per row (the
    sample std, as in DeepSeekMath's reference implementations); all 0 in a group of equal rewards."""
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"modules/grpo.py: rewards must be (n, G) with G >= 2, got {tuple(rewards.shape)}")
    rewards = rewards.float()
    adv = (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + eps)
    # Exactly 0 where all rewards are equal, whatever rounding in the mean (and eps = 0) would give.
    return adv.masked_fill((rewards == rewards[:, :1]).all(1, keepdim=True), 0.0)


def grpo_objective(log_probs: torch.Tensor, old_log_probs: torch.Tensor, ref_log_probs: torch.Tensor,
                   advantages: torch.Tensor, clip_eps: float = 0.2, beta: float = 0.04) -> GRPOLoss:
    """Token log-probs (n, G, L) of the policy (with grad), of the policy that drew the group and
    of the reference (no grad); ``advantages`` (n, G)."""
    seq, old_seq = log_probs.sum(-1), old_log_probs.detach().sum(-1)
    ratio = torch.exp(seq - old_seq)
    clipped = ratio.clamp(1 - clip_eps, 1 + clip_eps)
    surrogate = torch.minimum(ratio * advantages, clipped * advantages)
    d = ref_log_probs.detach() - log_probs
    kl = (torch.exp(d) - d - 1).sum(-1)
    loss = -(surrogate - beta * kl).mean()
    clipped_taken = ((ratio > 1 + clip_eps) & (advantages > 0)) | ((ratio < 1 - clip_eps) & (advantages < 0))
    return GRPOLoss(loss, kl.detach().mean(), clipped_taken.float().mean())


def policy_log_probs(model, input_ids, attention_mask, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """(m, L) teacher-forced log-prob of each label token (as
    :func:`modules.transformers.generation.target_log_probs`) and the entropy of each position's
    next-token distribution, from one forward pass."""
    logits = model(input_ids, attention_mask, shift_right(labels))
    log_probs = F.log_softmax(logits.float(), dim=-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return log_probs.gather(-1, labels[..., None]).squeeze(-1), entropy


def grpo_batch_loss(policy, reference, layout: TokenLayout, item_codes: torch.Tensor, trie: PrefixTrie,
                    history: torch.Tensor, target: torch.Tensor, user: torch.Tensor | None, *, mode: str,
                    group_size: int, rewards=("rule",), temperature: float = 1.0, top_k: int | None = None,
                    item_embeddings: torch.Tensor | None = None, alpha: float = 0.5, clip_eps: float = 0.2,
                    beta: float = 0.04, eps: float = 1e-4) -> GRPOStats:
    """One GRPO batch, on-policy: draw a group of ``group_size`` candidates per user from the
    current ``policy`` (no grad), score them, and return the loss of the policy's single update
    on them (the group's sampling policy is the current one: its log-probs, detached, are
    ``pi_old``). Both models run in eval mode (no dropout: at equal weights the ratio is exactly 1
    and the KL 0)."""
    policy.eval()
    reference.eval()
    input_ids, mask = layout.encode_history(history, item_codes, user)
    cands = generate_candidates(mode, policy, input_ids, mask, trie, layout, group_size, temperature, top_k)
    n, g = cands.items.shape
    rows = (input_ids.repeat_interleave(g, 0), mask.repeat_interleave(g, 0), cands.tokens.flatten(0, 1))
    log_probs, entropy = policy_log_probs(policy, *rows)
    with torch.no_grad():
        ref_log_probs = target_log_probs(reference, *rows)
    log_probs, ref_log_probs = log_probs.view(n, g, -1), ref_log_probs.view(n, g, -1)
    # The rank-aware reward ranks samples by the policy's probability (repeated samples of one item
    # share its rank and penalty: modules/rewards.py); beams come ranked.
    seq = log_probs.detach().sum(-1)
    rank = seq.argsort(dim=1, descending=True, stable=True).argsort(dim=1) if mode == "sample" else None
    reward = group_rewards(rewards, cands.items, target, rank, item_embeddings, alpha)
    out = grpo_objective(log_probs, log_probs.detach(), ref_log_probs, group_advantages(reward, eps), clip_eps, beta)
    hit = (cands.items == target[:, None]).float()
    return GRPOStats(out.loss, float(reward.mean()), float(hit.mean()), float(hit.any(1).float().mean()), float(out.kl),
                     float(out.clip_fraction), float(entropy.detach().mean()))


# ----------------------------------------------------------------------------- train_grpo.py's runs

STAT_KEYS = ("reward", "hit_rate", "group_hit", "kl", "clip_fraction", "entropy")  # of GRPOStats, per step


def mean_stats(rows: list[dict]) -> dict:
    """The mean of each of :data:`STAT_KEYS` over per-step statistics ``rows`` ({} when none)."""
    return {k: float(np.mean([r[k] for r in rows])) for k in STAT_KEYS} if rows else {}


def sft_metrics(path: Path, key: dict, compute: Callable[[], tuple]) -> dict:
    """The SFT model's metrics on the validation set (``valid``), the test set (``test``) and the
    validation sample the GRPO run validates on (``valid_sample``; ``compute`` gives None when
    that is the whole set), computed once per ``key`` (the SFT weights and the sample) and kept
    in ``path``: a resumed run does not pay for a second full test (minutes on Beauty)."""
    try:
        stored = json.loads(path.read_text())
        if all(stored.get(k) == v for k, v in key.items()) and "valid_sample" in stored:
            return stored
    except (OSError, ValueError):
        pass
    valid, test, valid_sample = compute()  # under torchrun: sharded over every rank, rank 0 writes
    record = {**key, "valid": valid, "test": test, "valid_sample": valid if valid_sample is None else valid_sample}
    if distributed.is_main():
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(record, indent=1, default=float) + "\n")
        tmp.replace(path)
    return record
