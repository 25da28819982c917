"""RQ-VAE, FSQ tokenizer and RQ-KMeans on tiny synthetic data (CPU, a few seconds)."""

import math

import pytest
import torch

from modules.quantizers.fsq import FSQConfig, FSQTokenizer
from modules.quantizers.rqkmeans import RQKMeans, RQKMeansConfig, balanced_assign, kmeans
from modules.quantizers.rqvae import RQVAE, RQVAEConfig, rotation_trick
from modules.semantic_ids import collision_stats



def clustered(n=256, k=16, dim=32, noise=0.3, seed=0):
    """n points around k random centres (k divides n)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, dim, generator=g)
    return centres[torch.arange(n) % k] + noise * torch.randn(n, dim, generator=g)


def hierarchical(n_per=8, dim=32, ratio=0.5, noise=0.02, seed=0):
    """x = a[i] + b[j] + c[l] over all (i, j, l): residual structure with n_per^3 items whose
    ideal 3-level codes are (i, j, l)."""
    g = torch.Generator().manual_seed(seed)
    parts = [torch.randn(n_per, dim, generator=g) * ratio**level for level in range(3)]
    idx = torch.cartesian_prod(*[torch.arange(n_per)] * 3)
    x = sum(p[idx[:, level]] for level, p in enumerate(parts))
    return x + noise * torch.randn(len(idx), dim, generator=g), idx


def tiny_rqvae(mode="ste", **kw):
    cfg = dict(input_dim=32, hidden_dims=[64], latent_dim=16, num_levels=3, codebook_size=8, quantize_mode=mode)
    return RQVAE(RQVAEConfig(**{**cfg, **kw}))


def same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Two labelings of the same points define the same clusters (up to renaming)."""
    pairs = torch.unique(torch.stack([a, b], 1), dim=0).shape[0]
    return pairs == torch.unique(a).numel() == torch.unique(b).numel()


# ----------------------------------------------------------------------------- RQ-VAE


def encoder_grads(model, x, dz):
    """Gradients of the encoder's parameters when dL/dz = dz (z = encoder(x)), by autograd."""
    return torch.autograd.grad(model.encoder(x), list(model.encoder.parameters()), dz)


def explicit_rotation_gradient(z, target, g):
    """lambda R^T g per row, R the rotation taking z's direction to target's written out as a
    matrix, lambda = |target| / |z| (Fifty et al. 2024)."""
    rows = []
    for s, t, gi in zip(z, target, g):
        u, v = s / s.norm(), t / t.norm()
        w = (u + v) / (u + v).norm()
        rot = torch.eye(len(s), dtype=s.dtype) - 2 * torch.outer(w, w) + 2 * torch.outer(v, u)
        rows.append(t.norm() / s.norm() * rot.T @ gi)
    return torch.stack(rows)


@pytest.mark.parametrize("mode", ["ste", "rotation", "gumbel"])
def test_recon_gradient_to_encoder_known_answer(mode):
    """The reconstruction loss's gradient on the encoder equals a naive reference (float64):
    g = dL/dz_q of the decoder at the sum of the chosen codes, then
    - ste: dL/dz = g (identity through the quantizer);
    - rotation: dL/dz = |z_q| / |z| R^T g with R written out as a matrix;
    - gumbel: z_q = sum_l softmax((-||r_l - C_l||^2 + G_l) / tau) C_l with the residuals
      r_l = z - (codes chosen above l), written out here and differentiated by autograd, with
      the same Gumbel noise G_l (the forward's draws replayed from the same seed).
    The encoder's expected gradient is then J_enc^T dL/dz."""
    torch.manual_seed(0)
    model = tiny_rqvae(mode, dead_code_threshold=0.0).double().train()
    x = clustered(64).double()
    model.init_codebooks(x)
    tau = 0.7
    torch.manual_seed(1)
    out = model(x, temperature=tau)
    out.recon_loss.backward()
    got = [p.grad for p in model.encoder.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in got)
    codebooks, codes, levels = model.codebooks.detach(), out.codes, torch.arange(3)
    with torch.no_grad():
        z = model.encoder(x)
    if mode == "gumbel":
        torch.manual_seed(1)  # F.gumbel_softmax draws -log(Exponential(1)) noise, one (B, K) per level
        z_leaf = z.clone().requires_grad_()
        residual, soft = z_leaf, 0.0
        for level in range(3):
            sq = ((residual[:, None, :] - codebooks[level][None]) ** 2).sum(-1)
            noise = -torch.empty_like(sq).exponential_().log()
            soft = soft + torch.softmax((-sq + noise) / tau, dim=1) @ codebooks[level]
            residual = residual - codebooks[level, codes[:, level]]
        recon = model.decoder(soft)
        torch.testing.assert_close(recon, out.recon)  # the replayed noise is the forward's
        (dz,) = torch.autograd.grad(((recon - x) ** 2).sum(1).mean(), z_leaf)
    else:
        hard = codebooks[levels, codes].sum(1).requires_grad_()
        (g,) = torch.autograd.grad(((model.decoder(hard) - x) ** 2).sum(1).mean(), hard)
        dz = g if mode == "ste" else explicit_rotation_gradient(z, hard.detach(), g)
    for name, a, b in zip([n for n, _ in model.encoder.named_parameters()], got, encoder_grads(model, x, dz)):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10, msg=name)


def test_fsq_recon_gradient_to_encoder_follows_the_chain_rule():
    """FSQ's gradient on the encoder is J_enc^T J_q^T g: g = dL/dz_q of the decoder at the
    quantized latent rebuilt from the codes (an independent path: indices -> grid values), J_q
    the quantizer's own straight-through Jacobian, which must be diagonal (FSQ rounds each
    latent dimension on its own) with entries in [0, levels] (a slope of at most 1 per residual
    level: rounding passed through, clamping cuts it), and non-zero somewhere."""
    torch.manual_seed(0)
    model = FSQTokenizer(FSQConfig(input_dim=32, hidden_dims=[64], fsq_levels=[5, 5, 5], num_levels=2)).double().train()
    x = clustered(64).double()
    out = model(x)
    out.recon_loss.backward()
    got = [p.grad for p in model.encoder.parameters()]
    with torch.no_grad():
        z = model.encoder(x)
    z_q = model.quantizer.get_output_from_indices(out.codes[:, None, :])[:, 0].detach().requires_grad_()
    torch.testing.assert_close(model.decoder(z_q), out.recon)
    (g,) = torch.autograd.grad(((model.decoder(z_q) - x) ** 2).sum(1).mean(), z_q)
    jac = torch.stack([torch.autograd.functional.jacobian(lambda v: model._quantize(v[None])[0][0], row) for row in z])
    diag = torch.diagonal(jac, dim1=1, dim2=2)
    torch.testing.assert_close(jac, torch.diag_embed(diag))
    assert diag.min() >= 0 and diag.max() <= 2 + 1e-9 and diag.abs().sum() > 0
    dz = torch.einsum("bij,bi->bj", jac, g)
    for name, a, b in zip([n for n, _ in model.encoder.named_parameters()], got, encoder_grads(model, x, dz)):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10, msg=name)
    assert out.codes.shape == (64, 2) and int(out.codes.max()) < 125
    assert model.codebook_sizes == [125, 125]


def test_codebook_gradient_known_answer():
    """TIGER's codebook term ||sg[r_l] - e_l||^2 (summed per item, averaged over the batch):
    code k of level l gets 2 / B * sum over its items (e_k - r_il); the commitment term adds
    nothing to the codebooks; unused codes get 0."""
    torch.manual_seed(0)
    model = tiny_rqvae(dead_code_threshold=0.0).double().train()
    x = clustered(64).double()
    model.init_codebooks(x)
    with torch.no_grad():  # k-means centroids are their items' mean: move them, or the answer is ~0
        model.codebooks.add_(0.3 * torch.randn_like(model.codebooks))
    out = model(x)
    out.quant_loss.backward()
    codebooks = model.codebooks.detach()
    with torch.no_grad():
        residual = model.encoder(x)
    expected = torch.zeros_like(codebooks)
    for level in range(3):
        e = codebooks[level, out.codes[:, level]]
        expected[level].index_add_(0, out.codes[:, level], 2 * (e - residual) / len(x))
        residual = residual - e
    assert (expected.norm(dim=-1) > 1e-3).sum() > 3 * 4  # most codes used: not a vacuous comparison
    torch.testing.assert_close(model.codebooks.grad, expected, rtol=1e-7, atol=1e-12)


def test_rotation_trick_value_and_gradient_against_explicit_matrix():
    torch.manual_seed(0)
    src = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    tgt = torch.randn(5, 7, dtype=torch.float64)
    out = rotation_trick(src, tgt)
    assert torch.allclose(out, tgt)  # forward value is the quantized vector
    g = torch.randn(5, 7, dtype=torch.float64)
    (out * g).sum().backward()
    for i in range(5):  # gradient = lambda R^T g with R the rotation taking src's direction to tgt's
        s, t = src[i].detach(), tgt[i]
        u, v = s / s.norm(), t / t.norm()
        w = (u + v) / (u + v).norm()
        rot = torch.eye(7, dtype=torch.float64) - 2 * torch.outer(w, w) + 2 * torch.outer(v, u)
        assert torch.allclose(rot @ u, v)
        assert torch.allclose(rot.T @ rot, torch.eye(7, dtype=torch.float64))
        assert torch.allclose(src.grad[i], t.norm() / s.norm() * rot.T @ g[i])


@pytest.mark.parametrize("mode", ["ste", "rotation", "gumbel"])
def test_forward_value_is_the_quantized_vector(mode):
    torch.manual_seed(0)
    model = tiny_rqvae(mode, dead_code_threshold=0.0).train()
    x = clustered(64)
    model.init_codebooks(x)
    out = model(x)
    assert torch.equal(out.codes, model.encode(x))  # training forward and encode agree on codes
    expected = model.decode_codes(out.codes)  # decoder applied to the sum of the chosen codes
    if mode != "gumbel":  # gumbel trains on a soft sample (next test)
        assert torch.allclose(out.recon, expected, atol=1e-5)
    model.eval()
    assert torch.allclose(model(x).recon, expected, atol=1e-5)


def test_gumbel_sample_hardens_as_temperature_drops():
    torch.manual_seed(0)
    model = tiny_rqvae("gumbel", num_levels=1, dead_code_threshold=0.0).train()
    z = torch.randn(256, 16)
    codebook = model.codebooks[0].detach()

    def distance_to_nearest_code(temperature):
        z_q, _, _ = model.quantize(z, temperature)
        return float((z_q.detach()[:, None] - codebook[None]).norm(dim=-1).min(1).values.max())

    assert distance_to_nearest_code(1e-4) < 1e-3  # one-hot: exactly a codebook row
    assert distance_to_nearest_code(10.0) > 0.1  # soft mixture of rows


def test_kmeans_init_beats_random_init():
    torch.manual_seed(0)
    x = clustered(512)
    random_init = tiny_rqvae(kmeans_init=False)
    kmeans_init = tiny_rqvae()
    kmeans_init.load_state_dict(random_init.state_dict())
    kmeans_init.init_codebooks(x)

    def quant_error(model):
        with torch.no_grad():
            z = model.encoder(x)
            return float((z - model.codes_to_latent(model.encode(x))).pow(2).sum(1).mean())

    assert quant_error(kmeans_init) < 0.5 * quant_error(random_init)


def test_first_training_batch_triggers_kmeans_init_once():
    torch.manual_seed(0)
    model = tiny_rqvae().train()
    assert not bool(model.initted)
    x = clustered(64)
    model(x)
    assert bool(model.initted)
    before = model.codebooks.detach().clone()
    model(x)  # no second init (dead-code replacement cannot fire: codes start at uniform use)
    assert torch.equal(before, model.codebooks.detach())


def test_ema_codebook_moves_each_used_code_to_its_residual_mean():
    """Known answer: with usage_decay 0 an EMA code becomes the mean of the residuals assigned
    to it in the batch; unused codes keep their value; the codebook gets no gradient."""
    torch.manual_seed(0)
    model = tiny_rqvae(codebook_update="ema", usage_decay=0.0, dead_code_threshold=0.0, kmeans_init=False).train()
    x = clustered(64)
    with torch.no_grad():
        z = model.encoder(x)
        before = model.codebooks.detach().clone()
        idx = model._distances(z, before[0]).argmin(1)
    out = model(x)
    assert not model.codebooks.requires_grad
    out.loss.backward()
    assert model.codebooks.grad is None
    for k in range(model.config.codebook_size):
        expected = z[idx == k].mean(0) if (idx == k).any() else before[0, k]
        torch.testing.assert_close(model.codebooks[0, k], expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(out.codes[:, 0], idx)


def test_ema_codebook_running_mean_and_uniform_start():
    """With decay d the code is (d * old_share * old_code + (1 - d) * batch_sum / B) /
    (d * old_share + (1 - d) * batch_share), starting from the uniform share 1/K."""
    torch.manual_seed(1)
    d, k = 0.9, 8
    model = tiny_rqvae(codebook_update="ema", usage_decay=d, dead_code_threshold=0.0, kmeans_init=False).train()
    x = clustered(64)
    with torch.no_grad():
        z = model.encoder(x)
        old = model.codebooks[0].clone()
        idx = model._distances(z, old).argmin(1)
    model(x)
    for c in range(k):
        share = (idx == c).float().mean()
        total = z[idx == c].sum(0) / len(z)
        expected = (d * old[c] / k + (1 - d) * total) / (d / k + (1 - d) * share)
        torch.testing.assert_close(model.codebooks[0, c], expected, atol=1e-5, rtol=1e-5)


def test_dead_codes_are_reseeded_from_batch_residuals():
    torch.manual_seed(0)
    model = tiny_rqvae(kmeans_init=False, dead_code_threshold=0.6, usage_decay=0.5).train()
    x = clustered(64)
    with torch.no_grad():
        z = model.encoder(x)
        model.codebooks[0] = 100.0  # all level-0 codes far away ...
        model.codebooks[0, 0] = z.mean(0)  # ... except one, which takes every item
    model(x)  # usage of codes 1.. halves: 1/8 -> 1/16 < 0.6/8, so they die on the next step
    model(x)
    codes = model.encode(x)
    assert torch.unique(codes[:, 0]).numel() > 1
    revived = model.codebooks[0, 1:].detach()
    # re-seeded codes are level-0 residuals (= latents) of the batch
    assert ((revived[:, None] - z[None]).norm(dim=-1).min(1).values < 1e-5).all()


def _train(model, x, steps, lr=1e-3, batch=128, seed=0):
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        out = model(x[torch.randint(len(x), (batch,), generator=gen)])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        return model(x).recon_loss.item(), collision_stats(model.encode(x))["collision_rate"]


def test_short_training_lowers_recon_loss_and_keeps_ids_distinct():
    torch.manual_seed(0)
    x = clustered(256)
    cfg = dict(codebook_size=32, usage_decay=0.9)
    model = tiny_rqvae(**cfg, dead_code_threshold=0.1)
    with torch.no_grad():
        initial = model.eval()(x).recon_loss.item()
    recon, collisions = _train(model, x, 300)
    assert recon < 0.15 * initial
    assert collisions < 0.1
    # Dead-code replacement is what keeps the codes spread: without it items collapse onto
    # their cluster's code.
    torch.manual_seed(0)
    _, collisions_without = _train(tiny_rqvae(**cfg, dead_code_threshold=0.0), x, 300)
    assert collisions_without > collisions + 0.2


def test_config_validation():
    with pytest.raises(ValueError, match="quantize_mode"):
        RQVAEConfig(quantize_mode="vq")
    with pytest.raises(ValueError, match="distance"):
        RQVAEConfig(distance="l1")
    with pytest.raises(ValueError, match="codebook_update"):
        RQVAEConfig(codebook_update="adam")


def test_cosine_distance_known_answer():
    """Hand-made 2-d case where cosine and euclidean nearest codes differ at both levels.
    Level 0, r = (1, 0): c0 = (10, 1) is almost parallel (cos 0.995) but far (dist^2 82),
    c1 = (0.5, 0.5) is at 45 degrees (cos 0.707) but close (dist^2 0.5).
    - cosine picks c0; the residual keeps the code's norm: (1, 0) - (10, 1) = (-9, -1); at
      level 1, d0 = (-1, 0) is parallel (cos 0.994, dist^2 65) and d1 = (-5, -5) is close
      (cos 0.781, dist^2 32): cosine picks d0 -> codes (0, 0). (Subtracting a unit-norm c0
      instead would leave (0.005, -0.0995), whose nearest direction is d1.)
    - euclidean picks c1, residual (0.5, -0.5), then d0 (dist^2 2.5 vs 50.5) -> codes (1, 0).
    Identity encoder, so the latent is the input; encode and the training forward agree."""
    x = torch.tensor([[1.0, 0.0]])
    expected = {"cosine": [[0, 0]], "euclidean": [[1, 0]]}
    for distance, codes in expected.items():
        model = RQVAE(RQVAEConfig(input_dim=2, hidden_dims=[], latent_dim=2, num_levels=2, codebook_size=2,
                                  distance=distance, kmeans_init=False, dead_code_threshold=0.0))
        with torch.no_grad():
            model.encoder[0].weight.copy_(torch.eye(2))
            model.encoder[0].bias.zero_()
            model.codebooks.copy_(torch.tensor([[[10.0, 1.0], [0.5, 0.5]], [[-1.0, 0.0], [-5.0, -5.0]]]))
        assert model.eval().encode(x).tolist() == codes, distance
        model.train()
        z_q, train_codes, _ = model.quantize(model.encoder(x))
        assert train_codes.tolist() == codes, distance
        torch.testing.assert_close(z_q, model.codes_to_latent(torch.tensor(codes)))
    # and on random data the two distances give different codes
    torch.manual_seed(0)
    cos, euc = tiny_rqvae(distance="cosine"), tiny_rqvae()
    euc.load_state_dict(cos.state_dict())
    x = clustered(64)
    assert not torch.equal(cos.encode(x), euc.encode(x))


# ----------------------------------------------------------------------------- FSQ


def test_fsq_decode_codes_matches_eval_forward():
    torch.manual_seed(0)
    model = FSQTokenizer(FSQConfig(input_dim=32, hidden_dims=[64], fsq_levels=[4, 4, 4], num_levels=3)).eval()
    x = clustered(64)
    out = model(x)
    assert torch.equal(out.codes, model.encode(x))
    assert torch.allclose(model.decode_codes(out.codes), out.recon, atol=1e-5)
    assert float(out.quant_loss) == 0.0


# ----------------------------------------------------------------------------- RQ-KMeans


def test_kmeans_recovers_separated_clusters():
    x = clustered(400, k=8, noise=0.05)
    _, assign = kmeans(x, 8, generator=torch.Generator().manual_seed(0))
    assert same_partition(assign, torch.arange(400) % 8)


def test_rqkmeans_recovers_hierarchical_codes():
    x, ideal = hierarchical()
    codes = RQKMeans(RQKMeansConfig(num_levels=3, codebook_size=8)).fit(x)
    for level in range(3):
        assert same_partition(codes[:, level], ideal[:, level])
    assert collision_stats(codes)["collision_rate"] == 0.0


@pytest.mark.parametrize("normalize", [False, True])
def test_rqkmeans_error_decreases_per_level_and_encode_matches_fit(normalize):
    x = clustered(600, k=20, noise=0.5)
    q = RQKMeans(RQKMeansConfig(num_levels=4, codebook_size=16, normalize=normalize))
    codes = q.fit(x)
    target = torch.nn.functional.normalize(x, dim=-1) if normalize else x
    errors = [float(target.pow(2).sum(1).mean())]
    errors += [float((target - q.decode(codes[:, : level + 1])).pow(2).sum(1).mean()) for level in range(4)]
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert torch.equal(q.encode(x), codes)


def test_rqkmeans_is_deterministic_given_seed():
    x = clustered(300, k=10, noise=1.0)
    a = RQKMeans(num_levels=2, codebook_size=16, seed=3).fit(x)
    b = RQKMeans(num_levels=2, codebook_size=16, seed=3).fit(x)
    assert torch.equal(a, b)


def test_rqkmeans_balanced_gives_equal_cluster_sizes():
    # Very unequal natural clusters: 3 big blobs and lots of codes.
    x = clustered(1024, k=3, noise=0.3)
    q = RQKMeans(RQKMeansConfig(num_levels=2, codebook_size=16, balanced=True))
    codes = q.fit(x)
    for level in range(2):
        sizes = torch.bincount(codes[:, level], minlength=16)
        assert sizes.min() == sizes.max() == 64  # 1024 / 16 with capacity ceil(N / K)
    plain = RQKMeans(RQKMeansConfig(num_levels=2, codebook_size=16)).fit(x)
    assert torch.bincount(plain[:, 0], minlength=16).max() > 64


@pytest.mark.parametrize("n,k", [(50, 7), (64, 8), (10, 10), (3, 5)])
def test_balanced_assign_respects_capacity(n, k):
    dist = torch.rand(n, k, generator=torch.Generator().manual_seed(n * k))
    assign = balanced_assign(dist)
    sizes = torch.bincount(assign, minlength=k)
    assert (assign >= 0).all() and sizes.sum() == n
    assert int(sizes.max()) <= math.ceil(n / k)


def test_balanced_assign_without_contention_is_nearest():
    dist = torch.tensor([[0.0, 5.0], [5.0, 0.0], [1.0, 2.0], [2.0, 1.0]])
    assert balanced_assign(dist).tolist() == [0, 1, 0, 1]
    # Capacity 2: the third point prefers cluster 0 but it is full.
    dist = torch.tensor([[0.0, 9.0], [0.1, 9.0], [0.2, 0.3], [9.0, 0.0]])
    assert balanced_assign(dist).tolist() == [0, 0, 1, 1]
