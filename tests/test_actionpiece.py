"""ActionPiece: fast vocabulary vs the exact slow reference, the stale-count quirk, SPR and
deterministic segmentation, decoding/fusion, tokenizer files, item features."""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modules.actionpiece import features as F
from modules.actionpiece import segment
from modules.actionpiece.official_port import OfficialReappearError, official_merges
from modules.actionpiece.reference import RefSequence, apply_merge, count_sequence, normalize, reference_merges
from modules.actionpiece.tokenizer import ActionPieceTokenizer
from modules.actionpiece.vocab import _pyset_copy_order, learn_merges, weight_scale


# ----------------------------------------------------------------------------- helpers
def random_corpus(seed: int, max_items=10, max_seqs=8, max_len=8, max_k=5, max_vals=4):
    """Items as tuples of initial token ids (category c, value v -> 1 + c * vals + v)."""
    rng = random.Random(seed)
    k, vals = rng.randint(1, max_k), rng.randint(1, max_vals)
    n_items = rng.randint(1, max_items)
    items = np.array([[1 + c * vals + rng.randrange(vals) for c in range(k)] for _ in range(n_items)])
    seqs = [[rng.randrange(n_items) for _ in range(rng.randint(1, max_len))]
            for _ in range(rng.randint(1, max_seqs))]
    return items, seqs, 1 + k * vals


def assert_same_as_reference(items, seqs, n_init, n_merges, mode, **kw):
    fast = learn_merges(items, seqs, n_init, n_merges, mode=mode, progress=False, **kw)
    ref_pairs, ref_counts = reference_merges([[tuple(items[i]) for i in s] for s in seqs], n_init, n_merges, mode)
    assert [tuple(map(int, p)) for p in fast.pairs] == ref_pairs
    if mode == "faithful":
        # The faithful reference is the official port: its float priorities, bit for bit.
        assert fast.priorities.tolist() == ref_counts
        return fast
    # Exact: the integer-scaled counts are the reference fractions times the scale.
    assert [Fraction(int(c), fast.scale) for c in fast.counts] == ref_counts
    assert np.allclose(fast.priorities, [float(c) for c in ref_counts], rtol=0, atol=1e-9)
    return fast


# ----------------------------------------------------------------------------- vocabulary
def test_weight_scale():
    assert weight_scale(5) == 3600
    s = weight_scale(4)
    for m in range(1, 5):
        assert (2 * s) % m == 0
        for n in range(1, 5):
            assert s % (m * n) == 0


@pytest.mark.parametrize("mode", ["correct", "faithful"])
def test_matches_reference_on_random_corpora(mode):
    for seed in range(60):
        items, seqs, n_init = random_corpus(seed)
        assert_same_as_reference(items, seqs, n_init, 40, mode)


@pytest.mark.parametrize("mode", ["correct", "faithful"])
def test_matches_reference_through_table_growth(mode):
    # A tiny initial capacity makes every table grow, the occurrence lists get rebuilt and
    # (correct mode) the heap compacted, many times over.
    for seed in range(100, 115):
        items, seqs, n_init = random_corpus(seed, max_items=12, max_seqs=10, max_len=12)
        assert_same_as_reference(items, seqs, n_init, 60, mode, initial_capacity=2)


corpus_strategy = st.integers(1, 4).flatmap(lambda k: st.tuples(
    st.just(k),
    st.integers(1, 3),
    st.lists(st.lists(st.integers(0, 2), min_size=k, max_size=k), min_size=1, max_size=6),
    st.lists(st.lists(st.integers(0, 5), min_size=1, max_size=7), min_size=1, max_size=5),
))


@settings(max_examples=60, deadline=None)
@given(corpus_strategy, st.sampled_from(["correct", "faithful"]))
def test_matches_reference_hypothesis(corpus, mode):
    k, vals, item_vals, seqs = corpus
    items = np.array([[1 + c * vals + min(v, vals - 1) for c, v in enumerate(row)] for row in item_vals])
    seqs = [[i % len(items) for i in s] for s in seqs]
    assert_same_as_reference(items, seqs, 1 + k * vals, 25, mode)


def test_faithful_stale_counts_hand_checked():
    # One item {1, 2, 3}: inside weight 2/3 for each pair. Merge (1, 2) (tie -> smaller
    # pair) -> {4, 3}; then (3, 4) with weight 2/2 -> {5}. Correct mode has nothing left.
    # Faithful mode never subtracted the vanished (1, 3) and (2, 3), so it goes on to
    # "merge" them with their stale 2/3: phantom tokens that occur nowhere.
    items, seqs = np.array([[1, 2, 3]]), [[0]]
    correct = learn_merges(items, seqs, 4, 10, mode="correct", progress=False)
    faithful = learn_merges(items, seqs, 4, 10, mode="faithful", progress=False)
    assert correct.pairs.tolist() == [[1, 2], [3, 4]]
    assert correct.priorities.tolist() == pytest.approx([2 / 3, 1.0], abs=1e-12)
    assert faithful.pairs.tolist() == [[1, 2], [3, 4], [1, 3], [2, 3]]
    assert faithful.priorities.tolist() == pytest.approx([2 / 3, 1.0, 2 / 3, 2 / 3], abs=1e-12)
    assert faithful.phantom.tolist() == [False, False, True, True] and not correct.phantom.any()


def test_faithful_phantoms_occur_nowhere():
    # On random corpora, every faithful merge whose pair is absent from the replayed
    # sequences must come after correct and faithful diverged; correct never does that.
    n_phantoms = 0
    for seed in range(40):
        items, seqs, n_init = random_corpus(seed, max_items=6, max_seqs=6)
        for mode in ("correct", "faithful"):
            res = learn_merges(items, seqs, n_init, 30, mode=mode, progress=False)
            state = [RefSequence([tuple(items[i]) for i in s]) for s in seqs]
            for n, (u, v) in enumerate(res.pairs.tolist()):
                present = sum((count_sequence(s).get((u, v), 0) for s in state), Fraction(0))
                if mode == "correct":
                    assert present == Fraction(int(res.counts[n]), res.scale)
                else:
                    assert res.phantom[n] == (present == 0)
                    n_phantoms += present == 0
                for s in state:
                    apply_merge(s, u, v, n_init + n)
    assert n_phantoms > 0


def test_correct_mode_on_real_sequences(shared_data):
    path = shared_data / "amazon2014/beauty/sequential_data.txt.gz"
    if not path.exists():
        pytest.skip(f"{path} missing")
    import gzip

    with gzip.open(path, "rt") as f:
        seqs = [[int(x) - 1 for x in line.split()[1:-2]] for _, line in zip(range(60), f)]
    used = sorted({i for s in seqs for i in s})
    remap = {i: n for n, i in enumerate(used)}
    seqs = [[remap[i] for i in s] for s in seqs]
    # Few distinct values per category, so that pairs repeat across users.
    feats = F.random_item_features(len(used), n_codebooks=3, codebook_size=4, n_hash_buckets=64, seed=1)
    tok, n_init = ActionPieceTokenizer.initial_vocab(feats)
    items = ActionPieceTokenizer._feature_tokens(tok, feats)
    for mode in ("correct", "faithful"):
        assert_same_as_reference(items, seqs, n_init, 30, mode)


def test_bad_input():
    with pytest.raises(ValueError, match="mode"):
        learn_merges(np.array([[1, 2]]), [[0]], 3, 1, mode="exact")
    with pytest.raises(ValueError, match="empty"):
        learn_merges(np.array([[1, 2]]), [[0], []], 3, 1)
    with pytest.raises(ValueError, match="repeats"):
        learn_merges(np.array([[1, 1]]), [[0]], 3, 1)
    with pytest.raises(ValueError, match="outside"):
        learn_merges(np.array([[1, 2]]), [[1]], 3, 1)


# ----------------------------------------------------------------------------- faithful = official
def assert_faithful_is_official(items, seqs, n_init, n_merges, **kw):
    """learn_merges(mode='faithful') against the plain port of the official code: same rules,
    same float priorities (bit for bit), same phantoms and failed-assert counts."""
    fast = learn_merges(items, seqs, n_init, n_merges, mode="faithful", progress=False, **kw)
    port = official_merges([[tuple(int(t) for t in items[i] if t >= 0) for i in s] for s in seqs],
                           n_init, n_merges)
    assert [tuple(map(int, p)) for p in fast.pairs] == port.pairs
    assert fast.priorities.tolist() == port.priorities
    assert fast.phantom.tolist() == port.phantom
    assert int(fast.reappearances.sum()) == len(port.reappearances)
    return fast, port


def test_pyset_copy_order_is_cpythons():
    # The faithful kernel walks the official inverted index (a Python set of sequence ids,
    # only ever added to) in the iteration order of its copy; float sums depend on it.
    rng = random.Random(0)
    tab, tmp, out = (np.zeros(1 << 17, dtype=np.int64) for _ in range(3))  # > 4 * 30000
    for trial in range(60):
        n = rng.choice([1, 2, 4, 5, 6, 9, 20, 100, 1000, 30000]) if trial < 50 else rng.randint(1, 3000)
        population = max(n, rng.choice([2 * n, 25000, 10**6]))
        keys = rng.sample(range(population), n) if trial % 3 else sorted(rng.sample(range(5 * n), n))
        s = set()
        for k in keys:
            s.add(k)
        newest_first = np.array(keys[::-1], dtype=np.int64)
        m = _pyset_copy_order(newest_first, n, tab, tmp, out)
        assert out[:m].tolist() == list(s.copy())


def test_faithful_float_tie_known_answer():
    # One sequence {1, 3, 5} {2, 4, 5}. The first merge (1, 5) leaves (3, 5) only across the
    # gap: exact count 1/6, but the official total is 7/9 + (1/6 - 7/9) in floats,
    # 0.16666666666666663, so (3, 5) comes after every pair at a true 1/6 (the
    # exact-arithmetic order would put it before (4, 7) and (5, 7)).
    items = np.array([[1, 3, 5], [2, 4, 5]])
    fast, port = assert_faithful_is_official(items, [[0, 1]], 7, 100)
    pairs = [tuple(map(int, p)) for p in fast.pairs]
    assert pairs[12:18] == [(2, 3), (2, 7), (3, 4), (4, 7), (5, 7), (3, 5)]
    assert fast.priorities[12:18].tolist() == [1 / 6] * 5 + [7 / 9 + (1 / 6 - 7 / 9)]
    assert fast.priorities[17] == 0.16666666666666663 < 1 / 6


@pytest.mark.parametrize("case", ["self_pairs", "mirrored", "shared_values", "long"])
def test_faithful_matches_official_port_hand_made(case):
    # Corpora built for ties: identical items (pairs (t, t) across a gap), items sharing
    # most values (one pair met in both orientations across a gap: w + w), many users
    # with the same few items (equal counts everywhere).
    if case == "self_pairs":
        items, seqs = np.array([[1, 2, 3]]), [[0] * 7, [0, 0], [0]]
        n_init = 4
    elif case == "mirrored":
        items, seqs = np.array([[1, 2], [2, 1], [1, 3]]), [[0, 1, 0, 2], [1, 0], [2, 1, 0, 1]]
        n_init = 4
    elif case == "shared_values":
        items = np.array([[1, 3, 5], [1, 3, 6], [2, 3, 5], [1, 4, 6]])
        seqs = [[0, 1], [1, 0], [2, 3, 0], [3, 2, 1, 0], [0, 1, 2, 3]] * 3
        n_init = 7
    else:
        items = np.array([[1, 3, 5, 7], [2, 4, 6, 8], [1, 4, 5, 8], [2, 3, 6, 7]])
        seqs = [[i % 4 for i in range(j, j + 25)] for j in range(6)]
        n_init = 9
    for cap in (2, 1 << 16):
        assert_faithful_is_official(items, seqs, n_init, 400, initial_capacity=cap)


def test_faithful_matches_official_port_random_ties():
    # Few values per category and many short sequences: ties, stale totals that come back
    # within 1e-12, phantom merges, pairs that re-appear (the official assertion).
    n_phantom = n_revalid = 0
    for seed in range(60):
        items, seqs, n_init = random_corpus(seed, max_items=8, max_seqs=30, max_len=8, max_vals=3)
        fast, port = assert_faithful_is_official(items, seqs, n_init, 300,
                                                 initial_capacity=2 if seed % 2 else 1 << 16)
        n_phantom += sum(port.phantom)
        n_revalid += len(port.pairs) - len(set(port.pairs))  # a pair merged twice
    assert n_phantom > 0 and n_revalid > 0


def test_faithful_reappearing_pair_like_official_under_O():
    # Search a corpus where a pair vanishes from a sequence and comes back: the official
    # code's `assert head_id not in pair2head_ids[pair]` fails there (strict=True), under
    # -O it goes on with the set unchanged, which is what faithful mode reproduces.
    for seed in range(400):
        items, seqs, n_init = random_corpus(seed, max_items=8, max_seqs=30, max_len=8, max_vals=3)
        corpus = [[tuple(items[i]) for i in s] for s in seqs]
        port = official_merges(corpus, n_init, 300)
        if port.reappearances:
            break
    else:
        pytest.fail("no corpus with a re-appearing pair")
    n_at = port.reappearances[0][0]
    with pytest.raises(OfficialReappearError):
        official_merges(corpus, n_init, 300, strict=True)
    assert official_merges(corpus, n_init, n_at, strict=True).pairs == port.pairs[:n_at]
    fast, _ = assert_faithful_is_official(items, seqs, n_init, 300)
    assert fast.reappearances[n_at] > 0 and not fast.reappearances[:n_at].any()


def test_faithful_matches_official_port_on_beauty(shared_data):
    # Real sequences (the first 1,000 Beauty train sequences) with the feature shapes of
    # the paper (random 4 x 256 codes + 64 hash buckets): the tokenizer's token2feat and
    # priority, as the official code would store them.
    import gzip

    path = shared_data / "amazon2014/beauty/sequential_data.txt.gz"
    if not path.exists():
        pytest.skip(f"{path} missing")
    with gzip.open(path, "rt") as f:
        users = [[int(x) - 1 for x in line.split()[1:]] for line in f]
    n_items = max(max(u) for u in users) + 1
    train = [u[:-2] for u in users if len(u) > 2][:1000]
    feats = F.random_item_features(n_items, n_codebooks=4, codebook_size=256, n_hash_buckets=64, seed=12345)
    n_merges = 150
    token2feat, n_init = ActionPieceTokenizer.initial_vocab(feats)
    tok = ActionPieceTokenizer.train(feats, train, n_init + n_merges, mode="faithful", progress=False)
    items = ActionPieceTokenizer._feature_tokens(token2feat, feats)
    port = official_merges([[tuple(items[i].tolist()) for i in s] for s in train], n_init, n_merges)
    official_token2feat = token2feat + [(-1, u, v) for u, v in port.pairs]
    official_priority = [0.0] * n_init + port.priorities
    assert tok.token2feat == official_token2feat
    assert tok.priority == official_priority
    assert sum(port.phantom) > 0  # the stale counts are at work within these merges


# ----------------------------------------------------------------------------- segmentation
def naive_bpe(tokens, rules):
    tokens = list(tokens)
    while True:
        best = None
        for i in range(len(tokens) - 1):
            a, b = sorted((tokens[i], tokens[i + 1]))
            r = rules.get((a, b))
            if r is not None and (best is None or r < best[0]):
                best = (r, i)
        if best is None:
            return tokens
        r, i = best
        tokens[i: i + 2] = [r]


@pytest.fixture(scope="module")
def small_tokenizer():
    rng = np.random.default_rng(0)
    feats = F.random_item_features(40, n_codebooks=3, codebook_size=5, n_hash_buckets=8, seed=3)
    seqs = [rng.integers(0, 40, rng.integers(3, 15)).tolist() for _ in range(60)]
    return ActionPieceTokenizer.train(feats, seqs, vocab_size=250, progress=False), seqs


def test_bpe_matches_naive(small_tokenizer):
    tok, _ = small_tokenizer
    rng = np.random.default_rng(1)
    init = np.arange(1, tok.n_init_feats)
    seqs = [rng.choice(init, rng.integers(0, 40)).tolist() for _ in range(200)]
    seg = segment.bpe_encode(seqs, tok.rule_table)
    for s, row, n in zip(seqs, seg.tokens, seg.lengths):
        assert row[:n].tolist() == naive_bpe(s, tok.rules)


def test_spr_tokens_valid_and_expand_back(small_tokenizer):
    tok, seqs = small_tokenizer
    hist = np.full((len(seqs), 20), -1)
    for r, s in enumerate(seqs):
        hist[r, : min(len(s), 20)] = s[:20]
    seg = tok.spr(hist, rng=7)
    assert seg.tokens.shape[1] == seg.lengths.max()
    for row, n, h in zip(seg.tokens, seg.lengths, hist):
        toks = row[:n].tolist()
        assert all(0 < t < tok.vocab_size for t in toks) and (row[n:] == 0).all()
        got = Counter(f for t in toks for f in tok.expand[t])
        want = Counter((c, int(v)) for i in h[h >= 0] for c, v in enumerate(tok.item_features[i]))
        assert got == want
    # Reproducible for a seed, different across seeds.
    again = tok.spr(hist, rng=7)
    assert np.array_equal(seg.tokens, again.tokens)
    other = tok.spr(hist, rng=8)
    assert not np.array_equal(seg.tokens, other.tokens)


def test_spr_single_permutation_is_bpe_of_it(small_tokenizer):
    # With one feature per "item" there is nothing to permute: SPR = plain BPE.
    tok, _ = small_tokenizer
    item_tokens = np.arange(1, tok.n_init_feats)[:, None]
    rng = np.random.default_rng(2)
    hist = rng.integers(0, len(item_tokens), (50, 30))
    seg = segment.spr_encode(hist, item_tokens, tok.rule_table, rng=0)
    for row, n, h in zip(seg.tokens, seg.lengths, hist):
        assert row[:n].tolist() == naive_bpe(item_tokens[h, 0].tolist(), tok.rules)


def test_deterministic_segmentation(small_tokenizer):
    tok, seqs = small_tokenizer
    for i in range(len(tok.item_features)):
        target = tok.encode_target(i)
        assert len(target) <= tok.n_categories
        assert tok.decode(target) == tuple(tok.item_features[i])
        assert tok.decode(target + [tok.eos_id, 0, 0]) == tuple(tok.item_features[i])
    for s in seqs[:10]:
        out = tok.encode_deterministic(s)
        got = Counter(f for t in out for f in tok.expand[t])
        want = Counter((c, int(v)) for i in s for c, v in enumerate(tok.item_features[i]))
        assert got == want
        assert out == tok.encode_deterministic(s)


def naive_none_encode(items, rules, priority):
    """Full rescan of every location after every merge (what segment.none_encode caches)."""
    seq = RefSequence(items)
    acts, ctx = seq.acts, seq.ctx
    rule = lambda a, b: rules.get((min(a, b), max(a, b)), -1)  # noqa: E731
    while True:
        cands = []  # (score, op, k, x, y, r) in enumeration order
        for k, a in enumerate(acts):
            cands += [(priority[rule(x, y)] * 2 / len(a), "in", k, x, y, rule(x, y))
                      for i, x in enumerate(a) for y in a[i + 1:] if rule(x, y) >= 0]
            if k == len(acts) - 1:
                break
            b, c = acts[k + 1], ctx[k]
            if c is not None:
                cands += [(priority[rule(x, c)] / len(a), "ac", k, x, c, rule(x, c)) for x in a if rule(x, c) >= 0]
                cands += [(priority[rule(c, y)] / len(b), "cb", k, c, y, rule(c, y)) for y in b if rule(c, y) >= 0]
            else:
                cands += [(priority[rule(x, y)] / (len(a) * len(b)), "ab", k, x, y, rule(x, y))
                          for x in a for y in b if rule(x, y) >= 0]
        if not cands:
            break
        top = max(c[0] for c in cands)
        _, op, k, x, y, r = next(c for c in cands if c[0] == top)
        if op == "in":
            acts[k].remove(x), acts[k].remove(y), acts[k].insert(0, r)
        elif op == "ac":
            acts[k].remove(x)
        elif op == "cb":
            acts[k + 1].remove(y)
        else:
            acts[k].remove(x), acts[k + 1].remove(y)
        if op != "in":
            ctx[k] = r
        normalize(seq)
    return [t for k, a in enumerate(acts) for t in a + ([ctx[k]] if k < len(ctx) and ctx[k] is not None else [])]


def test_none_encode_matches_naive(small_tokenizer):
    tok, seqs = small_tokenizer
    rng = np.random.default_rng(4)
    priority = list(tok.priority)
    for trial in range(80):
        if trial % 2:  # random priorities: many more ties and cross/context merges
            priority = [0.0] * tok.n_init_feats + rng.integers(1, 4, tok.vocab_size - tok.n_init_feats).tolist()
        items = [list(tok.item_tokens[i]) for i in rng.integers(0, len(tok.item_tokens), rng.integers(1, 12))]
        assert segment.none_encode(items, tok.rules, priority) == naive_none_encode(items, tok.rules, priority)


def test_none_encode_known_answer():
    # Item {1, 2, 3}; rules 4 = (1, 2) [priority 1], 5 = (2, 3) [priority 5]:
    # the best-scoring rule (2, 3) applies first, then nothing else matches.
    rules = {(1, 2): 4, (2, 3): 5}
    priority = [0, 0, 0, 0, 1.0, 5.0]
    assert segment.none_encode([[1, 2, 3]], rules, priority) == [5, 1]
    # Two items {1}, {2}: the cross pair merges into the context slot, then the emptied
    # second item takes the token and the first (empty, followed by an empty slot) goes.
    assert segment.none_encode([[1], [2]], {(1, 2): 3}, [0, 0, 0, 2.0]) == [3]


def test_decode_and_fuse():
    token2feat = [(-1, -1), (0, 7), (0, 8), (1, 3), (1, 4), (-1, 1, 3), (-1, 2, 5)]
    expand = segment.expand_table(token2feat)
    assert expand[6] == ((0, 8), (0, 7), (1, 3))
    dec = lambda t: segment.decode_tokens(t, expand, 2, eos_id=8)  # noqa: E731
    assert dec([5]) == (7, 3)
    assert dec([2, 4, 8, 1]) == (8, 4)
    assert dec([6]) is None  # category 0 twice
    assert dec([1]) is None  # category 1 missing
    assert dec([0, 3]) is None and dec([9, 3]) is None  # pad / out of range
    fused = segment.fuse_beams([[[5], [6], [2, 4]], [[2, 4], [5]]], dec, topk=5)
    assert fused.items == [(7, 3), (8, 4)]
    assert fused.scores == pytest.approx([1 + 1 / math.log2(3), 1 / math.log2(4) + 1])
    assert fused.n_invalid == 1


# ----------------------------------------------------------------------------- tokenizer files
def test_json_round_trip_and_truncation(small_tokenizer, tmp_path):
    tok, _ = small_tokenizer
    path = tmp_path / "actionpiece.json"
    tok.save_json(path)
    obj = json.loads(path.read_text())
    assert set(obj) == {"n_categories", "n_init_feats", "token2feat", "priority"}
    assert obj["token2feat"][0] == [-1, -1] and len(obj["token2feat"][-1]) == 3
    back = ActionPieceTokenizer.load_json(path)
    assert back.token2feat == tok.token2feat and back.priority == tok.priority
    short = ActionPieceTokenizer.load_json(path, vocab_size=tok.n_init_feats + 10)
    assert short.vocab_size == tok.n_init_feats + 10
    assert short.token2feat == tok.token2feat[: short.vocab_size]
    for bad in (tok.n_init_feats - 1, tok.vocab_size + 1):
        with pytest.raises(ValueError, match="vocab_size"):
            ActionPieceTokenizer.load_json(path, vocab_size=bad)
    obj["token2feat"][-1] = [-1, 5, tok.vocab_size + 3]
    path.write_text(json.dumps(obj))
    with pytest.raises(ValueError, match=r"actionpiece.json.*token2feat\["):
        ActionPieceTokenizer.load_json(path)


def test_save_and_from_pretrained(small_tokenizer, tmp_path, monkeypatch):
    tok, _ = small_tokenizer
    tok.save_pretrained(tmp_path / "tok")
    back = ActionPieceTokenizer.from_pretrained(tmp_path / "tok", vocab_size=tok.vocab_size - 5)
    assert back.vocab_size == tok.vocab_size - 5
    assert np.array_equal(back.item_features, tok.item_features)
    assert back.config["mode"] == "correct"
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo_id, revision=None: calls.append(repo_id) or str(tmp_path / "tok"))
    hub = ActionPieceTokenizer.from_pretrained("someone/actionpiece-beauty")
    assert calls == ["someone/actionpiece-beauty"] and hub.token2feat == tok.token2feat


def test_train_matches_learn_merges(small_tokenizer):
    tok, seqs = small_tokenizer
    res = learn_merges(tok.item_tokens, seqs, tok.n_init_feats, tok.vocab_size - tok.n_init_feats, progress=False)
    assert [t[1:] for t in tok.token2feat[tok.n_init_feats:]] == [tuple(p) for p in res.pairs.tolist()]
    n_values = sum(len(np.unique(tok.item_features[:, c])) for c in range(tok.n_categories))
    assert tok.n_init_feats == 1 + n_values


# ----------------------------------------------------------------------------- features
def test_hash_buckets_unique_and_seeded():
    codes = np.array([[0, 1], [0, 1], [2, 2], [0, 1]])
    a = F.add_hash_buckets(codes, 4, seed=5)
    assert np.array_equal(a, F.add_hash_buckets(codes, 4, seed=5))
    assert len({tuple(r) for r in a}) == 4 and a[:, 2].max() < 4
    assert len(set(a[[0, 1, 3], 2])) == 3
    with pytest.raises(ValueError, match="n_hash_buckets"):
        F.add_hash_buckets(codes, 2)


def test_pca_whiten_and_opq():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 24)) @ rng.normal(size=(24, 24)) + 3.0
    z = F.pca_whiten(x, 16)
    assert z.shape == (600, 16)
    assert np.allclose(z.mean(0), 0, atol=1e-4) and np.allclose(z.std(0, ddof=1), 1, atol=1e-3)
    opq = F.train_opq(z, n_codebooks=4, codebook_size=8, n_iter=8, seed=0)
    assert np.allclose(opq.rotation.T @ opq.rotation, np.eye(16), atol=1e-8)
    codes = opq.encode(z)
    assert codes.shape == (600, 4) and codes.min() >= 0 and codes.max() < 8
    err_opq = ((opq.decode(codes) - z) ** 2).sum()
    pq = F.train_opq(z, n_codebooks=4, codebook_size=8, n_iter=0, seed=0)
    err_pq = ((pq.decode(pq.encode(z)) - z) ** 2).sum()
    assert err_opq < err_pq
    feats = F.item_features_from_embeddings(x, np.arange(400), n_hash_buckets=64, pca_dim=16,
                                            n_codebooks=4, codebook_size=8, opq_iter=3)
    assert feats.shape == (600, 5) and len({tuple(r) for r in feats}) == 600
