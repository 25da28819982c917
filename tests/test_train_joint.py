"""train_joint.py (ETEGRec) end to end on a tiny fixture: the result JSON with its refresh figures,
the saved recommender + tokenizer, exact resume from the middle of a tokenizer epoch, learning
against an untrained control, and a rebalanced starting tokenizer kept rebalanced."""

import json

import pytest
import torch

import train_joint
import train_rqvae
from modules.recommender import GenerativeRecommender
from modules.semantic_ids import SemanticIdTokenizer, collision_stats
from tests.fixtures import dataset_bindings, run_script, write_p5_dataset


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("joint")
    data = write_p5_dataset(root / "data")
    base = dataset_bindings(data, root / "cache")
    run_script(train_rqvae.main, "configs/tiny/rqvae_tiny.gin", base + [f"train_rqvae.out_dir = '{root / 'rq'}'"])
    return root, base


def run(setup, out, *extra):
    root, base = setup
    # 10-step units: tokenizer 0-9, recommender 10-19, tokenizer 20-29 (SIA / PSA on), ... to step 40
    return run_script(train_joint.main, "configs/tiny/joint_tiny.gin", base + [
        f"train_joint.tokenizer = '{root / 'rq'}'", f"train_joint.out_dir = '{out}'", "train_joint.max_steps = 40",
        "train_joint.finetune_steps = 10", "train_joint.finetune_eval_every = 5", "train_joint.eval_users = 60",
        "train_joint.precision = 'fp32'", *extra])


def weights(path):
    return torch.load(path, weights_only=False)["model"]


def test_joint_end_to_end_and_exact_resume(setup, tmp_path):
    full = run(setup, tmp_path / "full")
    for split in ("valid", "test", "popularity"):
        assert set(full[split]) >= {"recall@10", "ndcg@10"} and all(0 <= v <= 1 for v in full[split].values())
    assert full["joint"]["steps"] == 40 and full["steps"] == 10
    assert [r["step"] for r in full["refreshes"]] == [10, 30]  # the first step after each tokenizer epoch
    for r in full["refreshes"]:
        assert set(r) == {"step", "changed", "changed_id", "changed_per_level", "collision_rate", "max_group",
                          "codebook_usage", "rebalanced"}
        assert r["rebalanced"] is False  # the tiny tokenizer's codes are its nearest codes
        assert 0 <= r["changed"] <= r["changed_id"] and 0 <= r["collision_rate"] <= 1 and len(r["codebook_usage"]) == 3
    # what from_pretrained(out_dir) serves: the fine-tuned T5 with the final tokenizer
    assert full["tokenizer"] == str(tmp_path / "full" / "recommender" / "tokenizer")
    tok = SemanticIdTokenizer.from_pretrained(full["tokenizer"])
    best = weights(tmp_path / "full" / "joint" / "best.pt")
    assert torch.equal(tok.item_codes, best["item_codes"]) and collision_stats(tok.item_codes)["max_group"] == 1
    rec = GenerativeRecommender.from_pretrained(tmp_path / "full", device="cpu")
    assert len(rec.recommend([rec.raw_ids[:3]], k=5)[0].items) == 5
    assert json.loads((tmp_path / "full" / "result.json").read_text())["refreshes"] == full["refreshes"]

    # stopped in the middle of the second tokenizer epoch (steps 20-29), then resumed
    part = run(setup, tmp_path / "split", "train_joint.stop_after_steps = 25")
    assert part["stopped_at_step"] == 25 and part["stage"] == "joint"
    resumed = run(setup, tmp_path / "split")
    assert resumed["refreshes"] == full["refreshes"]
    assert resumed["valid"] == full["valid"] and resumed["test"] == full["test"]
    for stage in ("joint/last.pt", "joint/best.pt", "finetune/best.pt"):
        a, b = weights(tmp_path / "full" / stage), weights(tmp_path / "split" / stage)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), stage


def test_learns_against_an_untrained_control(setup, tmp_path):
    """200 joint steps (25-step units: 4 tokenizer units, 3 code refreshes, SIA / PSA from step 50
    on) and 100 fine-tuning steps find the fixture's category cycles. Measured test NDCG@10 (seeds
    42, 1, 7): 0.40, 0.38, 0.32; the same runs at learning rate 0 (the untrained control) score
    0.074, popularity 0.078. Both runs: ~30 s on one core."""
    learn = ["train_joint.max_steps = 200", "train_joint.epoch_steps = 25", "train_joint.finetune_steps = 100",
             "train_joint.finetune_eval_every = 50", "train_joint.eval_users = None"]
    trained = run(setup, tmp_path / "trained", *learn)
    control = run(setup, tmp_path / "control", *learn[1:], "train_joint.max_steps = 50",
                  "train_joint.finetune_steps = 10", "train_joint.lr_rec = 0.0", "train_joint.lr_id = 0.0",
                  "train_joint.finetune_lr = 0.0")
    model, untrained = trained["test"]["ndcg@10"], control["test"]["ndcg@10"]
    assert model >= 3 * untrained and model >= untrained + 0.2, (model, untrained)
    assert model >= 3 * trained["popularity"]["ndcg@10"]
    assert trained["test"]["recall@10"] >= 2 * control["test"]["recall@10"]
    # Stage 1 alone (the joint model's best validation) learns too.
    assert trained["joint"]["best_valid_ndcg@10"] >= 1.5 * control["joint"]["best_valid_ndcg@10"]


def test_rebalanced_tokenizer_stays_rebalanced(setup, tmp_path):
    """A tokenizer with LC-Rec's rebalanced last level (4 codes per level: many collisions) and a
    dedup level sized from the rebalanced groups. With the RQ-VAE frozen (lr_id 0) the refresh
    must give back the starting codes: nearest codes would undo the rebalancing."""
    root, base = setup
    tok = run_script(train_rqvae.main, "configs/tiny/rqvae_tiny.gin", base + [
        f"train_rqvae.out_dir = '{tmp_path / 'rb'}'", "CODEBOOK_SIZE = 4", "train_rqvae.rebalance_last_level = True"])
    assert tok["collision_rate"] < tok["before_rebalance"]["collision_rate"]
    res = run(setup, tmp_path / "joint", f"train_joint.tokenizer = '{tmp_path / 'rb'}'", "train_joint.max_steps = 20",
              "train_joint.lr_id = 0.0", "train_joint.finetune_steps = 5")
    [refresh] = res["refreshes"]
    assert refresh["step"] == 10 and refresh["rebalanced"] is True
    assert refresh["changed"] == refresh["changed_id"] == 0
    assert refresh["collision_rate"] == pytest.approx(tok["collision_rate"])
    assert res["final_codes"]["match_tokenizer"] is True and res["final_codes"]["changed_from_start"] == 0


def test_tokenizer_must_be_an_rqvae_with_a_dedup_level(setup, tmp_path):
    root, base = setup
    run_script(train_rqvae.main, "configs/rqkmeans_amazon.gin", base + [
        f"train_rqvae.out_dir = '{tmp_path / 'km'}'", "RQKMeansConfig.codebook_size = 8", "train_rqvae.dedup_size = None",
        "train_rqvae.wandb_mode = 'disabled'"])
    with pytest.raises(ValueError, match="need a train_rqvae.py RQ-VAE tokenizer"):
        run_script(train_joint.main, "configs/tiny/joint_tiny.gin", base + [
            f"train_joint.tokenizer = '{tmp_path / 'km'}'", f"train_joint.out_dir = '{tmp_path / 'out'}'"])
