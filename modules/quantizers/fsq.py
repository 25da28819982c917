"""FSQ tokenizer (RecGPT style), two modes (`FSQConfig.mode`).

'residual' (default): MLP encoder -> vector-quantize-pytorch's ResidualFSQ -> MLP decoder;
num_levels quantizers, each with the implicit codebook prod(levels) (e.g. levels (4, 4, 4, 4)
-> 256 codes per level, matching TIGER's 3 x 256). num_levels=1 is plain FSQ.

'chunked' (RecGPT's tokenizer, HKUDS/RecGPT `ae_trainer.py`, `encoder.py`, `utils/fsq.py`):
the embedding is cut into num_chunks equal chunks (RecGPT: 4 x 192 of a 768-d embedding), and
one FSQ (a linear projection chunk -> len(levels) dims, levels (8, 8, 8, 6, 5) = 15,360 codes,
shared by all chunks) quantizes each chunk into one code: code j depends on chunk j only, and
there is no residual. The projection is trained as an autoencoder on the item embeddings
(RecGPT: L1 reconstruction, no interaction data); the decoder maps the chunks' quantized
vectors back to the embedding. RecGPT's decoder is a 2-layer transformer over the chunk
vectors read at the last position, then Linear-ReLU-Linear; here it is an MLP over their
concatenation (`hidden_dims`), and the loss is the squared error summed per item as for the
other quantizers (`item_sq_error`) instead of RecGPT's L1: neither changes what a code can
depend on. No encoder MLP: RecGPT's encoder only reshapes (its transformer layers are unused).

There are no codebooks to learn in either mode, so no codebook/commitment loss, no k-means
init and no dead codes; gradients pass by rounding-STE.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor, nn
from vector_quantize_pytorch import FSQ, ResidualFSQ

from modules.quantizers.rqvae import RQVAEOutput, item_sq_error, mlp


FSQ_MODES = ("residual", "chunked")


@dataclass
class FSQConfig:
    input_dim: int = 384
    hidden_dims: Sequence[int] = field(default_factory=lambda: [512, 256, 128])
    latent_dim: int | None = None  # None -> len(fsq_levels) (no projection inside the quantizer)
    fsq_levels: Sequence[int] = field(default_factory=lambda: [4, 4, 4, 4])  # quantization steps per FSQ dim
    num_levels: int = 3  # residual quantizers = semantic-ID length L ('residual' mode)
    # 'residual': the above. 'chunked' (RecGPT): input cut into num_chunks chunks, one FSQ code
    # each (L = num_chunks); latent_dim and num_levels are unused, hidden_dims is the decoder's.
    mode: str = "residual"
    num_chunks: int = 4

    def __post_init__(self):
        self.hidden_dims = list(self.hidden_dims)
        self.fsq_levels = list(self.fsq_levels)
        if any(level < 2 for level in self.fsq_levels):
            raise ValueError(f"FSQConfig.fsq_levels: every entry must be >= 2, got {self.fsq_levels}")
        if self.mode not in FSQ_MODES:
            raise ValueError(f"FSQConfig.mode: {self.mode!r} not in {FSQ_MODES}")
        if self.num_chunks < 1:
            raise ValueError(f"FSQConfig.num_chunks: must be >= 1, got {self.num_chunks}")

    @property
    def code_length(self) -> int:
        return self.num_chunks if self.mode == "chunked" else self.num_levels


class FSQTokenizer(nn.Module):
    """`forward(x, temperature=1.0) -> RQVAEOutput` (temperature ignored, kept for a common
    signature with RQVAE), `encode(x) -> codes (B, L)`, `decode_codes(codes)`."""

    def __init__(self, config: FSQConfig | None = None, **kwargs):
        super().__init__()
        self.config = c = config if config is not None else FSQConfig(**kwargs)
        if c.mode == "chunked":
            # input_dim is set by train_rqvae after the config is built, so it is checked here.
            if c.input_dim % c.num_chunks:
                raise ValueError(f"FSQConfig.input_dim: {c.input_dim} is not divisible by "
                                 f"FSQConfig.num_chunks = {c.num_chunks}")
            self.encoder = nn.Unflatten(-1, (c.num_chunks, c.input_dim // c.num_chunks))
            self.decoder = mlp([c.input_dim, *c.hidden_dims, c.input_dim])
            # One FSQ for all chunks (RecGPT shares it): its projections act on each chunk alone.
            self.quantizer = FSQ(levels=list(c.fsq_levels), dim=c.input_dim // c.num_chunks)
            return
        latent_dim = c.latent_dim or len(c.fsq_levels)
        self.encoder = mlp([c.input_dim, *c.hidden_dims, latent_dim])
        self.decoder = mlp([latent_dim, *reversed(c.hidden_dims), c.input_dim])
        self.quantizer = ResidualFSQ(dim=latent_dim, levels=list(c.fsq_levels), num_quantizers=c.num_levels)

    @property
    def codebook_sizes(self) -> list[int]:
        return [math.prod(self.config.fsq_levels)] * self.config.code_length

    def _quantize(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """(quantized latent flattened per item, codes (B, L))."""
        if self.config.mode == "chunked":  # z: (B, chunks, chunk_dim), chunks as the sequence axis
            z_q, codes = self.quantizer(z)
            return z_q.flatten(1), codes.long()
        # The library wants (batch, seq, dim); items are a length-1 sequence.
        z_q, codes = self.quantizer(z[:, None, :])
        return z_q[:, 0], codes[:, 0].long()

    def forward(self, x: Tensor, temperature: float = 1.0) -> RQVAEOutput:
        z = self.encoder(x)
        z_q, codes = self._quantize(z)
        recon = self.decoder(z_q)
        recon_loss = item_sq_error(recon, x)
        zero = recon_loss.new_zeros(())
        return RQVAEOutput(recon, codes, recon_loss, zero, recon_loss, z)

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        return self._quantize(self.encoder(x.to(next(self.parameters()))))[1]

    def code_digits(self, codes: Tensor) -> Tensor:
        """Chunked mode: each code's FSQ grid point as digits (B, L, len(fsq_levels)), digit i in
        [0, fsq_levels[i]); `digits_to_codes` inverts it."""
        self._require_chunked("code_digits")
        levels = torch.tensor(self.config.fsq_levels, device=codes.device)
        basis = torch.cumprod(torch.cat([levels.new_ones(1), levels[:-1]]), 0)  # mixed radix, first digit lowest
        return (codes.long()[..., None] // basis) % levels

    def digits_to_codes(self, digits: Tensor) -> Tensor:
        """Chunked mode: codes (B, L) of digits (B, L, len(fsq_levels)), mixed radix with the
        first FSQ dimension least significant (the library's order)."""
        self._require_chunked("digits_to_codes")
        levels = self.config.fsq_levels
        basis = torch.tensor([math.prod(levels[:i]) for i in range(len(levels))], device=digits.device)
        return (digits.long() * basis).sum(-1)

    def _require_chunked(self, name: str) -> None:
        if self.config.mode != "chunked":
            raise ValueError(f"FSQTokenizer.{name}: only for FSQConfig.mode = 'chunked', not {self.config.mode!r}")

    def decode_codes(self, codes: Tensor) -> Tensor:
        """Reconstruction (B, input_dim) from codes (B, L)."""
        codes = codes.to(next(self.parameters()).device)
        if self.config.mode == "chunked":
            return self.decoder(self.quantizer.indices_to_codes(codes).flatten(1))
        return self.decoder(self.quantizer.get_output_from_indices(codes[:, None, :])[:, 0])
