"""Building blocks shared by the T5 and GPT recommenders.

Shapes: ``B`` sequences (or users), ``S``/``T`` positions, ``h`` heads, ``d`` head size.
Attention masks are *additive* float tensors (0 = attend, very negative = masked) so that a
row with nothing to attend to gives a finite uniform softmax instead of NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def additive_mask(keep: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """bool keep-mask -> additive mask of ``dtype`` (0 where kept, the dtype's minimum elsewhere)."""
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(~keep, torch.finfo(dtype).min)


def cpu_keep_mask(shape, p: float) -> torch.Tensor:
    """Bernoulli(1 - p) bool mask, drawn several times faster than ``bernoulli_`` on CPU.

    torch draws CPU random numbers serially, one per element; for TIGER's activations that
    costs more than the matmuls. Here each 64-bit draw gives four 16-bit uniforms (so p is
    rounded to a multiple of 1/65536). It uses torch's default generator: ``torch.manual_seed``
    still makes runs reproducible.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"modules/transformers/layers.py: dropout p must be in [0, 1), got {p}")
    numel = 1
    for size in shape:
        numel *= size
    words = torch.randint(-(2**63), 2**63 - 1, ((numel + 3) // 4,), dtype=torch.int64)
    threshold = torch.tensor(round(p * 65536) - 32768, dtype=torch.int16)  # a tensor: faster compare
    return torch.ge(words.view(torch.int16)[:numel], threshold).view(shape)


def dropout_unscaled(x: torch.Tensor, p: float, training: bool, relu: bool = False) -> tuple[torch.Tensor, float]:
    """Dropout (of ``relu(x)`` if ``relu``) *without* the 1 / (1 - p) rescaling, and that scale.

    The caller applies the scale after the next linear map (it commutes with it), where the
    tensor is smaller: e.g. (n, S, d_model) after an MLP's output matrix instead of its
    (n, S, d_ff) hidden units. On CPU this saves a pass over the big tensor; elsewhere torch's
    fused dropout kernel is used (it rescales itself, so the returned scale is 1).
    """
    if not training or p == 0.0:
        return (F.relu(x) if relu else x), 1.0
    if x.device.type != "cpu":
        return F.dropout(F.relu(x) if relu else x, p, True), 1.0
    out = torch.where(cpu_keep_mask(x.shape, p), x, x.new_zeros(()))
    return (out.relu_() if relu else out), 1.0 / (1.0 - p)


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """``F.dropout`` with the faster CPU mask of :func:`cpu_keep_mask`."""
    out, scale = dropout_unscaled(x, p, training)
    return out.mul_(scale) if scale != 1.0 else out


class Dropout(nn.Module):
    """``nn.Dropout`` using :func:`dropout`."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class RMSNorm(nn.Module):
    """T5's LayerNorm: scale only, no mean subtraction, no bias."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # On CPU F.rms_norm runs a chain of pow/mean/add/rsqrt/mul kernels; one vector_norm
        # reduction instead makes it ~1.5x faster (forward).
        mean_square = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square() / x.shape[-1]
        return x * torch.rsqrt(mean_square + self.eps) * self.weight


class FeedForward(nn.Module):
    """Position-wise MLP: ``relu`` / ``gelu`` (two matrices) or ``swiglu`` (gated, three)."""

    def __init__(self, d_model: int, d_ff: int, activation: str = "relu", dropout: float = 0.0):
        super().__init__()
        if activation not in ("relu", "gelu", "swiglu"):
            raise ValueError(f"modules/transformers/layers.py: unknown activation {activation!r}")
        self.activation = activation
        # swiglu's gate and value come out of one matmul, then split.
        self.wi = nn.Linear(d_model, d_ff * (2 if activation == "swiglu" else 1), bias=False)
        self.wo = nn.Linear(d_ff, d_model, bias=False)
        self.p = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.wi(x)
        if self.activation == "gelu":
            h = F.gelu(h, approximate="tanh")
        elif self.activation == "swiglu":
            gate, value = h.chunk(2, dim=-1)
            h = F.silu(gate) * value
        h, scale = dropout_unscaled(h, self.p, self.training, relu=self.activation == "relu")
        out = self.wo(h)
        return out * scale if scale != 1.0 else out


class Rotary(nn.Module):
    """Rotary position embedding (RoPE, rotate-half form) for heads of size ``d_head``."""

    def __init__(self, d_head: int, base: float = 10000.0):
        super().__init__()
        if d_head % 2:
            raise ValueError("modules/transformers/layers.py: RoPE needs an even head size")
        inv_freq = base ** (-torch.arange(0, d_head, 2, dtype=torch.float32) / d_head)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(S,) positions -> cos, sin of shape (S, d_head), to pass to :func:`apply_rotary`."""
        angles = positions.float()[:, None] * self.inv_freq
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (..., S, d) by the angles of its positions."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos.to(x.dtype) + torch.cat([-x2, x1], dim=-1) * sin.to(x.dtype)


def cached_scores(q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Dot products of one query per row, q (rows, h, d), with cached keys (t, rows, h, d) -> (t, rows, h).

    Decoding attends from one query to a handful of cached positions per row: a short loop of
    elementwise ops over the position-major cache is 2-4x faster than SDPA, whose overhead per
    (row, head) pair dominates such tiny problems.
    """
    return torch.stack([(k * q).sum(-1) for k in keys])


def cached_values(probs: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Weights (t, rows, h) times cached values (t, rows, h, d), summed over t -> (rows, h, d)."""
    out = values[0] * probs[0, ..., None]
    for s in range(1, len(values)):
        out.addcmul_(values[s], probs[s, ..., None])
    return out


class Attention(nn.Module):
    """Multi-head attention on ``F.scaled_dot_product_attention``.

    Self-attention projects q, k, v with one fused matmul; cross-attention projects q from the
    decoder and k, v (once, see :meth:`project_kv`) from the encoder output.
    ``inner = num_heads * d_head`` may differ from ``d_model`` (TIGER: 6 x 64 = 384 vs 128).
    ``scale`` multiplies q.k: T5 uses 1.0 (its initialisation absorbs 1/sqrt(d)).
    """

    def __init__(self, d_model: int, num_heads: int, d_head: int, dropout: float = 0.0,
                 scale: float | None = None, cross: bool = False):
        super().__init__()
        self.num_heads, self.d_head, self.cross = num_heads, d_head, cross
        self.scale = scale
        self.dropout = dropout
        inner = num_heads * d_head
        if cross:
            self.q = nn.Linear(d_model, inner, bias=False)
            self.kv = nn.Linear(d_model, 2 * inner, bias=False)
        else:
            self.qkv = nn.Linear(d_model, 3 * inner, bias=False)
        self.o = nn.Linear(inner, d_model, bias=False)

    def _heads(self, x: torch.Tensor, parts: int) -> tuple[torch.Tensor, ...]:
        """(B, S, parts * h * d) -> ``parts`` views of shape (B, h, S, d).

        ``split`` rather than ``unbind`` of a 5-d view: its backward writes the gradients
        straight into the (B, S, parts * h * d) layout with one ``cat`` (no extra copy).
        """
        B, S, _ = x.shape
        chunks = x.split(self.num_heads * self.d_head, dim=-1)
        assert len(chunks) == parts
        return tuple(t.view(B, S, self.num_heads, self.d_head).transpose(1, 2) for t in chunks)

    def _merge(self, out: torch.Tensor) -> torch.Tensor:
        """(B, h, S, d) -> output projection of (B, S, h * d)."""
        B, _, S, _ = out.shape
        return self.o(out.transpose(1, 2).reshape(B, S, self.num_heads * self.d_head))

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self._heads(self.qkv(x), 3)

    def project_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention keys/values of an encoder output (B, S, D) -> 2 x (B, h, S, d)."""
        return self._heads(self.kv(memory), 2)

    def attend(self, q, k, v, mask=None) -> torch.Tensor:
        """Attention on (B, h, S, d) tensors with an additive ``mask`` broadcastable to (B, h, Sq, Sk)."""
        if self.training and q.device.type == "cpu":
            # In training SDPA takes its slow "math" path on CPU (the T5 mask needs a gradient)
            # and draws its dropout mask element by element; this is the same math, faster.
            if self.scale != 1.0:
                q = q * (self.scale if self.scale is not None else q.shape[-1] ** -0.5)
            scores = q @ k.transpose(-1, -2)
            if mask is not None:
                scores += mask
            probs, drop_scale = dropout_unscaled(scores.softmax(dim=-1), self.dropout, True)
            out = self._merge(probs @ v)
            return out * drop_scale if drop_scale != 1.0 else out
        if mask is not None and mask.dtype != q.dtype:  # e.g. float32 mask under bf16 autocast
            mask = mask.clamp(min=torch.finfo(q.dtype).min).to(q.dtype)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, scale=self.scale
        )
        return self._merge(out)

    def attend_cached(self, q, keys, values, bias=None) -> torch.Tensor:
        """Decoding step: q (rows, h, 1, d) over cached keys/values (t, rows, h, d) -> (rows, D).

        ``bias``: additive, broadcastable to (t, rows, h).
        """
        scale = self.scale if self.scale is not None else self.d_head**-0.5
        q = q[:, :, 0] * scale if scale != 1.0 else q[:, :, 0]
        scores = cached_scores(q, keys)
        if bias is not None:
            scores = scores + bias
        probs = dropout(scores.softmax(dim=0), self.dropout, self.training)
        return self.o(cached_values(probs, values).flatten(1))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Self-attention over the positions of ``x`` (B, S, D)."""
        return self.attend(*self.project_qkv(x), mask)

    def forward_received(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                         query_keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Self-attention like :meth:`forward`, plus the attention each position receives.

        Returns (output (B, S, D), received (B, S)): the softmax weights summed over heads and
        over the queries where ``query_keep`` (B, S) bool is True (all if None), detached.
        SDPA returns no weights, so this computes them explicitly (an (B, h, S, S) tensor):
        meant for the one layer whose weights are needed (RASTP's pruning layer of the T5).
        """
        q, k, v = self.project_qkv(x)
        scale = self.scale if self.scale is not None else self.d_head**-0.5
        scores = (q * scale if scale != 1.0 else q) @ k.transpose(-1, -2)
        if mask is not None:
            scores = scores + mask
        probs = scores.float().softmax(dim=-1)
        received = probs.detach()
        if query_keep is not None:
            received = received * query_keep[:, None, :, None].to(received.dtype)
        received = received.sum(dim=(1, 2))
        probs, drop_scale = dropout_unscaled(probs, self.dropout, self.training)
        out = self._merge(probs.to(v.dtype) @ v)
        return (out * drop_scale if drop_scale != 1.0 else out), received

    def forward_cross(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], mask=None) -> torch.Tensor:
        """Cross-attention of ``x`` (B, T, D) to precomputed ``kv`` (from :meth:`project_kv`).

        In beam decoding ``T`` is the beam axis: all beams of a user query the same encoder
        keys/values, which are therefore stored once per user, not once per beam.
        """
        (q,) = self._heads(self.q(x), 1)
        return self.attend(q, *kv, mask)


__all__ = [
    "additive_mask", "cpu_keep_mask", "dropout_unscaled", "dropout", "Dropout", "RMSNorm", "FeedForward",
    "Rotary", "apply_rotary", "cached_scores", "cached_values", "Attention",
]
