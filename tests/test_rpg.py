"""RPG (modules/rpg.py, modules/rpg_graph.py): the parallel multi-token loss against a
per-target, per-codebook loop; exact scores against a brute-force sum of log-probabilities;
graph decoding against exact ranking when the graph covers the catalogue; and, through
train_decoder.py, that RPG learns the fixture of tests/fixtures.py by the suite's margin while
an untrained one does not."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_decoder
from modules.rpg import RPG, RPGConfig, rpg_loss
from modules.rpg_graph import GraphScores, graph_decode, item_graph
from modules.semantic_ids import SemanticIdTokenizer
from tests.fixtures import dataset_bindings, run_script, write_p5_dataset
from tests.test_learning import MIN_GAP, MIN_RATIO

N_ITEMS, N_CODEBOOKS, K = 19, 4, 8


def tiny_rpg(seed=0, dropout=0.0, max_len=8):
    torch.manual_seed(seed)
    codes = torch.randint(0, K, (N_ITEMS, N_CODEBOOKS))
    model = RPG(RPGConfig(num_items=N_ITEMS, num_codebooks=N_CODEBOOKS, codebook_size=K, max_len=max_len, d_model=16,
                          num_heads=2, num_layers=2, d_ff=24, dropout=dropout, temperature=0.5), codes)
    with torch.no_grad():  # heads start as the identity: perturb them so the test covers W and b
        model.heads.weight.normal_(0, 0.1)
        model.heads.bias.normal_(0, 0.1)
    return model, codes


def random_segments(rng, n=6, width=6):
    items = np.full((n, width), -1, dtype=np.int64)
    for r in range(n):
        length = int(rng.integers(2, width + 1))
        items[r, :length] = rng.choice(N_ITEMS, length, replace=False)
    return torch.from_numpy(items)


def naive_logits(model, h):
    """Codebook j's logits of one state h, written out: cosine(head_j(h), token embeddings) / T."""
    cfg = model.config
    out = []
    for j in range(cfg.num_codebooks):
        head = h + F.silu(h @ model.heads.weight[j] + model.heads.bias[j])
        table = model.token_embed.weight[j * cfg.codebook_size:(j + 1) * cfg.codebook_size]
        out.append(F.cosine_similarity(head[None], table, dim=-1) / cfg.temperature)
    return out


def test_parallel_loss_equals_per_token_loop():
    model, codes = tiny_rpg()
    items = random_segments(np.random.default_rng(0))
    total, count = rpg_loss(model, items, chunk=2)
    ref, ref_count = torch.zeros(()), 0
    for row in items:
        length = int((row >= 0).sum())
        for t in range(length - 1):  # one forward pass per target on exactly its history
            h = model(row[None, :t + 1])[0, -1]
            for j, logits in enumerate(naive_logits(model, h)):
                ref = ref + F.cross_entropy(logits[None], codes[row[t + 1], j][None], reduction="sum")
            ref_count += 1
    assert count == ref_count
    torch.testing.assert_close(total, ref, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(total, list(model.parameters()))
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


def test_exact_scores_are_sums_of_token_log_probs():
    model, codes = tiny_rpg(1)
    model.eval()
    history = random_segments(np.random.default_rng(1), n=5)
    scores = model.scores(history)
    for b, row in enumerate(history):
        length = int((row >= 0).sum())
        h = model(row[None, :length])[0, -1]
        log_probs = [torch.log_softmax(lg, -1) for lg in naive_logits(model, h)]
        ref = torch.stack([sum(log_probs[j][codes[i, j]] for j in range(N_CODEBOOKS)) for i in range(N_ITEMS)])
        torch.testing.assert_close(scores[b], ref, rtol=1e-5, atol=1e-5)


def test_item_graph_matches_its_definition():
    model, codes = tiny_rpg(2)
    graph = item_graph(model, n_edges=5, chunk=4)
    table = F.normalize(model.token_embed.weight, dim=-1).view(N_CODEBOOKS, K, -1)
    sim = torch.zeros(N_ITEMS, N_ITEMS)
    for i in range(N_ITEMS):
        for j in range(N_ITEMS):
            sim[i, j] = sum((1 + table[k, codes[i, k]] @ table[k, codes[j, k]]) / 2 for k in range(N_CODEBOOKS))
    # Neighbour sets equal the 5 most similar by the definition (ties aside: random weights have none).
    for i in range(N_ITEMS):
        assert set(graph[i].tolist()) == set(sim[i].topk(5).indices.tolist())
    assert (graph[:, 0] == torch.arange(N_ITEMS)).all(), "an item is its own nearest neighbour"


@pytest.mark.parametrize("beams, steps", [(1, 1), (3, 2)])
def test_graph_decoding_equals_exact_when_the_graph_covers_the_catalogue(beams, steps):
    model, _ = tiny_rpg(3)
    model.eval()
    history = random_segments(np.random.default_rng(3), n=7)
    log_probs = model.token_log_probs(model.last_states(history))
    exact = model.item_scores(log_probs).topk(10, dim=1)
    graph = item_graph(model, n_edges=N_ITEMS)  # every item neighbours every item
    items, values = graph_decode(model, log_probs, graph, beams=beams, steps=steps, top_k=10,
                                 generator=torch.Generator().manual_seed(0))
    assert torch.equal(items, exact.indices)
    torch.testing.assert_close(values, exact.values)
    scorer = GraphScores(model, n_edges=N_ITEMS, graph_beams=beams, propagation_steps=steps)
    assert torch.equal(scorer.scores(history).topk(10, dim=1).indices, exact.indices)


def test_graph_decoding_on_a_sparse_graph_returns_distinct_visited_items():
    model, _ = tiny_rpg(4)
    model.eval()
    history = random_segments(np.random.default_rng(4), n=9)
    log_probs = model.token_log_probs(model.last_states(history))
    graph = item_graph(model, n_edges=3)
    items, values = graph_decode(model, log_probs, graph, beams=2, steps=3, top_k=6,
                                 generator=torch.Generator().manual_seed(1))
    exact = model.item_scores(log_probs)
    for row, vals, full in zip(items, values, exact):
        found = row[row >= 0]
        assert len(set(found.tolist())) == len(found), "no item twice"
        torch.testing.assert_close(vals[: len(found)], full[found])
        assert (vals[: len(found)].diff() <= 0).all(), "best first"


# ------------------------------------------------------------------ end to end: learns the fixture

@pytest.fixture(scope="module")
def fixture_run(tmp_path_factory):
    """The fixture dataset and a tokenizer of 8 random codes of 16 per item (RPG needs no
    semantic structure to learn the fixture's item-to-item order, only distinct IDs)."""
    root = tmp_path_factory.mktemp("rpg")
    data = write_p5_dataset(root / "data")
    base = dataset_bindings(data, root / "cache")
    num_items = len({int(t) for line in (data / "sequential_data.txt").read_text().split("\n") if line
                     for t in line.split()[1:]})
    codes = torch.randint(0, 16, (num_items, 8), generator=torch.Generator().manual_seed(0))
    SemanticIdTokenizer(None, codes, [16] * 8).save_pretrained(root / "tok")
    return root, base


def train_rpg(fixture_run, out, *extra):
    root, base = fixture_run
    return run_script(train_decoder.main, "configs/tiny/rpg_tiny.gin", base + [
        f"train_decoder.tokenizer = '{root / 'tok'}'", f"train_decoder.out_dir = '{out}'",
        "train_decoder.precision = 'fp32'", *extra])


def learned(res) -> bool:
    model, pop = res["test"]["ndcg@10"], res["popularity"]["ndcg@10"]
    return model >= MIN_RATIO * pop and model - pop >= MIN_GAP


def test_rpg_learns_the_fixture_and_an_untrained_one_does_not(fixture_run, tmp_path):
    res = train_rpg(fixture_run, tmp_path / "rpg")
    msg = f"test NDCG@10 {res['test']['ndcg@10']:.4f} vs popularity {res['popularity']['ndcg@10']:.4f}"
    assert res["architecture"] == "rpg" and res["popularity"]["ndcg@10"] > 0.02, msg
    assert learned(res), f"RPG did not learn: {msg}"
    frozen = train_rpg(fixture_run, tmp_path / "frozen", "train_decoder.lr = 0.0", "train_decoder.max_steps = 2",
                       "train_decoder.eval_every = 2")
    assert not learned(frozen), f"untrained RPG passes: {frozen['test']}"


def test_rpg_graph_decoding_end_to_end_matches_exact_on_a_covering_graph(fixture_run, tmp_path):
    """The same trained weights tested with exact scoring and with a graph that links every item
    to every item: the same ranking, so the same metrics."""
    exact = train_rpg(fixture_run, tmp_path / "run", "train_decoder.max_steps = 60")
    graph = train_rpg(fixture_run, tmp_path / "run", "train_decoder.max_steps = 60",
                      "train_decoder.decoding = 'graph'", "GraphScores.n_edges = 60", "GraphScores.propagation_steps = 1")
    assert graph["decoding"] == "graph"
    assert graph["test"] == exact["test"] and graph["valid"] == exact["valid"]


def test_rpg_recommender_round_trip_ranks_as_the_evaluator(fixture_run, tmp_path):
    """The run's export (what from_pretrained and the Hub round trip serve) recommends exactly the
    evaluator's top 10 (the model's exact ranking of every item), before and after save/load, and
    a run folder without its export is rebuilt from best.pt."""
    import shutil

    from data.prepare import load_dataset
    from modules.recommender import GenerativeRecommender

    root, _ = fixture_run
    res = train_rpg(fixture_run, tmp_path / "run", "train_decoder.max_steps = 60")
    data = root / "data"
    dataset = load_dataset(source="p5", path=str(data), items=str(data / "items.item"), min_count=1,
                           cache_dir=str(root / "cache"), verbose=False)
    ex = dataset.eval_examples("test")
    raw = dataset.items["raw_id"].to_list()
    histories = [[raw[i] for i in row if i >= 0] for row in ex.history]
    rec = GenerativeRecommender.from_pretrained(tmp_path / "run", device="cpu")
    got = [r.item_ids for r in rec.recommend(histories, k=10)]
    with torch.no_grad():
        expected = rec.model.scores(torch.as_tensor(ex.history)).topk(10, dim=1).indices.tolist()
    assert got == expected
    hits = np.mean([t in g for t, g in zip(ex.target, got)])
    assert hits == pytest.approx(res["test"]["recall@10"])
    rec.save_pretrained(tmp_path / "saved")
    again = GenerativeRecommender.from_pretrained(tmp_path / "saved", device="cpu")
    assert [r.item_ids for r in again.recommend(histories, k=10)] == got
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("best.pt", "best.pt.sha256", "result.json"):
        if (tmp_path / "run" / name).exists():
            shutil.copy(tmp_path / "run" / name, bare / name)
    rebuilt = GenerativeRecommender.from_pretrained(bare, device="cpu")
    assert [r.item_ids for r in rebuilt.recommend(histories, k=10)] == got


def test_bench_rpg_decoding_reads_the_run_record(fixture_run, tmp_path, monkeypatch):
    """bench/bench_rpg.py's decoding benchmark (docs/04-rpg.md) rebuilds the run's RPG from the
    recommender record of its best.pt (its graph of 100 edges per item cut to the fixture's 60 items)."""
    import importlib.util

    import gin

    root, base = fixture_run
    train_rpg(fixture_run, tmp_path / "run", "train_decoder.max_steps = 20", "train_decoder.eval_every = 10")
    spec = importlib.util.spec_from_file_location("bench_rpg", Path(__file__).resolve().parents[1] / "bench/bench_rpg.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(bench, "item_graph", lambda model, n_edges: item_graph(model, n_edges=10))
    data_config = tmp_path / "data.gin"
    data_config.write_text("\n".join(b for b in base if b.startswith("load_dataset.")) + "\n")
    gin.clear_config()
    try:
        out = bench.decoding(str(tmp_path / "run"), [str(data_config)], users=50, batch=16)
    finally:
        gin.clear_config()
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=False)
    assert out["model_config"] == best["recommender"]["config"]["model_config"] and out["users"] == 50
