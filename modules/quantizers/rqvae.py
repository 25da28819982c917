"""RQ-VAE (TIGER): MLP encoder -> residual quantizer (L levels x K codes) -> MLP decoder.

Why not vector-quantize-pytorch's ResidualVQ: we need three gradient estimators through the
same residual quantizer - straight-through, the rotation trick (Fifty et al. 2024) and a soft
Gumbel-softmax assignment - plus TIGER's learnable codebooks trained by a codebook loss
(||sg[r] - e||^2 + beta ||r - sg[e]||^2). The library's gumbel option asserts against the
rotation trick and against learnable codebooks, and its EMA codebooks have no codebook loss,
so using it would mean two code paths for one model. One ~100-line residual loop below does
all three modes; the only extras it needs are k-means init (shared with RQ-KMeans) and an
EMA usage count for dead-code replacement, both small.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modules import distributed
from modules.quantizers.rqkmeans import kmeans
from modules.quantizers.sinkhorn import sinkhorn_assign

QUANTIZE_MODES = ("ste", "rotation", "gumbel")


class RQVAEOutput(NamedTuple):
    """Output of RQVAE / FSQTokenizer forward. Losses are scalars; loss = recon_loss + quant_loss.
    RQVAE's losses are squared errors summed over the vector and averaged over the batch
    (see `item_sq_error`); FSQTokenizer's recon_loss is the same. `latents` is the encoder's
    output before quantization, with its gradient path to the encoder, for models that add
    losses on it (HiD-VAE's code prefixes and uniqueness loss)."""

    recon: Tensor  # (B, input_dim)
    codes: Tensor  # (B, L) long
    recon_loss: Tensor
    quant_loss: Tensor
    loss: Tensor
    latents: Tensor  # (B, latent_dim); FSQTokenizer's chunked mode: (B, num_chunks, chunk_dim)


def item_sq_error(a: Tensor, b: Tensor) -> Tensor:
    """Squared error summed over the last dim, averaged over items.

    Why not F.mse_loss (mean over every element): text embeddings are unit vectors, so a
    per-element reconstruction MSE is ~1/384 of an item's error and the latent-space
    commitment loss dominates; the encoder then minimises it by shrinking every latent onto
    one code (measured on Beauty: all 12,101 items on one code after 200 steps). Summing per
    item weighs reconstruction (384 dims) against quantization (32 dims) as TIGER's
    reference losses do.
    """
    return (a - b).pow(2).sum(-1).mean()


def mlp(dims: Sequence[int]) -> nn.Sequential:
    """Linear layers with ReLU between them (none after the last: latents/reconstructions are unbounded)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def rotation_trick(src: Tensor, tgt: Tensor, eps: float = 1e-8) -> Tensor:
    """Rotation-trick estimator (Fifty et al. 2024, sec. 4.2): forward value is `tgt`; the
    gradient reaching `src` is the output gradient rotated by the (constant) rotation that
    takes src's direction to tgt's and scaled by |tgt|/|src|.

    R = I - 2 w w^T + 2 v u^T with u = src/|src|, v = tgt/|tgt|, w = (u+v)/|u+v|, applied
    to src without materialising R (vector-quantize-pytorch's `rotate_to` is the same maths,
    but it is not part of that package's public API).
    """
    src_norm = src.norm(dim=-1, keepdim=True).clamp_min(eps)
    tgt_norm = tgt.norm(dim=-1, keepdim=True).clamp_min(eps)
    u = (src / src_norm).detach()
    v = (tgt / tgt_norm).detach()
    w = F.normalize(u + v, dim=-1, eps=eps)
    rotated = src - 2 * (src * w).sum(-1, keepdim=True) * w + 2 * (src * u).sum(-1, keepdim=True) * v
    return rotated * (tgt_norm / src_norm).detach()


@dataclass
class RQVAEConfig:
    input_dim: int = 384
    hidden_dims: Sequence[int] = field(default_factory=lambda: [512, 256, 128])
    latent_dim: int = 32
    num_levels: int = 3
    codebook_size: int = 256
    beta: float = 0.25  # commitment weight
    quantize_mode: str = "ste"  # "ste" | "rotation" | "gumbel"
    distance: str = "euclidean"  # "euclidean" | "cosine" (cosine only picks the code; see _distances)
    kmeans_init: bool = True  # k-means init from the first training batch unless init_codebooks ran
    kmeans_iters: int = 20
    # Dead codes: a code whose EMA share of assignments falls below
    # dead_code_threshold / codebook_size (i.e. below that fraction of uniform use) is re-seeded
    # with a random residual of the current batch. Relative to uniform use so that it does not
    # depend on the batch size (vector-quantize-pytorch's threshold_ema_dead_code is a count).
    # Fresh and re-seeded codes start at the uniform share, so with usage_decay 0.99 a code must
    # stay unused ~230 steps (ln 0.1 / ln 0.99) before it counts as dead. 0 disables it.
    dead_code_threshold: float = 0.1
    usage_decay: float = 0.99
    # How codebooks learn: "loss" - by gradient of TIGER's codebook loss ||sg[r] - e||^2;
    # "ema" - each code moves to the running mean of the residuals assigned to it (VQ-VAE-2 /
    # vector-quantize-pytorch style, decay usage_decay), which tracks the encoder's moving
    # latents closely; the loss then keeps only the commitment term.
    codebook_update: str = "loss"
    # LC-Rec / ETEGRec: in training, the last level's codes of a batch are the argmax of a
    # Sinkhorn-Knopp transport plan with uniform code marginals (distances scaled to [-1, 1],
    # see modules/quantizers/sinkhorn.py), so the batch spreads near-uniformly over the last
    # codebook and the encoder/codebooks learn a last level with fewer collisions. `encode`
    # stays nearest-code (batch-independent codes; LC-Rec's get_indices does the same).
    sinkhorn_last_level: bool = False
    sinkhorn_epsilon: float = 0.003
    sinkhorn_iters: int = 100

    def __post_init__(self):
        if self.quantize_mode not in QUANTIZE_MODES:
            raise ValueError(f"RQVAEConfig.quantize_mode: {self.quantize_mode!r} not in {QUANTIZE_MODES}")
        if self.codebook_update not in ("loss", "ema"):
            raise ValueError(f"RQVAEConfig.codebook_update: {self.codebook_update!r} not in ('loss', 'ema')")
        if self.distance not in ("euclidean", "cosine"):
            raise ValueError(f"RQVAEConfig.distance: {self.distance!r} not in ('euclidean', 'cosine')")
        if self.sinkhorn_epsilon <= 0 or self.sinkhorn_iters < 1:
            raise ValueError("RQVAEConfig.sinkhorn_epsilon must be > 0 and sinkhorn_iters >= 1")
        self.hidden_dims = list(self.hidden_dims)


class RQVAE(nn.Module):
    """TIGER's RQ-VAE. `forward(x, temperature) -> RQVAEOutput`, `encode(x) -> codes (B, L)`.

    Codes are the hard nearest codes of the residual chain r_0 = z, r_{l+1} = r_l - e_l, so
    forward (in any mode) and encode give the same codes; the one exception is training with
    sinkhorn_last_level, where the last level takes the batch's Sinkhorn-balanced codes. The
    mode only changes what the decoder sees and how gradients get back to the encoder.

    Data-parallel training (torchrun, ``modules/distributed.py``): what training mode does to
    the codebooks outside autograd uses the whole global batch, so that every rank keeps the
    same codebooks: usage counts and EMA residual sums are summed over ranks, dead codes are
    re-seeded with residuals drawn by rank 0 from all ranks' rows, Sinkhorn balances the global
    batch, k-means init ends with rank 0's codebooks. Every rank must then run each training
    forward (as the shared loop does); evaluation (``encode``) never communicates.
    """

    def __init__(self, config: RQVAEConfig | None = None, **kwargs):
        super().__init__()
        self.config = c = config if config is not None else RQVAEConfig(**kwargs)
        self.encoder = mlp([c.input_dim, *c.hidden_dims, c.latent_dim])
        self.decoder = mlp([c.latent_dim, *reversed(c.hidden_dims), c.input_dim])
        codebooks = torch.empty(c.num_levels, c.codebook_size, c.latent_dim)
        nn.init.kaiming_uniform_(codebooks)
        self.codebooks = nn.Parameter(codebooks, requires_grad=c.codebook_update == "loss")  # (L, K, d)
        self.register_buffer("initted", torch.tensor(not c.kmeans_init))
        # EMA share of assignments per code (dead codes; the EMA codebook's denominator) and,
        # for codebook_update="ema", the EMA of (sum of assigned residuals) / batch size, so that
        # codebook = residual_sum / usage. Both start at the uniform share.
        self.register_buffer("usage", torch.full((c.num_levels, c.codebook_size), 1 / c.codebook_size))
        self.register_buffer("residual_sum", codebooks / c.codebook_size)

    @property
    def codebook_sizes(self) -> list[int]:
        return [self.config.codebook_size] * self.config.num_levels

    def _distances(self, r: Tensor, codebook: Tensor) -> Tensor:
        """(B, K), smaller is closer. Cosine compares directions only; the code vector keeps its
        norm so the residual arithmetic stays in the latent space."""
        if self.config.distance == "cosine":
            return -F.normalize(r, dim=-1) @ F.normalize(codebook, dim=-1).T
        return (r.pow(2).sum(1, keepdim=True) - 2 * r @ codebook.T + codebook.pow(2).sum(1)).clamp_min(0)

    @torch.no_grad()
    def init_codebooks(self, x: Tensor) -> None:
        """Residual k-means on the encoder latents of x (input space, (N, input_dim)).

        Called on the first training batch when config.kmeans_init and not done yet; calling it
        yourself on all item embeddings (or a large sample) gives better initial codebooks.
        """
        if x.shape[0] < self.config.codebook_size:
            warnings.warn(
                f"RQVAE.init_codebooks: k-means on {x.shape[0]} vectors for {self.config.codebook_size} codes "
                f"leaves duplicate codes; pass more items (e.g. all embeddings) to init_codebooks",
                stacklevel=2,
            )
        residual = self.encoder(x.to(self.codebooks))
        gen = torch.Generator().manual_seed(int(torch.randint(2**31, (1,))))  # follows torch's seed
        for level in range(self.config.num_levels):
            cent, assign = kmeans(residual, self.config.codebook_size, self.config.kmeans_iters, gen)
            self.codebooks.data[level] = cent
            residual = residual - cent[assign]
        self.residual_sum.copy_(self.codebooks.data * self.usage[..., None])
        self.initted.fill_(True)
        # k-means on a GPU need not give every rank the same bits: rank 0's codebooks for all.
        distributed.broadcast_tensors_([self.codebooks, self.residual_sum])

    @torch.no_grad()
    def _replace_dead_codes(self, level: int, residual: Tensor) -> None:
        k = self.config.codebook_size
        dead = (self.usage[level] < self.config.dead_code_threshold / k).nonzero().squeeze(1)
        if dead.numel() == 0:
            return
        # Under torchrun: the same dead codes on every rank (usage is synchronised), re-seeded
        # with the rows of the whole global batch that rank 0 draws.
        residual, _ = distributed.all_gather_rows(residual)
        pick = torch.randint(residual.shape[0], (dead.numel(),), device=residual.device)
        seeds = residual[pick]
        distributed.broadcast_tensors_([seeds])
        self.codebooks.data[level, dead] = seeds
        self.usage[level, dead] = 1 / k
        self.residual_sum[level, dead] = seeds / k

    @torch.no_grad()
    def _update_usage(self, level: int, idx: Tensor, residual: Tensor) -> None:
        """EMA of each code's share of the batch; for EMA codebooks also of its residual sum,
        then code = residual_sum / share (a code nobody picks keeps its value)."""
        c, decay = self.config, self.config.usage_decay
        counts = torch.bincount(idx, minlength=c.codebook_size).to(self.usage)
        sums = torch.zeros_like(self.residual_sum[level]).index_add_(0, idx, residual) \
            if c.codebook_update == "ema" else None
        n = idx.numel()
        if distributed.active():  # the global batch's counts and sums, the same on every rank
            total = torch.tensor([n], dtype=counts.dtype, device=counts.device)
            distributed.all_reduce_sum_([counts, total] + ([sums] if sums is not None else []))
            n = total  # a tensor: no host synchronisation
        share = counts / n
        self.usage[level].mul_(decay).add_(share, alpha=1 - decay)
        if c.codebook_update == "ema":
            sums = sums / n
            self.residual_sum[level].mul_(decay).add_(sums, alpha=1 - decay)
            alive = self.usage[level] > 1e-12  # a code with no share left (usage_decay 0) keeps its value
            self.codebooks.data[level, alive] = self.residual_sum[level, alive] / self.usage[level, alive, None]

    def quantize(self, z: Tensor, temperature: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
        """Residual-quantize latents z (B, d) -> (z_q, codes (B, L), quant_loss).

        z_q's forward value is the sum of the chosen codes (or, for gumbel in training, the
        soft mixture); its gradient path to z depends on quantize_mode. In training mode this
        also updates usage counts and re-seeds dead codes (before they are used, so autograd
        never sees an in-place change).
        """
        c = self.config
        update = self.training and torch.is_grad_enabled()
        residual, hard, soft = z, 0.0, 0.0
        codes, quant_loss = [], z.new_zeros(())
        for level in range(c.num_levels):
            if update and c.dead_code_threshold > 0:
                self._replace_dead_codes(level, residual.detach())
            codebook = self.codebooks[level]
            dist = self._distances(residual, codebook)
            if c.sinkhorn_last_level and self.training and level == c.num_levels - 1:
                # Balanced over the global batch under torchrun; this rank keeps its own rows.
                every, mine = distributed.all_gather_rows(dist)
                idx = sinkhorn_assign(every, c.sinkhorn_epsilon, c.sinkhorn_iters)[mine]
            else:
                idx = dist.argmin(1)
            e = codebook[idx]
            # TIGER: codebook loss moves codes to the (frozen) residuals, commitment the reverse.
            quant_loss = quant_loss + c.beta * item_sq_error(residual, e.detach())
            if c.codebook_update == "loss":
                quant_loss = quant_loss + item_sq_error(e, residual.detach())
            if c.quantize_mode == "gumbel" and self.training:
                weights = F.gumbel_softmax(-dist, tau=temperature, hard=False)
                soft = soft + weights @ codebook.clone()  # EMA updates write codebooks in place
            if update:
                self._update_usage(level, idx, residual.detach())
            hard = hard + e.detach()
            residual = residual - e.detach()
            codes.append(idx)
        if c.quantize_mode == "gumbel" and self.training:
            z_q = soft
        elif not z.requires_grad:  # no gradient to route: use the exact sum (STE/rotation add fp noise)
            z_q = hard
        elif c.quantize_mode == "rotation":
            z_q = rotation_trick(z, hard)
        else:
            z_q = z + (hard - z).detach()
        return z_q, torch.stack(codes, 1), quant_loss

    def forward(self, x: Tensor, temperature: float = 1.0) -> RQVAEOutput:
        """x (B, input_dim) -> RQVAEOutput. `temperature` is only used by quantize_mode="gumbel"
        (the caller anneals it). In training mode: k-means init on the first batch (if
        configured), codebook usage tracking and dead-code re-seeding."""
        if self.training and not bool(self.initted):
            self.init_codebooks(distributed.all_gather_rows(x)[0])  # the global batch under torchrun
        z = self.encoder(x)
        z_q, codes, quant_loss = self.quantize(z, temperature)
        recon = self.decoder(z_q)
        recon_loss = item_sq_error(recon, x)
        return RQVAEOutput(recon, codes, recon_loss, quant_loss, recon_loss + quant_loss, z)

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """Hard codes (B, L) of x; no side effects (no usage update, no k-means init)."""
        residual = self.encoder(x.to(self.codebooks))
        codes = []
        for codebook in self.codebooks:
            idx = self._distances(residual, codebook).argmin(1)
            residual = residual - codebook[idx]
            codes.append(idx)
        return torch.stack(codes, 1)

    @torch.no_grad()
    def rebalance_collisions(self, x: Tensor, codes: Tensor | None = None, max_rounds: int = 20) -> Tensor:
        """LC-Rec's code-assignment step (`generate_indices.py`): the items of x (N, input_dim)
        that share a whole code get their last level re-chosen by `sinkhorn_assign` over their
        group (sinkhorn_epsilon, sinkhorn_iters), repeated while collisions remain and codes
        change, at most max_rounds times. Levels < L-1 keep their codes. `codes` defaults to
        `encode(x)`. Exact duplicates (equal latents) stay collided, as in LC-Rec: a dedup
        level (`semantic_ids.add_dedup_level`) still has to make IDs unique.
        """
        c = self.config
        z = self.encoder(x.to(self.codebooks))
        codes = self.encode(x) if codes is None else codes.to(z.device).clone()
        levels = torch.arange(c.num_levels - 1, device=z.device)
        residual = z - self.codebooks[levels, codes[:, :-1]].sum(1)
        for _ in range(max_rounds):
            _, inverse, counts = torch.unique(codes, dim=0, return_inverse=True, return_counts=True)
            changed = False
            for group in (counts > 1).nonzero().squeeze(1).tolist():
                members = (inverse == group).nonzero().squeeze(1)
                dist = self._distances(residual[members], self.codebooks[-1])
                new = sinkhorn_assign(dist, c.sinkhorn_epsilon, c.sinkhorn_iters)
                changed = changed or not torch.equal(new, codes[members, -1])
                codes[members, -1] = new
            if not changed:
                break
        return codes

    def codes_to_latent(self, codes: Tensor) -> Tensor:
        """Sum of the code vectors of the first codes.shape[1] levels, (B, latent_dim)."""
        codes = codes.to(self.codebooks.device)
        levels = torch.arange(codes.shape[1], device=codes.device)
        return self.codebooks[levels, codes].sum(1)

    def decode_codes(self, codes: Tensor) -> Tensor:
        """Reconstruction (B, input_dim) from codes (B, L)."""
        return self.decoder(self.codes_to_latent(codes))
