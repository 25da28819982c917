"""RecGPT-style decoder (HKUDS/RecGPT ``model.py``, ``modeling_gpt2_rec.py``): items as blocks of
their L semantic-ID tokens, attention bidirectional inside a block and causal across blocks,
text-embedding chunks added to the token inputs, and the next item's L tokens predicted in
parallel.

- Input of the token of level l of item t: ``token_norm(embed(token)) + text_norm(proj(text))``
  where ``text`` is chunk l of the item's text embedding (the embedding cut into as many equal
  chunks as the chunked-FSQ tokenizer cut it, ``FSQConfig.num_chunks``; code l of that tokenizer
  depends on chunk l alone) and ``proj`` one linear map shared by all chunks (RecGPT's
  ``linear_layer`` + ``norm_aux``; its token embeddings go through ``norm_seq``). So an item never
  seen in training still has an input that says what it is.
- The levels after the chunks (the dedup level every tokenizer here appends) get a second linear
  map of the *whole* text embedding: the dedup code is an arbitrary rank inside a group of items
  with the same chunk codes, so its token embedding means nothing for an unseen item, and the
  whole embedding is the one thing that tells such items apart. With a tokenizer that has no
  chunks (RQ-VAE, RQ-KMeans, residual FSQ) every level gets the whole embedding.
- Attention (:func:`modules.transformers.gpt.block_causal_allowed` with block L): a token sees
  its own item's L tokens and every earlier item's, never a later item's.
- Output: position l of item t's block gives the distribution of code l of item t+1, over level
  l's codes only (the tied embedding rows of that level). Training (``next_item_block_loss`` in
  modules/objectives.py) scores every item of a segment after the first in one pass.
- Decoding: the history is encoded once; the L distributions of its last block are independent
  of each other, so :meth:`RecGPT.step` ignores the tokens it is fed and returns the next level's
  distribution. modules/beam_search.py's trie-constrained search then ranks valid items by the
  sum of their L log-probs: exactly (same items, same scores as scoring every item) when
  ``beam_size`` >= the number of items, an approximation otherwise, as for any model (a prefix
  cut at level l can hide a completion that later levels would have ranked high).

Departures from RecGPT:
- RecGPT shares one vocabulary of 15,360 codes (+ padding) across its 4 chunks; here each level
  has its own code tokens (the project's :class:`modules.tokens.TokenLayout`) and there is a
  fifth, dedup level (RecGPT has none; its items with equal codes collide).
- Transformer: the project's pre-norm RMSNorm blocks with RoPE over token positions (GPT-2 with
  learned absolute positions and LayerNorm in RecGPT), sized by the ``GPTConfig.*`` bindings;
  the output layer is tied to the token embedding (RecGPT: a separate ``pred_head``).
- Each of the L labels is scored by a softmax over its level's codes (RecGPT: over its whole shared
  vocabulary).
- Beam search: the project's batched trie search with one width (RecGPT: widths 10, 5, 5, 5
  per level, 20 kept, with a temperature of 0.1 on the logits, which changes no ranking of one
  level but does change how levels weigh against each other).
- No hashed user token (TIGER's): RecGPT has none, and its point is a model that transfers
  through item text to unseen items and users; a user-ID bucket would also break the
  one-block-per-item layout. ``num_user_buckets`` must be 0.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from modules.beam_search import PrefixTrie
from modules.tokens import NUM_SPECIAL, TokenLayout
from modules.transformers.generation import DecodingState, KVCache
from modules.transformers.gpt import DecoderStack, GPTConfig
from modules.transformers.layers import RMSNorm


@dataclass
class RecGPTConfig(GPTConfig):
    """:class:`GPTConfig` (the transformer's sizes) plus what comes from the tokenizer and data."""

    codebook_sizes: tuple[int, ...] = ()  # codes per level of the item IDs (L levels)
    num_items: int = 0  # rows of the item tables (text embeddings, codes)
    text_dim: int = 0  # size of an item's text embedding
    num_chunks: int = 0  # leading levels that each get one chunk of the text; the rest get all of it

    def __post_init__(self):
        super().__post_init__()
        self.codebook_sizes = tuple(int(c) for c in self.codebook_sizes)
        where = "modules/transformers/recgpt.py: RecGPTConfig"
        if not self.codebook_sizes or min(self.codebook_sizes) < 1:
            raise ValueError(f"{where}.codebook_sizes must be positive code counts, got {self.codebook_sizes}")
        expected = NUM_SPECIAL + sum(self.codebook_sizes)
        if self.vocab_size != expected or self.output_vocab_size != expected:
            raise ValueError(f"{where}.vocab_size / output_vocab_size must both be {expected} (specials + codes, "
                             f"no user tokens), got {self.vocab_size} / {self.output_vocab_size}")
        if self.num_items < 1 or self.text_dim < 1:
            raise ValueError(f"{where}.num_items and .text_dim must be >= 1, got {self.num_items}, {self.text_dim}")
        if not 0 <= self.num_chunks <= len(self.codebook_sizes):
            raise ValueError(f"{where}.num_chunks must be in [0, {len(self.codebook_sizes)}] (the levels), "
                             f"got {self.num_chunks}")
        if self.num_chunks and self.text_dim % self.num_chunks:
            raise ValueError(f"{where}.text_dim {self.text_dim} is not divisible by num_chunks {self.num_chunks}")

    @property
    def num_levels(self) -> int:
        return len(self.codebook_sizes)

    @property
    def offsets(self) -> tuple[int, ...]:
        return TokenLayout(self.codebook_sizes).offsets


@dataclass
class RecGPTDecodingState(DecodingState):
    last_block: torch.Tensor  # (n, L, D) final hidden states of each history's last item
    level: int = 0  # the level the next step returns


class RecGPT(DecoderStack):
    """Block-causal decoder over items' semantic IDs with text-chunk inputs (see the module
    docstring). Buffers ``item_text`` (num_items, text_dim) and ``item_codes`` (num_items, L) are
    fixed, saved with the weights (so an export needs no dataset), and set by :meth:`set_items`
    (:func:`build_recgpt`) or by loading a state dict. Inputs are right-padded histories of whole
    items as :meth:`TokenLayout.encode_history` makes them (no user token)."""

    def __init__(self, config: RecGPTConfig):
        super().__init__(config)
        cfg, L = config, config.num_levels
        self.num_levels = L
        # Not trained (no Parameter), but persistent: from_pretrained rebuilds the model from its
        # config and weights alone.
        self.register_buffer("item_text", torch.zeros(cfg.num_items, cfg.text_dim))
        self.register_buffer("item_codes", torch.zeros(cfg.num_items, L, dtype=torch.long))
        self.chunk_proj = (nn.Linear(cfg.text_dim // cfg.num_chunks, cfg.d_model, bias=False)
                           if cfg.num_chunks else None)
        self.item_proj = nn.Linear(cfg.text_dim, cfg.d_model, bias=False) if cfg.num_chunks < L else None
        self.token_norm = RMSNorm(cfg.d_model, cfg.eps)
        self.text_norm = RMSNorm(cfg.d_model, cfg.eps)
        self.reset_parameters()  # again: the layers above came after DecoderStack's
        self._trie: PrefixTrie | None = None  # item_codes as a trie, to find the item of a block

    # ------------------------------------------------------------------ item tables
    @torch.no_grad()
    def set_items(self, item_codes: torch.Tensor, item_text: torch.Tensor) -> None:
        """The codes (num_items, L) and text embeddings (num_items, text_dim) of every item."""
        item_codes, item_text = torch.as_tensor(item_codes).long(), torch.as_tensor(item_text).float()
        if tuple(item_codes.shape) != tuple(self.item_codes.shape):
            raise ValueError(f"RecGPT.set_items: item_codes must be {tuple(self.item_codes.shape)}, "
                             f"got {tuple(item_codes.shape)}")
        if tuple(item_text.shape) != tuple(self.item_text.shape):
            raise ValueError(f"RecGPT.set_items: item_text must be {tuple(self.item_text.shape)} "
                             f"(RecGPTConfig.num_items, text_dim), got {tuple(item_text.shape)}")
        PrefixTrie(item_codes, self.config.codebook_sizes, max_dense=0)  # raises on bad or duplicate codes
        self.item_codes.copy_(item_codes)
        self.item_text.copy_(item_text)
        self._trie = None

    def _load_from_state_dict(self, *args, **kwargs):
        self._trie = None  # new item_codes
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        self._trie = None  # item_codes moved (device)
        return super()._apply(fn, *args, **kwargs)

    def block_items(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(n, H * L) tokens -> (n, H) item_id of each block, -1 for padding and code tuples that
        are no item."""
        n, S = input_ids.shape
        L = self.num_levels
        if S % L:
            raise ValueError(f"RecGPT: rows of {S} tokens are not blocks of the {L} levels of whole items "
                             "(histories from TokenLayout.encode_history, no user token)")
        if self._trie is None:
            try:
                self._trie = PrefixTrie(self.item_codes, self.config.codebook_sizes, max_dense=0)
            except ValueError as e:
                raise RuntimeError(f"RecGPT.item_codes are not set (build with build_recgpt or load weights): "
                                   f"{e}") from None
        offsets = torch.tensor(self.config.offsets, device=input_ids.device)
        items = self._trie.lookup(input_ids.view(n, S // L, L) - offsets)
        return items.masked_fill(~attention_mask.bool().view(n, S // L, L).all(-1), -1)

    def text_inputs(self, items: torch.Tensor) -> torch.Tensor:
        """(n, H) item_ids (-1: none) -> (n, H * L, D) text part of the token inputs (0 for none)."""
        cfg, L = self.config, self.num_levels
        text = self.item_text[items.clamp(min=0)]  # (n, H, text_dim)
        parts = []
        if self.chunk_proj is not None:  # chunk l -> level l
            parts.append(self.chunk_proj(text.unflatten(-1, (cfg.num_chunks, cfg.text_dim // cfg.num_chunks))))
        if self.item_proj is not None:  # the whole embedding -> each later level
            parts.append(self.item_proj(text)[:, :, None].expand(-1, -1, L - cfg.num_chunks, -1))
        x = self.text_norm(torch.cat(parts, dim=2))  # (n, H, L, D)
        return (x * (items >= 0)[..., None, None].to(x.dtype)).flatten(1, 2)

    def embed_inputs(self, ids: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return self.token_norm(self.embed(ids)) + self.text_inputs(self.block_items(ids, keep))

    # ------------------------------------------------------------------ outputs
    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Final (normed) hidden states (n, S, D) of one block-causal pass."""
        x, _ = self._run(input_ids, attention_mask.bool(), block=self.num_levels)
        return self.norm(x)

    def level_logits(self, h: torch.Tensor, level: int) -> torch.Tensor:
        """Hidden states (..., D) -> logits (..., codebook_sizes[level]) over level ``level``'s codes."""
        start, size = self.config.offsets[level], self.config.codebook_sizes[level]
        weight = self.lm_head.weight if self.lm_head is not None else self.embed.weight
        return F.linear(h, weight[start : start + size])

    def next_item_logits(self, input_ids, attention_mask, predict: torch.Tensor) -> list[torch.Tensor]:
        """One pass over right-padded sequences (n, S); entry l: logits (M_l, codebook_sizes[l]) of
        the next item's code l at the positions of level l where ``predict`` (n, S) is True, in
        row-major order (training: the blocks of every item followed by another)."""
        h = self.hidden(input_ids, attention_mask)
        level = torch.arange(input_ids.shape[1], device=input_ids.device) % self.num_levels
        return [self.level_logits(h[predict & (level == l)], l) for l in range(self.num_levels)]

    def last_block(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(n, L, D) hidden states of each row's last real item (right-padded rows)."""
        h = self.hidden(input_ids, attention_mask)
        L = self.num_levels
        last = (attention_mask.sum(1) // L - 1).clamp(min=0)
        pos = last[:, None] * L + torch.arange(L, device=h.device)
        return h.gather(1, pos[..., None].expand(-1, -1, h.shape[-1]))

    def _in_vocab(self, level_log_probs: torch.Tensor, level: int) -> torch.Tensor:
        """(..., codebook_sizes[level]) -> (..., V_out): -inf outside the level's tokens."""
        start = self.config.offsets[level]
        out = level_log_probs.new_full((*level_log_probs.shape[:-1], self.config.output_vocab_size), float("-inf"))
        out[..., start : start + level_log_probs.shape[-1]] = level_log_probs
        return out

    def forward(self, input_ids, attention_mask, decoder_input_ids) -> torch.Tensor:
        """Logits (n, L, V_out), fp32, of the next item's L tokens (-inf outside each level's codes),
        as the GPT's teacher-forced ``forward``; the fed tokens (``decoder_input_ids``, n x L) change
        nothing: the levels are predicted in parallel."""
        if decoder_input_ids.shape[1] != self.num_levels:
            raise ValueError(f"RecGPT.forward: {decoder_input_ids.shape[1]} labels, the items have "
                             f"{self.num_levels} levels (no EOS)")
        h = self.last_block(input_ids, attention_mask)
        return torch.stack([self._in_vocab(self.level_logits(h[:, l], l).float(), l)
                            for l in range(self.num_levels)], dim=1)

    def start_decoding(self, input_ids, attention_mask) -> RecGPTDecodingState:
        return RecGPTDecodingState(cache=KVCache(0), num_beams=1, last_block=self.last_block(input_ids, attention_mask))

    def step(self, state: RecGPTDecodingState, tokens: torch.Tensor):
        """Log-probs (n, b, V_out) of the next level's code, the same for every beam: the tokens
        fed (n, b) are not inputs of the parallel prediction."""
        n, b = tokens.shape
        if b != state.num_beams:
            raise ValueError(f"modules/transformers/recgpt.py: step got {b} beams, the state has {state.num_beams}")
        if state.level >= self.num_levels:
            raise ValueError(f"modules/transformers/recgpt.py: all {self.num_levels} levels were decoded")
        level = state.level
        log_probs = F.log_softmax(self.level_logits(state.last_block[:, level], level).float(), dim=-1)
        # An expanded view: beam search slices the level's columns before anything is materialised.
        return (self._in_vocab(log_probs, level)[:, None].expand(n, b, -1),
                dataclasses.replace(state, level=level + 1))


def text_chunks(tokenizer) -> int:
    """How many leading levels of ``tokenizer``'s IDs each encode one chunk of the text embedding:
    ``FSQConfig.num_chunks`` for RecGPT's chunked FSQ, else 0."""
    config = getattr(getattr(tokenizer, "quantizer", None), "config", None)
    return int(config.num_chunks) if getattr(config, "mode", None) == "chunked" else 0


def build_recgpt(gpt: GPTConfig, layout: TokenLayout, tokenizer, item_text: np.ndarray) -> RecGPT:
    """A RecGPT with ``gpt``'s sizes over ``tokenizer``'s item codes and ``item_text`` (num_items,
    text_dim), the text embeddings from ``data.prepare.load_item_embeddings``."""
    if layout.num_user_buckets:
        raise ValueError("train_decoder.num_user_buckets must be 0 for architecture 'recgpt' (got "
                         f"{layout.num_user_buckets}): RecGPT has no user token, it transfers through item "
                         "text, and a user token would break its one-block-per-item layout")
    item_text = np.asarray(item_text, dtype=np.float32)
    chunks = text_chunks(tokenizer)
    chunked_dim = tokenizer.quantizer.config.input_dim if chunks else None
    if chunked_dim is not None and chunked_dim != item_text.shape[1]:
        raise ValueError(f"the tokenizer's FSQ chunked {chunked_dim}-d embeddings but load_item_embeddings gives "
                         f"{item_text.shape[1]}-d ones: set load_item_embeddings.model to the embeddings the "
                         "tokenizer was trained on")
    if item_text.shape[0] != tokenizer.num_items:
        raise ValueError(f"{item_text.shape[0]} item text embeddings for the tokenizer's {tokenizer.num_items} items")
    config = RecGPTConfig(**{**gpt.to_dict(), "codebook_sizes": layout.codebook_sizes,
                             "num_items": item_text.shape[0], "text_dim": item_text.shape[1], "num_chunks": chunks})
    model = RecGPT(config)
    model.set_items(tokenizer.item_codes, torch.from_numpy(item_text))
    return model
