"""Item features for ActionPiece (spec section 2): PCA-whitened text embeddings quantized
by OPQ + PQ into ``n_codebooks`` codes, plus one hash-bucket feature that makes every item's
feature tuple unique.

The official pipeline uses sklearn PCA and the faiss index ``OPQ4,IVF1,PQ4x8``. faiss is not
a project dependency, so OPQ is written here in numpy: one coarse centroid (IVF1 = the mean
of the training vectors), then alternate PQ k-means on the rotated residuals and an
orthogonal Procrustes update of the rotation (Ge et al., "Optimized Product Quantization",
non-parametric variant, as faiss' ``OPQMatrix`` does). Codes differ from faiss' bit for bit
(different initialisation), not in kind.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def fit_pca(x: np.ndarray, n_components: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PCA of the rows of ``x`` (N, D): (mean (D,), components (k, D) with orthonormal rows,
    std (k,) of the data along each), k = min(n_components, N, D). The whitened projection
    is ``(x - mean) @ components.T / std`` (sklearn ``PCA(whiten=True)``)."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be (N, D), got shape {x.shape}")
    n_components = min(n_components, x.shape[0], x.shape[1])
    mean = x.mean(0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    std = s[:n_components] / max(x.shape[0] - 1, 1) ** 0.5
    return mean, vt[:n_components], std


def pca_whiten(emb: np.ndarray, n_components: int = 128, fit_rows: np.ndarray | None = None) -> np.ndarray:
    """Project on the top principal components, scaled to unit variance (sklearn
    ``PCA(whiten=True)``), fitted on ``fit_rows`` (default: all rows)."""
    x = np.asarray(emb, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be (N, D), got shape {x.shape}")
    mean, components, std = fit_pca(x if fit_rows is None else x[np.asarray(fit_rows)], n_components)
    return ((x - mean) @ components.T / np.maximum(std, 1e-12)).astype(np.float32)


# numpy rather than torch below: k-means is many small ops, and torch's per-op thread
# hand-off made it 100x slower on a busy 2-core machine.
def _nearest(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid (||c||^2 - 2 x.c: one matmul)."""
    return ((c * c).sum(1) - 2 * x @ c.T).argmin(1)


def _kmeans(x: np.ndarray, k: int, n_iter: int, rng: np.random.Generator,
            init: np.ndarray | None = None) -> np.ndarray:
    """Lloyd k-means; empty clusters are re-seeded from points of the largest one."""
    if init is None:
        init = x[rng.permutation(len(x))[:k]].copy()
        if len(init) < k:  # fewer points than centroids: repeat some, perturbed
            extra = init[rng.integers(len(init), size=k - len(init))]
            init = np.concatenate([init, extra + 1e-4 * rng.normal(size=extra.shape)])
    c = init
    for _ in range(n_iter):
        assign = _nearest(x, c)
        counts = np.bincount(assign, minlength=k)
        sums = np.stack([np.bincount(assign, weights=col, minlength=k) for col in x.T], 1)
        new = sums / np.maximum(counts, 1)[:, None]
        for e in np.flatnonzero(counts == 0):
            big = int(counts.argmax())
            members = np.flatnonzero(assign == big)
            new[e] = x[members[rng.integers(len(members))]] + 1e-4 * rng.normal(size=x.shape[1])
            counts[big] -= 1
        c = new
    return c


@dataclass
class OPQ:
    """Fitted OPQ + PQ quantizer."""

    mean: np.ndarray  # (D,) the single IVF centroid
    rotation: np.ndarray  # (D, D) orthogonal; codes quantize (x - mean) @ rotation
    codebooks: np.ndarray  # (M, ksub, D / M)

    def encode(self, x: np.ndarray) -> np.ndarray:
        xt = (np.asarray(x, dtype=np.float64) - self.mean) @ self.rotation
        m, _, dsub = self.codebooks.shape
        return np.stack([_nearest(xt[:, i * dsub:(i + 1) * dsub], self.codebooks[i]) for i in range(m)], 1)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        parts = [self.codebooks[i][codes[:, i]] for i in range(self.codebooks.shape[0])]
        return np.concatenate(parts, 1) @ self.rotation.T + self.mean


def train_opq(x: np.ndarray, n_codebooks: int = 4, codebook_size: int = 256, n_iter: int = 20,
              kmeans_iter: int = 4, final_kmeans_iter: int = 25, seed: int = 0) -> OPQ:
    """Fit OPQ (rotation + product quantizer) on the rows of ``x``.

    Like faiss' ``OPQMatrix``: a few k-means iterations per rotation update (warm-started),
    then a longer final k-means of the product quantizer in the learned rotation."""
    xt = np.asarray(x, dtype=np.float64)
    n, d = xt.shape
    if d % n_codebooks:
        raise ValueError(f"dimension {d} not divisible by n_codebooks={n_codebooks}")
    rng = np.random.default_rng(seed)
    dsub = d // n_codebooks
    mean = xt.mean(0)
    xc = xt - mean
    rot = np.eye(d)
    books: list[np.ndarray | None] = [None] * n_codebooks
    for it in range(n_iter + 1):
        last = it == n_iter
        xr = xc @ rot
        recon = np.empty_like(xr)
        for i in range(n_codebooks):
            sub = xr[:, i * dsub:(i + 1) * dsub]
            books[i] = _kmeans(sub, codebook_size, final_kmeans_iter if last else kmeans_iter, rng, books[i])
            recon[:, i * dsub:(i + 1) * dsub] = books[i][_nearest(sub, books[i])]
        if last:
            break
        # Procrustes: the orthogonal R minimising ||xc R - recon|| is U V^T of svd(xc^T recon).
        u, _, vt = np.linalg.svd(xc.T @ recon)
        rot = u @ vt
    return OPQ(mean, rot, np.stack(books))  # type: ignore[arg-type]


def add_hash_buckets(codes: np.ndarray, n_hash_buckets: int, seed: int = 12345) -> np.ndarray:
    """Append the hash-bucket feature of spec section 2.6: items sharing the same codes get
    distinct values, drawn from a per-code-tuple random permutation, in item order."""
    codes = np.asarray(codes, dtype=np.int64)
    rng = np.random.RandomState(seed)
    perms: dict[tuple[int, ...], np.ndarray] = {}
    seen: dict[tuple[int, ...], int] = {}
    bucket = np.empty(len(codes), dtype=np.int64)
    for item, row in enumerate(map(tuple, codes.tolist())):
        if row not in perms:
            perms[row] = rng.permutation(n_hash_buckets)
            seen[row] = 0
        k = seen[row]
        if k >= n_hash_buckets:
            raise ValueError(f"item {item}: more than n_hash_buckets={n_hash_buckets} items share codes {row}")
        bucket[item] = perms[row][k]
        seen[row] = k + 1
    out = np.concatenate([codes, bucket[:, None]], 1)
    assert len(np.unique(out, axis=0)) == len(out)
    return out


def item_features_from_embeddings(
    emb: np.ndarray,
    train_items: np.ndarray,
    n_hash_buckets: int = 64,
    pca_dim: int = 128,
    n_codebooks: int = 4,
    codebook_size: int = 256,
    seed: int = 12345,
    opq_iter: int = 20,
) -> np.ndarray:
    """(N, n_codebooks + 1) features: OPQ codes of the whitened embeddings + hash bucket.

    PCA is fitted on all items (as the official code does: text only, no interactions);
    the quantizer only on ``train_items`` (item_ids seen in the training split)."""
    z = pca_whiten(emb, pca_dim)
    quant = train_opq(z[np.asarray(train_items)], n_codebooks, codebook_size, n_iter=opq_iter, seed=seed)
    return add_hash_buckets(quant.encode(z), n_hash_buckets, seed)


def random_item_features(n_items: int, n_codebooks: int = 4, codebook_size: int = 256,
                         n_hash_buckets: int = 64, seed: int = 12345) -> np.ndarray:
    """Seeded pseudo-random codes + hash buckets: the shapes of real features, for benchmarks."""
    codes = np.random.default_rng(seed).integers(0, codebook_size, (n_items, n_codebooks))
    return add_hash_buckets(codes, n_hash_buckets, seed)
