"""RPG (Hou et al., KDD 2025, "Generating Long Semantic IDs in Parallel for Recommendation"):
each item has a long, unordered semantic ID (n OPQ codes of 256, ``configs/opq_amazon.gin``),
and one causal decoder state per position predicts all n codes of the next item at once.

- Input: an item is the mean of its n token embeddings (one table of n x 256 tokens), plus a
  learned position; a causal Transformer (SASRec's pre-LN blocks) over the items.
- Output: one residual projection head per codebook (``h + SiLU(W_j h + b_j)``, W_j zero at
  start, as the paper's heads), L2-normalised; the logits of codebook j are its cosine
  similarities with codebook j's (normalised, input-tied) token embeddings over a
  temperature (Beauty: 0.03). Loss: the sum over the n codebooks of each code's
  cross-entropy (:func:`rpg_loss`), at every position of a sequence as SASRec.
- Scoring: an item's score is the sum of its n tokens' log-probabilities (the paper averages:
  the same ranking). :meth:`RPG.scores` computes it for the whole catalogue with one
  ``embedding_bag`` over the item-token table: exact top-K is then a plain top-k.
- Graph-constrained decoding for catalogues too large for exact scoring:
  :mod:`modules.rpg_graph`.

Departures from the paper / its code: SASRec's pre-LN blocks from this repo instead of
HuggingFace's GPT-2 (same structure: pre-LN, GELU, learned positions); the loss sums the
n per-codebook cross-entropies (the reference averages them: a constant factor, which with
Adam matters only through gradient clipping and weight decay); dropout is this repo's
(embeddings, attention, FFN, residual branches); histories are the repo's (20 items).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from modules.sasrec import Block
from modules.training import length_chunks
from modules.transformers.layers import Dropout, additive_mask


@dataclass
class RPGConfig:
    num_items: int
    num_codebooks: int  # n: tokens per item (the tokenizer's levels)
    codebook_size: int = 256
    max_len: int = 50  # positions; train_decoder.py sets the dataset's max_history
    d_model: int = 128
    num_heads: int = 2
    num_layers: int = 2
    d_ff: int = 512
    dropout: float = 0.2
    temperature: float = 0.03  # the paper's, on every dataset
    # An item's input is the mean of its n token embeddings (the paper) times this factor. The
    # mean of n independent N(0, 0.02) rows is ~sqrt(n) times smaller than the position
    # embeddings at initialisation; input_scale = n ** 0.5 evens them out (None: 1, the paper's).
    input_scale: float | None = None
    activation: str = "gelu"
    pre_norm: bool = True  # modules.sasrec.Block reads it (RPG is always pre-LN)
    eps: float = 1e-6

    def __post_init__(self):
        if self.num_items < 1 or self.num_codebooks < 1 or self.codebook_size < 1 or self.max_len < 1:
            raise ValueError(f"modules/rpg.py: RPGConfig needs positive num_items, num_codebooks, codebook_size, "
                             f"max_len; got {self.num_items}, {self.num_codebooks}, {self.codebook_size}, "
                             f"{self.max_len}")
        if self.d_model % self.num_heads:
            raise ValueError(f"modules/rpg.py: RPGConfig.d_model {self.d_model} is not divisible by "
                             f"num_heads {self.num_heads}")
        if not self.temperature > 0:
            raise ValueError(f"modules/rpg.py: RPGConfig.temperature must be > 0, got {self.temperature}")
        if not self.pre_norm:
            raise ValueError("modules/rpg.py: RPGConfig.pre_norm must be True (RPG's decoder is pre-LN)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class ParallelHeads(nn.Module):
    """n residual heads ``h + SiLU(W_j h + b_j)`` applied at once: (T, d) -> (T, n, d)."""

    def __init__(self, n: int, d: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n, d, d))  # zero: each head starts as the identity
        self.bias = nn.Parameter(torch.zeros(n, d))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h.unsqueeze(-2) + F.silu(torch.einsum("td,nde->tne", h, self.weight) + self.bias)


class RPG(nn.Module):
    """``item_tokens``: (num_items, n) codes of each item, each in [0, codebook_size).

    ``forward(items)``: items (B, S), -1 padded at the end -> decoder states (B, S, d);
    :meth:`token_log_probs` turns states into (T, n, K) log-probabilities of the next item's
    codes, :meth:`scores` ranks the whole catalogue."""

    def __init__(self, config: RPGConfig, item_tokens: torch.Tensor):
        super().__init__()
        self.config = cfg = config
        item_tokens = torch.as_tensor(item_tokens, dtype=torch.long)
        if item_tokens.shape != (cfg.num_items, cfg.num_codebooks):
            raise ValueError(f"modules/rpg.py: item_tokens of shape {tuple(item_tokens.shape)}, expected "
                             f"(num_items, num_codebooks) = ({cfg.num_items}, {cfg.num_codebooks})")
        if item_tokens.numel() and (item_tokens.min() < 0 or item_tokens.max() >= cfg.codebook_size):
            raise ValueError(f"modules/rpg.py: item codes must lie in [0, {cfg.codebook_size}), got "
                             f"[{int(item_tokens.min())}, {int(item_tokens.max())}]")
        offsets = torch.arange(cfg.num_codebooks) * cfg.codebook_size
        # Global token ids (codebook j's code c is token j * K + c). Saved with the weights, so a
        # checkpoint or export is a complete ranker; the run also fingerprints the tokenizer's codes.
        self.register_buffer("item_tokens", item_tokens + offsets)
        self.token_embed = nn.Embedding(cfg.num_codebooks * cfg.codebook_size, cfg.d_model)
        self.pos_embed = nn.Embedding(cfg.max_len, cfg.d_model)
        self.drop = Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.eps)
        self.heads = ParallelHeads(cfg.num_codebooks, cfg.d_model)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 initialisation N(0, 0.02); LayerNorms at identity; heads start as the identity."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.normal_(0.0, 0.02)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.LayerNorm):
                m.reset_parameters()
        self.heads.weight.zero_()
        self.heads.bias.zero_()

    def item_inputs(self, items: torch.Tensor) -> torch.Tensor:
        """(..., ) item_ids -> (..., d): the mean of each item's n token embeddings."""
        x = F.embedding_bag(self.item_tokens[items.reshape(-1)], self.token_embed.weight, mode="mean")
        x = x if self.config.input_scale is None else x * self.config.input_scale
        return x.view(*items.shape, -1)

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        S = items.shape[1]
        if S > self.config.max_len:
            raise ValueError(f"modules/rpg.py: sequences of {S} items, longer than RPGConfig.max_len "
                             f"{self.config.max_len}")
        # Padding (-1) looks up item 0: padding sits at the end and the mask is causal, so no
        # real position attends to it, and its outputs are never scored.
        x = self.drop(self.item_inputs(items.clamp(min=0)) + self.pos_embed.weight[:S])
        pos = torch.arange(S, device=items.device)
        mask = additive_mask(pos[None, :] <= pos[:, None])
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x)

    def token_logits(self, states: torch.Tensor) -> torch.Tensor:
        """(T, d) decoder states -> (T, n, K) logits: cosine(head j's output, codebook j's token
        embeddings) / temperature."""
        cfg = self.config
        heads = F.normalize(self.heads(states), dim=-1)
        table = F.normalize(self.token_embed.weight, dim=-1).view(cfg.num_codebooks, cfg.codebook_size, -1)
        return torch.einsum("tnd,nkd->tnk", heads, table.to(heads.dtype)) / cfg.temperature

    def token_log_probs(self, states: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.token_logits(states).float(), dim=-1)

    def last_states(self, history: torch.Tensor) -> torch.Tensor:
        """(B, H) histories, -1 padded at the end (at least one item each) -> (B, d) last states."""
        lengths = (history >= 0).sum(1)
        if (lengths == 0).any():
            raise ValueError("modules/rpg.py: RPG got an empty history")
        # Rows of similar length together, each chunk cut to its longest history: padding sits
        # at the end behind a causal mask, so the states are the same, without most of the padding.
        out = torch.empty(len(history), self.config.d_model, device=history.device)
        for sel, width in length_chunks(lengths, 64):
            states = self(history[sel, :width])
            out[sel] = states[torch.arange(len(sel), device=history.device), lengths[sel] - 1].float()
        return out

    def item_scores(self, log_probs: torch.Tensor, items: torch.Tensor | None = None) -> torch.Tensor:
        """(B, n, K) log-probabilities -> (B, N) scores of ``items`` (default: the catalogue),
        each the sum of the item's n token log-probabilities: one embedding_bag whose rows are
        the tokens and columns the users."""
        tokens = self.item_tokens if items is None else self.item_tokens[items]
        per_token = log_probs.reshape(len(log_probs), -1).T.contiguous()  # (n K, B)
        return F.embedding_bag(tokens, per_token, mode="sum").T

    def scores(self, history: torch.Tensor) -> torch.Tensor:
        """Exact scores (B, num_items) of the next item after each history (evaluate_exact_topk)."""
        return self.item_scores(self.token_log_probs(self.last_states(history)))


def rpg_loss(model: RPG, items: torch.Tensor, amp: torch.dtype | None = None,
             chunk: int | None = None) -> tuple[torch.Tensor, int]:
    """RPG's multi-token loss: each row a segment of item_ids (B, W), oldest first, -1 padded;
    every position predicts the n codes of the next item, each with its own cross-entropy.
    Returns (the cross-entropies summed over codes and targets, number of targets), as
    :func:`modules.objectives.full_softmax_loss` does for SASRec."""
    inputs, target = items[:, :-1], items[:, 1:]
    is_target = target >= 0
    total = torch.zeros((), device=items.device)
    for sel, width in length_chunks(is_target.sum(1), chunk):
        keep = is_target[sel, :width]
        with torch.autocast(items.device.type, dtype=amp, enabled=amp is not None):
            # The heads run on every position of the chunk, padding too, and the targets are picked
            # after: matmul shapes then repeat from batch to batch. A new row count per chunk made
            # oneDNN's bf16 kernel cache grow without bound (measured: +60 MB per step on Beauty).
            logits = model.token_logits(model(inputs[sel, :width]).flatten(0, 1))[keep.flatten()]
        labels = model.item_tokens[target[sel, :width][keep]] % model.config.codebook_size  # (T, n) codes
        total = total + F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="sum")
    return total, int(is_target.sum())


__all__ = ["RPGConfig", "RPG", "ParallelHeads", "rpg_loss"]
