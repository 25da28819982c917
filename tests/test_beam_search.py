"""Prefix trie and constrained beam search against exhaustive scoring of every item."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modules.beam_search import PrefixTrie, beam_search, beam_search_tokens
from modules.tokens import TokenLayout
from modules.transformers.generation import target_log_probs
from modules.transformers.gpt import GPT, GPTConfig
from modules.transformers.t5 import T5, T5Config

SIZES = (4, 4, 4)
LAYOUT = TokenLayout(SIZES, num_user_buckets=5)
SMALL = dict(d_model=32, num_heads=2, d_head=16, d_ff=64)



def make_model(kind: str, seed: int):
    torch.manual_seed(seed)
    vocab = dict(vocab_size=LAYOUT.vocab_size, output_vocab_size=LAYOUT.output_vocab_size)
    if kind == "t5":
        model = T5(T5Config(**vocab, **SMALL, num_encoder_layers=2, num_decoder_layers=2))
    else:
        model = GPT(GPTConfig(**vocab, **SMALL, num_layers=2))
    # Larger output weights give peaked, seed-dependent distributions (beam choices matter).
    with torch.no_grad():
        model.embed.weight.mul_(3 if kind == "gpt" else 1)
    return model.eval()


def make_problem(seed: int, num_items: int = 30, n: int = 6):
    """num_items random distinct codes out of the 64 possible, and n random histories."""
    g = torch.Generator().manual_seed(seed)
    every = torch.tensor(list(itertools.product(*(range(s) for s in SIZES))))
    codes = every[torch.randperm(len(every), generator=g)[:num_items]]
    history = torch.randint(0, num_items, (n, 5), generator=g)
    history[0, 2:] = -1
    ids, mask = LAYOUT.encode_history(history, codes, user=torch.arange(n))
    return codes, ids, mask


def exhaustive_scores(model, ids, mask, codes) -> torch.Tensor:
    """(n, N): sum of the L teacher-forced token log-probs of every item, for every user."""
    n, N = ids.shape[0], codes.shape[0]
    labels = LAYOUT.codes_to_tokens(codes).repeat(n, 1)
    with torch.no_grad():
        lp = target_log_probs(model, ids.repeat_interleave(N, 0), mask.repeat_interleave(N, 0), labels)
    return lp.sum(-1).view(n, N)


# ---------------------------------------------------------------------- trie
@pytest.mark.parametrize("max_dense", [1 << 24, 0])
def test_trie_children_match_naive_sets(max_dense):
    codes, _, _ = make_problem(0, num_items=23)
    trie = PrefixTrie(codes, SIZES, max_dense=max_dense)
    rows = [tuple(r) for r in codes.tolist()]
    prefixes = [sorted({r[:level] for r in rows}) for level in range(len(SIZES) + 1)]
    for level in range(len(SIZES)):
        nodes = torch.arange(-1, len(prefixes[level]))
        child = trie.children(level, nodes)
        assert (child[0] == -1).all()  # a dead beam has no children
        for node, prefix in enumerate(prefixes[level]):
            for code in range(SIZES[level]):
                expected = prefix + (code,)
                got = child[node + 1, code].item()
                if expected in prefixes[level + 1]:
                    assert got == prefixes[level + 1].index(expected)
                else:
                    assert got == -1
    assert torch.equal(trie.lookup(codes), torch.arange(len(codes)))
    missing = [c for c in itertools.product(*(range(s) for s in SIZES)) if c not in rows]
    assert (trie.lookup(torch.tensor(missing)) == -1).all()


def test_trie_rejects_duplicates_and_bad_codes():
    with pytest.raises(ValueError, match="duplicate"):
        PrefixTrie(torch.tensor([[0, 1, 2], [0, 1, 2]]), SIZES)
    with pytest.raises(ValueError, match="outside"):
        PrefixTrie(torch.tensor([[0, 4, 2]]), SIZES)


# ---------------------------------------------------------------------- beam search
@pytest.mark.parametrize("kind", ["t5", "gpt"])
@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), beam=st.integers(30, 40))
def test_wide_beam_equals_exhaustive_scoring(kind, autocast, seed, beam):
    """Exact, order included, even when the caller runs under bf16 autocast (training precision):
    the ranking scores are computed in fp32 and compared with exhaustive fp32 scoring."""
    codes, ids, mask = make_problem(seed, n=24)
    model = make_model(kind, seed)
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        out = beam_search(model, ids, mask, PrefixTrie(codes, SIZES), LAYOUT, beam_size=beam, top_k=10)
    exhaustive = exhaustive_scores(model, ids, mask, codes)
    best = exhaustive.topk(10, dim=1)
    # The exhaustive top 10, in order, up to items whose scores tie within float noise (two items
    # 1e-6 apart may swap): each returned item's true score, the ranking's scores, and no better
    # item left out.
    torch.testing.assert_close(out.scores, best.values, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(exhaustive.gather(1, out.items), best.values, atol=1e-4, rtol=1e-4)
    clear = (best.values[:, :-1] - best.values[:, 1:]).abs() > 1e-4  # rank i is no near-tie with i + 1
    settled = torch.cat([clear, torch.ones_like(clear[:, :1])], 1) & torch.cat([torch.ones_like(clear[:, :1]), clear], 1)
    assert torch.equal(out.items[settled], best.indices[settled])
    assert all(len(set(row)) == 10 for row in out.items.tolist())
    assert torch.equal(out.tokens, LAYOUT.codes_to_tokens(codes[out.items]))


@pytest.mark.parametrize("kind", ["t5", "gpt"])
@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), beam=st.integers(1, 12), max_dense=st.sampled_from([0, 1 << 24]))
def test_narrow_beam_returns_distinct_valid_items_with_true_scores(kind, seed, beam, max_dense):
    codes, ids, mask = make_problem(seed)
    model = make_model(kind, seed)
    top_k = max(1, beam // 2)
    out = beam_search(model, ids, mask, PrefixTrie(codes, SIZES, max_dense), LAYOUT, beam_size=beam, top_k=top_k)
    assert out.items.shape == (ids.shape[0], top_k) and out.invalid_rate is None
    assert ((out.items >= 0) & (out.items < len(codes))).all()
    for row in out.items.tolist():
        assert len(set(row)) == len(row)
    assert (out.scores[:, :-1] >= out.scores[:, 1:]).all()
    exhaustive = exhaustive_scores(model, ids, mask, codes)
    torch.testing.assert_close(out.scores, exhaustive.gather(1, out.items), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["t5", "gpt"])
def test_unconstrained_search_reports_invalid_beams(kind):
    codes, ids, mask = make_problem(7, num_items=20)
    model = make_model(kind, 7)
    trie = PrefixTrie(codes, SIZES)
    # 64 beams hold every code sequence: the top beams are the exhaustive top over all 64.
    out = beam_search(model, ids, mask, trie, LAYOUT, beam_size=64, top_k=64, unconstrained=True)
    every = torch.tensor(list(itertools.product(*(range(s) for s in SIZES))))
    all_scores = exhaustive_scores(model, ids, mask, every)
    torch.testing.assert_close(out.scores, all_scores.sort(dim=1, descending=True).values, atol=1e-4, rtol=1e-4)
    assert out.invalid_rate == pytest.approx(44 / 64)
    got_codes = LAYOUT.tokens_to_codes(out.tokens)
    assert torch.equal(out.items, trie.lookup(got_codes))
    small = beam_search(model, ids, mask, trie, LAYOUT, beam_size=8, top_k=5, unconstrained=True)
    assert small.invalid_rate == pytest.approx((small.items < 0).float().mean().item())


def test_top_k_beyond_catalogue_is_padded():
    codes, ids, mask = make_problem(3, num_items=4)
    model = make_model("t5", 3)
    out = beam_search(model, ids, mask, PrefixTrie(codes, SIZES), LAYOUT, beam_size=8, top_k=6)
    assert (out.items[:, :4] >= 0).all() and (out.items[:, 4:] == -1).all()
    assert torch.isinf(out.scores[:, 4:]).all() and torch.isfinite(out.scores[:, :4]).all()
    assert sorted(out.items[0, :4].tolist()) == [0, 1, 2, 3]


@pytest.mark.parametrize("kind", ["t5", "gpt"])
def test_beam_search_tokens_enumerates_every_sequence_best_first(kind):
    _, ids, mask = make_problem(5, n=3)
    model = make_model(kind, 5)
    V, T = LAYOUT.output_vocab_size, 2
    out = beam_search_tokens(model, ids, mask, beam_size=V**T + 5, num_steps=T)
    every = torch.tensor(list(itertools.product(range(V), repeat=T)))
    with torch.no_grad():
        exact = target_log_probs(model, ids.repeat_interleave(len(every), 0), mask.repeat_interleave(len(every), 0),
                                 every.repeat(len(ids), 1)).sum(1).view(len(ids), -1)
    key = out.tokens[:, : V**T, 0] * V + out.tokens[:, : V**T, 1]  # row of `every` of each beam
    assert all(sorted(row.tolist()) == list(range(V**T)) for row in key)
    torch.testing.assert_close(out.scores[:, : V**T], exact.gather(1, key), atol=1e-4, rtol=1e-4)
    assert (out.scores[:, : V**T].diff(dim=1) <= 0).all()
    assert torch.isinf(out.scores[:, V**T:]).all() and (out.tokens[:, V**T:] == 0).all()
