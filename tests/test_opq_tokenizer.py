"""OPQ semantic IDs (RPG): the fitted quantizer's codes against a brute-force reference,
save/load round trip through SemanticIdTokenizer, IDs without a dedup level (shared codes
allowed) and the tiny config end to end through train_rqvae.py."""

import gin
import numpy as np
import pytest
import torch

import train_rqvae
from modules.quantizers.opq import OPQConfig, OPQTokenizer, resolve_backend
from modules.semantic_ids import SemanticIdTokenizer, collision_stats
from tests.fixtures import dataset_bindings, run_script, write_p5_dataset

TINY = "configs/tiny/opq_tiny.gin"


def clustered(n: int, d: int, seed: int) -> torch.Tensor:
    """n points around 12 centres with anisotropic noise (so PCA and the rotation matter)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(12, d, generator=g) * 3
    scale = torch.linspace(2.0, 0.1, d)
    return centres[torch.randint(12, (n,), generator=g)] + torch.randn(n, d, generator=g) * scale


@pytest.fixture(scope="module")
def fitted():
    x = clustered(400, 24, seed=0)
    q = OPQTokenizer(OPQConfig(n_codebooks=4, codebook_size=16, pca_dim=16, n_iter=4, seed=3))
    codes = q.fit(x)
    return q, x, codes


def test_fit_returns_codes_of_every_item(fitted):
    q, x, codes = fitted
    assert codes.shape == (400, 4) and codes.dtype == torch.long
    assert int(codes.min()) >= 0 and int(codes.max()) < 16
    assert q.codebook_sizes == [16] * 4
    assert torch.equal(codes, q.encode(x))
    assert q.codebooks.shape == (4, 16, 4) and q.rotation.shape == (16, 16) and q.pca_components.shape == (16, 24)
    assert torch.allclose(q.rotation @ q.rotation.T, torch.eye(16), atol=1e-5)  # orthogonal


def test_encode_is_the_nearest_codeword_per_sub_vector(fitted):
    """encode = argmin over each codebook of the squared distance to the matching slice of the
    PCA-projected, centred and rotated vector, computed here in float64 from the buffers."""
    q, _, _ = fitted
    x = clustered(300, 24, seed=1).double()
    z = (x - q.pca_mean.double()) @ q.pca_components.double().T / q.pca_scale.double()
    zr = (z - q.mean.double()) @ q.rotation.double()
    books = q.codebooks.double()
    m, k, dsub = books.shape
    ref = torch.empty(len(x), m, dtype=torch.long)
    for i in range(m):
        sub = zr[:, i * dsub:(i + 1) * dsub]
        for n in range(len(x)):
            ref[n, i] = int(((sub[n] - books[i]) ** 2).sum(1).argmin())
    assert torch.equal(q.encode(x.float()), ref)
    assert torch.equal(q.encode(x.float(), batch_size=7), ref)  # batching does not change codes


def test_decode_reconstructs_better_than_the_mean(fitted):
    q, x, codes = fitted
    err = ((q.decode(codes) - x) ** 2).sum(1).mean()
    assert err < 0.2 * ((x - x.mean(0)) ** 2).sum(1).mean()


@pytest.mark.parametrize("backend", ["numpy", "faiss"])
def test_backends_fit_the_same_scheme(backend):
    """Both backends give codes = encode(x), an orthogonal rotation and about the same error."""
    if backend == "faiss":
        pytest.importorskip("faiss")
    x = clustered(400, 24, seed=5)
    errors = {}
    for b in ("numpy", backend):
        q = OPQTokenizer(OPQConfig(n_codebooks=4, codebook_size=16, pca_dim=16, n_iter=4, backend=b))
        codes = q.fit(x)
        assert q.config.backend == b and torch.equal(codes, q.encode(x))
        assert torch.allclose(q.rotation @ q.rotation.T, torch.eye(16), atol=1e-5)
        errors[b] = float(((q.decode(codes) - x) ** 2).sum(1).mean())
    assert errors[backend] < 1.15 * errors["numpy"], errors


def test_auto_backend_falls_back_to_numpy_without_faiss(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "faiss", None)  # import faiss -> ImportError
    assert resolve_backend("auto") == "numpy" and resolve_backend("numpy") == "numpy"
    with pytest.raises(ImportError, match="pip install faiss-cpu"):
        resolve_backend("faiss")
    with pytest.raises(ValueError, match="not in"):
        resolve_backend("sklearn")
    q = OPQTokenizer(OPQConfig(n_codebooks=2, codebook_size=8, n_iter=1))
    q.fit(clustered(100, 8, seed=0))
    assert q.config.backend == "numpy"


def test_pca_without_whitening_and_full_dims():
    x = clustered(300, 16, seed=2)
    q = OPQTokenizer(OPQConfig(n_codebooks=4, codebook_size=8, whiten=False, n_iter=2))
    codes = q.fit(x)
    assert q.config.input_dim == 16 and q.pca_components.shape == (16, 16)
    assert torch.equal(q.pca_scale, torch.ones(16))
    assert codes.shape == (300, 4)


@pytest.mark.parametrize("cfg, message", [
    (dict(n_codebooks=5, pca_dim=16), "not divisible by n_codebooks 5"),
    (dict(n_codebooks=4, pca_dim=64), "must be in 1..min"),
])
def test_bad_dims_are_clear_errors(cfg, message):
    with pytest.raises(ValueError, match=message):
        OPQTokenizer(OPQConfig(codebook_size=8, **cfg)).fit(clustered(50, 24, seed=0))


def test_encode_before_fit_is_a_clear_error():
    with pytest.raises(RuntimeError, match="call fit"):
        OPQTokenizer(OPQConfig()).encode(torch.zeros(2, 8))


def test_round_trip_through_save_and_load(fitted, tmp_path):
    q, _, codes = fitted
    raw_ids = [f"item{i}" for i in range(len(codes))]
    tok = SemanticIdTokenizer(q, codes, codebook_sizes=q.codebook_sizes, raw_ids=raw_ids)
    tok.save_pretrained(tmp_path / "tok")
    back = SemanticIdTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert back.kind == "opq" and isinstance(back.quantizer, OPQTokenizer)
    assert torch.equal(back.item_codes, codes) and back.codebook_sizes == [16] * 4
    assert back.raw_ids == raw_ids
    new = clustered(50, 24, seed=7)
    assert torch.equal(back.encode(new), tok.encode(new))
    for name, buf in q.state_dict().items():
        assert torch.equal(back.quantizer.state_dict()[name], buf), name


def test_shared_ids_without_a_dedup_level_save_and_load(tmp_path):
    """RPG keeps items with the same n codes as they are: the tokenizer saves, loads and reports them."""
    x = clustered(200, 16, seed=4)
    x[10] = x[3]  # identical embeddings -> identical codes
    q = OPQTokenizer(OPQConfig(n_codebooks=2, codebook_size=8, n_iter=2))
    codes = q.fit(x)
    assert torch.equal(codes[10], codes[3])
    stats = collision_stats(codes)
    assert stats["collision_rate"] > 0 and stats["max_group"] >= 2
    SemanticIdTokenizer(q, codes).save_pretrained(tmp_path / "tok")
    back = SemanticIdTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert torch.equal(back.item_codes, codes) and back.codebook_sizes == [8, 8]


# ----------------------------------------------------------------------------- train_rqvae.py


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("p5")
    return write_p5_dataset(root / "data"), root / "cache"


@pytest.fixture(autouse=True)
def clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


def run(data, out, *extra):
    folder, cache = data
    return run_script(train_rqvae.main, TINY, dataset_bindings(folder, cache) + [f"train_rqvae.out_dir = '{out}'", *extra])


def test_tiny_config_end_to_end_without_dedup_level(data, tmp_path):
    res = run(data, tmp_path / "run")
    assert res["quantizer"] == "OPQTokenizer" and res["num_items"] == 60 and res["steps"] == 0
    assert res["dedup_size"] == 0
    assert len(res["codebook_usage"]) == 4 and len(res["codebook_perplexity"]) == 4
    assert all(0 < u <= 1 for u in res["codebook_usage"])
    tok = SemanticIdTokenizer.from_pretrained(str(tmp_path / "run" / "tokenizer"))
    assert tok.kind == "opq" and tok.item_codes.shape == (60, 4)  # no dedup level
    assert tok.codebook_sizes == [16] * 4
    stats = collision_stats(tok.item_codes)
    assert (res["collision_rate"], res["max_group"]) == (stats["collision_rate"], stats["max_group"])
    assert res["unique_after_dedup"] == (stats["max_group"] == 1)
    assert (tmp_path / "run" / "codebook_usage.png").read_bytes()[:4] == b"\x89PNG"
    # The saved codes are the quantizer's nearest codes of the item embeddings.
    folder, cache = data
    emb = np.load(next(cache.rglob("embeddings-*.npy")))
    assert torch.equal(tok.encode(torch.from_numpy(emb)), tok.item_codes)


def test_dedup_level_still_appended_when_asked(data, tmp_path):
    res = run(data, tmp_path / "run", "train_rqvae.dedup_size = None")
    tok = SemanticIdTokenizer.from_pretrained(str(tmp_path / "run" / "tokenizer"))
    assert tok.item_codes.shape == (60, 5) and res["unique_after_dedup"] is True
    assert tok.codebook_sizes[:4] == [16] * 4 and res["dedup_size"] == tok.codebook_sizes[4]
