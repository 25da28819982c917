"""SASRec (Kang & McAuley, 2018): causal self-attention over item-ID embeddings, the ID-based
baseline of the semantic-ID recommenders.

Trained as gSASRec / eSASRec make it strong: every position of a user's sequence predicts
the next item with a full softmax over all items (:func:`modules.objectives.full_softmax_loss`),
scores are dot products with the input item embeddings (tied), and evaluation ranks all items
exactly (:func:`modules.evaluation.evaluate_exact_topk`).

Sequences are right-padded with -1 (the repo's layout), and position ``j`` holds the
``j``-th item of the window (learned position embeddings, 0 = oldest). With padding only at
the end, the causal mask alone keeps every real position from seeing padding, and a target
predicted inside a training segment sees the same positions as it would as the last item of
an evaluation history.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from data.prepare import ITEM_EMBEDDINGS_FILE, ITEM_EMBEDDINGS_MANIFEST
from modules.transformers.layers import Attention, Dropout, FeedForward, additive_mask


@dataclass
class SASRecConfig:
    num_items: int
    max_len: int = 50  # positions; train_decoder.py sets the dataset's max_history
    d_model: int = 64
    num_heads: int = 1
    num_layers: int = 2
    d_ff: int = 256
    dropout: float = 0.2  # embeddings, attention weights, FFN hidden units, residual branches
    activation: str = "gelu"  # or "relu" (the original), "swiglu"
    pre_norm: bool = True  # LayerNorm before each sublayer (+ a final one); False: after (post-LN)
    eps: float = 1e-6

    def __post_init__(self):
        if self.num_items < 1 or self.max_len < 1:
            raise ValueError(f"modules/sasrec.py: SASRecConfig needs num_items >= 1 and max_len >= 1, "
                             f"got {self.num_items}, {self.max_len}")
        if self.d_model % self.num_heads:
            raise ValueError(f"modules/sasrec.py: SASRecConfig.d_model {self.d_model} is not divisible by "
                             f"num_heads {self.num_heads}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class Block(nn.Module):
    def __init__(self, cfg: SASRecConfig):
        super().__init__()
        self.pre_norm = cfg.pre_norm
        self.norm1 = nn.LayerNorm(cfg.d_model, eps=cfg.eps)
        self.attn = Attention(cfg.d_model, cfg.num_heads, cfg.d_model // cfg.num_heads, cfg.dropout)
        self.norm2 = nn.LayerNorm(cfg.d_model, eps=cfg.eps)
        self.ffn = FeedForward(cfg.d_model, cfg.d_ff, cfg.activation, cfg.dropout)
        self.drop = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.drop(self.attn(self.norm1(x), mask))
            return x + self.drop(self.ffn(self.norm2(x)))
        x = self.norm1(x + self.drop(self.attn(x, mask)))
        return self.norm2(x + self.drop(self.ffn(x)))


class SASRec(nn.Module):
    """``forward(items)``: items (n, S) item_ids, -1 padded at the end -> hidden states (n, S, d);
    position j's state scores the item after position j against :attr:`item_embeddings`."""

    def __init__(self, config: SASRecConfig):
        super().__init__()
        self.config = cfg = config
        self.item_embed = nn.Embedding(cfg.num_items, cfg.d_model)
        self.pos_embed = nn.Embedding(cfg.max_len, cfg.d_model)
        self.embed_norm = None if cfg.pre_norm else nn.LayerNorm(cfg.d_model, eps=cfg.eps)
        self.drop = Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        # Pre-LN leaves the residual stream unnormalised: a last LayerNorm before scoring.
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.eps) if cfg.pre_norm else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """BERT / RecBole initialisation: N(0, 0.02) weights, LayerNorms at identity."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.normal_(0.0, 0.02)
            elif isinstance(m, nn.LayerNorm):
                m.reset_parameters()

    @property
    def item_embeddings(self) -> torch.Tensor:
        """(num_items, d): the input embeddings, also the output layer (tied)."""
        return self.item_embed.weight

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        S = items.shape[1]
        if S > self.config.max_len:
            raise ValueError(f"modules/sasrec.py: sequences of {S} items, longer than SASRecConfig.max_len "
                             f"{self.config.max_len}")
        # Padding (-1) looks up item 0: with padding at the end and a causal mask no real
        # position attends to it, and its outputs are never scored.
        x = self.item_embed(items.clamp(min=0)) + self.pos_embed.weight[:S]
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        x = self.drop(x)
        pos = torch.arange(S, device=items.device)
        mask = additive_mask(pos[None, :] <= pos[:, None])  # (S, S), broadcast over rows and heads
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x) if self.norm is not None else x

    def scores(self, history: torch.Tensor) -> torch.Tensor:
        """Scores (n, num_items) of the next item after each history (n, H), -1 padded at the end
        (at least one item per row)."""
        last = (history >= 0).sum(1) - 1
        if (last < 0).any():
            raise ValueError("modules/sasrec.py: SASRec.scores got an empty history")
        h = self(history)[torch.arange(len(history), device=history.device), last]
        return h @ self.item_embeddings.T


def save_item_embeddings(out_dir: str | Path, model: SASRec, manifest: dict) -> Path:
    """Write ``model``'s item table to ``out_dir/item_embeddings.npy`` (float32 (num_items, d),
    item_id order) and ``manifest`` (+ its shape) to ``item_embeddings.json``, each atomically.

    The manifest is what :func:`data.prepare.load_item_embeddings` checks (dataset fingerprint,
    item count), so it is removed first and written last: a crash in between leaves no pair
    that looks valid."""
    out = Path(out_dir)
    table = model.item_embeddings.detach().float().cpu().numpy()
    manifest = {**manifest, "num_items": int(table.shape[0]), "dim": int(table.shape[1]),
                "model": model.config.to_dict()}
    (out / ITEM_EMBEDDINGS_MANIFEST).unlink(missing_ok=True)
    for name, write in ((ITEM_EMBEDDINGS_FILE, lambda f: np.save(f, table, allow_pickle=False)),
                        (ITEM_EMBEDDINGS_MANIFEST, lambda f: f.write(json.dumps(manifest, indent=1).encode()))):
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=out)
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
            os.replace(tmp, out / name)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return out / ITEM_EMBEDDINGS_FILE


__all__ = ["SASRecConfig", "SASRec", "save_item_embeddings"]
