"""Candidate items drawn from a generative recommender: G per user, every one a real item.

Two ways, both batched over users x G on CPU or GPU, both driven through the decoding
interface of :mod:`modules.transformers.generation` (``start_decoding`` / ``step`` /
``state.reorder``), the only Python loop being over the L code levels:

- :func:`sample_items`: ancestral sampling with temperature and top-k, constrained by the
  item trie (:class:`modules.beam_search.PrefixTrie`): at each level only the codes that
  continue the sampled prefix into some item can be drawn, so the G samples are valid items
  (repeats possible). The distribution sampled is, per level, ``softmax(logits / T)`` over the
  valid codes restricted to the top-k of them (:func:`constrained_probs`);
- :func:`beam_candidates`: constrained beam search of width G, i.e. the G distinct items of
  highest (approximate) sequence probability, best first (MiniOneRec's candidate generation).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from modules.beam_search import PrefixTrie, beam_search
from modules.tokens import BOS, TokenLayout


class Candidates(NamedTuple):
    items: torch.Tensor  # (n, G) item_ids
    tokens: torch.Tensor  # (n, G, L) their code tokens (decoder labels)


def constrained_probs(logits: torch.Tensor, valid: torch.Tensor, temperature: float = 1.0,
                      top_k: int | None = None) -> torch.Tensor:
    """Next-code probabilities (..., C): ``softmax(logits / temperature)`` over the ``valid``
    codes (bool, same shape), restricted to the ``top_k`` most likely of them (ties at the k-th
    value are kept). A row without a valid code would be a dead prefix, which a trie never has."""
    if temperature <= 0:
        raise ValueError(f"modules/sampling.py: temperature must be > 0, got {temperature}")
    scores = (logits.float() / temperature).masked_fill(~valid, float("-inf"))
    if top_k is not None and top_k < scores.shape[-1]:
        if top_k < 1:
            raise ValueError(f"modules/sampling.py: top_k must be >= 1 or None, got {top_k}")
        kth = scores.topk(top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    return torch.softmax(scores, dim=-1)


@torch.no_grad()
def sample_items(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, trie: PrefixTrie,
                 layout: TokenLayout, num_samples: int, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None) -> Candidates:
    """``num_samples`` items per user drawn level by level from :func:`constrained_probs`.

    Runs in fp32 and in the model's current mode (call ``model.eval()`` for no dropout). The
    encoder pass / history prefix runs once per user; the G samples share it. Random draws use
    ``generator`` (default: torch's global generator of the inputs' device, which seeded runs and
    exact resume control).
    """
    if num_samples < 1:
        raise ValueError(f"modules/sampling.py: num_samples must be >= 1, got {num_samples}")
    if trie.codebook_sizes != layout.codebook_sizes:
        raise ValueError("modules/sampling.py: trie and layout have different codebook_sizes")
    n, device = input_ids.shape[0], input_ids.device
    with torch.autocast(device.type, enabled=False):
        state = model.start_decoding(input_ids, attention_mask)
        tokens = torch.full((n, 1), BOS, dtype=torch.long, device=device)
        node = torch.zeros((n, 1), dtype=torch.long, device=device)
        picked = []
        for level, (offset, size) in enumerate(zip(layout.offsets, layout.codebook_sizes)):
            log_probs, state = model.step(state, tokens)
            child = trie.children(level, node)  # (n, b, size)
            probs = constrained_probs(log_probs[..., offset: offset + size], child >= 0, temperature, top_k)
            if level == 0:  # one row per user so far: draw all G first codes from it
                code = torch.multinomial(probs[:, 0], num_samples, replacement=True, generator=generator)
                child = child.expand(-1, num_samples, -1)
                if level + 1 < layout.num_levels:
                    state = state.reorder(torch.zeros_like(code))
            else:  # each of the G rows continues its own prefix: no reordering
                code = torch.multinomial(probs.flatten(0, 1), 1, generator=generator).view(n, num_samples)
            node = child.gather(-1, code[..., None])[..., 0]
            tokens = code + offset
            picked.append(tokens)
    items = trie.leaf_item[node]
    return Candidates(items, torch.stack(picked, dim=-1))


@torch.no_grad()
def beam_candidates(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, trie: PrefixTrie,
                    layout: TokenLayout, num_candidates: int) -> Candidates:
    """The ``num_candidates`` best distinct valid items per user by constrained beam search of
    that width (deterministic; best first)."""
    if num_candidates > trie.num_items:
        raise ValueError(f"modules/sampling.py: {num_candidates} distinct candidates asked from a catalogue "
                         f"of {trie.num_items} items")
    out = beam_search(model, input_ids, attention_mask, trie, layout, beam_size=num_candidates)
    return Candidates(out.items, out.tokens)


def generate_candidates(mode: str, model, input_ids, attention_mask, trie: PrefixTrie, layout: TokenLayout,
                        group_size: int, temperature: float = 1.0, top_k: int | None = None) -> Candidates:
    """``mode`` 'sample' (:func:`sample_items`) or 'beam' (:func:`beam_candidates`)."""
    if mode == "sample":
        return sample_items(model, input_ids, attention_mask, trie, layout, group_size, temperature, top_k)
    if mode == "beam":
        return beam_candidates(model, input_ids, attention_mask, trie, layout, group_size)
    raise ValueError(f"modules/sampling.py: candidate mode must be 'sample' or 'beam', got {mode!r}")
