"""Known answers for the ActionPiece evaluator (modules/actionpiece/recommender.py) with a mock
model whose beam search returns planned token sequences: exact Recall/NDCG/err@10, user-target
alignment across batches and segmentations, and the official scoring of decoded feature
tuples that are no item (they keep their rank) against the lenient one (dropped)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from data.dataset import Examples
from modules.actionpiece import ActionPieceTokenizer
from modules.actionpiece.recommender import (
    IGNORE, INVALID, NO_ITEM, ActionPieceLayout, ItemDecoder, evaluate_actionpiece, fuse_keys,
)
from modules.beam_search import beam_search_tokens
from modules.tokens import EOS, NUM_SPECIAL, PAD

# Two categories with values 0..3; the items are the 12 tuples with c0 != c1 (item_id in this
# order), so (0, 0), (1, 1), ... are valid feature tuples that are no item. Tokens: pad, c0 = v
# -> 1 + v, c1 = v -> 5 + v, and one merge rule: 9 = (c0 = 0) + (c1 = 1), item 0 in one token.
ITEMS = [(a, b) for a in range(4) for b in range(4) if a != b]
T = 2  # decoding steps = categories


@pytest.fixture(scope="module")
def tok():
    t2f = [(-1, -1)] + [(0, v) for v in range(4)] + [(1, v) for v in range(4)] + [(-1, 1, 6)]
    return ActionPieceTokenizer(2, 9, t2f, [0.0] * 9 + [5.0], np.array(ITEMS))


@pytest.fixture(scope="module")
def layout(tok):
    return ActionPieceLayout.build(tok, "all")


def test_fixture_tokenizer(tok, layout):
    assert tok.encode_target(0) == [9] and tok.encode_target(1) == [1, 7]
    assert layout.labels[0].tolist() == [layout.to_model[9], EOS, IGNORE]


def item_beam(layout, item: int) -> list[int]:
    """Model tokens of an item's label, cut to the T decoding steps (EOS-filled)."""
    row = layout.labels[item][:T]
    return np.where(row == IGNORE, EOS, row).tolist()


def tuple_beam(layout, v0: int, v1: int) -> list[int]:
    """A valid feature tuple from its initial tokens: an item or not."""
    return [int(layout.to_model[1 + v0]), int(layout.to_model[5 + v1])]


def invalid_beam(layout, a: int, b: int) -> list[int]:
    """Category 0 twice: decodes to no feature tuple."""
    return [int(layout.to_model[1 + a]), int(layout.to_model[1 + b])]


def history_key(tok, items) -> tuple:
    return tuple(sorted((c, int(v)) for i in items for c, v in enumerate(tok.item_features[i])))


@dataclasses.dataclass
class PlanState:
    plans: list  # per row: token sequences, best first
    prefix: torch.Tensor  # (n, b, t) tokens chosen so far
    started: bool = False

    def reorder(self, beam_idx: torch.Tensor) -> "PlanState":
        idx = beam_idx[..., None].expand(-1, -1, self.prefix.shape[-1])
        return dataclasses.replace(self, prefix=self.prefix.gather(1, idx))


class PlannedModel(torch.nn.Module):
    """Decoding interface (modules/transformers/generation.py) whose beam search returns, for a
    user recognised by the features of its encoder input (the same for every SPR segmentation),
    exactly ``plans[history_key]`` best first; the remaining beams are no feature tuple."""

    def __init__(self, tok, layout, plans: dict):
        super().__init__()
        self.tok, self.layout, self.plans = tok, layout, plans

    def _key(self, row: torch.Tensor) -> tuple:
        ap = self.layout.to_ap[row.numpy()]
        return tuple(sorted(f for a in ap.tolist() if 0 < a < self.tok.vocab_size for f in self.tok.expand[a]))

    def start_decoding(self, input_ids, attention_mask):
        plans = [self.plans[self._key(row)] for row in input_ids]
        return PlanState(plans, torch.zeros((len(input_ids), 1, 0), dtype=torch.long))

    def step(self, state: PlanState, tokens: torch.Tensor):
        prefix = torch.cat([state.prefix, tokens[..., None]], dim=2) if state.started else state.prefix
        n, b, t = prefix.shape
        logp = torch.full((n, b, self.layout.output_vocab_size), -1e4)
        # The fillers: PAD/BOS/EOS after a planned prefix, or anything after them, is no
        # feature tuple (pad token or a missing category), and there are always enough of them
        # above every other unplanned sequence.
        logp[..., :NUM_SPECIAL] = -1e3
        for i in range(n):
            for j in range(b):
                have = prefix[i, j].tolist()
                for r, seq in enumerate(state.plans[i]):
                    if seq[:t] == have:
                        score = 0.0 if t + 1 < T else -float(r)
                        logp[i, j, seq[t]] = max(float(logp[i, j, seq[t]]), score)
        return logp, PlanState(state.plans, prefix, True)


def run_eval(tok, layout, users, *, q=1, batch_size=2, num_beams=10, **kw):
    """users: (history items, target, planned beams) -> the evaluator's output."""
    plans = {history_key(tok, h): beams for h, _, beams in users}
    assert len(plans) == len(users)  # every user recognisable
    width = max(len(h) for h, _, _ in users)
    history = np.full((len(users), width), -1, dtype=np.int64)
    for u, (h, _, _) in enumerate(users):
        history[u, : len(h)] = h
    examples = Examples(np.arange(len(users)), history, np.array([t for _, t, _ in users]))
    model = PlannedModel(tok, layout, plans)
    return evaluate_actionpiece(model, tok, layout, ItemDecoder(tok, layout), examples, q=q, num_beams=num_beams,
                                batch_size=batch_size, seed=0, device=torch.device("cpu"), **kw)


def g(rank: int) -> float:
    return 1 / math.log2(rank + 2)


@pytest.fixture(params=[1, 3], ids=["1thread", "3threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)  # >1: batches decoded in a thread pool
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("q,batch_size", [(1, 2), (1, 3), (3, 6), (3, 3)])
def test_known_ranks_across_batches(tok, layout, threads, q, batch_size):
    """Target at rank 0, 1, 4, 6, never (twice) and the one-token item at rank 0, with each
    user's target different, over batches smaller than the user count."""
    def i(item):
        return item_beam(layout, item)

    users = [
        ([1], 3, [i(3), i(4), i(5)]),  # rank 0
        ([2], 4, [i(5), i(4), i(6)]),  # rank 1
        ([1, 2], 5, [i(6), i(7), i(8), i(9), i(5)]),  # rank 4
        ([3], 6, [i(1), i(2), i(3), i(4), i(5), i(7), i(6)]),  # rank 6: in the top 10, not the top 5
        ([4, 5], 7, [i(1), i(2)]),  # never
        ([6], 0, [i(0)]),  # rank 0, a merged token
        ([7, 8, 9], 8, []),  # nothing valid generated
    ]
    out = run_eval(tok, layout, users, q=q, batch_size=batch_size)
    n = len(users)
    want = {"recall@1": 2 / n, "recall@5": 4 / n, "recall@10": 5 / n,
            "ndcg@5": (g(0) + g(1) + g(4) + g(0)) / n, "ndcg@10": (g(0) + g(1) + g(4) + g(6) + g(0)) / n}
    for k, v in want.items():
        assert out[k] == pytest.approx(v, abs=1e-12), k
        assert out[f"official/{k}"] == out[f"lenient/{k}"] == out[k]  # every valid tuple is an item
    valid = [len(b) for _, _, b in users]
    assert out["err@10"] == pytest.approx(sum(10 - v for v in valid) / (10 * n))  # empty fused slots
    assert out["invalid_rate"] == pytest.approx(sum(10 - v for v in valid) / (10 * n))  # all PAD beams
    assert out["no_item_rate"] == 0 and out["users"] == n


def users_with_tuples_that_are_no_items(layout):
    i = lambda x: item_beam(layout, x)  # noqa: E731
    t = lambda a, b: tuple_beam(layout, a, b)  # noqa: E731
    return [
        ([1], 3, [t(0, 0), i(3), i(4)]),  # no item first: official rank 1, lenient rank 0
        ([2], 4, [invalid_beam(layout, 0, 1), i(4)]),  # no feature tuple first: dropped by both, rank 0
        ([5], 6, [t(1, 1), t(2, 2), i(2), i(6)]),  # official rank 3, lenient rank 1
        ([8], 9, [t(0, 0), t(3, 3), i(5)]),  # never; (0, 0) again, in another user
    ]


def test_official_scoring_keeps_the_rank_of_tuples_that_are_no_item(tok, layout):
    users = users_with_tuples_that_are_no_items(layout)
    n = len(users)
    official = {"recall@1": 1 / n, "recall@5": 3 / n, "ndcg@5": (g(1) + g(0) + g(3)) / n}
    lenient = {"recall@1": 2 / n, "recall@5": 3 / n, "ndcg@5": (g(0) + g(0) + g(1)) / n}
    default = run_eval(tok, layout, users)  # the default is the official scoring
    dropped = run_eval(tok, layout, users, invalid_beams="drop")
    for k in official:
        assert default[k] == pytest.approx(official[k]), k
        assert dropped[k] == pytest.approx(lenient[k]), k
        for out in (default, dropped):
            assert out[f"official/{k}"] == pytest.approx(official[k])
            assert out[f"lenient/{k}"] == pytest.approx(lenient[k])
    assert dropped["recall@10"] == default["recall@10"] == 3 / n
    # err@10 counts the empty slots of the official fused top 10: distinct valid tuples 3, 1, 4, 3.
    assert default["err@10"] == dropped["err@10"] == pytest.approx((7 + 9 + 6 + 7) / (10 * n))
    assert default["no_item_rate"] == pytest.approx(5 / (10 * n))
    assert default["invalid_rate"] == pytest.approx((10 * n - 6) / (10 * n))  # 6 beams are items


def test_bad_mode(tok, layout):
    with pytest.raises(ValueError, match="invalid_beams"):
        run_eval(tok, layout, users_with_tuples_that_are_no_items(layout), invalid_beams="skip")


def test_item_decoder_keys(tok, layout):
    dec = ItemDecoder(tok, layout)
    beams = torch.tensor([item_beam(layout, 0), item_beam(layout, 7), tuple_beam(layout, 2, 2),
                          tuple_beam(layout, 0, 0), invalid_beam(layout, 1, 2), tuple_beam(layout, 2, 2),
                          [PAD, PAD], tuple_beam(layout, 2, 1)])
    keys = dec(beams).tolist()
    assert keys[:2] == [0, 7] and keys[4] == keys[6] == INVALID and keys[7] == ITEMS.index((2, 1))
    assert keys[2] <= NO_ITEM and keys[3] <= NO_ITEM and keys[2] != keys[3] and keys[5] == keys[2]


def test_fuse_keys_known_answer():
    x, y = NO_ITEM, NO_ITEM - 1  # two tuples that are no item
    # Ranks 0, 1, 2 weigh 1, 1/log2(3), 1/2; INVALID beams are skipped but use their rank.
    official, lenient, n = fuse_keys([[x, 4, INVALID, 7], [x, 7, 4, y]], width=4)
    # x: 2; 4: 1/log2(3) + 1/2 = 1.13; 7: 1/log2(5) + 1/log2(3) = 1.06; y: 1/log2(5)
    assert official.tolist() == [-1, 4, 7, -1] and lenient.tolist() == [4, 7, -1, -1] and n == 4
    # Ties keep first-seen order; width cuts.
    official, lenient, n = fuse_keys([[5, 6], [6, 5]], width=1)
    assert official.tolist() == lenient.tolist() == [5] and n == 2
    official, lenient, n = fuse_keys([[INVALID, INVALID]], width=3)
    assert official.tolist() == lenient.tolist() == [-1, -1, -1] and n == 0


def test_mock_returns_its_plan(tok, layout):
    """The mock itself: the beam search returns the planned sequences first, then only beams
    that decode to no feature tuple."""
    plan = [item_beam(layout, 0), tuple_beam(layout, 3, 3), invalid_beam(layout, 2, 0), item_beam(layout, 5)]
    model = PlannedModel(tok, layout, {history_key(tok, [2, 3]): plan})
    ids, mask = layout.encode_inputs(tok, np.array([[2, 3], [3, 2]]), np.random.default_rng(0))
    beams = beam_search_tokens(model, ids, mask, beam_size=10, num_steps=T).tokens
    keys = ItemDecoder(tok, layout)(beams)
    for row, k in zip(beams, keys):
        assert row[: len(plan)].tolist() == plan
        assert (k[len(plan):] == INVALID).all()
