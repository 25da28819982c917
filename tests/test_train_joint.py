"""train_joint.py (ETEGRec) end to end on a tiny fixture: the result JSON with its refresh figures,
the saved recommender + tokenizer, and exact resume from the middle of a tokenizer epoch."""

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
                          "codebook_usage"}
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


def test_tokenizer_must_be_an_rqvae_with_a_dedup_level(setup, tmp_path):
    root, base = setup
    run_script(train_rqvae.main, "configs/rqkmeans_amazon.gin", base + [
        f"train_rqvae.out_dir = '{tmp_path / 'km'}'", "RQKMeansConfig.codebook_size = 8", "train_rqvae.dedup_size = None",
        "train_rqvae.wandb_mode = 'disabled'"])
    with pytest.raises(ValueError, match="need a train_rqvae.py RQ-VAE tokenizer"):
        run_script(train_joint.main, "configs/tiny/joint_tiny.gin", base + [
            f"train_joint.tokenizer = '{tmp_path / 'km'}'", f"train_joint.out_dir = '{tmp_path / 'out'}'"])
