"""Sinkhorn-Knopp transport plans and the Sinkhorn-balanced last level of RQ-VAE / RQ-KMeans."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modules.quantizers.rqkmeans import RQKMeans, RQKMeansConfig
from modules.quantizers.rqvae import RQVAE, RQVAEConfig
from modules.quantizers.sinkhorn import normalize_cost, sinkhorn_assign, sinkhorn_knopp


def naive_sinkhorn(cost: np.ndarray, epsilon: float, iters: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Textbook scaling in float64 (no log domain): u = a / K v, v = b / K^T u."""
    kernel = np.exp(-cost / epsilon)
    v = np.ones(cost.shape[1])
    for _ in range(iters):
        u = a / (kernel @ v)
        v = b / (kernel.T @ u)
    return u[:, None] * kernel * v[None, :]


def skewed_batch(n=256, k=16, seed=0):
    """n points in a tight blob around one code; the other k - 1 codes lie farther away,
    so the nearest code of (almost) every point is code 0."""
    g = torch.Generator().manual_seed(seed)
    x = 0.05 * torch.randn(n, 8, generator=g)
    codes = torch.cat([torch.zeros(1, 8), torch.nn.functional.normalize(torch.randn(k - 1, 8, generator=g), dim=1)])
    return x, codes


# ----------------------------------------------------------------------------- plan


def test_known_answer_zero_cost_is_the_product_of_marginals():
    a = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    b = torch.tensor([0.1, 0.6, 0.2, 0.1], dtype=torch.float64)
    plan = sinkhorn_knopp(torch.zeros(3, 4), epsilon=0.1, iters=1, row_marginals=a, col_marginals=b)
    torch.testing.assert_close(plan, a[:, None] * b[None, :], rtol=1e-12, atol=1e-12)


def test_known_answer_symmetric_two_by_two():
    # cost [[0, c], [c, 0]], uniform marginals: by symmetry P = K / (2 (1 + t)), t = e^{-c/eps}.
    c, eps = 1.0, 0.5
    t = math.exp(-c / eps)
    plan = sinkhorn_knopp(torch.tensor([[0.0, c], [c, 0.0]]), eps, iters=5)
    expected = torch.tensor([[1.0, t], [t, 1.0]], dtype=torch.float64) / (2 * (1 + t))
    torch.testing.assert_close(plan, expected, rtol=1e-12, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 7), k=st.integers(1, 7), seed=st.integers(0, 10_000), epsilon=st.sampled_from([0.3, 1.0, 3.0]))
def test_plan_matches_marginals_and_naive_reference(n, k, seed, epsilon):
    g = torch.Generator().manual_seed(seed)
    cost = torch.rand(n, k, generator=g, dtype=torch.float64)
    a = torch.rand(n, generator=g, dtype=torch.float64) + 0.1
    b = torch.rand(k, generator=g, dtype=torch.float64) + 0.1
    a, b = a / a.sum(), b / b.sum()
    plan = sinkhorn_knopp(cost, epsilon, 300, a, b)
    torch.testing.assert_close(plan.sum(1), a, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(plan.sum(0), b, rtol=1e-7, atol=1e-9)
    ref = naive_sinkhorn(cost.numpy(), epsilon, 300, a.numpy(), b.numpy())
    np.testing.assert_allclose(plan.numpy(), ref, rtol=1e-7, atol=1e-12)


def test_default_marginals_are_uniform_and_small_epsilon_stays_finite():
    # epsilon 0.003 on [-1, 1] costs: e^{-333} underflows a direct-scaling float32 version.
    x, codes = skewed_batch()
    cost = normalize_cost(torch.cdist(x, codes).pow(2))
    assert cost.min() == pytest.approx(-1, abs=1e-4) and cost.max() == pytest.approx(1, abs=1e-4)
    plan = sinkhorn_knopp(cost, 0.003, 100)
    assert torch.isfinite(plan).all()
    torch.testing.assert_close(plan.sum(0), torch.full((16,), 1 / 16, dtype=torch.float64))
    # Small epsilon converges slowly on the rows (the last update fixes the columns): within
    # 10% after LC-Rec's 100 iterations, and closer than after 10.
    row_error = (plan.sum(1) * 256 - 1).abs().max()
    assert row_error < 0.1
    assert row_error < (sinkhorn_knopp(cost, 0.003, 10).sum(1) * 256 - 1).abs().max()


def test_bad_input_raises():
    with pytest.raises(ValueError, match="sinkhorn.py"):
        sinkhorn_knopp(torch.zeros(3), 0.1, 10)
    with pytest.raises(ValueError, match="equal sums"):
        sinkhorn_knopp(torch.zeros(2, 2), 0.1, 10, torch.tensor([0.5, 0.5]), torch.tensor([0.5, 0.2]))
    with pytest.raises(ValueError, match="epsilon"):
        sinkhorn_knopp(torch.zeros(2, 2), 0.0, 10)


def test_balanced_assignment_shrinks_the_largest_cluster():
    x, codes = skewed_batch()
    dist = torch.cdist(x, codes).pow(2)
    plain = torch.bincount(dist.argmin(1), minlength=16)
    balanced = torch.bincount(sinkhorn_assign(dist, 0.003, 100), minlength=16)
    assert plain.max() == 256  # everything on the blob's code
    assert balanced.max() <= 2 * 256 // 16  # near-uniform: at most twice the even share
    assert (balanced > 0).sum() >= 12


def test_uncontended_assignment_is_argmin():
    # One point per code and each point far closer to its own code: the uniform plan is argmin's.
    g = torch.Generator().manual_seed(0)
    dist = torch.rand(16, 16, generator=g) + 10 * (1 - torch.eye(16))
    assert torch.equal(sinkhorn_assign(dist, 0.003, 100), dist.argmin(1))


# ----------------------------------------------------------------------------- RQ-VAE


def tiny(sinkhorn: bool, **kw):
    torch.manual_seed(0)
    cfg = dict(input_dim=32, hidden_dims=[64], latent_dim=8, num_levels=3, codebook_size=8, sinkhorn_last_level=sinkhorn)
    return RQVAE(RQVAEConfig(**{**cfg, **kw}))


def entropy(counts: torch.Tensor) -> float:
    share = counts[counts > 0].double() / counts.sum()
    return float(-(share * share.log()).sum())


@pytest.mark.parametrize("mode", ["ste", "rotation", "gumbel"])
def test_rqvae_sinkhorn_trains_and_codes_are_valid(mode):
    """In every quantize mode: the encoder gets gradient, codes are in range, and the training
    batch's last level is Sinkhorn-balanced: closer to the even share, with a lower largest
    count, a higher smallest count and a higher entropy than the same batch's nearest codes."""
    model = tiny(True, quantize_mode=mode).train()
    x = torch.randn(128, 32, generator=torch.Generator().manual_seed(1))
    out = model(x, temperature=0.7)
    out.recon_loss.backward()
    for name, p in model.encoder.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert out.codes.shape == (128, 3) and out.codes.dtype == torch.long
    assert ((out.codes >= 0) & (out.codes < 8)).all()
    assert torch.isfinite(out.loss)
    # The same batch's nearest last-level codes, by hand from the residuals the forward saw
    # (the forward leaves the codebooks as they were: codebook loss, no code is dead yet).
    with torch.no_grad():
        residual = model.encoder(x) - model.codebooks[[0, 1], out.codes[:, :2]].sum(1)
        nearest = torch.cdist(residual, model.codebooks[2]).argmin(1)
    sinkhorn, plain = torch.bincount(out.codes[:, 2], minlength=8), torch.bincount(nearest, minlength=8)
    # Measured: Sinkhorn 13-17 items per code (even share 16), nearest 4-25.
    assert (sinkhorn - 16).abs().max() <= 3, sinkhorn.tolist()
    assert sinkhorn.max() < plain.max() and sinkhorn.min() > plain.min(), (sinkhorn.tolist(), plain.tolist())
    assert entropy(sinkhorn) > entropy(plain)
    model.eval()
    codes = model.encode(x)
    assert ((codes >= 0) & (codes < 8)).all()
    assert torch.equal(codes[:, :2], out.codes[:, :2]) and torch.equal(codes[:, 2], nearest)  # encode: nearest codes


def test_rqvae_sinkhorn_balances_only_the_last_level_and_only_in_training():
    on, off = tiny(True), tiny(False, dead_code_threshold=0.0)
    on.config.dead_code_threshold = 0.0  # no re-seeding: both models keep the same codebooks
    x = torch.randn(256, 32, generator=torch.Generator().manual_seed(2))
    off.init_codebooks(x)
    on.load_state_dict(off.state_dict())
    # Skew the batch's last-level residuals: all codes of the last level but one pushed far away.
    with torch.no_grad():
        for m in (on, off):
            m.codebooks.data[2, 1:] += 3 * m.codebooks.data[2].norm(dim=1).max()
            m.residual_sum.copy_(m.codebooks.data * m.usage[..., None])
    with torch.no_grad():
        codes_on, codes_off = on.train()(x).codes, off.train()(x).codes
    assert torch.equal(codes_on[:, :2], codes_off[:, :2])
    assert torch.bincount(codes_off[:, 2], minlength=8).max() == 256
    assert torch.bincount(codes_on[:, 2], minlength=8).max() <= 2 * 256 // 8
    on.eval(), off.eval()
    assert torch.equal(on.encode(x), off.encode(x))
    assert torch.equal(on(x).recon, off(x).recon)


def test_rqvae_option_off_is_unchanged():
    # Off: training codes are the nearest codes (encode), whatever epsilon/iters say.
    a, b = tiny(False), tiny(False, sinkhorn_epsilon=0.5, sinkhorn_iters=3)
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(4)
    out_a = a.train()(x)
    torch.manual_seed(4)
    out_b = b.train()(x)
    assert torch.equal(out_a.codes, out_b.codes) and torch.equal(out_a.loss, out_b.loss)
    assert torch.equal(out_a.codes, a.eval().encode(x))


def test_config_validation():
    with pytest.raises(ValueError, match="sinkhorn"):
        RQVAEConfig(sinkhorn_epsilon=0.0)


# ----------------------------------------------------------------------------- RQ-KMeans


def test_rqkmeans_sinkhorn_last_level_spreads_codes():
    # A deep last level: residuals of 3 tight blobs after a 3-code first level are near-zero
    # noise; plain k-means still spreads them, so skew it: many points, few distinct residuals.
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 16, generator=g) * 5
    x = centres[torch.arange(600) % 3]
    x[:40] += 0.5 * torch.randn(40, 16, generator=g)  # a few outliers pull centroids away
    plain = RQKMeans(RQKMeansConfig(num_levels=2, codebook_size=8)).fit(x)
    sk = RQKMeans(RQKMeansConfig(num_levels=2, codebook_size=8, sinkhorn_last_level=True))
    codes = sk.fit(x)
    assert torch.equal(codes[:, 0], plain[:, 0])  # the first level is untouched
    assert torch.bincount(codes[:, 1], minlength=8).max() < torch.bincount(plain[:, 1], minlength=8).max()
    assert ((codes >= 0) & (codes < 8)).all()
    enc = sk.encode(x)
    assert enc.shape == (600, 2) and ((enc >= 0) & (enc < 8)).all()


def test_rqvae_rebalance_collisions_lowers_the_collision_rate():
    from modules.semantic_ids import collision_stats

    model = tiny(True)
    x = torch.randn(512, 32, generator=torch.Generator().manual_seed(0))  # 512 items, 8^3 codes
    model.init_codebooks(x)
    model.eval()
    codes = model.encode(x)
    fixed = model.rebalance_collisions(x, max_rounds=3)
    assert torch.equal(fixed[:, :2], codes[:, :2])  # only the last level moves
    assert ((fixed >= 0) & (fixed < 8)).all()
    assert collision_stats(fixed)["collision_rate"] < collision_stats(codes)["collision_rate"] - 0.1
    assert torch.equal(model.encode(x), codes)  # no side effects
