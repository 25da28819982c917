"""Constrained beam search over the semantic IDs of the catalogue.

The valid code sequences form a prefix trie stored as tensors (:class:`PrefixTrie`), so the
codes allowed after every beam's prefix are found for the whole batch x beams at once, on
CPU or GPU; the only Python loop is over the L code levels. The model is anything with the
decoding interface of :mod:`modules.transformers.generation` (T5 and GPT).
:func:`beam_search_tokens` runs the same loop without a trie, over the whole output
vocabulary (token spaces such as ActionPiece's).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from modules.tokens import BOS, PAD, TokenLayout


class PrefixTrie:
    """Valid item code sequences as a trie of tensors.

    The nodes at depth ``l`` are the distinct valid prefixes of length ``l``, numbered in
    sorted order (depth 0: one node, the empty prefix). Child ``c`` of node ``p`` at depth
    ``l`` has key ``p * codebook_sizes[l] + c``; ``keys[l]`` lists the valid keys sorted, and
    a child's node id is its key's rank there. Lookups use a dense table
    (nodes x codebook_sizes[l]) where it has at most ``max_dense`` entries (a gather, the
    fastest) and binary search on ``keys[l]`` otherwise (memory O(items) per level).
    """

    def __init__(self, item_codes: torch.Tensor, codebook_sizes, max_dense: int = 1 << 24,
                 item_ids: torch.Tensor | None = None):
        """``item_ids``: the item id each row of ``item_codes`` stands for (default: its row
        number), e.g. ``PrefixTrie(codes[ids], sizes, item_ids=ids)`` searches a subset of the
        catalogue and returns catalogue ids."""
        item_codes = torch.as_tensor(item_codes).long()
        self.codebook_sizes = tuple(int(c) for c in codebook_sizes)
        if item_codes.dim() != 2 or item_codes.shape[1] != len(self.codebook_sizes):
            raise ValueError(f"modules/beam_search.py: item_codes must be (N, {len(self.codebook_sizes)})")
        sizes = torch.tensor(self.codebook_sizes, device=item_codes.device)
        if ((item_codes < 0) | (item_codes >= sizes)).any():
            raise ValueError("modules/beam_search.py: item_codes has a code outside [0, codebook_sizes[l])")
        self.keys, self.tables = [], []
        node = torch.zeros(item_codes.shape[0], dtype=torch.long, device=item_codes.device)
        num_nodes = 1
        for level, size in enumerate(self.codebook_sizes):
            keys, node = torch.unique(node * size + item_codes[:, level], sorted=True, return_inverse=True)
            table = None
            if num_nodes * size <= max_dense:  # int32: half the memory (Beauty: 12 MB in all)
                table = torch.full((num_nodes * size,), -1, dtype=torch.int32, device=keys.device)
                table[keys] = torch.arange(len(keys), dtype=torch.int32, device=keys.device)
                table = table.view(num_nodes, size)
            self.keys.append(keys)
            self.tables.append(table)
            num_nodes = len(keys)
        if num_nodes != item_codes.shape[0]:
            raise ValueError("modules/beam_search.py: item_codes has duplicate rows (items must have unique codes)")
        self.leaf_item = torch.empty_like(node)
        if item_ids is None:
            item_ids = torch.arange(len(node), device=node.device)
        elif torch.as_tensor(item_ids).shape != node.shape:
            raise ValueError(f"modules/beam_search.py: item_ids must have one id per row of item_codes "
                             f"({len(node)}), got shape {tuple(torch.as_tensor(item_ids).shape)}")
        self.leaf_item[node] = torch.as_tensor(item_ids, device=node.device).long()

    @property
    def num_levels(self) -> int:
        return len(self.codebook_sizes)

    @property
    def num_items(self) -> int:
        return len(self.leaf_item)

    def to(self, device) -> "PrefixTrie":
        out = object.__new__(PrefixTrie)
        out.codebook_sizes = self.codebook_sizes
        out.keys = [k.to(device) for k in self.keys]
        out.tables = [None if t is None else t.to(device) for t in self.tables]
        out.leaf_item = self.leaf_item.to(device)
        return out

    def children(self, level: int, node: torch.Tensor) -> torch.Tensor:
        """Node ids (...) at depth ``level`` -> (..., codebook_sizes[level]) child ids, -1 = invalid.

        Negative (dead) input nodes have no children.
        """
        size = self.codebook_sizes[level]
        parent = node.clamp(min=0)
        table = self.tables[level]
        if table is not None:
            child = table[parent].long()
        else:
            # A node's children are the run keys[lo:hi] of keys in [parent * size, (parent + 1) * size):
            # two binary searches per node, then the few children scattered into their code columns
            # (not one search per code: 15,360 per node with RecGPT's FSQ codes).
            keys = self.keys[level]
            lo = torch.searchsorted(keys, (parent * size).contiguous())
            hi = torch.searchsorted(keys, ((parent + 1) * size).contiguous())
            width = int((hi - lo).max()) if hi.numel() else 0
            last = torch.maximum(hi - 1, lo)[..., None]  # columns past a node's children repeat its last
            idx = torch.minimum(lo[..., None] + torch.arange(width, device=node.device), last)
            idx = idx.clamp(max=len(keys) - 1)
            has = (hi > lo)[..., None]  # a childless node writes -1 into column 0
            code = torch.where(has, keys[idx] - parent[..., None] * size, 0)
            child = torch.full((*node.shape, size), -1, dtype=torch.long, device=node.device)
            child.scatter_(-1, code, torch.where(has, idx, -1))
        return child.masked_fill(node[..., None] < 0, -1)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """(..., L) codes -> item ids, -1 where the codes are no item. One binary search per
        level on ``keys`` (not :meth:`children`, which lists a node's whole codebook: 15,360
        entries per query for RecGPT's FSQ codes)."""
        node = torch.zeros(codes.shape[:-1], dtype=torch.long, device=codes.device)
        for level, size in enumerate(self.codebook_sizes):
            code, keys = codes[..., level], self.keys[level]
            query = (node.clamp(min=0) * size + code.clamp(0, size - 1)).contiguous()
            pos = torch.searchsorted(keys, query).clamp(max=len(keys) - 1)
            found = (keys[pos] == query) & (node >= 0) & (code >= 0) & (code < size)
            node = torch.where(found, pos, -1)
        return torch.where(node >= 0, self.leaf_item[node.clamp(min=0)], -1)


class BeamSearchOutput(NamedTuple):
    items: torch.Tensor  # (n, K) item_ids, best first; -1 = no (valid) item
    scores: torch.Tensor  # (n, K) sum of the L tokens' log-probs; -inf where no beam was left
    tokens: torch.Tensor  # (n, K, L) generated token ids (PAD where no beam was left)
    invalid_rate: float | None  # unconstrained search: fraction of the returned beams that are no item


class TokenBeams(NamedTuple):
    tokens: torch.Tensor  # (n, B, T) token ids, best beam first (PAD where no beam was left)
    scores: torch.Tensor  # (n, B) sum of the T tokens' log-probs (-inf where no beam was left)


def _search(model, input_ids, attention_mask, beam_size: int, ranges, trie: PrefixTrie | None, constrained: bool):
    """The beam search loop shared by :func:`beam_search` and :func:`beam_search_tokens`.

    ``ranges[t] = (offset, size)``: step t picks among tokens [offset, offset + size) (size
    None: the whole output vocabulary). With a ``trie``, beams also track their trie node
    and, if ``constrained``, only valid prefixes are kept. All beams of all users advance
    together; the only Python loop is over the steps.
    Returns scores (n, b), tokens (n, b, T) and trie nodes (n, b) (-1: no valid prefix).

    Runs in fp32 even inside a caller's autocast: bf16 logits reorder near-tied beams (on a
    tiny T5, bf16 and exhaustive fp32 scoring disagreed on the top-10 order of 19 of 96
    users), and a ranking must not depend on the training precision.
    """
    with torch.autocast(input_ids.device.type, enabled=False):
        return _search_fp32(model, input_ids, attention_mask, beam_size, ranges, trie, constrained)


def _search_fp32(model, input_ids, attention_mask, beam_size: int, ranges, trie: PrefixTrie | None,
                 constrained: bool):
    n, device = input_ids.shape[0], input_ids.device
    state = model.start_decoding(input_ids, attention_mask)
    # The first step runs one beam per user: all beams would start from the same BOS.
    tokens = torch.full((n, 1), BOS, dtype=torch.long, device=device)
    node = torch.zeros((n, 1), dtype=torch.long, device=device)
    scores = torch.zeros((n, 1), device=device, dtype=torch.float32)
    picked = torch.zeros((n, 1, 0), dtype=torch.long, device=device)
    for step, (offset, size) in enumerate(ranges):
        log_probs, state = model.step(state, tokens)
        log_probs = log_probs.float()
        size = log_probs.shape[-1] - offset if size is None else size
        cand = scores[..., None] + log_probs[..., offset : offset + size]  # (n, b, size)
        child = trie.children(step, node) if trie is not None else None
        if constrained:
            cand = cand.masked_fill(child < 0, float("-inf"))
        scores, flat = cand.flatten(1).topk(min(beam_size, cand[0].numel()), dim=1)
        beam_idx, choice = flat // size, flat % size
        if child is not None:
            node = child.flatten(1).gather(1, flat)
        tokens = choice + offset
        picked = torch.cat([picked.gather(1, beam_idx[..., None].expand(-1, -1, step)), tokens[..., None]], dim=2)
        if step + 1 < len(ranges):
            state = state.reorder(beam_idx)
    return scores, picked, node


def _pad_beams(x: torch.Tensor, width: int, value) -> torch.Tensor:
    """Pad dim 1 of x to ``width`` with ``value`` (fewer candidates than beams: tiny vocabularies)."""
    if x.shape[1] >= width:
        return x[:, :width]
    return torch.cat([x, x.new_full((x.shape[0], width - x.shape[1], *x.shape[2:]), value)], dim=1)


@torch.no_grad()
def beam_search(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, trie: PrefixTrie,
                layout: TokenLayout, beam_size: int, top_k: int | None = None,
                unconstrained: bool = False) -> BeamSearchOutput:
    """Top-``top_k`` items per user by beam search over the L code levels.

    Constrained (default): only prefixes of valid items are kept, so the results are distinct
    valid items; with ``beam_size`` >= the number of items it is exact (equals scoring every
    item). ``unconstrained``: any code of the right level is allowed at each step (tokens of
    other kinds never are); returned beams may be no item (``items`` -1, see ``invalid_rate``).
    """
    top_k = beam_size if top_k is None else top_k
    if not 0 < top_k <= beam_size:
        raise ValueError(f"modules/beam_search.py: need 0 < top_k <= beam_size, got {top_k}, {beam_size}")
    if trie.codebook_sizes != layout.codebook_sizes:
        raise ValueError("modules/beam_search.py: trie and layout have different codebook_sizes")
    if trie.leaf_item.device != input_ids.device:
        raise ValueError(f"modules/beam_search.py: trie is on {trie.leaf_item.device}, inputs on "
                         f"{input_ids.device} (use trie.to(device) once)")
    ranges = list(zip(layout.offsets, layout.codebook_sizes))
    scores, tokens, node = _search(model, input_ids, attention_mask, beam_size, ranges, trie, not unconstrained)
    k = min(top_k, scores.shape[1])
    items = torch.where(node >= 0, trie.leaf_item[node.clamp(min=0)], -1)
    invalid_rate = float((items[:, :k] < 0).float().mean()) if unconstrained else None
    return BeamSearchOutput(_pad_beams(items, top_k, -1), _pad_beams(scores, top_k, float("-inf")),
                            _pad_beams(tokens, top_k, PAD), invalid_rate)


def merge_reserved(main: BeamSearchOutput, reserved: BeamSearchOutput, top_k: int, slots: int) -> torch.Tensor:
    """Top-``top_k`` items from two searches over disjoint parts of the catalogue, ``slots`` of
    them reserved for the second (TIGER's cold-start share: ``reserved`` searched the cold
    items, ``main`` the rest). ``reserved``'s best ``slots`` items (fewer where it found fewer)
    and ``main``'s best ``top_k`` minus as many, ranked together by score (ties: ``main``
    first). (n, top_k) item ids, -1 where both searches ran out of items."""
    if not 0 < slots <= top_k:
        raise ValueError(f"modules/beam_search.py: need 0 < slots <= top_k, got {slots}, {top_k}")
    if main.items.shape[1] < top_k or reserved.items.shape[1] < slots:
        raise ValueError("modules/beam_search.py: merge_reserved needs top_k main and slots reserved beams per row")
    # Constrained beams come best first and items that were not found (-1, score -inf) last.
    n_reserved = (reserved.items[:, :slots] >= 0).sum(1, keepdim=True)
    take_main = torch.arange(top_k, device=main.items.device) < top_k - n_reserved
    take_reserved = torch.arange(slots, device=main.items.device) < n_reserved
    items = torch.cat([torch.where(take_main, main.items[:, :top_k], -1),
                       torch.where(take_reserved, reserved.items[:, :slots], -1)], dim=1)
    scores = torch.cat([main.scores[:, :top_k].masked_fill(~take_main, float("-inf")),
                        reserved.scores[:, :slots].masked_fill(~take_reserved, float("-inf"))], dim=1)
    order = scores.argsort(dim=1, descending=True, stable=True)[:, :top_k]
    return items.gather(1, order)


@torch.no_grad()
def beam_search_tokens(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, beam_size: int,
                       num_steps: int) -> TokenBeams:
    """Unconstrained beam search over the whole output vocabulary for ``num_steps`` tokens.

    For token spaces without a fixed per-position layout (e.g. ActionPiece); with
    ``beam_size`` >= V_out ** num_steps it enumerates every sequence, best first.
    """
    scores, tokens, _ = _search(model, input_ids, attention_mask, beam_size, [(0, None)] * num_steps, None, False)
    return TokenBeams(_pad_beams(tokens, beam_size, PAD), _pad_beams(scores, beam_size, float("-inf")))
