"""TokenLayout, T5 and GPT: known answers, cache vs recomputation, padding invariance."""

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modules.tokens import BOS, EOS, PAD, TokenLayout
from modules.transformers.generation import shift_right, target_log_probs
from modules.transformers.gpt import GPT, GPTConfig, left_align
from modules.transformers.layers import cpu_keep_mask, dropout, dropout_unscaled
from modules.transformers.t5 import T5, T5Config, relative_position_bucket

LAYOUT = TokenLayout((4, 5, 3), num_user_buckets=7)



def tiny_t5(layout=LAYOUT, **kw) -> T5:
    cfg = dict(vocab_size=layout.vocab_size, output_vocab_size=layout.output_vocab_size, d_model=32,
               num_heads=2, d_head=24, d_ff=64, num_encoder_layers=2, num_decoder_layers=2)
    return T5(T5Config(**{**cfg, **kw}))


def tiny_gpt(layout=LAYOUT, **kw) -> GPT:
    cfg = dict(vocab_size=layout.vocab_size, output_vocab_size=layout.output_vocab_size, d_model=32,
               num_heads=2, d_head=24, d_ff=64, num_layers=3)
    return GPT(GPTConfig(**{**cfg, **kw}))


MODELS = {
    "t5-tied": lambda: tiny_t5(),
    "t5-untied-full-vocab": lambda: tiny_t5(tie_embeddings=False, output_vocab_size=None),
    "gpt-gelu": lambda: tiny_gpt(),
    "gpt-swiglu-untied": lambda: tiny_gpt(activation="swiglu", tie_embeddings=False),
}


def random_inputs(seed: int, n: int = 5, num_items: int = 12, H: int = 4, layout=LAYOUT):
    g = torch.Generator().manual_seed(seed)
    codes = torch.stack([torch.randint(0, s, (num_items,), generator=g) for s in layout.codebook_sizes], 1)
    lengths = torch.randint(0, H + 1, (n,), generator=g)
    history = torch.randint(0, num_items, (n, H), generator=g)
    history[torch.arange(H)[None, :] >= lengths[:, None]] = -1
    ids, mask = layout.encode_history(history, codes, user=torch.arange(n) * 3)
    return ids, mask, codes, g


# ---------------------------------------------------------------------- TokenLayout
def test_layout_offsets_and_sizes():
    assert LAYOUT.offsets == (3, 7, 12)
    assert LAYOUT.user_offset == 15 and LAYOUT.output_vocab_size == 15 and LAYOUT.vocab_size == 22
    assert (PAD, BOS, EOS) == (0, 1, 2)


def test_encode_history_known_answer():
    codes = torch.tensor([[0, 0, 0], [3, 4, 2], [1, 2, 1]])
    history = torch.tensor([[1, 2, -1], [-1, -1, -1]])
    ids, mask = LAYOUT.encode_history(history, codes, user=torch.tensor([9, 3]))
    assert ids.tolist() == [[15 + 2, 6, 11, 14, 4, 9, 13, 0, 0, 0], [15 + 3] + [0] * 9]
    assert mask.tolist() == [[True] * 7 + [False] * 3, [True] + [False] * 9]
    ids, mask = LAYOUT.encode_history(history, codes)
    assert ids.shape == (2, 9) and mask.sum().item() == 6


def test_encode_target_and_round_trip():
    codes = torch.tensor([[0, 0, 0], [3, 4, 2], [1, 2, 1]])
    labels = LAYOUT.encode_target(torch.tensor([2, 1]), codes)
    assert labels.tolist() == [[4, 9, 13], [6, 11, 14]]
    assert LAYOUT.encode_target(torch.tensor([0]), codes, eos=True).tolist() == [[3, 7, 12, EOS]]
    assert torch.equal(LAYOUT.tokens_to_codes(LAYOUT.codes_to_tokens(codes)), codes)
    assert TokenLayout.from_dict(LAYOUT.to_dict()) == LAYOUT
    with pytest.raises(ValueError, match="no code of its level"):
        LAYOUT.tokens_to_codes(torch.tensor([[3, 3, 12]]))


@pytest.mark.parametrize("history, match", [
    ([[0, -1, 1]], "after a -1"), ([[5, 0, 0]], "outside"), ([[-2, 0, 0]], "outside")])
def test_encode_history_rejects_bad_input(history, match):
    codes = torch.tensor([[0, 0, 0], [3, 4, 2]])
    with pytest.raises(ValueError, match=match):
        LAYOUT.encode_history(torch.tensor(history), codes)
    with pytest.raises(ValueError, match="item_codes"):
        LAYOUT.encode_history(torch.tensor([[0]]), torch.tensor([[0, 9, 0]]))


# ---------------------------------------------------------------------- relative position buckets
def hf_relative_position_bucket(relative_position, bidirectional=True, num_buckets=32, max_distance=128):
    """Hugging Face transformers' T5Attention._relative_position_bucket, verbatim."""
    relative_buckets = 0
    if bidirectional:
        num_buckets //= 2
        relative_buckets += (relative_position > 0).to(torch.long) * num_buckets
        relative_position = torch.abs(relative_position)
    else:
        relative_position = -torch.min(relative_position, torch.zeros_like(relative_position))
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    relative_position_if_large = max_exact + (
        torch.log(relative_position.float() / max_exact)
        / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)
    ).to(torch.long)
    relative_position_if_large = torch.min(
        relative_position_if_large, torch.full_like(relative_position_if_large, num_buckets - 1)
    )
    relative_buckets += torch.where(is_small, relative_position, relative_position_if_large)
    return relative_buckets


def test_relative_position_bucket_known_values():
    # Bidirectional, 32 buckets, max distance 128: 16 per sign, 8 exact, then
    # 8 + floor(log(dist / 8) / log(128 / 8) * 8), capped at 15; positive offsets + 16.
    known = {0: 0, 1: 17, -1: 1, 5: 21, -7: 7, 8: 24, 9: 24, 12: 25, 16: 26, 20: 26, -20: 10,
             32: 28, 64: 30, 127: 31, 200: 31, -200: 15}
    rel = torch.tensor(list(known))
    assert relative_position_bucket(rel).tolist() == list(known.values())
    # Causal: only looking back counts; 16 exact, then 16 + floor(log(dist / 16) / log(8) * 16).
    known = {1: 0, 5: 0, 0: 0, -1: 1, -15: 15, -16: 16, -20: 17, -32: 21, -64: 26, -127: 31, -1000: 31}
    rel = torch.tensor(list(known))
    assert relative_position_bucket(rel, bidirectional=False).tolist() == list(known.values())


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets, max_distance", [(32, 128), (8, 20), (64, 512)])
def test_relative_position_bucket_matches_hf(bidirectional, num_buckets, max_distance):
    rel = torch.arange(-1000, 1001)
    assert torch.equal(relative_position_bucket(rel, bidirectional, num_buckets, max_distance),
                       hf_relative_position_bucket(rel, bidirectional, num_buckets, max_distance))


# ---------------------------------------------------------------------- models
@pytest.mark.parametrize("name", MODELS)
@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_kv_cache_matches_full_recomputation(name, seed):
    """Decode 6 tokens (past the cache's initial capacity of 4) with beams that split and
    get reordered; every step's log-probs equal a full teacher-forced forward."""
    ids, mask, codes, g = random_inputs(seed)
    torch.manual_seed(seed)
    model = MODELS[name]().eval()
    n, V, T = ids.shape[0], model.config.output_vocab_size, 6
    seq = torch.randint(3, V, (n, 3, T), generator=g)  # 3 continuations per user
    seq[:, :, 0] = BOS
    seq[:, 1:, :2] = seq[:, :1, :2]  # they share their first 2 tokens: one beam, then split
    order = torch.arange(3).expand(n, 3)  # which continuation each beam follows
    steps = []
    with torch.no_grad():
        state = model.start_decoding(ids, mask)
        for t in range(T):
            if t == 2:
                state, order = state.reorder(torch.zeros(n, 3, dtype=torch.long)), torch.arange(3).expand(n, 3)
            if t == 4:  # permute the beams: beam j now continues old beam perm[j]
                perm = torch.tensor([2, 0, 1]).expand(n, 3)
                state, order = state.reorder(perm), order.gather(1, perm)
            beams = 1 if t < 2 else 3
            tokens = seq.gather(1, order[:, :beams, None].expand(-1, -1, T))[:, :, t]
            lp, state = model.step(state, tokens)
            # Back to continuation order (before the split, beam 0 stands for all three).
            steps.append(lp.expand(-1, 3, -1) if beams == 1 else lp.gather(1, order.argsort(1)[..., None].expand(-1, -1, V)))
        for c in range(3):
            full = model(ids, mask, seq[:, c]).log_softmax(-1)
            inc = torch.stack([lp[:, c] for lp in steps], dim=1)
            torch.testing.assert_close(inc, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_padding_does_not_change_outputs(name):
    ids, mask, codes, g = random_inputs(1)
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    dec = torch.randint(3, model.config.output_vocab_size, (ids.shape[0], 3), generator=g)
    dec[:, 0] = BOS
    with torch.no_grad():
        ref = model(ids, mask, dec)
        # Append 6 padded positions holding arbitrary tokens; and rewrite existing pad tokens.
        junk = torch.randint(0, LAYOUT.vocab_size, (ids.shape[0], 6), generator=g)
        ids2 = torch.cat([ids.masked_fill(~mask, 5), junk], dim=1)
        mask2 = torch.cat([mask, torch.zeros_like(junk, dtype=torch.bool)], dim=1)
        torch.testing.assert_close(model(ids2, mask2, dec), ref, atol=1e-5, rtol=1e-5)
        assert not model(ids, mask, dec).isnan().any()
        state = model.start_decoding(ids2, mask2)
        lp, _ = model.step(state, torch.full((ids.shape[0], 1), BOS))
        torch.testing.assert_close(lp[:, 0], ref[:, 0].log_softmax(-1), atol=1e-5, rtol=1e-5)


def test_left_align_keeps_token_order():
    ids = torch.tensor([[5, 6, 7, 0, 0], [8, 0, 0, 0, 0], [1, 2, 3, 4, 9]])
    mask = ids != 0
    out, keep = left_align(ids, mask)
    assert out.tolist() == [[0, 0, 5, 6, 7], [0, 0, 0, 0, 8], [1, 2, 3, 4, 9]]
    assert torch.equal(keep, out != 0)


@pytest.mark.parametrize("name", MODELS)
def test_training_step_gives_finite_grads_everywhere(name):
    ids, mask, codes, g = random_inputs(2)
    ids[0], mask[0] = 0, False  # a row with nothing to attend to must not produce NaN
    torch.manual_seed(0)
    model = MODELS[name]().train()
    labels = LAYOUT.encode_target(torch.randint(0, len(codes), (ids.shape[0],), generator=g), codes)
    logits = model(ids, mask, shift_right(labels))
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    # The decoder's relative position bias learns (T5 computes it once and shares it).
    if isinstance(model, T5):
        assert model.decoder_bias.embedding.weight.grad.abs().sum() > 0
        assert model.encoder_bias.embedding.weight.grad.abs().sum() > 0
    # Dropout is active in training and off in eval.
    with torch.no_grad():
        assert not torch.equal(model(ids, mask, labels), model(ids, mask, labels))
        model.eval()
        assert torch.equal(model(ids, mask, labels), model(ids, mask, labels))


def test_target_log_probs_are_normalised_over_output_vocab():
    ids, mask, codes, g = random_inputs(3)
    model = tiny_t5().eval()
    n = ids.shape[0]
    with torch.no_grad():
        # Summing p(label) over every possible first token gives 1.
        first = torch.arange(LAYOUT.output_vocab_size)
        rep = lambda t: t.repeat_interleave(len(first), 0)  # noqa: E731
        labels = torch.stack([first.repeat(n), torch.full((n * len(first),), 5)], dim=1)
        lp = target_log_probs(model, rep(ids), rep(mask), labels)[:, 0].view(n, -1)
        torch.testing.assert_close(lp.exp().sum(1), torch.ones(n))


def test_config_round_trip_and_t5_init_scale():
    model = tiny_t5()
    assert T5Config.from_dict(model.config.to_dict()) == model.config
    assert GPTConfig.from_dict(tiny_gpt().config.to_dict()) == tiny_gpt().config
    # T5 init: q has std (d_model * d_head)^-0.5, k and v d_model^-0.5.
    w = model.encoder_layers[0].attn.qkv.weight
    inner = 2 * 24
    assert abs(w[:inner].std().item() - (32 * 24) ** -0.5) < 0.01
    assert abs(w[inner:].std().item() - 32**-0.5) < 0.03


# ---------------------------------------------------------------------- dropout
def test_cpu_keep_mask_rate_and_reproducibility():
    torch.manual_seed(0)
    keep = cpu_keep_mask((1000, 1001), 0.1)
    assert keep.shape == (1000, 1001) and keep.dtype == torch.bool
    # Binomial std of the rate is 3e-4; the quantised p differs from 0.1 by 6e-6.
    assert abs(keep.float().mean().item() - 0.9) < 2e-3
    # Rows are not copies of each other (each 16-bit lane is its own draw).
    assert not torch.equal(keep[0], keep[1])
    torch.manual_seed(0)
    assert torch.equal(cpu_keep_mask((1000, 1001), 0.1), keep)
    assert cpu_keep_mask((3, 5), 0.0).all() and not cpu_keep_mask((3, 5), 65535 / 65536).any()
    with pytest.raises(ValueError, match="dropout p"):
        cpu_keep_mask((3,), 1.0)


@pytest.mark.parametrize("relu", [False, True])
def test_dropout_matches_its_mask_and_grad(relu):
    x = torch.randn(37, 11, requires_grad=True)
    torch.manual_seed(1)
    out, scale = dropout_unscaled(x, 0.25, True, relu=relu)
    torch.manual_seed(1)
    keep = cpu_keep_mask(x.shape, 0.25)
    ref = torch.where(keep, x.relu() if relu else x, 0.0)
    assert scale == 1 / 0.75 and torch.equal(out, ref)
    out.sum().backward()
    expected = keep & (x > 0) if relu else keep
    assert torch.equal(x.grad, expected.float())
    assert torch.equal(dropout(x, 0.25, False), x)
    torch.manual_seed(2)
    y = dropout(x, 0.25, True)
    torch.manual_seed(2)
    assert torch.allclose(y, torch.where(cpu_keep_mask(x.shape, 0.25), x / 0.75, 0.0))


@pytest.mark.parametrize("name", ["t5-tied", "gpt-gelu"])
def test_cpu_training_attention_path_matches_sdpa(name):
    """Without dropout, train mode (manual attention on CPU) gives eval mode's (SDPA) outputs."""
    ids, mask, codes, g = random_inputs(4)
    torch.manual_seed(0)
    model = (tiny_t5 if name.startswith("t5") else tiny_gpt)(dropout=0.0)
    dec = torch.randint(3, LAYOUT.output_vocab_size, (ids.shape[0], 3), generator=g)
    train_out = model.train()(ids, mask, dec)
    with torch.no_grad():
        eval_out = model.eval()(ids, mask, dec)
    torch.testing.assert_close(train_out, eval_out, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------- all-positions GPT training
def test_all_positions_loss_equals_sliding_windows_summed():
    """One causal pass over a whole sequence scores every target exactly as one sliding window
    per target does (fp32, no dropout), with and without the user token, ragged lengths."""
    from modules.objectives import all_positions_loss, sliding_window_loss

    torch.manual_seed(0)
    model = tiny_gpt(dropout=0.0).eval()
    codes = torch.tensor(list(itertools.product(*(range(c) for c in LAYOUT.codebook_sizes))))[torch.randperm(60)[:30]]
    items = torch.full((4, 7), -1)
    for row, length in enumerate([7, 2, 5, 3]):
        items[row, :length] = torch.randperm(30)[:length]
    for user in (None, torch.tensor([3, 1, 4, 1])):
        total, count = all_positions_loss(model, LAYOUT, codes, items, user, chunk=2)
        ref, ref_count = torch.zeros(()), 0
        for row in range(4):
            length = int((items[row] >= 0).sum())
            for t in range(1, length):
                history = torch.full((1, 6), -1)
                history[0, :t] = items[row, :t]
                loss, n = sliding_window_loss(model, LAYOUT, codes, history, items[row, t: t + 1],
                                              None if user is None else user[row: row + 1])
                ref, ref_count = ref + loss, ref_count + n
        assert count == ref_count == (6 + 1 + 4 + 2) * LAYOUT.num_levels
        torch.testing.assert_close(total, ref, atol=1e-4, rtol=1e-5)
