"""T5-style encoder-decoder (TIGER's recommender), with incremental decoding.

Follows T5 v1.0 (what TIGER used): pre-norm RMSNorm blocks without biases, ReLU MLP, no
1/sqrt(d) attention scaling (the initialisation absorbs it), bucketed relative position bias
(bidirectional in the encoder, causal in the decoder) computed once per stack and added in
every layer, shared input embedding, optionally tied output embedding (then scaled by
d_model^-0.5 as in T5).

Optional RASTP (representation-aware semantic token pruning, ``T5Config.prune_after_layer``):
after encoder layer k each token is scored by the attention it receives in that layer times
the L1 norm of its hidden state, and only the best ``keep_ratio`` of each history's real
tokens go on through the remaining encoder layers and into the decoder's cross-attention.
A history of L real tokens keeps max(1, floor(L x p / q)) of them, p / q = ``keep_ratio`` read as
a fraction (:func:`keep_fraction`: 0.333 and '1/3' both mean one third, so 81 tokens keep 27).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import nn

from modules.transformers.generation import DecodingState, KVCache
from modules.transformers.layers import Attention, Dropout, FeedForward, RMSNorm, additive_mask


@dataclass
class T5Config:
    """Sizes default to TIGER: 4 + 4 layers, d_model 128, 6 heads x 64, d_ff 1024."""

    vocab_size: int
    output_vocab_size: int | None = None  # logits cover tokens [0, output_vocab_size); None = all
    d_model: int = 128
    num_heads: int = 6
    d_head: int = 64
    d_ff: int = 1024
    num_encoder_layers: int = 4
    num_decoder_layers: int = 4
    dropout: float = 0.1
    num_buckets: int = 32
    max_distance: int = 128
    activation: str = "relu"
    tie_embeddings: bool = True
    eps: float = 1e-6
    init_factor: float = 1.0
    # RASTP: prune the encoder sequence after layer prune_after_layer (1-based; None = off) to
    # floor(real tokens x keep_ratio) tokens per row (at least 1), keep_ratio a number or a
    # fraction string ('1/3') taken as the nearest fraction with denominator <= 100 (0.333 ->
    # 1/3, 0.29 -> 29/100). See `keep_fraction` and `rastp_select`.
    prune_after_layer: int | None = None
    keep_ratio: float | str = "1/3"

    def __post_init__(self):
        if self.output_vocab_size is None:
            self.output_vocab_size = self.vocab_size
        if not 0 < self.output_vocab_size <= self.vocab_size:
            raise ValueError("modules/transformers/t5.py: T5Config.output_vocab_size must be in (0, vocab_size]")
        if self.prune_after_layer is not None and not 1 <= self.prune_after_layer <= self.num_encoder_layers:
            raise ValueError("modules/transformers/t5.py: T5Config.prune_after_layer must be None or in "
                             f"[1, num_encoder_layers={self.num_encoder_layers}], got {self.prune_after_layer}")
        keep_fraction(self.keep_ratio)  # a ValueError naming keep_ratio unless a fraction in (0, 1]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "T5Config":
        return cls(**d)


def relative_position_bucket(relative_position: torch.Tensor, bidirectional: bool = True,
                             num_buckets: int = 32, max_distance: int = 128) -> torch.Tensor:
    """T5's bucketing of ``key_position - query_position`` (same as Hugging Face's T5).

    Bidirectional: half the buckets per sign (positive offsets in the upper half). Within a
    sign, the first half of the buckets are exact offsets, the rest grow logarithmically up
    to ``max_distance``; farther offsets share the last bucket. Causal: only offsets <= 0
    (looking back) are distinguished, all positive ones fall in bucket 0.
    """
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    # clamp(min=1) only avoids log(0); those positions take the exact branch anyway.
    log_ratio = torch.log(distance.clamp(min=1).float() / max_exact) / math.log(max_distance / max_exact)
    large = (max_exact + (log_ratio * (num_buckets - max_exact)).long()).clamp(max=num_buckets - 1)
    return buckets + torch.where(distance < max_exact, distance, large)


class RelativePositionBias(nn.Module):
    """Learned per-head scalar bias for each relative-position bucket."""

    def __init__(self, num_heads: int, num_buckets: int, max_distance: int, bidirectional: bool):
        super().__init__()
        self.embedding = nn.Embedding(num_buckets, num_heads)
        self.num_buckets, self.max_distance, self.bidirectional = num_buckets, max_distance, bidirectional

    def forward(self, query_pos: torch.Tensor, key_pos: torch.Tensor) -> torch.Tensor:
        """(Sq,), (Sk,) positions -> (1, h, Sq, Sk) bias."""
        buckets = relative_position_bucket(key_pos[None, :] - query_pos[:, None], self.bidirectional,
                                           self.num_buckets, self.max_distance)
        return self.embedding(buckets).permute(2, 0, 1)[None]

    def between(self, pos: torch.Tensor) -> torch.Tensor:
        """(n, S) positions per row -> (n, h, S, S) bias (rows of different positions: RASTP)."""
        buckets = relative_position_bucket(pos[:, None, :] - pos[:, :, None], self.bidirectional,
                                           self.num_buckets, self.max_distance)
        return self.embedding(buckets).permute(0, 3, 1, 2)


KEEP_RATIO_MAX_DENOMINATOR = 100


def keep_fraction(keep_ratio: float | str | Fraction) -> Fraction:
    """RASTP's keep ratio as an exact fraction p / q: the nearest fraction with q <= 100 to a
    number or to a string such as '1/3' or '0.25'.

    RASTP keeps floor(L / 3) tokens of L for a ratio of 1/3, which no float spells: 0.333 x 81 =
    26.97 would keep 26 of 81 where the paper keeps 27. Read as fractions, 0.333 (or 0.3333, or
    '1/3') is 1/3 and 81 tokens keep 27; 0.29 stays 29/100, 0.25 is 1/4, 0.667 is 2/3. The count
    is then integer arithmetic (floor(L x p / q) = L * p // q), with no rounding slack.
    """
    try:
        value = Fraction(keep_ratio.strip() if isinstance(keep_ratio, str) else keep_ratio)
        fraction = value.limit_denominator(KEEP_RATIO_MAX_DENOMINATOR)
    except (TypeError, ValueError, ZeroDivisionError, OverflowError):
        raise ValueError(f"modules/transformers/t5.py: T5Config.keep_ratio must be a number or a fraction string "
                         f"such as '1/3', got {keep_ratio!r}") from None
    if not 0 < fraction <= 1:
        raise ValueError(f"modules/transformers/t5.py: T5Config.keep_ratio must be in (0, 1] (read as the nearest "
                         f"fraction with denominator <= {KEEP_RATIO_MAX_DENOMINATOR}), got {keep_ratio!r} = {fraction}")
    return fraction


def rastp_select(scores: torch.Tensor, attention_mask: torch.Tensor,
                 keep_ratio: float | str | Fraction) -> tuple[torch.Tensor, torch.Tensor]:
    """Which encoder tokens RASTP keeps: scores (n, S), bool mask (n, S) -> (index, keep), both (n, M).

    Row b keeps its m_b = max(1, floor(L_b x p / q)) best-scoring real tokens, L_b = its number
    of real tokens (not the padded length S, so a user's result does not depend on the batch it
    is in) and p / q = :func:`keep_fraction` of ``keep_ratio`` (0.333 -> 1/3: 81 tokens keep 27).
    ``index`` lists the kept tokens in increasing original order, then (rows with m_b < M =
    max m_b) filler slots with ``keep`` False; a row without real tokens keeps one slot, masked.
    Padding is thus never kept while a real token is dropped.
    """
    fraction = keep_fraction(keep_ratio)
    real = attention_mask.bool()
    n, S = real.shape
    counts = (real.sum(1) * fraction.numerator // fraction.denominator).clamp(min=1)
    M = int(counts.max())
    _, index = scores.detach().float().masked_fill(~real, float("-inf")).topk(M, dim=1)
    chosen = torch.arange(M, device=index.device) < counts[:, None]  # topk ranks below m_b
    keep = chosen & real.gather(1, index)
    order = torch.where(chosen, index, index + S).argsort(dim=1)  # kept tokens first, in order
    return index.gather(1, order), keep.gather(1, order)


class EncoderLayer(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.norm1 = RMSNorm(cfg.d_model, cfg.eps)
        self.attn = Attention(cfg.d_model, cfg.num_heads, cfg.d_head, cfg.dropout, scale=1.0)
        self.norm2 = RMSNorm(cfg.d_model, cfg.eps)
        self.ffn = FeedForward(cfg.d_model, cfg.d_ff, cfg.activation, cfg.dropout)
        self.drop = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x), mask))
        return x + self.drop(self.ffn(self.norm2(x)))

    def forward_received(self, x: torch.Tensor, mask: torch.Tensor, query_keep: torch.Tensor):
        """``forward`` plus the attention each token receives from the real queries (n, S)."""
        a, received = self.attn.forward_received(self.norm1(x), mask, query_keep)
        x = x + self.drop(a)
        return x + self.drop(self.ffn(self.norm2(x))), received


class DecoderLayer(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.norm1 = RMSNorm(cfg.d_model, cfg.eps)
        self.self_attn = Attention(cfg.d_model, cfg.num_heads, cfg.d_head, cfg.dropout, scale=1.0)
        self.norm2 = RMSNorm(cfg.d_model, cfg.eps)
        self.cross_attn = Attention(cfg.d_model, cfg.num_heads, cfg.d_head, cfg.dropout, scale=1.0, cross=True)
        self.norm3 = RMSNorm(cfg.d_model, cfg.eps)
        self.ffn = FeedForward(cfg.d_model, cfg.d_ff, cfg.activation, cfg.dropout)
        self.drop = Dropout(cfg.dropout)

    def _cross_and_ffn(self, x, memory_kv, memory_mask):
        x = x + self.drop(self.cross_attn.forward_cross(self.norm2(x), memory_kv, memory_mask))
        return x + self.drop(self.ffn(self.norm3(x)))

    def forward(self, x, self_mask, memory_kv, memory_mask):
        """Teacher-forced pass over all T decoder positions of x (n, T, D)."""
        x = x + self.drop(self.self_attn(self.norm1(x), self_mask))
        return self._cross_and_ffn(x, memory_kv, memory_mask)

    def step(self, x, self_bias, cache: KVCache, layer: int, memory_kv, memory_mask):
        """One new position per beam: x (n, b, D); the middle axis holds beams, not positions.

        Self-attention runs per beam (rows n * b, one query each) over its cached positions;
        cross-attention runs per user with the b beams as b queries of the shared memory.
        """
        n, b, D = x.shape
        q, k, v = self.self_attn.project_qkv(self.norm1(x).reshape(n * b, 1, D))
        cache.write(layer, k, v)
        x = x + self.drop(self.self_attn.attend_cached(q, *cache.view(layer), self_bias).view(n, b, D))
        return self._cross_and_ffn(x, memory_kv, memory_mask)


@dataclass
class T5DecodingState(DecodingState):
    memory_kv: tuple  # per decoder layer (k, v), each (n, h, S, d): shared by a user's beams
    memory_mask: torch.Tensor  # (n, 1, 1, S) additive


class T5(nn.Module):
    """Encoder-decoder recommender; ``forward(input_ids, attention_mask, decoder_input_ids)``."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.config = cfg = config
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder_bias = RelativePositionBias(cfg.num_heads, cfg.num_buckets, cfg.max_distance, True)
        self.encoder_layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_encoder_layers))
        self.encoder_norm = RMSNorm(cfg.d_model, cfg.eps)
        self.decoder_bias = RelativePositionBias(cfg.num_heads, cfg.num_buckets, cfg.max_distance, False)
        self.decoder_layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_decoder_layers))
        self.decoder_norm = RMSNorm(cfg.d_model, cfg.eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.output_vocab_size, bias=False)
        self.drop = Dropout(cfg.dropout)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """T5's initialisation (Hugging Face ``T5PreTrainedModel._init_weights``)."""
        cfg, f = self.config, self.config.init_factor
        inner = cfg.num_heads * cfg.d_head
        self.embed.weight.normal_(0.0, f)
        if self.lm_head is not None:
            self.lm_head.weight.normal_(0.0, f)
        for bias in (self.encoder_bias, self.decoder_bias):
            bias.embedding.weight.normal_(0.0, f * cfg.d_model**-0.5)
        for m in self.modules():
            if isinstance(m, Attention):
                if m.cross:
                    m.q.weight.normal_(0.0, f * (cfg.d_model * cfg.d_head) ** -0.5)
                    m.kv.weight.normal_(0.0, f * cfg.d_model**-0.5)
                else:
                    q, kv = m.qkv.weight.split([inner, 2 * inner])
                    q.normal_(0.0, f * (cfg.d_model * cfg.d_head) ** -0.5)
                    kv.normal_(0.0, f * cfg.d_model**-0.5)
                m.o.weight.normal_(0.0, f * inner**-0.5)
            elif isinstance(m, FeedForward):
                m.wi.weight.normal_(0.0, f * cfg.d_model**-0.5)
                m.wo.weight.normal_(0.0, f * cfg.d_ff**-0.5)
            elif isinstance(m, RMSNorm):
                m.weight.fill_(1.0)

    # ------------------------------------------------------------------ encoder
    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(n, S) tokens and bool mask -> encoder output (n, S, D); with RASTP (n, M, D), whose
        mask only :meth:`encode_memory` returns."""
        return self.encode_memory(input_ids, attention_mask)[0]

    def encode_memory(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, S) tokens and bool mask -> encoder output (n, S', D) and its bool mask (n, S').

        S' = S unless RASTP is on (``prune_after_layer``), then S' = M of :func:`rastp_select`.
        The pruned layers' relative position bias uses the kept tokens' *original* positions:
        the bias was learned on those distances, and compacting would make tokens that were
        far apart look adjacent.
        """
        cfg = self.config
        S = input_ids.shape[1]
        pos = torch.arange(S, device=input_ids.device)
        # One (n, h, S, S) mask for all layers: the shared position bias plus key padding.
        mask = self.encoder_bias(pos, pos) + additive_mask(attention_mask[:, None, None, :].bool())
        x = self.drop(self.embed(input_ids))
        for i, layer in enumerate(self.encoder_layers):
            if i + 1 != cfg.prune_after_layer:
                x = layer(x, mask)
                continue
            real = attention_mask.bool()
            x, received = layer.forward_received(x, mask, real)
            index, attention_mask = rastp_select(received * x.detach().float().abs().sum(-1), real, cfg.keep_ratio)
            x = x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))
            mask = self.encoder_bias.between(index) + additive_mask(attention_mask[:, None, None, :])
        return self.drop(self.encoder_norm(x)), attention_mask

    def memory(self, memory: torch.Tensor, attention_mask: torch.Tensor):
        """Cross-attention keys/values of every decoder layer, and the additive memory mask."""
        kv = tuple(layer.cross_attn.project_kv(memory) for layer in self.decoder_layers)
        return kv, additive_mask(attention_mask[:, None, None, :].bool())

    # ------------------------------------------------------------------ decoder
    def output_logits(self, h: torch.Tensor) -> torch.Tensor:
        if self.lm_head is not None:
            return self.lm_head(h)
        weight = self.embed.weight[: self.config.output_vocab_size]
        return F.linear(h * self.config.d_model**-0.5, weight)

    def decode_states(self, decoder_input_ids, memory_kv, memory_mask) -> torch.Tensor:
        """Teacher-forced final decoder hidden states (n, T, D), the input of :meth:`output_logits`
        (ETEGRec aligns the first position's state, the one that predicts the first code)."""
        T = decoder_input_ids.shape[1]
        pos = torch.arange(T, device=decoder_input_ids.device)
        causal = additive_mask(pos[None, :] <= pos[:, None])
        self_mask = self.decoder_bias(pos, pos) + causal
        x = self.drop(self.embed(decoder_input_ids))
        for layer, kv in zip(self.decoder_layers, memory_kv):
            x = layer(x, self_mask, kv, memory_mask)
        return self.drop(self.decoder_norm(x))

    def decode(self, decoder_input_ids, memory_kv, memory_mask) -> torch.Tensor:
        return self.output_logits(self.decode_states(decoder_input_ids, memory_kv, memory_mask))

    def forward(self, input_ids, attention_mask, decoder_input_ids) -> torch.Tensor:
        """Teacher-forced logits (n, T, output_vocab_size)."""
        memory_kv, memory_mask = self.memory(*self.encode_memory(input_ids, attention_mask))
        return self.decode(decoder_input_ids, memory_kv, memory_mask)

    # ------------------------------------------------------------------ incremental decoding
    def start_decoding(self, input_ids, attention_mask) -> T5DecodingState:
        """Encode once; the state holds one (empty) beam per user."""
        memory_kv, memory_mask = self.memory(*self.encode_memory(input_ids, attention_mask))
        return T5DecodingState(cache=KVCache(len(self.decoder_layers)), num_beams=1, memory_kv=memory_kv,
                               memory_mask=memory_mask)

    def step(self, state: T5DecodingState, tokens: torch.Tensor):
        """Feed one token per beam, tokens (n, b) -> log-probs of the next token (n, b, V_out)."""
        n, b = tokens.shape
        if b != state.num_beams:
            raise ValueError(f"modules/transformers/t5.py: step got {b} beams, the state has {state.num_beams}")
        t = state.cache.length
        pos = torch.arange(t + 1, device=tokens.device)
        self_bias = self.decoder_bias(pos[t:], pos)[0, :, 0].T[:, None, :]  # (t + 1, 1, h): the new row
        x = self.drop(self.embed(tokens))
        for i, layer in enumerate(self.decoder_layers):
            x = layer.step(x, self_bias, state.cache, i, state.memory_kv[i], state.memory_mask)
        logits = self.output_logits(self.drop(self.decoder_norm(x)))
        state = dataclasses.replace(state, cache=state.cache.advanced())
        return F.log_softmax(logits.float(), dim=-1), state
