"""FSQ tokenizer (RecGPT style): MLP encoder -> (residual) finite scalar quantization -> MLP decoder.

Quantization is vector-quantize-pytorch's ResidualFSQ: num_levels quantizers, each with the
implicit codebook prod(levels) (e.g. levels (4, 4, 4, 4) -> 256 codes per level, matching
TIGER's 3 x 256). num_levels=1 is plain FSQ. There are no codebooks to learn, so no
codebook/commitment loss, no k-means init and no dead codes; gradients pass by rounding-STE.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor, nn
from vector_quantize_pytorch import ResidualFSQ

from modules.quantizers.rqvae import RQVAEOutput, item_sq_error, mlp


@dataclass
class FSQConfig:
    input_dim: int = 384
    hidden_dims: Sequence[int] = field(default_factory=lambda: [512, 256, 128])
    latent_dim: int | None = None  # None -> len(fsq_levels) (no projection inside the quantizer)
    fsq_levels: Sequence[int] = field(default_factory=lambda: [4, 4, 4, 4])  # quantization steps per FSQ dim
    num_levels: int = 3  # residual quantizers = semantic-ID length L

    def __post_init__(self):
        self.hidden_dims = list(self.hidden_dims)
        self.fsq_levels = list(self.fsq_levels)
        if any(level < 2 for level in self.fsq_levels):
            raise ValueError(f"FSQConfig.fsq_levels: every entry must be >= 2, got {self.fsq_levels}")


class FSQTokenizer(nn.Module):
    """`forward(x, temperature=1.0) -> RQVAEOutput` (temperature ignored, kept for a common
    signature with RQVAE), `encode(x) -> codes (B, L)`, `decode_codes(codes)`."""

    def __init__(self, config: FSQConfig | None = None, **kwargs):
        super().__init__()
        self.config = c = config if config is not None else FSQConfig(**kwargs)
        latent_dim = c.latent_dim or len(c.fsq_levels)
        self.encoder = mlp([c.input_dim, *c.hidden_dims, latent_dim])
        self.decoder = mlp([latent_dim, *reversed(c.hidden_dims), c.input_dim])
        self.quantizer = ResidualFSQ(dim=latent_dim, levels=list(c.fsq_levels), num_quantizers=c.num_levels)

    @property
    def codebook_sizes(self) -> list[int]:
        return [math.prod(self.config.fsq_levels)] * self.config.num_levels

    def _quantize(self, z: Tensor) -> tuple[Tensor, Tensor]:
        # The library wants (batch, seq, dim); items are a length-1 sequence.
        z_q, codes = self.quantizer(z[:, None, :])
        return z_q[:, 0], codes[:, 0].long()

    def forward(self, x: Tensor, temperature: float = 1.0) -> RQVAEOutput:
        z_q, codes = self._quantize(self.encoder(x))
        recon = self.decoder(z_q)
        recon_loss = item_sq_error(recon, x)
        zero = recon_loss.new_zeros(())
        return RQVAEOutput(recon, codes, recon_loss, zero, recon_loss)

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        return self._quantize(self.encoder(x.to(next(self.parameters()))))[1]

    def decode_codes(self, codes: Tensor) -> Tensor:
        """Reconstruction (B, input_dim) from codes (B, L)."""
        codes = codes.to(next(self.parameters()).device)
        return self.decoder(self.quantizer.get_output_from_indices(codes[:, None, :])[:, 0])
