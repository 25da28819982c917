"""SASRec (modules/sasrec.py) and its training / evaluation by train_decoder.py.

Known answers and slow references for the full-softmax loss over every position, causality,
the exact top-K evaluator; then a seeded end-to-end run on the fixture of tests/fixtures.py
that must beat popularity by the margin of tests/test_learning.py, exact resume, and the
saved item embeddings read back by ``load_item_embeddings('sasrec:<run dir>')``.
"""

import json
import math

import gin
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_decoder
from data.dataset import Examples
from modules.evaluation import evaluate_exact_topk, ranking_metrics
from modules.objectives import full_softmax_loss
from modules.sasrec import SASRec, SASRecConfig
from tests.fixtures import dataset_bindings, run_script, write_p5_dataset

N_ITEMS = 23


def tiny_model(seed=0, dropout=0.0, pre_norm=True, max_len=8):
    torch.manual_seed(seed)
    return SASRec(SASRecConfig(num_items=N_ITEMS, max_len=max_len, d_model=16, num_heads=2, num_layers=2, d_ff=24,
                               dropout=dropout, pre_norm=pre_norm))


def random_segments(rng, n=7, width=6):
    """(n, width) item_ids, -1 padded at the end, every row at least 2 items (1 target)."""
    items = np.full((n, width), -1, dtype=np.int64)
    for r in range(n):
        length = int(rng.integers(2, width + 1))
        items[r, :length] = rng.choice(N_ITEMS, length, replace=False)
    return torch.from_numpy(items)


def naive_loss(model, items):
    """One forward pass per target on exactly its history: summed CE, number of targets."""
    total, count = torch.zeros(()), 0
    for row in items:
        length = int((row >= 0).sum())
        for j in range(length - 1):
            h = model(row[None, : j + 1])[0, -1]
            total = total + F.cross_entropy((h @ model.item_embeddings.T)[None], row[j + 1: j + 2], reduction="sum")
            count += 1
    return total, count


@pytest.mark.parametrize("pre_norm", [True, False])
def test_full_softmax_loss_equals_per_target_loop(pre_norm):
    model = tiny_model(pre_norm=pre_norm)
    items = random_segments(np.random.default_rng(1))
    ref, ref_count = naive_loss(model, items)
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    for chunk, budget in ((None, 2**26), (2, 2**26), (3, 0)):  # budget 0: every chunk recomputed in backward
        total, count = full_softmax_loss(model, items, chunk=chunk, logits_budget=budget)
        assert count == ref_count == int((items[:, 1:] >= 0).sum())
        torch.testing.assert_close(total, ref, atol=1e-5, rtol=1e-5)
        grads = torch.autograd.grad(total, list(model.parameters()))
        for (name, _), g, r in zip(model.named_parameters(), grads, ref_grads):
            torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4, msg=f"{name} (chunk {chunk}, budget {budget})")


def test_full_softmax_loss_known_answer():
    """Zero item embeddings: every logit is 0, so each target costs log(num_items)."""
    model = tiny_model()
    with torch.no_grad():
        model.item_embed.weight.zero_()
    items = torch.tensor([[3, 5, 7, -1], [1, 2, -1, -1], [4, 0, 6, 8]])
    total, count = full_softmax_loss(model, items, chunk=2)
    assert count == 2 + 1 + 3
    assert total.item() == pytest.approx(6 * math.log(N_ITEMS), rel=1e-6)


@pytest.mark.parametrize("pre_norm", [True, False])
def test_causality_and_padding(pre_norm):
    model = tiny_model(pre_norm=pre_norm).eval()
    items = torch.tensor([[3, 5, 7, 9, 11, 13], [2, 4, 6, 8, 10, 12]])
    out = model(items)
    for k in range(1, 6):
        changed = items.clone()
        changed[:, k] = (changed[:, k] + 1) % N_ITEMS
        other = model(changed)
        torch.testing.assert_close(other[:, :k], out[:, :k], atol=1e-6, rtol=0)  # earlier positions: unchanged
        assert not torch.allclose(other[:, k:], out[:, k:], atol=1e-4)  # the changed one and later ones move
    # Padding at the end (and the batch's width) changes nothing at the real positions.
    padded = torch.tensor([[3, 5, 7, -1, -1, -1, -1, -1]])
    torch.testing.assert_close(model(padded)[:, :3], model(items[:1, :3]), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="max_len"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_exact_topk_evaluator_equals_naive_ranking():
    model = tiny_model(dropout=0.3, max_len=5).train()
    rng = np.random.default_rng(3)
    n = 11
    history = random_segments(rng, n=n, width=5).numpy()
    history[0, 1:] = -1  # a one-item history
    target = rng.integers(0, N_ITEMS, n)
    target[:4] = [int(history[i, 0]) for i in range(4)]  # some easy hits
    examples = Examples(np.arange(n), history, target)
    got = evaluate_exact_topk(model, examples, batch_size=4)
    assert model.training, "the evaluator must restore training mode"
    model.eval()
    ranked = []
    with torch.no_grad():
        for row in history:
            length = int((row >= 0).sum())
            h = model(torch.from_numpy(row[None, :length]))[0, -1]
            scores = (model.item_embeddings @ h).numpy()
            ranked.append(np.argsort(-scores, kind="stable")[:10])
    want = ranking_metrics(np.array(ranked), target)
    assert {k: got[k] for k in want} == pytest.approx(want, abs=1e-12)
    assert got["users"] == n and want["recall@10"] > 0


# ------------------------------------------------------------------ end to end (train_decoder.py)

# tests/test_learning.py's clear-margin criterion: at least 3x popularity's test NDCG@10 and
# 0.2 above it (~5 standard errors over the fixture's 150 test users).
LEARN_STEPS = 400
MIN_RATIO, MIN_GAP = 3.0, 0.2


@pytest.fixture(scope="module")
def fixture_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("sasrec")
    data = write_p5_dataset(root / "data")
    return root, dataset_bindings(data, root / "cache")


def run(fixture_data, out, *extra):
    _, base = fixture_data
    return run_script(train_decoder.main, "configs/tiny/sasrec_tiny.gin", base + [
        f"train_decoder.out_dir = '{out}'", f"train_decoder.max_steps = {LEARN_STEPS}",
        "train_decoder.eval_every = 100", "train_decoder.log_every = 100", "train_decoder.seed = 42",
        # the thresholds must not depend on the machine's bf16 speed
        "train_decoder.precision = 'fp32'", *extra])


@pytest.fixture(scope="module")
def learned(fixture_data):
    out = fixture_data[0] / "learned"
    return out, run(fixture_data, out)


def the_dataset(fixture_data):
    from data.prepare import load_dataset

    gin.clear_config()
    try:
        gin.parse_config_files_and_bindings([], [b for b in fixture_data[1] if b.startswith("load_dataset")])
        return load_dataset()
    finally:
        gin.clear_config()


def test_sasrec_beats_popularity_without_a_tokenizer(learned):
    _, res = learned
    assert res["architecture"] == "sasrec" and res["train_mode"] == "all_positions" and res["steps"] == LEARN_STEPS
    assert res["invalid_rate"] == 0.0 and "unconstrained_test" not in res and "beam_size" not in res
    for split in ("valid", "test", "popularity"):
        assert set(res[split]) == set(train_decoder.REPORT_KEYS) and all(0 <= v <= 1 for v in res[split].values())
    model, pop = res["test"]["ndcg@10"], res["popularity"]["ndcg@10"]
    msg = f"test NDCG@10 {model:.4f} vs popularity {pop:.4f}"
    assert pop > 0.02, f"popularity baseline implausibly low ({msg})"
    assert model >= MIN_RATIO * pop and model - pop >= MIN_GAP, f"SASRec did not learn: {msg}"


def test_untrained_sasrec_does_not_pass(fixture_data, tmp_path):
    """The criterion can fail: learning rate 0 (the initial weights) stays near popularity."""
    res = run(fixture_data, tmp_path / "frozen", "train_decoder.lr = 0.0", "train_decoder.max_steps = 2",
              "train_decoder.eval_every = 2")
    model, pop = res["test"]["ndcg@10"], res["popularity"]["ndcg@10"]
    assert not (model >= MIN_RATIO * pop and model - pop >= MIN_GAP) and model < pop + 0.05, (model, pop)


def test_exact_resume(fixture_data, learned, tmp_path):
    full_dir, full = learned
    part = run(fixture_data, tmp_path / "split", "train_decoder.stop_after_steps = 150")
    assert part["stopped_at_step"] == 150 and not (tmp_path / "split" / "item_embeddings.npy").exists()
    resumed = run(fixture_data, tmp_path / "split")
    assert resumed["valid"] == full["valid"] and resumed["test"] == full["test"]
    assert resumed["best_step"] == full["best_step"]
    a = torch.load(full_dir / "best.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "split" / "best.pt", weights_only=False)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    np.testing.assert_array_equal(np.load(full_dir / "item_embeddings.npy"),
                                  np.load(tmp_path / "split" / "item_embeddings.npy"))


def test_item_embeddings_round_trip(fixture_data, learned, monkeypatch):
    from data import text
    from data.prepare import load_item_embeddings

    out, res = learned
    ds = the_dataset(fixture_data)
    best = torch.load(out / "best.pt", weights_only=False)
    table = np.load(out / "item_embeddings.npy")
    assert res["item_embeddings"] == str(out / "item_embeddings.npy")
    assert table.dtype == np.float32 and table.shape == (ds.num_items, 32)
    np.testing.assert_array_equal(table, best["model"]["item_embed.weight"].numpy())  # the best checkpoint's
    manifest = json.loads((out / "item_embeddings.json").read_text())
    assert manifest["dataset_fingerprint"] == ds.fingerprint() and manifest["num_items"] == ds.num_items
    assert manifest["dim"] == 32 and manifest["best_step"] == res["best_step"] == best["step"]
    assert manifest["model"]["d_model"] == 32 and "train_decoder.architecture = 'sasrec'" in manifest["config"]

    np.testing.assert_array_equal(load_item_embeddings(ds, model=f"sasrec:{out}"), table)
    both = load_item_embeddings(ds, model=f"concat:sasrec:{out}+sasrec:{out}")
    unit = table / np.linalg.norm(table, axis=1, keepdims=True)
    np.testing.assert_allclose(both, np.concatenate([unit, unit], axis=1), rtol=1e-6)
    # Text + collaborative: each part unit norm (a fake encoder stands in for the sentence model).
    monkeypatch.setattr(text, "_load_encoder", lambda name, device: FakeEncoder())
    mixed = load_item_embeddings(ds, model=f"concat:fake/encoder+sasrec:{out}")
    assert mixed.shape == (ds.num_items, FakeEncoder.dim + 32) and mixed.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(mixed[:, :FakeEncoder.dim], axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(mixed[:, FakeEncoder.dim:], unit, rtol=1e-6)


class FakeEncoder:
    dim = 5

    def encode(self, texts, batch_size, show_progress_bar, convert_to_numpy, normalize_embeddings):
        out = np.random.default_rng(len(texts)).normal(size=(len(texts), self.dim)).astype(np.float32)
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def test_item_embeddings_errors(fixture_data, learned, tmp_path):
    from data.prepare import load_dataset, load_item_embeddings

    out, _ = learned
    ds = the_dataset(fixture_data)
    with pytest.raises(FileNotFoundError, match="item_embeddings.npy not found"):
        load_item_embeddings(ds, model=f"sasrec:{tmp_path / 'nope'}")
    with pytest.raises(ValueError, match="concat"):
        load_item_embeddings(ds, model=f"concat:sasrec:{out}")
    # Another dataset: refused, naming the manifest.
    other = write_p5_dataset(tmp_path / "other", num_items=40, seed=1)
    gin.clear_config()
    ds2 = load_dataset("p5", path=str(other), items=str(other / "items.item"), min_count=1,
                       cache_dir=str(tmp_path / "c2"), verbose=False)
    with pytest.raises(ValueError, match=r"item_embeddings\.json: dataset_fingerprint"):
        load_item_embeddings(ds2, model=f"sasrec:{out}")
    # A table whose shape disagrees with the manifest (a damaged or replaced file).
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "item_embeddings.json").write_text((out / "item_embeddings.json").read_text())
    np.save(bad / "item_embeddings.npy", np.zeros((ds.num_items - 1, 32), dtype=np.float32))
    with pytest.raises(ValueError, match=r"bad/item_embeddings\.npy: shape"):
        load_item_embeddings(ds, model=f"sasrec:{bad}")


def test_configuration_errors(fixture_data, tmp_path):
    with pytest.raises(ValueError, match="train_mode"):
        run(fixture_data, tmp_path / "a", "train_decoder.train_mode = 'sliding'")
    with pytest.raises(ValueError, match="tokenizer is required for architecture 't5'"):
        run(fixture_data, tmp_path / "b", "train_decoder.architecture = 't5'", "train_decoder.train_mode = 'sliding'")
    with pytest.raises(ValueError, match="architecture must be"):
        run(fixture_data, tmp_path / "c", "train_decoder.architecture = 'bert4rec'")
