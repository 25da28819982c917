"""Training losses of the semantic-ID recommenders: next-item cross-entropy over the item's
code tokens, either one sliding window per target (T5 and GPT) or every target of a whole
sequence in one causal pass (GPT only).

Both return (summed cross-entropy, number of label tokens), so callers can average over the
tokens of a batch however it was cut into passes. Rows run in chunks of similar length
(:func:`modules.training.length_chunks`): padding sits at the end and is masked, so the loss
is the same and most padding is never computed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
