import dataclasses
import itertools
import math
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from data.dataset import Examples
from modules.beam_search import PrefixTrie
from modules.evaluation import MetricAccumulator, evaluate_generative, popularity_ranking, ranking_metrics
from modules.tokens import BOS, TokenLayout


def naive_metrics(ranked, target, ks):
    """Slow per-user reference straight from the definitions."""
    ranked = np.asarray(ranked)
    target = np.asarray(target)
    out = {}
    for k in ks:
        rec, ndcg = [], []
        for row, t in zip(ranked, target):
            r = None
            for i, item in enumerate(row[:k]):
                if item >= 0 and item == t:
                    r = i
                    break
            rec.append(0.0 if r is None else 1.0)
            ndcg.append(0.0 if r is None else 1.0 / math.log2(r + 2))
        out[f"recall@{k}"] = sum(rec) / len(rec)
        out[f"ndcg@{k}"] = sum(ndcg) / len(ndcg)
    return out


def assert_close(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == pytest.approx(b[key], abs=1e-12), key


def test_single_user_known_answers():
    ranked = np.array([[7, 1, 2, 3, 4]])
    assert ranking_metrics(ranked, [7], ks=(1, 5)) == {
        "recall@1": 1.0, "ndcg@1": 1.0, "recall@5": 1.0, "ndcg@5": 1.0,
    }
    m = ranking_metrics(ranked, [2], ks=(1, 5))  # rank 2 -> 1/log2(4) = 0.5
    assert m == {"recall@1": 0.0, "ndcg@1": 0.0, "recall@5": 1.0, "ndcg@5": 0.5}
    m = ranking_metrics(ranked, [9], ks=(1, 5))  # missing
    assert m == {"recall@1": 0.0, "ndcg@1": 0.0, "recall@5": 0.0, "ndcg@5": 0.0}


def test_three_users_by_hand():
    ranked = torch.tensor(
        [
            [5, 0, 1, 2, 3, 4, 6, 7, 8, 9],  # target 5 at rank 0
            [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],  # target 3 at rank 3
            [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],  # target 7 at rank 7
        ]
    )
    m = ranking_metrics(ranked, torch.tensor([5, 3, 7]))
    assert list(m) == ["recall@1", "ndcg@1", "recall@5", "ndcg@5", "recall@10", "ndcg@10"]
    assert m["recall@1"] == pytest.approx(1 / 3)
    assert m["ndcg@1"] == pytest.approx(1 / 3)
    assert m["recall@5"] == pytest.approx(2 / 3)
    assert m["ndcg@5"] == pytest.approx((1 + 1 / math.log2(5)) / 3)  # (1 + 0.430677) / 3
    assert m["ndcg@5"] == pytest.approx(0.476892, abs=1e-6)
    assert m["recall@10"] == pytest.approx(1.0)
    assert m["ndcg@10"] == pytest.approx((1 + 1 / math.log2(5) + 1 / math.log2(9)) / 3)
    assert m["ndcg@10"] == pytest.approx(0.582047, abs=1e-6)


def test_minus_one_never_hits_and_first_occurrence_counts():
    ranked = np.array([[-1, -1, 4], [3, 3, -1]])
    m = ranking_metrics(ranked, np.array([4, 3]), ks=(1, 3))
    assert m["recall@1"] == 0.5 and m["ndcg@1"] == 0.5
    assert m["recall@3"] == 1.0
    assert m["ndcg@3"] == pytest.approx((0.5 + 1.0) / 2)
    with pytest.raises(ValueError, match="target"):
        ranking_metrics(ranked, np.array([-1, 3]), ks=(1,))


def test_wider_ranking_ignores_extra_columns():
    ranked = np.array([[1, 2, 3]])
    assert ranking_metrics(ranked, [3], ks=(2,)) == {"recall@2": 0.0, "ndcg@2": 0.0}


@pytest.mark.parametrize(
    "ranked, target, ks, match",
    [
        (np.zeros((3, 4), dtype=np.int64), np.zeros(3, dtype=np.int64), (1, 5), "K=4"),
        (np.zeros((3, 5), dtype=np.int64), np.zeros(2, dtype=np.int64), (1, 5), "target"),
        (np.zeros((3, 5), dtype=np.int64), np.zeros((3, 1), dtype=np.int64), (1,), "target"),
        (np.zeros(5, dtype=np.int64), np.zeros(5, dtype=np.int64), (1,), r"\(n, K\)"),
        (np.zeros((0, 5), dtype=np.int64), np.zeros(0, dtype=np.int64), (1,), "n == 0"),
        (np.zeros((3, 5)), np.zeros(3, dtype=np.int64), (1,), "integer"),
        (np.zeros((3, 5), dtype=np.int64), np.zeros(3, dtype=np.int64), (), "ks"),
        (np.zeros((3, 5), dtype=np.int64), np.zeros(3, dtype=np.int64), (0, 1), "ks"),
    ],
)
def test_bad_input_raises(ranked, target, ks, match):
    with pytest.raises(ValueError, match=match):
        ranking_metrics(ranked, target, ks=ks)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 30),
    n_items=st.integers(1, 15),
    extra=st.integers(0, 3),
    seed=st.integers(0, 2**32 - 1),
    as_torch=st.booleans(),
)
def test_matches_naive_reference(n, n_items, extra, seed, as_torch):
    rng = np.random.default_rng(seed)
    ks = (1, 3, 5)
    # Items from -1..n_items-1 with repeats: exercises "no item" and duplicate entries.
    ranked = rng.integers(-1, n_items, size=(n, max(ks) + extra))
    target = rng.integers(0, n_items, size=n)
    expected = naive_metrics(ranked, target, ks)
    if as_torch:
        ranked, target = torch.from_numpy(ranked), torch.from_numpy(target)
    assert_close(ranking_metrics(ranked, target, ks=ks), expected)


def test_accumulator_equals_one_shot():
    rng = np.random.default_rng(0)
    ranked = rng.integers(-1, 50, size=(1000, 10))
    target = rng.integers(0, 50, size=1000)
    ranked[::7, 3] = target[::7]  # make some hits certain
    acc = MetricAccumulator(ks=(1, 5, 10))
    for start in range(0, 1000, 137):  # uneven batches, last one short
        acc.update(torch.from_numpy(ranked[start : start + 137]), target[start : start + 137])
    assert acc.count == 1000
    one_shot = ranking_metrics(ranked, target)
    assert_close(acc.compute(), one_shot)
    assert_close(one_shot, naive_metrics(ranked, target, (1, 5, 10)))
    assert one_shot["recall@5"] > 0.1
    acc.reset()
    with pytest.raises(ValueError, match="update"):
        acc.compute()


def test_popularity_known_answer_and_ties():
    counts = np.array([3, 5, 5, 0, 3, 1])
    top = popularity_ranking(counts, n_users=2, k=4)
    assert top.dtype == np.int64
    np.testing.assert_array_equal(top, [[1, 2, 0, 4], [1, 2, 0, 4]])
    # Fewer items than k: padded with -1, which the metrics treat as "no item".
    np.testing.assert_array_equal(popularity_ranking(np.array([1, 2]), 1, 3), [[1, 0, -1]])


def test_popularity_exclude_global_and_per_user():
    counts = np.array([3, 5, 5, 0, 3, 1])
    np.testing.assert_array_equal(
        popularity_ranking(counts, 2, 3, exclude=np.array([2, 4])), [[1, 0, 5], [1, 0, 5]]
    )
    history = np.array([[1, 2, -1], [-1, -1, -1], [0, 1, 2], [3, 5, 4]])
    np.testing.assert_array_equal(
        popularity_ranking(counts, 4, 3, exclude=history),
        [[0, 4, 5], [1, 2, 0], [4, 5, 3], [1, 2, 0]],
    )
    # Everything excluded but two items: padded with -1.
    np.testing.assert_array_equal(
        popularity_ranking(counts, 1, 3, exclude=np.array([[0, 1, 2, 4]])), [[5, 3, -1]]
    )


@settings(max_examples=60, deadline=None)
@given(
    n_users=st.integers(0, 8),
    n_items=st.integers(1, 12),
    h=st.integers(0, 6),
    k=st.integers(1, 8),
    seed=st.integers(0, 2**32 - 1),
)
def test_popularity_matches_naive(n_users, n_items, h, k, seed):
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 4, size=n_items)  # small range: many ties
    exclude = rng.integers(-1, n_items, size=(n_users, h))
    got = popularity_ranking(counts, n_users, k, exclude=exclude)
    ordered = sorted(range(n_items), key=lambda i: (-counts[i], i))
    for u in range(n_users):
        row = [i for i in ordered if i not in set(exclude[u].tolist())][:k]
        assert got[u].tolist() == row + [-1] * (k - len(row))
    assert got.shape == (n_users, k)


def test_popularity_bad_input():
    with pytest.raises(ValueError, match="n_users"):
        popularity_ranking(np.ones(5), 3, 2, exclude=np.zeros((2, 2), dtype=np.int64))
    with pytest.raises(ValueError, match="outside"):
        popularity_ranking(np.ones(5), 1, 2, exclude=np.array([5]))
    with pytest.raises(ValueError, match="k >= 1"):
        popularity_ranking(np.ones(5), 1, 0)


# ---------------------------------------------------------------- evaluate_generative known answers
# A mock recommender that knows, for each user (recognised by the history it is given), the
# full order it prefers over every code sequence, and a catalogue where some sequences are no
# item. Beam search over it returns exactly that order (see OracleModel), so each user's target
# lands at a rank the test chooses and the metrics have closed-form values.

# Different sizes per level: a token offset taken from the wrong level lands outside its range.
EVAL_SIZES = (3, 2, 3)
ALL_SEQS = list(itertools.product(*(range(s) for s in EVAL_SIZES)))  # 18 code sequences
_perm = np.random.default_rng(7).permutation(len(ALL_SEQS))
ITEM_SEQS = [ALL_SEQS[i] for i in _perm[:13]]  # item_id -> codes, not in sorted code order
INVALID_SEQS = [ALL_SEQS[i] for i in _perm[13:]]  # 5 sequences that are no item
EVAL_CODES = torch.tensor(ITEM_SEQS)
N_EVAL_ITEMS = len(ITEM_SEQS)


def gain(rank: int) -> float:
    """NDCG of a hit at 0-based ``rank`` (one relevant item: ideal DCG = 1)."""
    return 1.0 / math.log2(rank + 2)


@dataclasses.dataclass
class OracleState:
    joint: torch.Tensor  # (n, *EVAL_SIZES) log p(code sequence) of each user
    prefix: torch.Tensor  # (n, b, level) codes chosen so far by each beam
    level: int  # the level the next step scores

    def reorder(self, beam_idx: torch.Tensor) -> "OracleState":
        idx = beam_idx[..., None].expand(-1, -1, self.prefix.shape[-1])
        return dataclasses.replace(self, prefix=self.prefix.gather(1, idx))


class OracleModel(torch.nn.Module):
    """Decoding interface of modules/transformers/generation.py over a known distribution.

    ``answers``: history (tuple of item_ids) -> (user id, order over all code sequences, best
    first). The user's distribution is p(seq) proportional to exp(-rank of seq), and ``step``
    returns its exact conditionals p(code_l | prefix), so a beam's score is log p(seq): any beam
    search that keeps every prefix of the penultimate level (here 6 <= beam_size) returns the
    order itself (constrained: with the non-items removed). The model reads only its inputs;
    targets are never given to it, so a hit means the evaluator paired this history's ranking
    with this history's target.
    """

    def __init__(self, layout: TokenLayout, answers: dict, use_user: bool):
        super().__init__()
        self.layout, self.answers, self.use_user = layout, answers, use_user
        self.code_to_item = {seq: i for i, seq in enumerate(ITEM_SEQS)}
        self.seen = []  # histories in the order the evaluator fed them

    def _read_row(self, ids: torch.Tensor, mask: torch.Tensor):
        tokens = ids[mask].tolist()
        user_token = None
        if tokens and tokens[0] >= self.layout.user_offset:
            user_token, tokens = tokens[0], tokens[1:]
        L = self.layout.num_levels
        assert len(tokens) % L == 0, "history tokens are not whole items"
        codes = self.layout.tokens_to_codes(torch.tensor(tokens).view(-1, L))
        history = tuple(self.code_to_item[tuple(c)] for c in codes.tolist())
        user, order = self.answers[history]
        if self.use_user:
            assert user_token == int(self.layout.user_tokens(torch.tensor(user))), "wrong user token"
        else:
            assert user_token is None, "user token without use_user"
        return history, order

    def start_decoding(self, input_ids, attention_mask):
        joint = torch.empty((input_ids.shape[0], len(ALL_SEQS)))
        for row in range(input_ids.shape[0]):
            history, order = self._read_row(input_ids[row], attention_mask[row])
            self.seen.append(history)
            score = torch.empty(len(ALL_SEQS))
            for rank, seq in enumerate(order):
                score[ALL_SEQS.index(seq)] = -float(rank)
            joint[row] = score.log_softmax(0)
        joint = joint.view(-1, *EVAL_SIZES)  # ALL_SEQS is in row-major (product) order
        return OracleState(joint, torch.zeros((len(joint), 1, 0), dtype=torch.long), 0)

    def step(self, state: OracleState, tokens: torch.Tensor):
        n, b = tokens.shape
        level, prefix = state.level, state.prefix
        if level == 0:
            assert (tokens == BOS).all(), "first step must be fed BOS"
        else:
            codes = tokens - self.layout.offsets[level - 1]
            assert ((codes >= 0) & (codes < EVAL_SIZES[level - 1])).all(), "fed a token of another level"
            prefix = torch.cat([prefix, codes[..., None]], dim=-1)
        assert prefix.shape == (n, b, level)
        # log p(prefix, code_l) = logsumexp of the joint over the levels after l.
        marg = state.joint
        for _ in range(len(EVAL_SIZES) - 1 - level):
            marg = marg.logsumexp(-1)
        marg = marg.reshape(n, -1, EVAL_SIZES[level])  # (n, prefixes of length level, codes)
        flat = torch.zeros((n, b), dtype=torch.long)
        for l in range(level):
            flat = flat * EVAL_SIZES[l] + prefix[..., l]
        rows = marg.gather(1, flat[..., None].expand(-1, -1, EVAL_SIZES[level]))
        cond = rows - rows.logsumexp(-1, keepdim=True)
        out = torch.full((n, b, self.layout.output_vocab_size), float("-inf"))
        off = self.layout.offsets[level]
        out[..., off: off + EVAL_SIZES[level]] = cond
        return out, OracleState(state.joint, prefix, level + 1)


def make_order(rng, target: int, pattern: str) -> list:
    """An order over all code sequences: ``pattern`` spells its start ('T' the target, 'v'
    another item, 'I' a sequence that is no item); then the other items, then the non-items,
    then the target if the pattern has no 'T' (last of 18: outside every top 10)."""
    others = [ITEM_SEQS[i] for i in rng.permutation(N_EVAL_ITEMS) if i != target]
    invalid = [INVALID_SEQS[i] for i in rng.permutation(len(INVALID_SEQS))]
    order = []
    for ch in pattern:
        order.append({"T": lambda: ITEM_SEQS[target], "v": others.pop, "I": invalid.pop}[ch]())
    order += others + invalid + ([] if "T" in pattern else [ITEM_SEQS[target]])
    assert sorted(order) == sorted(ALL_SEQS)
    return order


def make_users(patterns: list[str], targets: list[int], seed: int = 0):
    """Examples with one distinct history per user, and the oracle's answers for them."""
    rng = np.random.default_rng(seed)
    histories, answers = [], {}
    for u, (pattern, target) in enumerate(zip(patterns, targets)):
        while True:  # distinct histories: they are how the oracle tells users apart
            length = int(rng.integers(1, 5))
            h = tuple(int(i) for i in rng.choice(N_EVAL_ITEMS, length, replace=False))
            if h not in answers:
                break
        answers[h] = (1000 + 3 * u, make_order(rng, target, pattern))
        histories.append(h)
    history = np.full((len(patterns), 4), -1, dtype=np.int64)
    for u, h in enumerate(histories):
        history[u, : len(h)] = h
    user = np.array([answers[h][0] for h in histories], dtype=np.int64)
    return Examples(user, history, np.array(targets, dtype=np.int64)), answers


def run_eval(examples, answers, batch_size, use_user=False, unconstrained=False, ks=(1, 5, 10)):
    layout = TokenLayout(EVAL_SIZES, num_user_buckets=7 if use_user else 0)
    model = OracleModel(layout, answers, use_user)
    model.train()
    out = evaluate_generative(model, examples, EVAL_CODES, layout, PrefixTrie(EVAL_CODES, EVAL_SIZES),
                              beam_size=10, top_k=10, batch_size=batch_size, use_user=use_user, ks=ks,
                              unconstrained=unconstrained)
    assert model.training, "evaluate_generative must restore training mode"
    # Every user decoded exactly once (no dropped or repeated batch).
    assert Counter(model.seen) == Counter(tuple(int(i) for i in h if i >= 0) for h in examples.history)
    return out


# Ranks of each user's target among the valid items, 0-based; "" never ranks it (last).
RANK_PATTERNS = [
    "T",  # 0
    "vvvvT",  # 4: last position inside @5
    "vvvvvT",  # 5: first position outside @5
    "v" * 9 + "T",  # 9: last position inside @10
    "v" * 10 + "T",  # 10: first position outside @10
    "",  # never
    "vT",  # 1
    "T",  # 0
    "vvvT",  # 3
    "T",  # 0: the last user, alone in the last batch when batch_size = 3
]
RANK_TARGETS = [4, 11, 0, 7, 2, 9, 12, 1, 5, 8]  # all different: a misaligned target misses


@pytest.mark.parametrize("use_user", [False, True])
@pytest.mark.parametrize("batch_size", [1, 3, 4, 10, 64])
def test_evaluate_generative_known_ranks(batch_size, use_user):
    examples, answers = make_users(RANK_PATTERNS, RANK_TARGETS)
    m = run_eval(examples, answers, batch_size, use_user=use_user)
    at5 = 3 * gain(0) + gain(4) + gain(1) + gain(3)
    expected = {
        "recall@1": 3 / 10,
        "ndcg@1": 3 / 10,
        "recall@5": 6 / 10,
        "ndcg@5": at5 / 10,
        "recall@10": 8 / 10,
        "ndcg@10": (at5 + gain(5) + gain(9)) / 10,
    }
    assert {k: m[k] for k in expected} == pytest.approx(expected, abs=1e-12)
    assert m["ndcg@5"] == pytest.approx((3 + 1 / math.log2(6) + 1 / math.log2(3) + 1 / math.log2(5)) / 10)
    assert m["users"] == 10 and "invalid_rate" not in m


def test_evaluate_generative_rank_histogram():
    """Recall@k for every k = 1..11 pins each user's rank, not just the sums."""
    examples, answers = make_users(RANK_PATTERNS, RANK_TARGETS)
    m = run_eval(examples, answers, batch_size=3, ks=tuple(range(1, 11)))
    ranks = [0, 4, 5, 9, 1, 0, 3, 0]  # the hits; users 4 and 5 miss
    for k in range(1, 11):
        assert m[f"recall@{k}"] == pytest.approx(sum(r < k for r in ranks) / 10, abs=1e-12), k
        assert m[f"ndcg@{k}"] == pytest.approx(sum(gain(r) for r in ranks if r < k) / 10, abs=1e-12), k


@pytest.mark.parametrize("batch_size", [1, 5, 7, 23, 100])
def test_evaluate_generative_pairs_each_user_with_its_target(batch_size):
    """Every user's ranking starts with its own target and neighbours' targets differ, so any
    shift between the histories and the targets of a batch (or across batches), or a lost last
    partial batch (23 users: 5 + 5 + 5 + 5 + 3), moves Recall@1 off 1."""
    n = 23
    targets = [(5 * u) % N_EVAL_ITEMS for u in range(n)]  # 0, 5, 10, 2, 7, ...: neighbours differ
    examples, answers = make_users(["T"] * n, targets, seed=1)
    m = run_eval(examples, answers, batch_size, use_user=True)
    assert m["recall@1"] == 1.0 and m["ndcg@10"] == pytest.approx(1.0, abs=1e-12) and m["users"] == n
    # The same users with targets rotated by one: each ranking now meets a neighbour's target,
    # which is in it but never first (the shifted pairing the assertions above rule out).
    rolled = Examples(examples.user, examples.history, np.roll(examples.target, 1))
    m = run_eval(rolled, answers, batch_size, use_user=True)
    assert m["recall@1"] == 0.0 and m["users"] == n


# Patterns with sequences that are no item ('I'): constrained search skips them, unconstrained
# search returns them as misses (-1) that still take a position.
FREE_PATTERNS = [
    "IT",  # constrained rank 0; unconstrained rank 1, 1 invalid in its top 10
    "T",  # 0; 0; 0 invalid
    "IIIIIT",  # 0; 5; 5 invalid
    "vIvIvIvvvT",  # 6; 9; 3 invalid
    "vvvvvvvvvIT",  # 9; 10 (miss); 1 invalid (position 9)
    "",  # miss; miss; 0 invalid (the other items come first)
    "IIvT",  # 1; 3; 2 invalid -- the last user, alone in the last batch of 3
]
FREE_TARGETS = [3, 10, 6, 0, 12, 2, 9]


@pytest.mark.parametrize("batch_size", [1, 3, 7])
def test_evaluate_generative_constrained_vs_unconstrained(batch_size):
    examples, answers = make_users(FREE_PATTERNS, FREE_TARGETS, seed=2)
    constrained = run_eval(examples, answers, batch_size)
    c5 = 3 * gain(0) + gain(1)
    assert {k: constrained[k] for k in ("recall@1", "recall@5", "recall@10", "ndcg@5", "ndcg@10")} == pytest.approx({
        "recall@1": 3 / 7, "recall@5": 4 / 7, "recall@10": 6 / 7,
        "ndcg@5": c5 / 7, "ndcg@10": (c5 + gain(6) + gain(9)) / 7,
    }, abs=1e-12)
    assert "invalid_rate" not in constrained

    free = run_eval(examples, answers, batch_size, unconstrained=True)
    f5 = gain(1) + gain(0) + gain(3)
    assert {k: free[k] for k in ("recall@1", "recall@5", "recall@10", "ndcg@5", "ndcg@10")} == pytest.approx({
        "recall@1": 1 / 7, "recall@5": 3 / 7, "recall@10": 5 / 7,
        "ndcg@5": f5 / 7, "ndcg@10": (f5 + gain(5) + gain(9)) / 7,
    }, abs=1e-12)
    # Invalid beams among all 7 x 10 returned: a per-user mean, not a mean of batch means
    # (batch_size 3: 6/30, 4/30, 2/10 -> 12/70, where the mean of the three would be 0.178).
    # beam_search takes each batch's rate in float32, hence 1e-6.
    assert free["invalid_rate"] == pytest.approx(12 / 70, abs=1e-6)
    assert free["users"] == 7


# Cold-start share (TIGER): the items trained on and the held-out ones searched apart, ``cold_slots``
# of the top 10 reserved for the best held-out items, then all ranked together by score.


def naive_cold_slot_ranking(order: list, cold: set, slots: int, top_k: int = 10) -> list:
    """The oracle's order over items only: the best min(slots, #cold) cold items and enough of
    the best warm ones to fill ``top_k``, in the oracle's order (its order is its score)."""
    items = [ITEM_SEQS.index(seq) for seq in order if seq in ITEM_SEQS]
    n_cold = min(slots, len(cold))
    chosen = set([i for i in items if i in cold][:n_cold] + [i for i in items if i not in cold][:top_k - n_cold])
    return [i for i in items if i in chosen]


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 4), st.integers(1, 10), st.sampled_from([1, 4, 10]))
def test_cold_slots_match_a_naive_merge(seed, n_cold, slots, batch_size):
    rng = np.random.default_rng(seed)
    n = 9
    patterns = ["".join(rng.choice(list("vI"), int(rng.integers(0, 6)))) + rng.choice(["T", ""]) for _ in range(n)]
    targets = [int(t) for t in rng.integers(0, N_EVAL_ITEMS, n)]
    examples, answers = make_users(patterns, targets, seed=seed)
    cold = set(int(i) for i in rng.choice(N_EVAL_ITEMS, n_cold, replace=False))
    warm_ids = torch.tensor([i for i in range(N_EVAL_ITEMS) if i not in cold])
    cold_ids = torch.tensor(sorted(cold))
    layout = TokenLayout(EVAL_SIZES, num_user_buckets=0)
    out = evaluate_generative(
        OracleModel(layout, answers, False), examples, EVAL_CODES, layout,
        PrefixTrie(EVAL_CODES[warm_ids], EVAL_SIZES, item_ids=warm_ids), beam_size=10, top_k=10,
        batch_size=batch_size, ks=(1, 5, 10), cold_trie=PrefixTrie(EVAL_CODES[cold_ids], EVAL_SIZES, item_ids=cold_ids),
        cold_slots=slots)
    ranked = [naive_cold_slot_ranking(answers[tuple(int(i) for i in h if i >= 0)][1], cold, slots)
              for h in examples.history]
    expected = naive_metrics([r + [-1] * (10 - len(r)) for r in ranked], examples.target, (1, 5, 10))
    assert_close({k: out[k] for k in expected}, expected)


def test_cold_slots_known_answer_and_bad_input():
    """Target 0 is cold and ranked 12th of the 13 items: it misses without reserved slots and,
    as the best cold item, enters at 10th place (below every warm item kept) with one slot."""
    order_items = [i for i in range(1, N_EVAL_ITEMS) if i != 5][:11] + [0, 5]
    order = [ITEM_SEQS[i] for i in order_items] + INVALID_SEQS
    examples, _ = make_users([""], [0], seed=3)
    answers = {tuple(int(i) for i in examples.history[0] if i >= 0): (1000, order)}
    layout = TokenLayout(EVAL_SIZES, num_user_buckets=0)
    warm_ids, cold_ids = torch.tensor([i for i in range(N_EVAL_ITEMS) if i not in (0, 5)]), torch.tensor([0, 5])
    tries = (PrefixTrie(EVAL_CODES[warm_ids], EVAL_SIZES, item_ids=warm_ids),
             PrefixTrie(EVAL_CODES[cold_ids], EVAL_SIZES, item_ids=cold_ids))
    plain = evaluate_generative(OracleModel(layout, answers, False), examples, EVAL_CODES, layout,
                                PrefixTrie(EVAL_CODES, EVAL_SIZES), beam_size=10, top_k=10)
    slot = evaluate_generative(OracleModel(layout, answers, False), examples, EVAL_CODES, layout, tries[0],
                               beam_size=10, top_k=10, cold_trie=tries[1], cold_slots=1)
    assert plain["recall@10"] == 0.0 and slot["recall@10"] == 1.0 and slot["ndcg@10"] == pytest.approx(gain(9))
    with pytest.raises(ValueError, match="cold_slots"):
        evaluate_generative(OracleModel(layout, answers, False), examples, EVAL_CODES, layout, tries[0],
                            beam_size=10, top_k=10, cold_slots=1)  # no cold_trie
    with pytest.raises(ValueError, match="item_ids"):
        PrefixTrie(EVAL_CODES[:3], EVAL_SIZES, item_ids=torch.arange(4))


def test_users_progress_prints_every_interval_without_a_terminal(capsys, monkeypatch):
    from modules import evaluation

    clock = iter([0.0, 10.0, 30.0, 45.0, 70.0])
    monkeypatch.setattr(evaluation.time, "time", lambda: next(clock))
    progress = evaluation.UsersProgress(1000, "eval")
    progress.enabled = True
    progress.update(100)  # t=10: too soon
    progress.update(300)  # t=30: 300 users in 30 s = 10 users/s, 700 left = 70 s
    progress.update(400)  # t=45: 15 s after the last line
    progress.update(1000)  # t=70: done, no line
    assert capsys.readouterr().err.splitlines() == ["[eval] 300/1,000 users, 10 users/s, ~1.2 min left"]


# ---------------------------------------------------------------- per-user ranks, history removed
# (issue 21: the test report keeps each user's rank for intervals and paired comparisons, and a
# second report ranks with the user's history items removed, as RecBole's and HSTU's evaluators do)

from modules.evaluation import (  # noqa: E402
    drop_items, evaluate_exact_topk, keeping_ranks, target_ranks,
)


def naive_ranks(ranked, target, k=10):
    """The first position of each target in the first k items of its ranking, -1 if absent."""
    out = []
    for row, t in zip(np.asarray(ranked).tolist(), np.asarray(target).tolist()):
        out.append(row[:k].index(t) if t in row[:k] else -1)
    return np.array(out)


def naive_without(ranking: list, history) -> list:
    """A ranking with the history items (-1: padding) removed, the rest in order."""
    seen = {int(h) for h in history if h >= 0}
    return [i for i in ranking if i not in seen]


def pad(row: list, k: int = 10) -> list:
    return (row + [-1] * k)[:k]


def test_target_ranks_and_drop_items_by_hand():
    ranked = torch.tensor([[5, 3, 3, -1], [1, 2, 4, 6], [-1, 7, 2, 0]])
    np.testing.assert_array_equal(target_ranks(ranked, [3, 9, 0]), [1, -1, 3])
    history = torch.tensor([[3, -1], [2, 6], [-1, -1]])
    np.testing.assert_array_equal(drop_items(ranked, history), [[5, -1, -1, -1], [1, 4, -1, -1], [-1, 7, 2, 0]])
    items, scores = drop_items(ranked, history, torch.tensor([[4.0, 3, 2, 1]] * 3))
    np.testing.assert_array_equal(items[1], [1, 4, -1, -1])
    assert scores[1].tolist() == [4.0, 2.0, float("-inf"), float("-inf")]


def test_accumulator_ranks_follow_the_keys():
    """Batches updated out of order (as a rank's share, then merged) come back in key order."""
    rng = np.random.default_rng(1)
    ranked, target = rng.integers(-1, 12, size=(50, 10)), rng.integers(0, 12, size=50)
    acc = MetricAccumulator(keep_ranks=True)
    for start in (40, 0, 20, 10, 30):
        acc.update(ranked[start:start + 10], target[start:start + 10], key=start)
    np.testing.assert_array_equal(acc.ranks(), naive_ranks(ranked, target))
    with pytest.raises(ValueError, match="keep_ranks"):
        MetricAccumulator().ranks()
    # Wider rankings: ranks count within the first max(ks) columns, -1 beyond, as the metrics do.
    wide = np.tile(np.arange(20), (2, 1))
    acc = MetricAccumulator(ks=(1, 5), keep_ranks=True)
    acc.update(wide, np.array([3, 7]))
    np.testing.assert_array_equal(acc.ranks(), [3, -1])


def test_accumulator_ranks_merge_over_ranks_in_key_order(monkeypatch):
    """merge_ranks under torchrun: two ranks' batches (even and odd) gathered in batch order."""
    from modules import distributed

    rng = np.random.default_rng(2)
    ranked, target = rng.integers(-1, 12, size=(40, 10)), rng.integers(0, 12, size=40)
    accs = [MetricAccumulator(keep_ranks=True) for _ in range(2)]
    for b, start in enumerate(range(0, 40, 8)):
        accs[b % 2].update(ranked[start:start + 8], target[start:start + 8], key=b)
    # The other rank's share, in the order merge_ranks gathers: per-batch sums, then ranks.
    other = iter([[(k, (s, n)) for k, s, n in accs[1]._parts], list(accs[1]._ranks)])

    def gather_keyed(parts):  # all_gather of both ranks' pairs, sorted by key
        return sorted(list(parts) + next(other), key=lambda p: p[0])

    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(distributed, "gather_keyed", gather_keyed)
    accs[0].merge_ranks()
    np.testing.assert_array_equal(accs[0].ranks(), naive_ranks(ranked, target))
    assert accs[0].count == 40


def run_ranked_eval(examples, answers, batch_size, beam_size=10, keep_ranks=True, **kw):
    layout = TokenLayout(EVAL_SIZES, num_user_buckets=0)
    return evaluate_generative(OracleModel(layout, answers, False), examples, EVAL_CODES, layout,
                               PrefixTrie(EVAL_CODES, EVAL_SIZES), beam_size=beam_size, top_k=10,
                               batch_size=batch_size, keep_ranks=keep_ranks, **kw)


@pytest.mark.parametrize("batch_size", [1, 3, 4, 64])
def test_evaluate_generative_keeps_ranks_in_example_order(batch_size):
    examples, answers = make_users(RANK_PATTERNS, RANK_TARGETS)
    plain = run_eval(examples, answers, batch_size)
    assert "ranks" not in plain and "history_removed" not in plain
    m = run_ranked_eval(examples, answers, batch_size)
    np.testing.assert_array_equal(m["ranks"], [0, 4, 5, 9, -1, -1, 1, 0, 3, 0])
    assert m["ranks"].dtype == np.int16
    same = [k for k in plain if k != "users_per_second"]
    assert {k: m[k] for k in same} == {k: plain[k] for k in same}  # the metrics are unchanged
    with keeping_ranks():  # how test_report asks through a script's own evaluate closure
        np.testing.assert_array_equal(run_eval(examples, answers, batch_size)["ranks"], m["ranks"])
    assert "ranks" not in run_eval(examples, answers, batch_size)  # the context is gone
    free = run_ranked_eval(examples, answers, batch_size, unconstrained=True)
    assert "ranks" in free and "history_removed" not in free  # no history report for the free search


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from([1, 4, 9]), st.sampled_from([10, 13]))
def test_history_removed_generative_matches_naive(seed, batch_size, beam_size):
    """The history-removed list against a naive reference: the oracle's order over the items (what
    a search of ``beam_size`` beams returns: its first ``beam_size`` items; 13 = every item), the
    user's history removed, cut to 10."""
    rng = np.random.default_rng(seed)
    n = 9
    patterns = ["".join(rng.choice(list("vI"), int(rng.integers(0, 6)))) + rng.choice(["T", ""]) for _ in range(n)]
    targets = [int(t) for t in rng.integers(0, N_EVAL_ITEMS, n)]
    examples, answers = make_users(patterns, targets, seed=seed)
    if seed % 2:  # some targets in the history too (a repeat): removed from the list, so a miss
        history = examples.history.copy()
        history[::3, 0] = examples.target[::3]
        keys = [tuple(int(i) for i in h if i >= 0) for h in examples.history]
        moved = {tuple(int(i) for i in h if i >= 0): answers[k] for h, k in zip(history, keys)}
        if len(moved) == n:  # histories still tell the users apart
            examples, answers = Examples(examples.user, history, examples.target), moved
    m = run_ranked_eval(examples, answers, batch_size, beam_size=beam_size)
    full = [[ITEM_SEQS.index(s) for s in answers[tuple(int(i) for i in h if i >= 0)][1] if s in ITEM_SEQS]
            for h in examples.history]
    headline = [pad(r[:beam_size][:10]) for r in full]
    removed = [pad(naive_without(r[:beam_size], h)) for r, h in zip(full, examples.history)]
    np.testing.assert_array_equal(m["ranks"], naive_ranks(headline, examples.target))
    assert_close({k: m[k] for k in naive_metrics(headline, examples.target, (1, 5, 10))},
                 naive_metrics(headline, examples.target, (1, 5, 10)))
    hr = m["history_removed"]
    np.testing.assert_array_equal(hr["ranks"], naive_ranks(removed, examples.target))
    expected = naive_metrics(removed, examples.target, (1, 5, 10))
    assert_close({k: hr[k] for k in expected}, expected)


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 4), st.integers(1, 10), st.sampled_from([1, 4, 10]))
def test_history_removed_with_cold_slots_matches_naive(seed, n_cold, slots, batch_size):
    """Cold slots: both searches (beam 13: every item) lose the history items, then merge."""
    rng = np.random.default_rng(seed)
    n = 9
    patterns = ["".join(rng.choice(list("vI"), int(rng.integers(0, 6)))) + rng.choice(["T", ""]) for _ in range(n)]
    targets = [int(t) for t in rng.integers(0, N_EVAL_ITEMS, n)]
    examples, answers = make_users(patterns, targets, seed=seed)
    cold = set(int(i) for i in rng.choice(N_EVAL_ITEMS, n_cold, replace=False))
    warm_ids = torch.tensor([i for i in range(N_EVAL_ITEMS) if i not in cold])
    cold_ids = torch.tensor(sorted(cold))
    layout = TokenLayout(EVAL_SIZES, num_user_buckets=0)
    out = evaluate_generative(
        OracleModel(layout, answers, False), examples, EVAL_CODES, layout,
        PrefixTrie(EVAL_CODES[warm_ids], EVAL_SIZES, item_ids=warm_ids), beam_size=13, top_k=10,
        batch_size=batch_size, cold_trie=PrefixTrie(EVAL_CODES[cold_ids], EVAL_SIZES, item_ids=cold_ids),
        cold_slots=slots, keep_ranks=True)
    removed = []
    for h in examples.history:
        items = naive_without([ITEM_SEQS.index(s) for s in answers[tuple(int(i) for i in h if i >= 0)][1]
                               if s in ITEM_SEQS], h)
        chosen_cold = [i for i in items if i in cold][:slots]
        chosen = set(chosen_cold + [i for i in items if i not in cold][:10 - len(chosen_cold)])
        removed.append(pad([i for i in items if i in chosen]))
    np.testing.assert_array_equal(out["history_removed"]["ranks"], naive_ranks(removed, examples.target))
    expected = naive_metrics(removed, examples.target, (1, 5, 10))
    assert_close({k: out["history_removed"][k] for k in expected}, expected)


class TableScorer:
    """scores(history) -> a fixed random score per (user, item), the user known by its history."""

    def __init__(self, examples, num_items, seed=0):
        self.table = {tuple(h.tolist()): s for h, s in
                      zip(examples.history, np.random.default_rng(seed).standard_normal((len(examples), num_items)))}
        self.training = False

    def eval(self):
        return self

    def train(self, mode=True):
        return self

    def scores(self, history):
        return torch.tensor(np.stack([self.table[tuple(h.tolist())] for h in history]))


@pytest.mark.parametrize("num_items, batch_size", [(40, 7), (40, 64), (12, 5)])
def test_history_removed_exact_topk_matches_naive(num_items, batch_size):
    """SASRec-style exact ranking: history scores set to -inf before the top 10, against sorting
    every item and removing the history by hand (12 items, histories up to 6: some users have
    fewer than 10 items left, padded with -1)."""
    rng = np.random.default_rng(num_items + batch_size)
    n, width = 30, 6
    history = np.full((n, width), -1, dtype=np.int64)
    for u in range(n):
        length = int(rng.integers(1, width + 1))
        history[u, :length] = rng.choice(num_items, length, replace=False)
    target = rng.integers(0, num_items, n)
    target[::4] = history[::4, 0]  # a repeat of a history item: a miss once it is removed
    examples = Examples(np.arange(n), history, target)
    scorer = TableScorer(examples, num_items)
    m = evaluate_exact_topk(scorer, examples, batch_size=batch_size, keep_ranks=True)
    full = [list(np.argsort(-scorer.table[tuple(h.tolist())], kind="stable")) for h in history]
    headline = [r[:10] for r in full]
    removed = [pad(naive_without(r, h)) for r, h in zip(full, history)]
    np.testing.assert_array_equal(m["ranks"], naive_ranks(headline, target))
    assert_close({k: m[k] for k in naive_metrics(headline, target, (1, 5, 10))},
                 naive_metrics(headline, target, (1, 5, 10)))
    np.testing.assert_array_equal(m["history_removed"]["ranks"], naive_ranks(removed, target))
    expected = naive_metrics(removed, target, (1, 5, 10))
    assert_close({k: m["history_removed"][k] for k in expected}, expected)
    assert m["history_removed"]["recall@10"] > 0 and (m["history_removed"]["ranks"][::4] == -1).all()
    assert "ranks" not in evaluate_exact_topk(scorer, examples, batch_size=batch_size)


def test_actionpiece_evaluator_keeps_ranks_and_removes_history():
    """evaluate_actionpiece with keep_ranks (tests/test_actionpiece_eval.py's planned model): the
    ranks of the headline scoring, and the history items dropped from its fused ranking."""
    from tests.test_actionpiece_eval import ITEMS, item_beam, run_eval, tuple_beam

    from modules.actionpiece import ActionPieceTokenizer
    from modules.actionpiece.recommender import ActionPieceLayout

    t2f = [(-1, -1)] + [(0, v) for v in range(4)] + [(1, v) for v in range(4)] + [(-1, 1, 6)]
    tok = ActionPieceTokenizer(2, 9, t2f, [0.0] * 9 + [5.0], np.array(ITEMS))
    layout = ActionPieceLayout.build(tok, "all")
    i = lambda x: item_beam(layout, x)  # noqa: E731
    users = [
        ([1], 3, [tuple_beam(layout, 0, 0), i(3), i(4)]),  # official rank 1, lenient 0; no history item listed
        ([4, 2], 6, [i(4), i(5), i(2), i(6)]),  # rank 3; without items 4 and 2: rank 1
        ([5], 5, [i(5), i(7)]),  # rank 0, but the target is a history item: a miss once removed
        ([8], 9, [i(8)] + [i(x) for x in (0, 1, 2, 3, 4, 5, 6, 7, 10)] + [i(9)]),  # rank 10 -> 9 without 8
    ]
    plain = run_eval(tok, layout, users, batch_size=1)
    assert "ranks" not in plain
    official = run_eval(tok, layout, users, batch_size=1, num_beams=12, keep_ranks=True)
    np.testing.assert_array_equal(official["ranks"], [1, 3, 0, -1])
    np.testing.assert_array_equal(official["history_removed"]["ranks"], [1, 1, -1, 9])
    assert official["history_removed"]["recall@10"] == 3 / 4
    lenient = run_eval(tok, layout, users, batch_size=3, num_beams=12, keep_ranks=True, invalid_beams="drop")
    np.testing.assert_array_equal(lenient["ranks"], [0, 3, 0, -1])
    np.testing.assert_array_equal(lenient["history_removed"]["ranks"], [0, 1, -1, 9])
