"""Semantic-ID quantizers: RQ-VAE (TIGER), RQ-KMeans (GRID) and an FSQ tokenizer (RecGPT).

All three expose `encode(x) -> codes (N, L)` and `codebook_sizes`; the trainable ones
(RQVAE, FSQTokenizer) return an `RQVAEOutput` from `forward(x, temperature)`.
"""

from modules.quantizers.fsq import FSQConfig, FSQTokenizer
from modules.quantizers.rqkmeans import RQKMeans, RQKMeansConfig, balanced_assign, kmeans
from modules.quantizers.rqvae import QUANTIZE_MODES, RQVAE, RQVAEConfig, RQVAEOutput, rotation_trick

__all__ = [
    "FSQConfig", "FSQTokenizer", "RQKMeans", "RQKMeansConfig", "balanced_assign", "kmeans",
    "QUANTIZE_MODES", "RQVAE", "RQVAEConfig", "RQVAEOutput", "rotation_trick",
]
