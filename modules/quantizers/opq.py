"""OPQ semantic IDs (RPG, Hou et al. KDD 2025): PCA of the item text embeddings, then
optimized product quantization into ``n_codebooks`` codes of ``codebook_size`` each.

An item's ID is its n PQ codes, one per sub-vector of the rotated embedding: the codes are
independent of each other (no residual, no order between them), which is what lets RPG
predict all of them at once. As RQKMeans, it is fitted once (no training loop) and is an
nn.Module only so its parameters travel as buffers (safetensors, ``.to(device)``).

Pipeline of ``encode(x)``:

    z  = (x - pca_mean) @ pca_components.T / pca_scale     # PCA to pca_dim dims (whitened or not)
    zr = (z - mean) @ rotation                             # OPQ: centre (faiss' IVF1) + rotation
    code_i = argmin_k |zr[i-th sub-vector] - codebooks[i, k]|^2   for i < n_codebooks

PCA is ``fit_pca`` of modules/actionpiece/features.py. OPQ (alternate PQ k-means and an
orthogonal Procrustes update of the rotation, Ge et al.'s non-parametric OPQ) comes from one
of two backends, the same scheme in both: start from the identity rotation (the PCA basis),
warm-start each k-means from the previous codebooks, end with a longer k-means of the
product quantizer in the final rotation.

- ``faiss`` (faiss-cpu: ``OPQMatrix`` + ``ProductQuantizer``, float32, the library RPG's
  reference uses): ~4x faster on Beauty (32 x 256 on 12,101 x 384: 58-72 s against 252 s,
  back to back on one busy core) for the same reconstruction error.
- ``numpy``: ``train_opq`` of modules/actionpiece/features.py (ActionPiece's, float64), the
  fallback when faiss is not installed.

The RPG reference runs faiss ``OPQ{n},IVF1,PQ{n}x8`` (random start rotation, PQ retrained
from scratch at the end) after sklearn ``PCA(whiten=True)``; on Beauty that scheme left a 7%
larger reconstruction error (154 against 144 per item, whitened 384 dims). Either way the
codes differ from the reference's bit for bit, not in kind.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn


BACKENDS = ("auto", "faiss", "numpy")


def resolve_backend(backend: str) -> str:
    """"auto" -> "faiss" when it imports, else "numpy"; "faiss" without faiss is an error."""
    if backend not in BACKENDS:
        raise ValueError(f"OPQConfig.backend = {backend!r}: not in {BACKENDS}")
    if backend == "numpy":
        return backend
    try:
        import faiss  # noqa: F401
    except ImportError as e:
        if backend == "faiss":
            raise ImportError("OPQConfig.backend = 'faiss': pip install faiss-cpu (or use 'numpy')") from e
        return "numpy"
    return "faiss"


def _train_opq_faiss(z: np.ndarray, c: "OPQConfig") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """faiss OPQMatrix + ProductQuantizer on z (N, d): (mean (d,), rotation (d, d) such that the
    codes quantize (z - mean) @ rotation, codebooks (M, K, d / M)). The scheme of ``train_opq``:
    identity start rotation, the PQ trained inside OPQ warm-starts the final k-means."""
    import faiss

    if c.codebook_size & (c.codebook_size - 1):
        raise ValueError(f"OPQConfig.backend = 'faiss': codebook_size {c.codebook_size} must be a power of 2 "
                         "(use backend = 'numpy')")
    n, d = z.shape
    faiss.omp_set_num_threads(torch.get_num_threads())  # the process' thread setting, not all cores
    mean = z.mean(0)
    xc = np.ascontiguousarray(z - mean, dtype=np.float32)
    pq = faiss.ProductQuantizer(d, c.n_codebooks, c.codebook_size.bit_length() - 1)
    pq.cp.seed = c.seed
    opq = faiss.OPQMatrix(d, c.n_codebooks)
    opq.niter, opq.niter_pq_0, opq.pq = c.n_iter, 4, pq  # 4 k-means iterations per update, as train_opq
    opq.max_train_points = max(n, 1)
    faiss.copy_array_to_vector(np.eye(d, dtype=np.float32).ravel(), opq.A)
    # k-means distances by BLAS: below this many points (128,000 in faiss 1.15) faiss takes a
    # per-point path, ~10x slower for 6-dim sub-vectors (64 codebooks of 384 dims) on Beauty.
    blas_threshold = faiss.cvar.distance_compute_blas_threshold
    faiss.cvar.distance_compute_blas_threshold = 0
    try:
        opq.train(xc)
        xr = opq.apply(xc)
        pq.cp.niter = c.final_kmeans_iter  # hot start (OPQMatrix leaves the PQ in Train_hot_start)
        pq.cp.max_points_per_centroid = max(n, 1)  # all points, no subsampling
        pq.train(xr)
    finally:
        faiss.cvar.distance_compute_blas_threshold = blas_threshold
    a = faiss.vector_to_array(opq.A).reshape(d, d)  # y = A x
    books = faiss.vector_to_array(pq.centroids).reshape(c.n_codebooks, c.codebook_size, d // c.n_codebooks)
    return mean, a.T.astype(np.float64), books


@dataclass
class OPQConfig:
    """n_codebooks x codebook_size OPQ codes. input_dim is filled in by `fit`."""

    n_codebooks: int = 32
    codebook_size: int = 256
    # PCA output dims; None keeps the embedding's dims (a rotation, plus whitening if set).
    # Must be divisible by n_codebooks (the PQ sub-vectors have pca_dim / n_codebooks dims).
    pca_dim: int | None = None
    whiten: bool = True  # unit variance per principal component (RPG: sklearn PCA(whiten=True))
    n_iter: int = 20  # OPQ rotation updates (each after 4 warm-started k-means iterations per codebook)
    final_kmeans_iter: int = 25  # k-means iterations of the final product quantizer
    seed: int = 0
    # "auto": faiss when importable, else numpy; fit() writes the one it used here (config.json keeps it).
    backend: str = "auto"
    input_dim: int | None = None


class OPQTokenizer(nn.Module):
    """PCA + OPQ tokenizer. `fit(x) -> codes (N, n_codebooks)`; `encode(x)` for new items;
    `decode(codes)` back to the embedding space."""

    def __init__(self, config: OPQConfig | None = None, **kwargs):
        super().__init__()
        self.config = config if config is not None else OPQConfig(**kwargs)
        c = self.config
        if c.n_codebooks < 1 or c.codebook_size < 1:
            raise ValueError(f"OPQConfig: n_codebooks ({c.n_codebooks}) and codebook_size ({c.codebook_size}) "
                             "must be >= 1")
        d_in = c.input_dim or 0
        d = self.dim if d_in else 0
        if d and d % c.n_codebooks:
            raise ValueError(f"OPQConfig: pca_dim {d} is not divisible by n_codebooks {c.n_codebooks}")
        self.register_buffer("pca_mean", torch.zeros(d_in))
        self.register_buffer("pca_components", torch.zeros(d, d_in))  # orthonormal rows
        self.register_buffer("pca_scale", torch.ones(d))  # per-component std when whitening, else 1
        self.register_buffer("mean", torch.zeros(d))
        self.register_buffer("rotation", torch.zeros(d, d))  # orthogonal
        self.register_buffer("codebooks", torch.zeros(c.n_codebooks, c.codebook_size, d // c.n_codebooks))

    @property
    def dim(self) -> int:
        """Dims after PCA (pca_dim, or input_dim when None)."""
        c = self.config
        return c.pca_dim if c.pca_dim is not None else (c.input_dim or 0)

    @property
    def codebook_sizes(self) -> list[int]:
        return [self.config.codebook_size] * self.config.n_codebooks

    @torch.no_grad()
    def fit(self, x: Tensor) -> Tensor:
        """Fit PCA and OPQ on x (N, D) (numpy, float64, deterministic given config.seed);
        returns ``encode(x)``, the nearest codes (N, n_codebooks)."""
        # Imported here: the modules.actionpiece package loads numba (seconds), which encode,
        # save and load (every SemanticIdTokenizer user) do not need.
        from modules.actionpiece.features import fit_pca, train_opq

        c = self.config
        if x.ndim != 2:
            raise ValueError(f"OPQTokenizer.fit: expected x of shape (N, D), got {tuple(x.shape)}")
        c.input_dim = x.shape[1]
        d = self.dim
        if not 0 < d <= min(x.shape):
            raise ValueError(f"OPQConfig.pca_dim = {d}: must be in 1..min(items, dims) = {min(x.shape)}")
        if d % c.n_codebooks:
            raise ValueError(f"OPQConfig: pca_dim {d} is not divisible by n_codebooks {c.n_codebooks} "
                             "(set OPQConfig.pca_dim)")
        c.backend = resolve_backend(c.backend)
        xn = x.detach().cpu().double().numpy()
        mean, components, std = fit_pca(xn, d)
        scale = np.maximum(std, 1e-12) if c.whiten else np.ones_like(std)
        z = (xn - mean) @ components.T / scale
        if c.backend == "faiss":
            opq_mean, rotation, codebooks = _train_opq_faiss(z, c)
        else:
            q = train_opq(z, c.n_codebooks, c.codebook_size, n_iter=c.n_iter,
                          final_kmeans_iter=c.final_kmeans_iter, seed=c.seed)
            opq_mean, rotation, codebooks = q.mean, q.rotation, q.codebooks
        dev = self.pca_mean.device
        for name, value in (("pca_mean", mean), ("pca_components", components), ("pca_scale", scale),
                            ("mean", opq_mean), ("rotation", rotation), ("codebooks", codebooks)):
            setattr(self, name, torch.as_tensor(np.ascontiguousarray(value), dtype=torch.float32, device=dev))
        return self.encode(x)

    def _check_fitted(self, where: str) -> None:
        if self.pca_components.numel() == 0:
            raise RuntimeError(f"OPQTokenizer.{where}: call fit(x) first")

    def transform(self, x: Tensor) -> Tensor:
        """(N, D) embeddings -> (N, dim) rotated PCA vectors, the space the codebooks live in."""
        self._check_fitted("transform")
        x = x.float().to(self.pca_mean.device)
        z = (x - self.pca_mean) @ self.pca_components.T / self.pca_scale
        return (z - self.mean) @ self.rotation

    @torch.no_grad()
    def encode(self, x: Tensor, batch_size: int = 8192) -> Tensor:
        """Nearest codeword of each sub-vector: codes (N, n_codebooks), int64."""
        self._check_fitted("encode")
        m, k, dsub = self.codebooks.shape
        c_sq = self.codebooks.pow(2).sum(-1)  # (M, K)
        out = []
        for i in range(0, max(len(x), 1), batch_size):
            sub = self.transform(x[i: i + batch_size]).view(-1, m, dsub)  # (B, M, dsub)
            # |s - c|^2 = |s|^2 - 2 s.c + |c|^2; |s|^2 is the same for every c of a sub-space.
            dist = c_sq - 2 * torch.einsum("bmd,mkd->bmk", sub, self.codebooks)
            out.append(dist.argmin(-1))
        return torch.cat(out)

    @torch.no_grad()
    def decode(self, codes: Tensor) -> Tensor:
        """Codes (N, n_codebooks) -> embeddings (N, D): the concatenated codewords taken back
        through the rotation and the PCA (the input minus what PCA dropped, when pca_dim < D)."""
        self._check_fitted("decode")
        m = self.codebooks.shape[0]
        codes = codes.long().to(self.codebooks.device)
        zr = self.codebooks[torch.arange(m, device=codes.device), codes].flatten(1)  # (N, dim)
        z = zr @ self.rotation.T + self.mean
        return (z * self.pca_scale) @ self.pca_components + self.pca_mean
