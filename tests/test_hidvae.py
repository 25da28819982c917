"""HiD-VAE (modules/quantizers/hidvae.py): losses with known answers (the code-prefix InfoNCE and
the tag classifier on a hand-set model included), category tags and tag purity on hand-made
tables, save/load through SemanticIdTokenizer, a tiny train_rqvae run on the fixture dataset,
and tag supervision raising tag purity over a plain RQ-VAE there."""

import math

import polars as pl
import pytest
import torch

import train_rqvae
from modules.quantizers.hidvae import (
    HiDVAE, HiDVAEConfig, category_tags, info_nce, tag_purity, uniqueness_loss,
)
from modules.quantizers.rqvae import RQVAE, RQVAEConfig
from modules.semantic_ids import SemanticIdTokenizer
from tests.fixtures import CATEGORIES, dataset_bindings, run_script, write_p5_dataset


# ----------------------------------------------------------------------------- uniqueness


def test_uniqueness_loss_zero_without_collisions():
    z = torch.randn(6, 8, requires_grad=True)
    codes = torch.arange(18).view(6, 3)  # all rows distinct
    loss = uniqueness_loss(z, codes, margin=0.5)
    assert loss.item() == 0.0
    loss.backward()  # still part of the graph
    assert torch.count_nonzero(z.grad) == 0


def test_uniqueness_loss_known_answer_and_gradient():
    # Items 0 and 1 collide (cos 1, 0.8 above the margin 0.2); 2 and 3 collide but point in
    # orthogonal directions (cos 0, below the margin); item 4 is alone.
    z = torch.tensor([[1.0, 0, 0], [2.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 1.0, 0]], requires_grad=True)
    codes = torch.tensor([[0, 0, 0], [0, 0, 0], [1, 1, 1], [1, 1, 1], [2, 0, 0]])
    loss = uniqueness_loss(z, codes, margin=0.2)
    assert loss.item() == pytest.approx((0.8 + 0.0) / 2)
    loss.backward()
    assert z.grad[:2].abs().sum() == 0  # identical directions: cosine is at its maximum (flat)
    z2 = torch.tensor([[1.0, 0.1, 0], [1.0, -0.1, 0]], requires_grad=True)
    loss2 = uniqueness_loss(z2, torch.zeros(2, 3, dtype=torch.long), margin=0.2)
    assert loss2.item() > 0
    loss2.backward()
    assert z2.grad.abs().sum() > 0
    # A step against the gradient pushes the colliding pair apart.
    with torch.no_grad():
        moved = z2 - 0.1 * z2.grad
    assert uniqueness_loss(moved, torch.zeros(2, 3, dtype=torch.long), 0.2) < loss2


# ----------------------------------------------------------------------------- InfoNCE


def test_info_nce_random_is_about_log_batch_and_aligned_is_near_zero():
    g = torch.Generator().manual_seed(0)
    b, d = 64, 256
    q, k = torch.randn(b, d, generator=g), torch.randn(b, d, generator=g)
    assert info_nce(q, k, temperature=1.0).item() == pytest.approx(math.log(b), rel=0.05)
    # Aligned: keys are the queries, near-orthogonal in 256 dims; temperature 0.1 sharpens.
    assert info_nce(q, q, temperature=0.1).item() < 0.01


def test_info_nce_masks_same_label_keys():
    q = torch.eye(4)
    k = torch.tensor([[1.0, 0, 0, 0], [1.0, 0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])
    labels = torch.tensor([0, 0, 1, 2])
    # Queries 0 and 1 (same tag) have equal keys: unmasked, each splits its mass between them.
    masked = info_nce(torch.stack([k[0], k[1], q[2], q[3]]), k, 0.1, labels=labels)
    assert masked.item() < 1e-3
    assert info_nce(torch.stack([k[0], k[1], q[2], q[3]]), k, 0.1).item() > 0.3


# ----------------------------------------------------------------------------- tags


def test_category_tags_drops_root_and_pads_from_deepest():
    items = pl.DataFrame({"categories": [
        "'Beauty', 'Makeup', 'Face', 'Concealers'",
        "'Beauty', 'Makeup'",
        "Beauty, Skin Care, Hands & Nails",
        "'Beauty', 'Makeup', 'Face', 'Powder', 'Loose'",
        "",
    ]})
    tag_ids, names = category_tags(items, 3)
    rows = [[names[lv][t] for lv, t in enumerate(r)] for r in tag_ids.tolist()]
    assert rows == [
        ["Makeup", "Face", "Concealers"],
        ["Makeup", "Makeup", "Makeup"],
        ["Skin Care", "Hands & Nails", "Hands & Nails"],
        ["Makeup", "Face", "Powder"],
        ["unknown", "unknown", "unknown"],
    ]
    assert names[0] == ["Makeup", "Skin Care", "unknown"]  # sorted per level
    assert tag_ids.shape == (5, 3) and str(tag_ids.dtype) == "int64"


def test_category_tags_keeps_first_tag_without_a_common_root():
    tag_ids, names = category_tags(pl.DataFrame({"categories": ["A, B", "C, D"]}), 2)
    assert [[names[lv][t] for lv, t in enumerate(r)] for r in tag_ids.tolist()] == [["A", "B"], ["C", "D"]]
    with pytest.raises(ValueError, match="categories"):
        category_tags(pl.DataFrame({"title": ["x"]}), 2)


def test_tag_purity_known_answer():
    # Level 0: code 0 holds tags [0, 0, 1] (majority 2 of 3), code 1 holds [1, 1] -> 4/5.
    # Level 1 (prefixes): (0,0) [0,0] pure, (0,1) [5] pure, (1,0) [3,4] majority 1 -> 4/5.
    codes = torch.tensor([[0, 0], [0, 0], [0, 1], [1, 0], [1, 0]])
    tags = torch.tensor([[0, 0], [0, 0], [1, 5], [1, 3], [1, 4]])
    assert tag_purity(codes, tags) == pytest.approx([4 / 5, 4 / 5])
    assert tag_purity(torch.arange(5)[:, None], tags[:, :1]) == [1.0]  # one item per code


# ----------------------------------------------------------------------------- model


def small_model(**kw) -> HiDVAE:
    cfg = HiDVAEConfig(rqvae=RQVAEConfig(input_dim=12, hidden_dims=[16], latent_dim=4, codebook_size=8,
                                         codebook_update="ema", quantize_mode="rotation"),
                       num_tags=[2, 3, 3], tag_dim=5, **kw)
    return HiDVAE(cfg)


def test_tag_losses_train_the_encoder_and_roundtrip(tmp_path):
    torch.manual_seed(0)
    model = small_model()
    model.set_tag_embeddings([torch.randn(n, 5) for n in (2, 3, 3)])
    x = torch.randn(32, 12)
    tags = torch.stack([torch.randint(n, (32,)) for n in (2, 3, 3)], 1)
    model.train()
    out = model(x, tags=tags)
    assert out.align_loss > 0 and out.classify_loss > 0 and 0 <= out.tag_accuracy <= 1
    model.zero_grad()
    (out.align_loss + out.classify_loss).backward()
    assert model.rqvae.encoder[0].weight.grad.abs().sum() > 0  # straight through the EMA codes
    assert all(h.weight.grad is not None for h in model.tag_heads)
    model.eval()
    codes = model.encode(x)
    assert model.predict_tags(codes).shape == (32, 3)
    tok = SemanticIdTokenizer(model, torch.cat([codes, torch.arange(32)[:, None]], 1))
    assert tok.kind == "hidvae"
    tok.save_pretrained(tmp_path / "tok")
    back = SemanticIdTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert isinstance(back.quantizer, HiDVAE) and back.quantizer.config == model.config
    assert torch.equal(back.encode(x), codes)
    assert torch.equal(back.quantizer.tag_embeddings(2), model.tag_embeddings(2))


@pytest.mark.parametrize("mode, update", [("ste", "loss"), ("rotation", "ema"), ("gumbel", "loss")])
def test_forward_is_the_wrapped_rqvae_forward_plus_the_tag_terms(mode, update):
    """Training steps on a fixed seed (k-means init on the first batch, dead codes re-seeded from
    step 2 on, Gumbel noise, usage and EMA updates) give HiD-VAE exactly the numbers of its RQ-VAE
    run alone from the same weights and seeds: reconstruction, codes, losses, gradients and the
    codebook state after every step; its loss adds the weighted tag terms to recon + quant."""
    torch.manual_seed(0)
    hid = small_model()
    hid.config.rqvae.quantize_mode, hid.config.rqvae.codebook_update = mode, update
    hid.config.rqvae.dead_code_threshold, hid.config.rqvae.usage_decay = 0.9, 0.5
    hid = HiDVAE(hid.config)  # rebuilt: codebook_update decides whether the codebooks take gradients
    hid.set_tag_embeddings([torch.randn(n, 5) for n in (2, 3, 3)])
    plain = RQVAE(hid.config.rqvae)
    plain.load_state_dict(hid.rqvae.state_dict())
    x = torch.randn(32, 12)
    tags = torch.stack([torch.randint(n, (32,)) for n in (2, 3, 3)], 1)
    hid.train(), plain.train()
    c = hid.config
    for step in range(3):
        outs = []
        for model, kw in ((hid, {"tags": tags}), (plain, {})):
            torch.manual_seed(100 + step)
            outs.append(model(x, temperature=0.5, **kw))
        h, p = outs
        for name in ("recon", "codes", "recon_loss", "quant_loss"):
            assert torch.equal(getattr(h, name), getattr(p, name)), (step, name)
        assert torch.equal(h.loss, p.loss + c.align_weight * h.align_loss + c.classify_weight * h.classify_loss
                           + c.unique_weight * h.unique_loss)
        hid.zero_grad(), plain.zero_grad()
        (h.recon_loss + h.quant_loss).backward()
        p.loss.backward()
        with torch.no_grad():
            for (name, a), b in zip(hid.rqvae.named_parameters(), plain.parameters()):
                if b.grad is not None:
                    assert torch.equal(a.grad, b.grad), (step, name)
                    a -= 0.1 * a.grad  # the same SGD step keeps both models on one trajectory
                    b -= 0.1 * b.grad
        for (name, a), b in zip(hid.rqvae.state_dict().items(), plain.state_dict().values()):
            assert torch.equal(a, b), (step, name)


def hand_set_model(align_temperature: float = 1.0) -> HiDVAE:
    """Two levels of two codes in 2 dims, identity encoder, hand-set codebooks, projections and heads.

    Codebooks: level 0 (2, 0) and (0, 2), level 1 (0.5, 0) and (0, 0.5); an input equal to a sum
    of codes is its own latent and quantizes exactly onto them. Tags: text embeddings (1, 0) and
    (0, 1) at both levels; level 0's projection is the identity (2 -> 2), level 1's puts the tag
    embedding on the level-1 half of the prefix (2 -> 4: (0, 0, t)). Classifier heads: level 0
    reads its prefix (logits = prefix), level 1 reads the level-1 half (logits = last 2 dims).
    """
    cfg = HiDVAEConfig(rqvae=RQVAEConfig(input_dim=2, hidden_dims=[], latent_dim=2, num_levels=2, codebook_size=2,
                                         kmeans_init=False, codebook_update="ema", dead_code_threshold=0.0),
                       num_tags=[2, 2], tag_dim=2, align_temperature=align_temperature)
    model = HiDVAE(cfg).eval()
    eye, zero = torch.eye(2), torch.zeros(2, 2)
    with torch.no_grad():
        model.rqvae.encoder[0].weight.copy_(eye)
        model.rqvae.encoder[0].bias.zero_()
        model.rqvae.codebooks.copy_(torch.tensor([[[2.0, 0], [0, 2.0]], [[0.5, 0], [0, 0.5]]]))
        model.tag_proj[0].weight.copy_(eye)
        model.tag_proj[1].weight.copy_(torch.cat([zero, eye]))
        model.tag_heads[0].weight.copy_(eye)
        model.tag_heads[1].weight.copy_(torch.cat([zero, eye], 1))
        for layer in (*model.tag_proj, *model.tag_heads):
            layer.bias.zero_()
    model.set_tag_embeddings([eye, eye])
    return model


def test_code_prefix_info_nce_and_classifier_known_answer():
    model = hand_set_model(align_temperature=0.5)
    # Item A = codes (0, 0) = (2.5, 0), tags (0, 0); item B = codes (1, 1) = (0, 2.5), tags (1, 1).
    x, tags = torch.tensor([[2.5, 0.0], [0.0, 2.5]]), torch.tensor([[0, 0], [1, 1]])
    out = model(x, tags=tags)
    assert out.codes.tolist() == [[0, 0], [1, 1]]
    # Level 0: prefixes (2, 0) / (0, 2) against keys (1, 0) / (0, 1): cosines 1 (own) and 0 (other).
    # Level 1: prefixes (2, 0, .5, 0) / (0, 2, 0, .5) against keys (0, 0, 1, 0) / (0, 0, 0, 1): own
    # cosine 0.5 / sqrt(4.25) (the level-0 half is part of the prefix), other 0. Temperature 0.5.
    own1 = 0.5 / math.sqrt(4.25)
    align = (math.log(1 + math.exp(-1 / 0.5)) + math.log(1 + math.exp(-own1 / 0.5))) / 2
    assert out.align_loss.item() == pytest.approx(align, rel=1e-5)
    # Level 0 logits = prefix: (2, 0) for tag 0, (0, 2) for tag 1; level 1 logits (0.5, 0), (0, 0.5).
    classify = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(-0.5))) / 2
    assert out.classify_loss.item() == pytest.approx(classify, rel=1e-5)
    assert out.tag_accuracy.item() == 1.0 and out.unique_loss.item() == 0.0
    assert torch.equal(model.predict_tags(out.codes), tags)
    c = model.config
    assert out.loss.item() == pytest.approx((out.recon_loss + out.quant_loss + c.align_weight * out.align_loss
                                             + c.classify_weight * out.classify_loss).item(), rel=1e-6)
    # Swapped tags: every positive is the orthogonal key, and the heads predict the other tag.
    swapped = model(x, tags=1 - tags)
    assert swapped.align_loss.item() == pytest.approx(
        (math.log(1 + math.exp(1 / 0.5)) + math.log(1 + math.exp(own1 / 0.5))) / 2, rel=1e-5)
    assert swapped.classify_loss.item() == pytest.approx((math.log(1 + math.exp(2)) + math.log(1 + math.exp(0.5))) / 2,
                                                         rel=1e-5)
    assert swapped.tag_accuracy.item() == 0.0


def test_config_checks_levels():
    with pytest.raises(ValueError, match="num_tags"):
        HiDVAEConfig(rqvae=RQVAEConfig(num_levels=3), num_tags=[2, 2])
    with pytest.raises(ValueError, match="num_tags"):
        HiDVAE(HiDVAEConfig())


# ----------------------------------------------------------------------------- train_rqvae


def test_tag_supervision_raises_tag_purity_over_a_plain_rqvae(tmp_path):
    """The fixture's items fall into 6 categories (one tag per item, repeated down the levels);
    their title embeddings also carry 4 brands and item numbers. With 6 codes at the first level
    and 150 steps, the plain RQ-VAE's first-level codes hold its tags at purity 0.50-0.58 (training
    seeds 1, 2, 3, 42), HiD-VAE's at 0.83-1.0; with align_weight = classify_weight = 0 HiD-VAE is
    back at 0.50-0.67."""
    folder = write_p5_dataset(tmp_path / "data")
    base = dataset_bindings(folder, tmp_path / "cache") + [
        "CODEBOOK_SIZE = 6", "train_rqvae.max_steps = 150", "train_rqvae.eval_every = 50",
        "train_rqvae.ckpt_every = 150", "train_rqvae.select_by = 'last'", "train_rqvae.seed = 42"]
    plain = run_script(train_rqvae.main, "configs/tiny/rqvae_tiny.gin",
                       base + [f"train_rqvae.out_dir = '{tmp_path / 'rq'}'"])
    hid = run_script(train_rqvae.main, "configs/tiny/rqvae_tiny.gin", base + [
        f"train_rqvae.out_dir = '{tmp_path / 'hid'}'", "train_rqvae.quantizer = @HiDVAEConfig()",
        "HiDVAEConfig.rqvae = @RQVAEConfig()"])
    assert plain["quantizer"] == "RQVAE" and hid["quantizer"] == "HiDVAE"
    first_plain, first_hid = plain["tag_purity"][0], hid["tag_purity"][0]
    assert first_hid >= first_plain + 0.25 and first_hid >= 0.8, (plain["tag_purity"], hid["tag_purity"])
    assert sum(hid["tag_purity"]) > sum(plain["tag_purity"])


def test_tiny_hidvae_run_saves_and_reloads(tmp_path):
    folder = write_p5_dataset(tmp_path / "data")
    out = tmp_path / "run"
    bindings = dataset_bindings(folder, tmp_path / "cache") + [
        "train_rqvae.quantizer = @HiDVAEConfig()",
        "HiDVAEConfig.rqvae = @RQVAEConfig()",
        "train_rqvae.max_steps = 60", "train_rqvae.eval_every = 30", "train_rqvae.ckpt_every = 30",
        f"train_rqvae.out_dir = '{out}'",
    ]
    res = run_script(train_rqvae.main, "configs/tiny/rqvae_tiny.gin", bindings)
    assert res["quantizer"] == "HiDVAE" and res["unique_after_dedup"] is True
    # The fixture's paths are 'Beauty', '<category>': the root is dropped, one tag padded down.
    assert res["tag_counts"] == [len(CATEGORIES)] * 3
    assert len(res["tag_purity"]) == 3 and all(0 < p <= 1 for p in res["tag_purity"])
    assert len(res["tag_accuracy"]) == 3 and all(0 <= a <= 1 for a in res["tag_accuracy"])
    assert res["last_eval"]["step"] == 60 and "tag_purity" in res["last_eval"]
    tok = SemanticIdTokenizer.from_pretrained(str(out / "tokenizer"))
    assert isinstance(tok.quantizer, HiDVAE) and tok.item_codes.shape == (60, 4)
    assert tok.quantizer.config.num_tags == [len(CATEGORIES)] * 3
    assert tok.quantizer.tag_embeddings(0).norm(dim=1).allclose(torch.ones(len(CATEGORIES)), atol=1e-4)


def test_hidvae_config_rebalances_its_last_step():
    # Issue 20, defect 10: the full 10,000-step schedule drifts to ~7% collisions at its last
    # step (results/beauty_hidvae_full.json, before_rebalance), so the config keeps the last
    # step's codes and applies LC-Rec's rebalancing (0.07% there).
    import gin

    with gin.unlock_config():
        gin.clear_config()
        try:
            gin.parse_config_files_and_bindings(["configs/hidvae_amazon.gin"], [], skip_unknown=True)
            assert gin.query_parameter("train_rqvae.rebalance_last_level") is True
            assert gin.query_parameter("train_rqvae.select_by") == "last"
        finally:
            gin.clear_config()
