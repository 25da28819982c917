"""Training losses of the recommenders: next-item cross-entropy over the item's code tokens,
either one sliding window per target (T5 and GPT) or every target of a whole sequence in one
causal pass (GPT; RecGPT's block-causal pass predicts an item's L codes in parallel:
:func:`next_item_block_loss`); and, for the ID-based SASRec, a full softmax over all items at every
position of a sequence (:func:`full_softmax_loss`).

All return (summed cross-entropy, number of labels: code tokens or items), so callers can
average over the labels of a batch however it was cut into passes. Rows run in chunks of similar length
(:func:`modules.training.length_chunks`): padding sits at the end and is masked, so the loss
is the same and most padding is never computed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from modules.tokens import TokenLayout
from modules.training import length_chunks
from modules.transformers.generation import shift_right


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def sliding_window_loss(model, layout: TokenLayout, item_codes: torch.Tensor, history: torch.Tensor,
                        target: torch.Tensor, user: torch.Tensor | None, amp: torch.dtype | None = None,
                        chunk: int | None = None) -> tuple[torch.Tensor, int]:
    """Each row: encoder/prefix = the history's tokens, labels = the target item's L codes."""
    input_ids, mask = layout.encode_history(history, item_codes, user)
    labels = layout.encode_target(target, item_codes)
    total = torch.zeros((), device=input_ids.device)
    for sel, width in length_chunks(mask.sum(1), chunk):
        with _autocast(input_ids.device, amp):
            logits = model(input_ids[sel, :width], mask[sel, :width], shift_right(labels[sel]))
        total = total + F.cross_entropy(logits.float().flatten(0, 1), labels[sel].flatten(), reduction="sum")
    return total, labels.numel()


def all_positions_loss(model, layout: TokenLayout, item_codes: torch.Tensor, items: torch.Tensor,
                       user: torch.Tensor | None, amp: torch.dtype | None = None,
                       chunk: int | None = None) -> tuple[torch.Tensor, int]:
    """Each row a whole segment of items (oldest first, -1 padded): one causal pass predicts the
    codes of every item after the first (:meth:`GPT.next_token_logits`). Equals the sum of
    :func:`sliding_window_loss` over those targets with the same histories (tested)."""
    input_ids, mask = layout.encode_history(items, item_codes, user)
    first = (0 if user is None else 1) + layout.num_levels  # the first token that is a label
    is_label = mask.clone()
    is_label[:, :first] = False
    predict = torch.zeros_like(is_label)
    predict[:, :-1] = is_label[:, 1:]  # position j predicts token j + 1
    total = torch.zeros((), device=input_ids.device)
    for sel, width in length_chunks(mask.sum(1), chunk):
        with _autocast(input_ids.device, amp):
            logits = model.next_token_logits(input_ids[sel, :width], mask[sel, :width], predict[sel, :width])
        labels = input_ids[sel, :width][is_label[sel, :width]]  # row-major, as the predicting positions
        total = total + F.cross_entropy(logits.float(), labels, reduction="sum")
    return total, int(is_label.sum())


def next_item_block_loss(model, layout: TokenLayout, item_codes: torch.Tensor, items: torch.Tensor,
                         amp: torch.dtype | None = None, chunk: int | None = None) -> tuple[torch.Tensor, int]:
    """RecGPT's loss (:class:`modules.transformers.recgpt.RecGPT`): each row a whole segment of items
    (oldest first, -1 padded), one block-causal pass; position l of item t's block predicts code l
    of item t + 1 (cross-entropy over level l's codes) for every item after the first. Returns
    (summed cross-entropy, number of labels: L per target); equals scoring each target from its
    history alone (tested)."""
    input_ids, mask = layout.encode_history(items, item_codes)
    L = layout.num_levels
    predict = torch.zeros_like(mask)
    predict[:, :-L] = mask[:, L:]  # a block predicts the next one, when there is a next one
    labels = torch.zeros_like(input_ids)
    labels[:, :-L] = input_ids[:, L:]  # the token L positions on: same level, next item
    level = torch.arange(input_ids.shape[1], device=input_ids.device) % L
    total = torch.zeros((), device=input_ids.device)
    for sel, width in length_chunks(mask.sum(1), chunk):
        rows = predict[sel, :width]
        with _autocast(input_ids.device, amp):
            logits = model.next_item_logits(input_ids[sel, :width], mask[sel, :width], rows)
        for lvl, level_logits in enumerate(logits):  # row-major, as the predicting positions
            target = labels[sel, :width][rows & (level[:width] == lvl)] - layout.offsets[lvl]
            total = total + F.cross_entropy(level_logits.float(), target, reduction="sum")
    return total, int(predict.sum())


# Above this many logits (targets x items) per batch, full_softmax_loss recomputes each chunk's
# logits in the backward pass instead of keeping them: 2^26 fp32 logits are 256 MB (+ as much
# for their gradient). Amazon Beauty (12k items, batch 256: ~2k targets, 25M logits) stays
# under it and pays no recomputation; MovieLens-32M (84k items, 20 targets per row) does not.
LOGITS_BUDGET = 2**26


def _summed_cross_entropy(hidden: torch.Tensor, items: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy((hidden @ items.T).float(), target, reduction="sum")


def full_softmax_loss(model, items: torch.Tensor, amp: torch.dtype | None = None, chunk: int | None = None,
                      logits_budget: int = LOGITS_BUDGET) -> tuple[torch.Tensor, int]:
    """SASRec's loss: each row a segment of item_ids (n, W), oldest first, -1 padded; every
    position predicts the next item with a softmax over all items (scores = hidden states x
    ``model.item_embeddings``), so one causal pass trains all W - 1 targets of a row.
    Returns (summed cross-entropy, number of targets); equals a per-target loop (tested).

    Rows run in chunks of ``chunk`` of similar length (:func:`length_chunks`). When the
    batch's logits would exceed ``logits_budget`` elements, each chunk's cross-entropy is
    checkpointed: its (targets x items) logits live only while that chunk is computed, in the
    forward and again in the backward pass (one extra matmul per chunk).
    """
    inputs, target = items[:, :-1], items[:, 1:]
    is_target = target >= 0
    recompute = torch.is_grad_enabled() and int(is_target.sum()) * model.config.num_items > logits_budget
    table = model.item_embeddings
    total = torch.zeros((), device=items.device)
    for sel, width in length_chunks(is_target.sum(1), chunk):
        keep = is_target[sel, :width]
        with _autocast(items.device, amp):
            hidden = model(inputs[sel, :width])[keep]
            labels = target[sel, :width][keep]
            if recompute:
                # Nothing random inside: no RNG state to stash for the recomputation.
                loss = checkpoint(_summed_cross_entropy, hidden, table, labels, use_reentrant=False,
                                  preserve_rng_state=False)
            else:
                loss = _summed_cross_entropy(hidden, table, labels)
        total = total + loss
    return total, int(is_target.sum())
