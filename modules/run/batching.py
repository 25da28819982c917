"""Batches, optimiser and learning-rate schedule. Batch order is a pure function of (seed,
epoch), so a resumed run takes the same batches as one that never stopped."""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch


# ----------------------------------------------------------------------------- batches


def length_chunks(lengths: torch.Tensor, chunk: int | None) -> Iterator[tuple[torch.Tensor, int]]:
    """Split a batch into chunks of at most ``chunk`` rows of similar length: yields (row
    indices, longest length in the chunk), shortest first. Running each chunk cut to its own
    width skips most padding when lengths vary (``None``: one chunk, the whole batch)."""
    order = torch.argsort(lengths, stable=True)
    for sel in order.split(chunk or max(1, len(order))):
        yield sel, int(lengths[sel].max())


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The example order of one epoch, a pure function of (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def batch_indices(n: int, batch_size: int, seed: int, start_step: int = 0,
                  drop_last: bool = False) -> Iterator[tuple[int, int, np.ndarray]]:
    """Endless ``(step, epoch, indices)`` from global step ``start_step`` on (resume-safe)."""
    per_epoch = n // batch_size if drop_last else math.ceil(n / batch_size)
    if per_epoch == 0:
        raise ValueError(f"batch_size {batch_size} is larger than the {n} training examples (drop_last)")
    step = start_step
    while True:
        epoch, offset = divmod(step, per_epoch)
        order = epoch_order(n, seed, epoch)
        for b in range(offset, per_epoch):
            yield step, epoch, order[b * batch_size: (b + 1) * batch_size]
            step += 1


# ----------------------------------------------------------------------------- optimiser


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float,
                   betas: tuple[float, float] = (0.9, 0.999),
                   module_lrs: dict[torch.nn.Module, float] | None = None) -> torch.optim.AdamW:
    """AdamW; matrices decay, biases / norms / 1-d parameters do not. ``module_lrs``: submodules
    of ``model`` whose parameters train at their own learning rate (two more groups each, e.g.
    train_joint.py's RQ-VAE at lr_id beside the recommender at lr)."""
    claimed = {id(p) for m in (module_lrs or {}) for p in m.parameters()}
    parts = [([p for p in model.parameters() if id(p) not in claimed], lr),
             *((list(m.parameters()), m_lr) for m, m_lr in (module_lrs or {}).items())]
    groups, params = [], []
    for part, part_lr in parts:
        part = [p for p in part if p.requires_grad]
        params += part
        extra = {} if part_lr == lr else {"lr": part_lr}
        groups += [{"params": [p for p in part if p.dim() >= 2], "weight_decay": weight_decay, **extra},
                   {"params": [p for p in part if p.dim() < 2], "weight_decay": 0.0, **extra}]
    fused = all(p.is_cuda for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None)


def warmup_cosine(optimizer, warmup_steps: int, total_steps: int, min_ratio: float = 0.0):
    """Linear warm-up to the base lr, then cosine decay to ``min_ratio`` x base at total_steps."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
