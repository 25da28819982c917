"""The decoding interface that beam search drives, shared by the T5 and GPT recommenders.

A model implements

    state = model.start_decoding(input_ids, attention_mask)     # one beam per user
    log_probs, state = model.step(state, tokens)                # tokens (n, b) -> (n, b, V_out)
    state = state.reorder(beam_idx)                             # (n, b_new) indices in [0, b)

Work that does not depend on the beam (the encoder pass, cross-attention keys/values, the
GPT history prefix) is done once per user in ``start_decoding`` and shared by its beams;
only the few decoded positions are cached per beam. ``step`` writes into the cache of the
state it is given, so feed each state to ``step`` once and go on with the returned one.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import torch
import torch.nn.functional as F

from modules.tokens import BOS


class KVCache:
    """Self-attention keys/values of the decoded positions of every layer, one row per beam.

    One position-major buffer (capacity, layers, 2, rows, h, d): a step writes its position in
    place (no concatenation), and reordering beams copies only the filled positions, with a
    single ``index_select``. Because steps write in place, a decoding state must be stepped
    at most once (beam search never goes back); :meth:`select` makes an independent copy.
    """

    def __init__(self, num_layers: int, buffer: torch.Tensor | None = None, length: int = 0):
        self.num_layers, self.buffer, self.length = num_layers, buffer, length

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store position ``length`` of ``layer``: k, v of shape (rows, h, 1, d)."""
        rows, h, _, d = k.shape
        if self.buffer is None:
            self.buffer = k.new_empty((4, self.num_layers, 2, rows, h, d))
        elif self.length == self.buffer.shape[0]:  # full: double the capacity
            grown = self.buffer.new_empty((2 * self.length, *self.buffer.shape[1:]))
            grown[: self.length] = self.buffer
            self.buffer = grown
        self.buffer[self.length, layer, 0] = k[:, :, 0]
        self.buffer[self.length, layer, 1] = v[:, :, 0]

    def view(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of positions 0..length (the one just written included), position-major:
        (t, rows, h, d) each, as :func:`modules.transformers.layers.cached_scores` takes them."""
        kv = self.buffer[: self.length + 1, layer]
        return kv[:, 0], kv[:, 1]

    def advanced(self) -> "KVCache":
        """The cache after a step: one more position (sharing the buffer)."""
        return KVCache(self.num_layers, self.buffer, self.length + 1)

    def select(self, rows: torch.Tensor) -> "KVCache":
        """A new cache holding rows ``rows`` (beam reordering)."""
        if self.buffer is None:
            return KVCache(self.num_layers)
        buffer = self.buffer.new_empty((self.buffer.shape[0], self.num_layers, 2, len(rows), *self.buffer.shape[4:]))
        # As (positions * layers * 2, rows, h * d): one gather of contiguous rows, into place.
        source = self.buffer[: self.length].flatten(0, 2).flatten(2)
        torch.index_select(source, 1, rows, out=buffer[: self.length].flatten(0, 2).flatten(2))
        return KVCache(self.num_layers, buffer, self.length)


def beam_rows(beam_idx: torch.Tensor, beams_before: int) -> torch.Tensor:
    """(n, b_new) beam indices within each user -> (n * b_new,) rows of the (n * b_before) batch."""
    n = beam_idx.shape[0]
    base = torch.arange(n, device=beam_idx.device)[:, None] * beams_before
    return (base + beam_idx).reshape(-1)


@dataclasses.dataclass
class DecodingState:
    """Per-beam cache of a decoding batch; subclasses add the per-user (shared) tensors."""

    cache: KVCache
    num_beams: int

    def reorder(self, beam_idx: torch.Tensor) -> "DecodingState":
        """New state whose beam j of user i continues old beam ``beam_idx[i, j]`` of user i."""
        rows = beam_rows(beam_idx, self.num_beams)
        return dataclasses.replace(self, cache=self.cache.select(rows), num_beams=beam_idx.shape[1])


class GenerativeRecommender(Protocol):
    """What :func:`modules.beam_search.beam_search` needs from a model."""

    def start_decoding(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> DecodingState: ...

    def step(self, state: DecodingState, tokens: torch.Tensor) -> tuple[torch.Tensor, DecodingState]: ...

    def __call__(self, input_ids, attention_mask, decoder_input_ids) -> torch.Tensor: ...


def shift_right(labels: torch.Tensor) -> torch.Tensor:
    """Teacher-forcing decoder inputs: BOS followed by all labels but the last."""
    return torch.cat([torch.full_like(labels[:, :1], BOS), labels[:, :-1]], dim=1)


def target_log_probs(model: GenerativeRecommender, input_ids, attention_mask, labels) -> torch.Tensor:
    """(n, T) log-probability of each label token under teacher forcing (one full forward)."""
    logits = model(input_ids, attention_mask, shift_right(labels))
    return F.log_softmax(logits.float(), dim=-1).gather(-1, labels[..., None]).squeeze(-1)
