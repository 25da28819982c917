"""RASTP token pruning in the T5 encoder: the kept count (floor(L / 3) for a third), which tokens
are kept (attention received x output L1 norm, on a hand-made layer), exactness when off, KV
cache, beam search."""

import itertools
import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modules.beam_search import PrefixTrie, beam_search
from modules.tokens import BOS, TokenLayout
from modules.transformers.generation import target_log_probs
from modules.transformers.layers import Attention, additive_mask
import modules.transformers.t5 as t5_module
from modules.transformers.t5 import T5, T5Config, keep_fraction, rastp_select

SIZES = (4, 4, 4)
LAYOUT = TokenLayout(SIZES, num_user_buckets=5)
SMALL = dict(d_model=32, num_heads=2, d_head=16, d_ff=64, num_encoder_layers=3, num_decoder_layers=2)
# Each ratio as given and the fraction it stands for (0.333 is a third: RASTP keeps floor(L / 3)).
MEANT = {0.1: Fraction(1, 10), 0.29: Fraction(29, 100), 0.333: Fraction(1, 3), "1/3": Fraction(1, 3),
         0.5: Fraction(1, 2), 1.0: Fraction(1)}
RATIOS = list(MEANT)


def expected_count(length: int, ratio) -> int:
    """max(1, floor(L x the fraction the ratio stands for)), in exact arithmetic."""
    return max(1, math.floor(MEANT[ratio] * length))


def make_model(seed: int, **kw) -> T5:
    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=LAYOUT.vocab_size, output_vocab_size=LAYOUT.output_vocab_size, **{**SMALL, **kw})
    return T5(cfg).eval()


def make_problem(seed: int, num_items: int = 30, n: int = 6, H: int = 6):
    g = torch.Generator().manual_seed(seed)
    every = torch.tensor(list(itertools.product(*(range(s) for s in SIZES))))
    codes = every[torch.randperm(len(every), generator=g)[:num_items]]
    lengths = torch.randint(1, H + 1, (n,), generator=g)
    history = torch.randint(0, num_items, (n, H), generator=g)
    history[torch.arange(H)[None, :] >= lengths[:, None]] = -1
    ids, mask = LAYOUT.encode_history(history, codes, user=torch.arange(n))
    return codes, ids, mask, g


# ----------------------------------------------------------------------------- selection


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 5), S=st.integers(1, 25), ratio=st.sampled_from(RATIOS))
def test_select_keeps_the_top_real_tokens_in_order(seed, n, S, ratio):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, S + 1, (n,), generator=g)
    mask = torch.arange(S)[None, :] < lengths[:, None]
    scores = torch.stack([torch.randperm(S, generator=g).float() for _ in range(n)])  # distinct
    index, keep = rastp_select(scores, mask, ratio)
    assert index.shape == keep.shape and index.shape[1] == max(expected_count(int(L), ratio) for L in lengths)
    for b in range(n):
        L = int(lengths[b])
        kept = index[b][keep[b]].tolist()
        if L == 0:
            assert kept == []  # one masked slot, no real token to keep
            continue
        m = expected_count(L, ratio)
        assert len(kept) == m
        assert kept == sorted(kept) and len(set(kept)) == m  # increasing original order
        assert all(i < L for i in kept)  # real tokens only
        naive = sorted(range(L), key=lambda i: -scores[b, i].item())[:m]
        assert kept == sorted(naive)
        assert keep[b, :m].all() and not keep[b, m:].any()  # kept slots first, fillers after


@pytest.mark.parametrize("ratio", [0.333, "1/3", 1 / 3, 0.3333, " 1/3 "])
def test_a_third_keeps_floor_of_length_over_three(ratio):
    lengths = torch.arange(1, 201)
    mask = torch.arange(200)[None, :] < lengths[:, None]
    _, keep = rastp_select(torch.rand(200, 200), mask, ratio)
    assert keep.sum(1).tolist() == [max(1, L // 3) for L in range(1, 201)]
    assert int(keep[80].sum()) == 27  # 81 tokens (a full 20-item history): 27, not floor(0.333 x 81) = 26


def test_keep_fraction_reads_ratios_as_fractions():
    assert keep_fraction(0.333) == keep_fraction("1/3") == keep_fraction(1 / 3) == Fraction(1, 3)
    assert keep_fraction(0.29) == Fraction(29, 100) and keep_fraction("0.25") == Fraction(1, 4)
    assert keep_fraction(0.667) == Fraction(2, 3) and keep_fraction(1) == 1
    for bad in (0.0, 0.004, 1.5, "2/1", "a third", "1/0", float("nan"), None):
        with pytest.raises(ValueError, match="keep_ratio"):
            keep_fraction(bad)
    # Configs saved with the float (or the string) load and keep the same count.
    cfg = T5Config(vocab_size=10, prune_after_layer=1, num_encoder_layers=1, keep_ratio="1/3")
    assert T5Config.from_dict(cfg.to_dict()).keep_ratio == "1/3"


def test_select_known_answer():
    scores = torch.tensor([[5.0, 1.0, 9.0, 3.0, 7.0, 0.0], [2.0, 8.0, 100.0, 100.0, 100.0, 100.0]])
    mask = torch.tensor([[True] * 6, [True, True, False, False, False, False]])
    index, keep = rastp_select(scores, mask, 0.5)
    assert index[0].tolist() == [0, 2, 4]  # top-3 of 6 in order, padding of row 1 never chosen
    assert index[1, 0].item() == 1 and keep.tolist() == [[True] * 3, [True, False, False]]


def test_received_attention_matches_explicit_softmax():
    torch.manual_seed(0)
    attn = Attention(32, 2, 16, scale=1.0).eval()
    x = torch.randn(3, 7, 32)
    keep = torch.arange(7)[None, :] < torch.tensor([[7], [4], [1]])
    mask = additive_mask(keep[:, None, None, :])
    with torch.no_grad():
        out, received = attn.forward_received(x, mask, keep)
        torch.testing.assert_close(out, attn(x, mask), atol=1e-5, rtol=1e-5)
        q, k, _ = attn.project_qkv(x)
        probs = (q @ k.transpose(-1, -2) + mask).softmax(-1)  # (B, h, S, S)
    for b in range(3):
        for j in range(7):
            ref = sum(probs[b, h, i, j] for h in range(2) for i in range(7) if keep[b, i])
            assert received[b, j].item() == pytest.approx(float(ref), abs=1e-5)
    assert (received[~keep] < 1e-6).all()  # padding keys get (numerically) nothing


# ----------------------------------------------------------------------------- which tokens


def hand_made_pruner() -> T5:
    """One encoder layer, 1 head of size 1, that prunes to a third after it, with hand-set weights:

    - token embeddings c x (1, 1, 0, 0) ("loud") or c x (1, 0, 1, 0) ("quiet"): after the
      pre-attention RMSNorm every token is (sqrt 2, sqrt 2, 0, 0) or (sqrt 2, 0, sqrt 2, 0);
    - q = dim 0, k = (ln 3 / 2) x dim 1, so every query's logit is ln 3 for a loud key and 0 for
      a quiet one: each real query gives a loud key 3 / Z and a quiet key 1 / Z (Z = 3 x loud +
      quiet keys of its row); no relative position bias;
    - the attention output and the MLP output are zero, so the layer's output is its input and a
      token's output L1 norm is 2c.
    The RASTP score of a token is then (real tokens) x (3 or 1) / Z x 2c: known in advance.
    """
    torch.manual_seed(0)
    model = T5(T5Config(vocab_size=16, d_model=4, num_heads=1, d_head=1, d_ff=4, num_encoder_layers=1,
                        num_decoder_layers=1, dropout=0.0, prune_after_layer=1, keep_ratio="1/3")).eval()
    layer = model.encoder_layers[0]
    with torch.no_grad():
        layer.attn.qkv.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, math.log(3) / 2, 0, 0], [0, 0, 0, 0]]))
        layer.attn.o.weight.zero_()
        layer.ffn.wo.weight.zero_()
        model.encoder_bias.embedding.weight.zero_()
    return model


# token id -> (loud, output L1 norm); id 9 is padding with a large norm (never kept all the same)
HAND_TOKENS = {1: (False, 2.0), 2: (True, 1.0), 3: (False, 5.0), 4: (True, 0.5), 5: (False, 1.0), 6: (True, 1.5),
               9: (True, 40.0)}


def test_pruning_keeps_the_tokens_with_most_attention_times_norm(monkeypatch):
    model = hand_made_pruner()
    with torch.no_grad():
        for token, (loud, norm) in HAND_TOKENS.items():
            direction = torch.tensor([1.0, 1.0, 0, 0] if loud else [1.0, 0, 1.0, 0])
            model.embed.weight[token] = direction * norm / 2
    ids = torch.tensor([[1, 2, 3, 4, 5, 6], [1, 2, 5, 9, 9, 9]])
    mask = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
    seen = []

    def spy(scores, attention_mask, keep_ratio):
        seen.append(scores.clone())
        return rastp_select(scores, attention_mask, keep_ratio)

    monkeypatch.setattr(t5_module, "rastp_select", spy)
    with torch.no_grad():
        memory, kept = model.encode_memory(ids, mask)
    # Row 0: Z = 3 x 3 + 3 = 12, received = 6 x (3 or 1) / 12, times the L1 norms 2, 1, 5, 0.5, 1, 1.5.
    # Row 1: Z = 3 + 2 = 5, received = 3 x (3 or 1) / 5, times 2, 1, 1; padding receives nothing.
    torch.testing.assert_close(seen[0][0], torch.tensor([1.0, 1.5, 2.5, 0.75, 0.5, 2.25]), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(seen[0][1, :3], torch.tensor([1.2, 1.8, 0.6]), atol=1e-4, rtol=1e-4)
    assert (seen[0][1, 3:].abs() < 1e-4).all()
    # Keep 6 // 3 = 2 and 3 // 3 = 1. By score: tokens 2 and 5 of row 0 (not the two most attended,
    # 1, 3, 5, nor the two largest norms, 0 and 2, nor the first two), token 1 of row 1 (the largest
    # norm is token 0's, and padding's is larger still).
    assert kept.tolist() == [[True, True], [True, False]]
    with torch.no_grad():
        expected = model.encoder_norm(model.embed(torch.tensor([[3, 6], [2, 2]])))
    torch.testing.assert_close(memory[0], expected[0])
    torch.testing.assert_close(memory[1, :1], expected[1, :1])


# ----------------------------------------------------------------------------- model


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("after", [1, 2, 3])
def test_encoder_keeps_floor_of_real_tokens(ratio, after):
    _, ids, mask, _ = make_problem(1)
    model = make_model(0, prune_after_layer=after, keep_ratio=ratio)
    with torch.no_grad():
        memory, kept = model.encode_memory(ids, mask)
    counts = [expected_count(int(L), ratio) for L in mask.sum(1)]
    assert kept.sum(1).tolist() == counts
    assert memory.shape == (ids.shape[0], max(counts), SMALL["d_model"])


def test_pruning_off_reproduces_the_unpruned_model_exactly():
    _, ids, mask, g = make_problem(2)
    off = make_model(3)
    on = make_model(3, prune_after_layer=2, keep_ratio=0.333)
    assert off.state_dict().keys() == on.state_dict().keys()  # no new weights: checkpoints load either way
    dec = torch.randint(3, LAYOUT.output_vocab_size, (ids.shape[0], 3), generator=g)
    dec[:, 0] = BOS
    with torch.no_grad():
        # The encoder written out as before RASTP existed.
        S = ids.shape[1]
        pos = torch.arange(S)
        enc_mask = off.encoder_bias(pos, pos) + additive_mask(mask[:, None, None, :].bool())
        x = off.embed(ids)
        for layer in off.encoder_layers:
            x = layer(x, enc_mask)
        ref = off.decode(dec, *off.memory(off.encoder_norm(x), mask))
        assert torch.equal(off(ids, mask, dec), ref)
        assert not torch.equal(on(ids, mask, dec), ref)  # and the option does something


def test_keep_ratio_one_only_drops_padding():
    # Kept tokens keep their original positions, so dropping only (fully masked) padding keys
    # changes nothing but rounding.
    _, ids, mask, g = make_problem(4)
    off = make_model(5)
    on = make_model(5, prune_after_layer=1, keep_ratio=1.0)
    dec = torch.randint(3, LAYOUT.output_vocab_size, (ids.shape[0], 3), generator=g)
    dec[:, 0] = BOS
    with torch.no_grad():
        torch.testing.assert_close(on(ids, mask, dec), off(ids, mask, dec), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("after", [1, 3])
def test_teacher_forcing_equals_cached_decoding_with_pruning(after):
    _, ids, mask, g = make_problem(6)
    model = make_model(7, prune_after_layer=after, keep_ratio=0.333)
    n, V, T = ids.shape[0], LAYOUT.output_vocab_size, 4
    seq = torch.randint(3, V, (n, T), generator=g)
    seq[:, 0] = BOS
    with torch.no_grad():
        full = model(ids, mask, seq).log_softmax(-1)
        state = model.start_decoding(ids, mask)
        steps = []
        for t in range(T):
            lp, state = model.step(state, seq[:, t : t + 1])
            steps.append(lp[:, 0])
    torch.testing.assert_close(torch.stack(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_pruned_training_step_has_finite_grads():
    _, ids, mask, g = make_problem(8)
    model = make_model(9, prune_after_layer=2, keep_ratio=0.5, dropout=0.1).train()
    labels = torch.randint(3, LAYOUT.output_vocab_size, (ids.shape[0], 3), generator=g)
    loss = -target_log_probs(model, ids, mask, labels).mean()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.encoder_layers[0].attn.qkv.weight.grad.abs().sum() > 0  # gradients reach below the cut


def test_beam_search_with_pruning_returns_valid_items_with_true_scores():
    codes, ids, mask, _ = make_problem(10, n=8)
    model = make_model(11, prune_after_layer=2, keep_ratio=0.333)
    trie = PrefixTrie(codes, SIZES)
    out = beam_search(model, ids, mask, trie, LAYOUT, beam_size=6, top_k=4)
    assert ((out.items >= 0) & (out.items < len(codes))).all()
    assert all(len(set(row)) == len(row) for row in out.items.tolist())
    # With a beam as wide as the catalogue: exactly the exhaustive top-10 of the pruned model.
    wide = beam_search(model, ids, mask, trie, LAYOUT, beam_size=len(codes), top_k=10)
    labels = LAYOUT.codes_to_tokens(codes).repeat(len(ids), 1)
    with torch.no_grad():
        lp = target_log_probs(model, ids.repeat_interleave(len(codes), 0), mask.repeat_interleave(len(codes), 0), labels)
    best = lp.sum(-1).view(len(ids), -1).topk(10, dim=1)
    assert torch.equal(wide.items, best.indices)
    torch.testing.assert_close(wide.scores, best.values, atol=1e-4, rtol=1e-4)


def test_config_validation():
    with pytest.raises(ValueError, match="prune_after_layer"):
        make_model(0, prune_after_layer=4)
    with pytest.raises(ValueError, match="keep_ratio"):
        make_model(0, prune_after_layer=1, keep_ratio=0.0)
    assert T5Config.from_dict(make_model(0, prune_after_layer=2).config.to_dict()).prune_after_layer == 2
