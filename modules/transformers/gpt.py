"""GPT-style decoder-only recommender with rotary positions, and incremental decoding.

One sequence per user: the history tokens, then the target tokens. Histories come
right-padded from :meth:`modules.tokens.TokenLayout.encode_history`; they are moved to the
left (padding first) so that the target always follows the last real token. RoPE only sees
position differences, so how much padding precedes a history does not change the outputs.

The decoder's BOS input (the first of ``shift_right(labels)``) is not fed: the last history
position predicts the target's first code. A target then reads exactly as a history item
does, so one causal pass over a whole sequence (:meth:`GPT.next_token_logits`) gives the
same predictions for every item in it as one sliding window per item.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from modules.transformers.generation import DecodingState, KVCache
from modules.transformers.layers import (
    Attention, Dropout, FeedForward, RMSNorm, Rotary, additive_mask, apply_rotary, cached_scores, cached_values,
)


@dataclass
class GPTConfig:
    vocab_size: int
    output_vocab_size: int | None = None  # logits cover tokens [0, output_vocab_size); None = all
    d_model: int = 128
    num_heads: int = 6
    d_head: int = 64
    d_ff: int = 1024
    num_layers: int = 4
    dropout: float = 0.1
    activation: str = "gelu"  # or "swiglu", "relu"
    rope_base: float = 10000.0
    tie_embeddings: bool = True
    eps: float = 1e-6

    def __post_init__(self):
        if self.output_vocab_size is None:
            self.output_vocab_size = self.vocab_size
        if not 0 < self.output_vocab_size <= self.vocab_size:
            raise ValueError("modules/transformers/gpt.py: GPTConfig.output_vocab_size must be in (0, vocab_size]")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        return cls(**d)


def left_align(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move every row's padding to the front, keeping the order of its real tokens."""
    keep = attention_mask.bool()
    order = torch.sort(keep.to(torch.int8), dim=1, stable=True).indices
    return input_ids.gather(1, order), keep.gather(1, order)


def prefix_beam_attention(q, prefix_kv, prefix_mask, own_k, own_v, scale: float) -> torch.Tensor:
    """One new query per beam attends to its user's history prefix and its own decoded tokens.

    The prefix keys/values (n, h, P, d) are stored once per user: the b beams of a user are
    stacked as b queries against them instead of copying the prefix b times.
    q: (n*b, h, 1, d); own_k/own_v: (t, n*b, h, d) position-major; prefix_mask: (n, 1, 1, P)
    additive. Returns (n*b, h, d).
    """
    prefix_k, prefix_v = prefix_kv
    n, h, P, d = prefix_k.shape
    b = q.shape[0] // n
    q = q[:, :, 0] * scale  # (n*b, h, d)
    q_user = q.view(n, b, h, d).transpose(1, 2)  # (n, h, b, d)
    s_prefix = q_user @ prefix_k.transpose(-1, -2) + prefix_mask  # (n, h, b, P)
    s_own = cached_scores(q, own_k).view(-1, n, b, h).permute(1, 3, 2, 0)  # (n, h, b, t)
    p = torch.cat([s_prefix, s_own], dim=-1).softmax(dim=-1)
    out = (p[..., :P] @ prefix_v).transpose(1, 2).reshape(n * b, h, d)
    p_own = p[..., P:].permute(3, 0, 2, 1).reshape(-1, n * b, h)  # (t, n*b, h)
    return out + cached_values(p_own, own_v)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.norm1 = RMSNorm(cfg.d_model, cfg.eps)
        self.attn = Attention(cfg.d_model, cfg.num_heads, cfg.d_head, cfg.dropout)
        self.norm2 = RMSNorm(cfg.d_model, cfg.eps)
        self.ffn = FeedForward(cfg.d_model, cfg.d_ff, cfg.activation, cfg.dropout)
        self.drop = Dropout(cfg.dropout)

    def _qkv(self, x, cos, sin):
        q, k, v = self.attn.project_qkv(self.norm1(x))
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def forward(self, x, mask, cos, sin):
        """Full pass over x (n, S, D); also returns this layer's (k, v) for a decoding prefix."""
        q, k, v = self._qkv(x, cos, sin)
        x = x + self.drop(self.attn.attend(q, k, v, mask))
        return x + self.drop(self.ffn(self.norm2(x))), (k, v)

    def step(self, x, cos, sin, cache: KVCache, layer: int, prefix_kv, prefix_mask):
        """One new position per beam, x (n, b, D) (middle axis = beams)."""
        n, b, D = x.shape
        q, k, v = self._qkv(x.reshape(n * b, 1, D), cos, sin)
        cache.write(layer, k, v)
        out = prefix_beam_attention(q, prefix_kv, prefix_mask, *cache.view(layer), self.attn.d_head**-0.5)
        x = x + self.drop(self.attn.o(out.flatten(1)).view(n, b, D))
        return x + self.drop(self.ffn(self.norm2(x)))


@dataclass
class GPTDecodingState(DecodingState):
    prefix_kv: tuple  # per layer (k, v), each (n, h, P, d): the history, shared by a user's beams
    prefix_mask: torch.Tensor  # (n, 1, 1, P) additive
    first_log_probs: torch.Tensor | None = None  # (n, 1, V_out): what the history's last position predicts


def block_causal_allowed(keep: torch.Tensor, block: int = 1) -> torch.Tensor:
    """(n, 1, S, S) bool: position i may attend to real (``keep`` (n, S)) position j when j's block
    (j // ``block``) is not after i's: causal across blocks, bidirectional inside one; ``block``
    1 is the plain causal mask. Each position also sees itself so that all-padding rows stay
    finite (no NaN grads)."""
    pos = torch.arange(keep.shape[1], device=keep.device)
    blk = pos // block
    return ((blk[None, :] <= blk[:, None]) & keep[:, None, None, :]) | (pos[None, :] == pos[:, None])


class DecoderStack(nn.Module):
    """Token embedding, RoPE transformer blocks, final norm and output layer: shared by
    :class:`GPT` and :class:`modules.transformers.recgpt.RecGPT` (which differ in their
    inputs, attention mask and what the outputs predict)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = cfg = config
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.rotary = Rotary(cfg.d_head, cfg.rope_base)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.output_vocab_size, bias=False)
        self.drop = Dropout(cfg.dropout)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 initialisation: N(0, 0.02), residual output projections scaled by 1/sqrt(2 layers)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.normal_(0.0, 0.02)
            elif isinstance(m, RMSNorm):
                m.weight.fill_(1.0)
        for block in self.blocks:
            for w in (block.attn.o.weight, block.ffn.wo.weight):
                w.mul_((2 * self.config.num_layers) ** -0.5)

    def output_logits(self, h: torch.Tensor) -> torch.Tensor:
        if self.lm_head is not None:
            return self.lm_head(h)
        return F.linear(h, self.embed.weight[: self.config.output_vocab_size])

    def embed_inputs(self, ids: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Input vectors (n, S, D) of token ids (n, S): the token embeddings."""
        return self.embed(ids)

    def _run(self, ids: torch.Tensor, keep: torch.Tensor, block: int = 1):
        """Causal pass over ids (n, S) (GPT: left-aligned) -> hidden states and per-layer (k, v);
        ``block`` > 1: block-causal (:func:`block_causal_allowed`)."""
        mask = additive_mask(block_causal_allowed(keep, block))  # (n, 1, S, S)
        cos, sin = self.rotary.cos_sin(torch.arange(ids.shape[1], device=ids.device))
        x = self.drop(self.embed_inputs(ids, keep))
        kvs = []
        for block in self.blocks:
            x, kv = block(x, mask, cos, sin)
            kvs.append(kv)
        return x, kvs


class GPT(DecoderStack):
    """Decoder-only recommender; ``forward(input_ids, attention_mask, decoder_input_ids)``
    returns the logits of the ``decoder_input_ids`` positions only (n, T, V_out)."""

    def forward(self, input_ids, attention_mask, decoder_input_ids) -> torch.Tensor:
        """Logits (n, T, V_out) for the T labels whose teacher-forcing inputs are
        ``decoder_input_ids`` = [BOS, label_1, ..., label_T-1] (BOS itself is not fed)."""
        ids, keep = left_align(input_ids, attention_mask)
        T = decoder_input_ids.shape[1]
        fed = decoder_input_ids[:, 1:]
        ids = torch.cat([ids, fed], dim=1)
        keep = torch.cat([keep, torch.ones_like(fed, dtype=torch.bool)], dim=1)
        x, _ = self._run(ids, keep)
        # Only the positions that predict a label need the (vocabulary-sized) output layer.
        return self.output_logits(self.norm(x[:, -T:]))

    def next_token_logits(self, input_ids, attention_mask, predict: torch.Tensor) -> torch.Tensor:
        """One causal pass over right-padded sequences (n, S); logits (M, V_out) of the next token
        at the M positions where ``predict`` (n, S) is True, in row-major order (all-positions
        training: every target item of a sequence at once)."""
        x, _ = self._run(input_ids, attention_mask.bool())
        return self.output_logits(self.norm(x[predict]))

    def start_decoding(self, input_ids, attention_mask) -> GPTDecodingState:
        ids, keep = left_align(input_ids, attention_mask)
        x, kvs = self._run(ids, keep)
        first = F.log_softmax(self.output_logits(self.norm(x[:, -1:])).float(), dim=-1)
        return GPTDecodingState(cache=KVCache(len(self.blocks)), num_beams=1, prefix_kv=tuple(kvs),
                                prefix_mask=additive_mask(keep[:, None, None, :]), first_log_probs=first)

    def step(self, state: GPTDecodingState, tokens: torch.Tensor):
        """Feed one token per beam, tokens (n, b) -> log-probs of the next token (n, b, V_out).
        The first step's token (BOS) is not fed: the history already predicted the first code."""
        n, b = tokens.shape
        if b != state.num_beams:
            raise ValueError(f"modules/transformers/gpt.py: step got {b} beams, the state has {state.num_beams}")
        if state.first_log_probs is not None:
            return state.first_log_probs.expand(n, b, -1), dataclasses.replace(state, first_log_probs=None)
        position = state.prefix_mask.shape[-1] + state.cache.length
        cos, sin = self.rotary.cos_sin(torch.tensor([position], device=tokens.device))
        x = self.drop(self.embed(tokens))
        for i, block in enumerate(self.blocks):
            x = block.step(x, cos, sin, state.cache, i, state.prefix_kv[i], state.prefix_mask)
        logits = self.output_logits(self.norm(x))
        return F.log_softmax(logits.float(), dim=-1), dataclasses.replace(state, cache=state.cache.advanced())
