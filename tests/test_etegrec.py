"""modules/etegrec.py: ETEGRec's code distributions, SIA and PSA losses, the phase schedule, which
parameters learn in which phase, and the code refresh."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from modules.etegrec import (
    JointModel, Phase, PhaseSchedule, code_log_probs, codes_were_rebalanced, final_code_stats, psa_loss, sia_loss,
)
from modules.objectives import sliding_window_loss
from modules.quantizers.rqvae import RQVAE, RQVAEConfig
from modules.semantic_ids import add_dedup_level, collision_stats
from modules.tokens import TokenLayout
from modules.training import make_optimizer
from modules.transformers.t5 import T5, T5Config

N_ITEMS, DIM, LEVELS, K = 40, 24, 2, 8


def build(seed: int = 0, dropout: float = 0.1, capacity: int = 16):
    torch.manual_seed(seed)
    emb = F.normalize(torch.randn(N_ITEMS, DIM), dim=-1)
    rqvae = RQVAE(RQVAEConfig(input_dim=DIM, hidden_dims=[16], latent_dim=8, num_levels=LEVELS, codebook_size=K,
                              codebook_update="ema", quantize_mode="rotation"))
    rqvae.init_codebooks(emb)
    rqvae.eval()
    codes = add_dedup_level(rqvae.encode(emb), capacity)
    layout = TokenLayout((K,) * LEVELS + (capacity,), num_user_buckets=4)
    t5 = T5(T5Config(vocab_size=layout.vocab_size, output_vocab_size=layout.output_vocab_size, d_model=16,
                     num_heads=2, d_head=8, d_ff=32, num_encoder_layers=1, num_decoder_layers=1, dropout=dropout))
    return JointModel(t5, rqvae, codes, capacity, head_hidden=16), layout, emb


def batch(n: int = 12, seed: int = 1):
    g = np.random.default_rng(seed)
    history = np.full((n, 5), -1)
    for i in range(n):
        length = g.integers(1, 6)
        history[i, :length] = g.choice(N_ITEMS, length, replace=False)
    target = torch.as_tensor(g.integers(0, N_ITEMS, n))
    target[1] = target[0]  # a repeated target in the batch
    return torch.as_tensor(history), target, torch.as_tensor(g.integers(0, 100, n))


REC, TOK = Phase(3, False, True, False), Phase(2, True, True, False)


def grads(joint, phase, **weights):
    """Each parameter's gradient (None: none) after one backward of the phase's loss."""
    model, layout, emb = joint
    model.zero_grad(set_to_none=True)
    model.train()
    out = model.loss(layout, emb, *batch(), phase, **weights)
    out.loss.backward()
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}, out


@pytest.fixture
def joint():
    return build(dropout=0.0)  # no dropout: two passes with other loss weights see the same network


# ----------------------------------------------------------------------------- losses


def test_code_log_probs_follow_the_residual_chain():
    torch.manual_seed(0)
    z, books = torch.randn(7, 4), torch.randn(3, 5, 4)
    log_p = code_log_probs(z, books)
    assert log_p.shape == (7, 3, 5) and torch.allclose(log_p.logsumexp(-1), torch.zeros(7, 3), atol=1e-6)
    for i in range(7):  # naive reference: one latent, level by level
        v = z[i]
        for level in range(3):
            d = ((v - books[level]) ** 2).sum(-1)
            assert torch.allclose(log_p[i, level], torch.log_softmax(-d, 0), atol=1e-5)
            v = v - books[level][d.argmin()]


def test_code_log_probs_pick_the_rqvae_codes():
    model, _, emb = build()
    with torch.no_grad():
        log_p = code_log_probs(model.rqvae.encoder(emb), model.rqvae.codebooks)
    assert torch.equal(log_p.argmax(-1), model.rqvae.encode(emb))


def test_sia_is_symmetric_kl_zero_only_for_equal_distributions():
    torch.manual_seed(0)
    p, q = torch.randn(6, 3, 5).log_softmax(-1), torch.randn(6, 3, 5).log_softmax(-1)
    assert sia_loss(p, p).item() == pytest.approx(0.0, abs=1e-7)
    kl = lambda a, b: (a.exp() * (a - b)).sum((1, 2)).mean()  # noqa: E731
    assert sia_loss(p, q).item() == pytest.approx((kl(p, q) + kl(q, p)).item(), rel=1e-5)
    assert sia_loss(p, q).item() > 0 and sia_loss(p, q).item() == pytest.approx(sia_loss(q, p).item())


def test_psa_random_pairs_cost_log_batch_per_direction_aligned_pairs_nothing():
    torch.manual_seed(0)
    b = 16
    target = torch.arange(b)
    h, r = torch.randn(b, 4096), torch.randn(b, 4096)
    assert psa_loss(h, r, target).item() == pytest.approx(2 * math.log(b), abs=0.2)  # both directions, summed
    assert psa_loss(r, r, target).item() < 1e-3


def test_psa_sums_both_directions_known_answer():
    """Paper Eq. 16: L_PSA = L(h -> r) + L(r -> h), each an in-batch InfoNCE averaged over the batch.
    Hand-made batch, temperature 1: h = (e0, e1, e1), r = (e0, e0, e1), cosines 0 or 1."""
    e = math.e
    h = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    r = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    # logits[i, j] = cos(h_i, r_j): rows (1, 1, 0), (0, 0, 1), (0, 0, 1)
    h_to_r = (math.log((2 * e + 1) / e) + math.log(2 + e) + math.log((2 + e) / e)) / 3
    # columns (1, 0, 0), (1, 0, 0), (0, 1, 1), each's label on its diagonal
    r_to_h = (math.log((e + 2) / e) + math.log(e + 2) + math.log((2 * e + 1) / e)) / 3
    assert psa_loss(h, r, torch.arange(3), temperature=1.0).item() == pytest.approx(h_to_r + r_to_h, rel=1e-6)
    # two orthonormal pairs: log(1 + e^-1) per direction
    eye = torch.eye(2)
    assert psa_loss(eye, eye, torch.arange(2), 1.0).item() == pytest.approx(2 * math.log(1 + 1 / e), rel=1e-6)


def test_psa_duplicates_of_a_target_are_not_negatives():
    torch.manual_seed(0)
    target = torch.tensor([0, 0, 1, 2, 2, 2, 3])
    r = torch.randn(4, 512)[target]  # the reconstruction of an item is the same in every row
    assert psa_loss(r, r, target).item() < 1e-3
    assert psa_loss(r, r, torch.arange(7)).item() > 0.5  # treated as distinct items they would be negatives


# ----------------------------------------------------------------------------- schedule


def test_phase_schedule_known_answer():
    s = PhaseSchedule(epoch_steps=3, cycle=3, warm_epochs=4)
    got = [s(step) for step in range(16)]
    assert [p.unit for p in got] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 5]
    assert [p.tokenizer for p in got] == [True] * 3 + [False] * 6 + [True] * 3 + [False] * 4
    assert [p.align for p in got] == [False] * 12 + [True] * 4
    assert [step for step, p in enumerate(got) if p.refresh] == [3, 12]
    assert PhaseSchedule(2, 2, 0)(5) == Phase(2, True, True, False)
    assert PhaseSchedule(2, 2, 0)(6) == Phase(3, False, True, True)
    with pytest.raises(ValueError, match="cycle >= 2"):
        PhaseSchedule(5, cycle=1)


# ----------------------------------------------------------------------------- gradients per phase


def test_recommender_ce_is_sliding_window_loss():
    model, layout, _ = build()
    history, target, user = batch()
    for chunk in (None, 4):
        torch.manual_seed(5)
        ce, count, pooled, first = model.recommender_states(layout, history, target, user, chunk=chunk)
        torch.manual_seed(5)
        ref, ref_count = sliding_window_loss(model.t5, layout, model.item_codes, history, target, user, chunk=chunk)
        assert count == ref_count and torch.allclose(ce, ref, atol=1e-5)
        assert pooled.shape == first.shape == (len(target), 16)


def test_recommender_epoch_trains_recommender_and_heads_only(joint):
    g, out = grads(joint, REC)
    assert set(out.metrics) == {"ce", "sia", "psa"}
    for name, grad in g.items():
        if name.startswith("rqvae."):
            assert grad is None, name
        else:
            assert grad is not None and grad.abs().sum() > 0, name
    # SIA reaches the sequence head and the T5 encoder (not only the decoder's CE path)
    with_sia, _ = grads(joint, REC, sia_weight=1.0, psa_weight=0.0)
    without, _ = grads(joint, REC, sia_weight=0.0, psa_weight=0.0)
    assert without["seq_head.0.weight"] is None and with_sia["seq_head.0.weight"].abs().sum() > 0
    enc = "t5.encoder_layers.0.attn.qkv.weight"
    assert not torch.allclose(with_sia[enc], without[enc])
    # warm epochs: no alignment, so the heads get no gradient
    warm, out = grads(joint, REC._replace(align=False))
    assert set(out.metrics) == {"ce"} and warm["seq_head.0.weight"] is None and warm["pref_head.0.weight"] is None


def test_tokenizer_epoch_trains_the_rqvae_only(joint):
    g, out = grads(joint, TOK)
    assert set(out.metrics) == {"sq", "sia", "psa"}
    for name, grad in g.items():
        if name.startswith("rqvae."):
            assert grad is not None and grad.abs().sum() > 0, name
        else:
            assert grad is None, name
    # SIA reaches the codebooks in tokenizer epochs
    with_sia, _ = grads(joint, TOK, sia_weight=1.0, psa_weight=0.0)
    without, _ = grads(joint, TOK, sia_weight=0.0, psa_weight=0.0)
    assert not torch.allclose(with_sia["rqvae.codebooks"], without["rqvae.codebooks"])
    # warm tokenizer epochs need no recommender pass: L_SQ only
    _, out = grads(joint, TOK._replace(align=False))
    assert set(out.metrics) == {"sq"}


def test_rqvae_stays_in_eval_mode_and_has_no_side_effects(joint):
    model = joint[0]
    model.train()
    assert model.t5.training and not model.rqvae.training
    usage = model.rqvae.usage.clone()
    grads(joint, TOK)
    assert torch.equal(usage, model.rqvae.usage) and model.rqvae.codebooks.requires_grad


def test_optimizer_steps_change_only_the_trained_side():
    model, layout, emb = build()
    opt = make_optimizer(model, 1e-2, 0.05, module_lrs={model.rqvae: 1e-3})
    assert sorted({g["lr"] for g in opt.param_groups}) == [1e-3, 1e-2]
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    model.train()
    for phase, trained in ((REC, "rec"), (TOK, "tok"), (REC, "rec")):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.zero_grad(set_to_none=True)
        model.loss(layout, emb, *batch(), phase).loss.backward()
        opt.step()
        for n, p in model.named_parameters():
            changed = not torch.equal(before[n], p.detach())
            assert changed == ((trained == "tok") == n.startswith("rqvae.")), (phase, n)


# ----------------------------------------------------------------------------- code refresh


def test_codes_change_only_at_refreshes_and_stay_unique():
    model, layout, emb = build()
    opt = make_optimizer(model, 1e-2, 0.0, module_lrs={model.rqvae: 3e-2})
    schedule = PhaseSchedule(epoch_steps=3, cycle=2, warm_epochs=2)
    model.train()
    refreshed = []
    for step in range(12):
        phase, codes = schedule(step), model.item_codes.clone()
        if phase.refresh:
            stats = model.refresh_codes(emb, step)
            refreshed.append(step)
            assert collision_stats(model.item_codes)["max_group"] == 1
            assert torch.equal(model.item_codes[:, :LEVELS], model.rqvae.encode(emb))
            moved = (codes != model.item_codes)
            assert stats.changed == int(moved[:, :LEVELS].any(1).sum()) and stats.changed_id == int(moved.any(1).sum())
            assert stats.changed_per_level == moved[:, :LEVELS].sum(0).tolist() and len(stats.codebook_usage) == LEVELS
        else:
            assert torch.equal(codes, model.item_codes)
        opt.zero_grad(set_to_none=True)
        model.loss(layout, emb, *batch(seed=step), phase).loss.backward()
        opt.step()
    assert refreshed == [3, 9]
    assert not torch.equal(model.item_codes[:, :LEVELS], build()[0].item_codes[:, :LEVELS])  # the codes did move


def test_a_rebalanced_start_stays_rebalanced_through_refreshes():
    """An LC-Rec-rebalanced tokenizer (train_rqvae.rebalance_last_level) keeps its balancing: with a
    dedup level sized from the rebalanced groups (2 here), nearest codes (max group 4) would not fit."""
    model, layout, emb = build()
    rqvae = model.rqvae
    nearest = rqvae.encode(emb)
    balanced = rqvae.rebalance_collisions(emb, nearest)
    capacity = collision_stats(balanced)["max_group"]
    assert collision_stats(balanced)["collision_rate"] < collision_stats(nearest)["collision_rate"]
    assert collision_stats(nearest)["max_group"] > capacity == 2
    start = add_dedup_level(balanced, capacity)
    assert codes_were_rebalanced(rqvae, start, emb)
    assert not codes_were_rebalanced(rqvae, add_dedup_level(nearest, 16), emb)
    assert not codes_were_rebalanced(rqvae, nearest.roll(1, 0), emb)  # other levels differ: not LC-Rec's

    joint = JointModel(model.t5, rqvae, start, capacity, head_hidden=16, rebalance=True)
    stats = joint.refresh_codes(emb, 10)  # the RQ-VAE has not moved: the refresh gives the start back
    assert stats.rebalanced and stats.changed == stats.changed_id == 0 and torch.equal(joint.item_codes, start)
    assert "(rebalanced)" in stats.line()
    final = final_code_stats(joint, emb, start)
    assert final["match_tokenizer"] and final["collision_rate"] == collision_stats(balanced)["collision_rate"]

    # After tokenizer steps the refresh rebalances the new nearest codes the same way.
    opt = make_optimizer(joint, 1e-2, 0.0, module_lrs={rqvae: 3e-2})
    joint.train()
    for step in range(3):
        opt.zero_grad(set_to_none=True)
        joint.loss(layout, emb, *batch(seed=step), TOK).loss.backward()
        opt.step()
    joint.dedup_capacity = 16
    stats = joint.refresh_codes(emb, 20)
    moved = rqvae.encode(emb)
    assert not torch.equal(moved, nearest)  # the tokenizer did move
    assert torch.equal(joint.item_codes[:, :LEVELS], rqvae.rebalance_collisions(emb, moved))
    assert stats.collision_rate == collision_stats(joint.item_codes[:, :LEVELS])["collision_rate"]


def test_refresh_beyond_the_dedup_capacity_names_the_binding():
    model, _, emb = build(capacity=16)
    model.dedup_capacity = 1
    with pytest.raises(ValueError, match="train_joint.dedup_capacity"):
        with torch.no_grad():
            model.rqvae.codebooks[:, 1:] += 100.0  # every item on code 0 at every level: one big group
        model.refresh_codes(emb, 7)
