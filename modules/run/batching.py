"""Batches, optimiser and learning-rate schedule. Batch order is a pure function of (seed,
epoch), so a resumed run takes the same batches as one that never stopped."""

from __future__ import annotations

import math
from typing import Iterator

import gin
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


class WarmupCosine(torch.optim.lr_scheduler.LRScheduler):
    """Linear warm-up to the base lr over ``warmup_steps``, then a cosine down to ``min_ratio`` x
    base. ``ends_at = 'steps'``: the cosine ends at ``total_steps``. ``ends_at = 'first'``: at
    ``total_steps`` or when the run's time budget is spent, whichever comes first, so that a run
    capped by ``max_train_minutes`` on a CPU slower than the one its step count was sized on
    still ends its decay at the cap instead of being cut off at a high learning rate. The budget
    share comes from ``train_loop`` (``budget_fraction``: the training clock's seconds over the
    cap, the same on every rank), and the time-based progress counts from the end of the warm-up
    (``warm_fraction``). Both are attributes, so ``state_dict`` keeps them for a resume. With
    'first' the schedule depends on the clock, so two runs are no longer bit-identical."""

    def __init__(self, optimizer, warmup_steps: int, total_steps: int, min_ratio: float = 0.0,
                 ends_at: str = "steps"):
        if ends_at not in ("steps", "first"):
            raise ValueError(f"warmup_cosine.ends_at must be 'steps' or 'first', got {ends_at!r}")
        self.warmup_steps, self.total_steps, self.min_ratio, self.ends_at = (
            warmup_steps, total_steps, min_ratio, ends_at)
        self.budget_fraction: float | None = None  # set by train_loop before each step (capped runs)
        self.warm_fraction: float | None = None  # budget_fraction when the warm-up ended
        super().__init__(optimizer)

    def progress(self, step: int) -> float:
        """Share of the cosine done before ``step`` (0 during the warm-up, 1 at its end)."""
        if step < self.warmup_steps:
            return 0.0
        done = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        if self.ends_at == "first" and self.budget_fraction is not None:
            if self.warm_fraction is None:
                self.warm_fraction = self.budget_fraction
            left = 1.0 - self.warm_fraction
            done = max(done, 1.0 if left <= 0 else min(1.0, (self.budget_fraction - self.warm_fraction) / left))
        return done

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / max(1, self.warmup_steps)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * self.progress(step)))

    def get_lr(self) -> list[float]:
        return [base * self.factor(self.last_epoch) for base in self.base_lrs]


@gin.configurable
def warmup_cosine(optimizer, warmup_steps: int, total_steps: int, min_ratio: float = 0.0,
                  ends_at: str = "steps") -> WarmupCosine:
    """Linear warm-up to the base lr, then cosine decay to ``min_ratio`` x base at total_steps,
    or (``ends_at = 'first'``, bench/configs/cpu_60min.gin) at the time cap if that comes first:
    see :class:`WarmupCosine`."""
    return WarmupCosine(optimizer, warmup_steps, total_steps, min_ratio, ends_at)
