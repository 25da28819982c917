"""One training step: what a ``loss_fn`` may return besides a bare mean loss, and the step's
gradients under torchrun (each rank's shard, summed over ranks as one global batch)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from modules import distributed


class StepOutput(NamedTuple):
    """What a ``loss_fn`` may return instead of a bare loss: the loss to minimise and scalar
    statistics of the step (e.g. GRPO's mean reward), averaged over each logging window and
    logged as ``train/<name>`` beside the loss (W&B, the bar, the progress lines)."""

    loss: "torch.Tensor | SummedLoss"
    metrics: dict[str, float | torch.Tensor]  # 0-d tensors are read only when logged


class SummedLoss(NamedTuple):
    """What a ``loss_fn`` may return instead of a mean: the loss summed over ``count`` terms
    (labels, tokens). One process minimises ``total / count``, as before. Under torchrun each
    rank's total is divided by the count summed over *all* ranks, the exact loss of the global
    batch, which averaging per-rank means is not when ranks hold different label counts. A bare
    scalar loss is taken as a mean over the batch's examples and weighted by shard size."""

    total: torch.Tensor
    count: "int | torch.Tensor"

    def mean(self) -> torch.Tensor:
        return self.total / self.count


def _distributed_backward(model, optimizer, loss_fn, idx: np.ndarray, window: dict[str, list[float]]) -> torch.Tensor:
    """One training step's loss and gradients under torchrun: this rank's shard of the global
    batch ``idx`` forward and backward, then gradients summed over ranks and divided by the
    global count (labels for a :class:`SummedLoss`, examples for a mean); the loss and the step
    statistics are summed alongside (one concurrent collective). Returns the global batch's loss
    (on every rank)."""
    local = distributed.shard(idx)
    out = loss_fn(local)
    stats: dict[str, float] = {}
    if isinstance(out, StepOutput):
        out, stats = out.loss, out.metrics
    if isinstance(out, SummedLoss):
        total, count = out.total, out.count
    else:  # a mean over the shard's examples
        total, count = out * len(local), len(local)
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    keys = sorted(stats)  # the same statistics on every rank, weighted by shard size
    summed = distributed.all_reduce_gradients(
        model.parameters(), [total.detach(), count, len(local), *(float(stats[k]) * len(local) for k in keys)],
        divisor_index=1)
    for i, k in enumerate(keys):
        window.setdefault(k, []).append(float(summed[3 + i] / summed[2]))
    return (summed[0] / summed[1]).float()
