"""The ActionPiece recommender around a T5 (spec ``shared/design/actionpiece.md``): tokenizer
loading/learning for a dataset, the model's token layout, generated tokens -> items, and the
evaluation by generation (sections 10-11) that ``train_actionpiece.py`` runs.

Token layout (model ids): PAD 0, BOS 1, EOS 2 as in ``modules.tokens`` (so the shared
``shift_right`` and beam search apply), then the ActionPiece tokens 1..V-1; ActionPiece's own
pad (token 0) is the model's PAD, so the model vocabulary is V + 2 as in the official code
(which puts BOS/EOS at V and V+1 instead). ``output_vocab = 'targets'`` orders the tokens that
occur in some item's deterministic encoding first and lets the decoder emit only those (and
the specials): like TIGER's user tokens, the others never occur in a label, and on Beauty this
cuts the output layer from 40k to ~13k tokens, the bulk of the decoding cost. ``'all'``: every
token, as the official code.

Scoring of generated beams (``invalid_beams``). A beam decodes to one of: an item; a valid
feature tuple (every category once) that is no item; nothing (-1: pad/BOS/out-of-range token,
a category missing or repeated). The official code (``genrec/models/ActionPiece/model.py``,
``ActionPiece.generate``; ``genrec/evaluator.py``) drops the last kind from the fusion but
fuses and ranks feature tuples without asking whether they are items, so a tuple that is no
item takes a slot and always misses: ``'keep_rank'`` (default, what the paper's numbers
mean). ``'drop'`` (lenient) also removes such tuples from the ranking, which lifts the items
behind them. Both are always computed. The official ``err@K`` is the fraction of the top K
slots of the fused ranking left empty (fewer than K distinct valid tuples over all beams);
padding is its only -1.
"""

from __future__ import annotations

import hashlib
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data.prepare import load_item_embeddings
from modules.actionpiece.features import item_features_from_embeddings
from modules.actionpiece.segment import fuse_beams
from modules.actionpiece.tokenizer import ActionPieceTokenizer
from modules import distributed
from modules.beam_search import beam_search_tokens
from modules.evaluation import MetricAccumulator, UsersProgress, drop_items, wants_ranks
from modules.tokens import BOS, EOS, NUM_SPECIAL, PAD

IGNORE = -100  # label padding, ignored by the loss
INVALID = -1  # ItemDecoder: the beam decodes to no valid feature tuple
NO_ITEM = -2  # ItemDecoder: keys <= NO_ITEM are valid feature tuples that are no item (one key per tuple)
INVALID_BEAMS = ("keep_rank", "drop")
METRIC_KS = (1, 5, 10)
ERR_K = 10


# ----------------------------------------------------------------------------- tokenizer
def items_fingerprint(dataset) -> str:
    """Identity of the item list (raw ids in item_id order): a tokenizer is only valid for it."""
    return hashlib.sha256("\n".join(map(str, dataset.items["raw_id"].to_list())).encode()).hexdigest()[:16]


def load_tokenizer(name: str, dataset, vocab_size: int) -> ActionPieceTokenizer:
    """A saved ActionPiece tokenizer by path (its dir, or a run dir holding ``tokenizer/``) or Hub
    id, checked against the dataset's items and truncated to ``vocab_size`` tokens."""
    path = Path(name)
    if (path / "tokenizer").is_dir():
        path = path / "tokenizer"
    if not path.exists() and (name.startswith((".", "/", "~")) or name.count("/") != 1):
        raise FileNotFoundError(f"ActionPiece tokenizer not found: {name} (a directory written by "
                                "ActionPieceTokenizer.save_pretrained, e.g. <out_dir>/tokenizer, or a Hub repo id; "
                                "leave train_actionpiece.tokenizer unset to learn one)")
    source = str(path) if path.exists() else name
    tok = ActionPieceTokenizer.from_pretrained(source)
    if tok.vocab_size > vocab_size:
        tok = ActionPieceTokenizer.from_pretrained(source, vocab_size=vocab_size)
    if tok.item_features is None:
        raise ValueError(f"ActionPiece tokenizer {name} has no item_features.json: it cannot map items to tokens")
    if len(tok.item_features) != dataset.num_items:
        raise ValueError(f"ActionPiece tokenizer {name} has features for {len(tok.item_features)} items but dataset "
                         f"{dataset.name} has {dataset.num_items}: it was built on another dataset or preprocessing")
    stored = tok.config.get("items_fingerprint")
    if stored is not None and stored != items_fingerprint(dataset):
        raise ValueError(f"ActionPiece tokenizer {name} was built for other items than dataset {dataset.name} "
                         f"(items_fingerprint {stored} != {items_fingerprint(dataset)})")
    return tok


def run_vocabulary(tokenizer: str | None, tok_dir: Path, dataset, vocab_size: int, mode: str,
                   features: dict) -> ActionPieceTokenizer:
    """train_actionpiece.py's vocabulary: the saved ``tokenizer`` when one is given, else the one
    the run learned into ``tok_dir`` (on resume; refused when it was built with other settings),
    else learned now (:func:`build_tokenizer`) and saved there."""
    if tokenizer is not None:
        return load_tokenizer(tokenizer, dataset, vocab_size)
    if tok_dir.is_dir():  # resume: the vocabulary this run learned before
        tok = load_tokenizer(str(tok_dir), dataset, vocab_size)
        made = {k: tok.config.get(k) for k in (*features, "mode", "requested_vocab_size")}
        wanted = {**features, "mode": mode, "requested_vocab_size": vocab_size}
        if made != wanted:
            diff = {k: (made[k], wanted[k]) for k in wanted if made[k] != wanted[k]}
            raise ValueError(f"{tok_dir} was built with other settings (stored, requested): {diff}; "
                             "use another out_dir or delete it")
        return tok
    print(f"[actionpiece] learning a {vocab_size:,}-token vocabulary on {dataset.name} ...", file=sys.stderr)
    tok = build_tokenizer(dataset, vocab_size, mode, features)
    tok.save_pretrained(tok_dir)
    return tok


def build_tokenizer(dataset, vocab_size: int, mode: str, features: dict) -> ActionPieceTokenizer:
    """Spec sections 2-7: item features from text embeddings (quantizer fitted on the items of the
    train split), then the vocabulary learned on the train split's sequences."""
    t0 = time.perf_counter()
    emb = load_item_embeddings(dataset)
    feats = item_features_from_embeddings(emb, np.flatnonzero(dataset.train_item_mask()), **features)
    features_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    tok = ActionPieceTokenizer.train(feats, dataset.train_sequences(), vocab_size, mode=mode, config={
        **features, "items_fingerprint": items_fingerprint(dataset), "dataset": dataset.name,
        "features_seconds": round(features_seconds, 2)})
    tok.config["vocab_seconds"] = round(time.perf_counter() - t0, 2)
    return tok


# ----------------------------------------------------------------------------- token layout
@dataclass
class ActionPieceLayout:
    """ActionPiece token ids <-> model token ids (see the module docstring)."""

    to_model: np.ndarray  # (V,) ActionPiece id -> model id (0 -> PAD)
    to_ap: np.ndarray  # (V + 2,) model id -> ActionPiece id (PAD, BOS -> 0; EOS -> the tokenizer's eos_id)
    output_vocab_size: int  # the decoder emits model ids [0, output_vocab_size)
    labels: np.ndarray  # (N, max_label_len) per item: model ids of its deterministic encoding + EOS, IGNORE padded

    @property
    def vocab_size(self) -> int:
        return len(self.to_ap)

    @classmethod
    def build(cls, tok: ActionPieceTokenizer, output_vocab: str) -> "ActionPieceLayout":
        if output_vocab not in ("targets", "all"):
            raise ValueError(f"train_actionpiece.output_vocab must be 'targets' or 'all', got {output_vocab!r}")
        targets = [tok.encode_target(i) for i in range(len(tok.item_features))]
        order = np.arange(1, tok.vocab_size)
        n_out = tok.vocab_size - 1
        if output_vocab == "targets":
            used = np.zeros(tok.vocab_size, dtype=bool)
            used[np.concatenate([np.asarray(t, dtype=np.int64) for t in targets])] = True
            used[0] = False
            order = np.concatenate([np.flatnonzero(used), np.flatnonzero(~used)[1:]])  # [1:]: drop pad
            n_out = int(used.sum())
        to_model = np.zeros(tok.vocab_size, dtype=np.int64)
        to_model[order] = NUM_SPECIAL + np.arange(len(order))
        to_ap = np.zeros(tok.vocab_size + 2, dtype=np.int64)
        to_ap[to_model[order]] = order
        to_ap[EOS] = tok.eos_id
        width = max(len(t) for t in targets) + 1
        labels = np.full((len(targets), width), IGNORE, dtype=np.int64)
        for i, t in enumerate(targets):
            labels[i, : len(t)] = to_model[t]
            labels[i, len(t)] = EOS
        return cls(to_model, to_ap, NUM_SPECIAL + n_out, labels)

    def encode_inputs(self, tok: ActionPieceTokenizer, history: np.ndarray,
                      rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Histories (n, H) -> encoder inputs [BOS] + SPR(history) + [EOS], PAD right-padded, and mask."""
        seg = tok.spr(history, rng)
        n, width = seg.tokens.shape
        ids = np.full((n, width + 2), PAD, dtype=np.int64)
        ids[:, 0] = BOS
        ids[:, 1: width + 1] = self.to_model[seg.tokens]  # SPR's padding (0) maps to PAD
        ids[np.arange(n), seg.lengths + 1] = EOS
        ids = torch.from_numpy(ids)
        return ids, ids != PAD


# ----------------------------------------------------------------------------- evaluation
class ItemDecoder:
    """Generated model tokens -> keys with the tokenizer's decoding (cut at EOS, expand merges,
    every category exactly once): the item id (>= 0); ``INVALID`` (-1) when the tokens are no
    valid feature tuple; a key <= ``NO_ITEM`` (-2), the same for the same tuple, when they are a
    valid feature tuple that is no item (the official code ranks those; see the module docstring)."""

    def __init__(self, tok: ActionPieceTokenizer, layout: ActionPieceLayout):
        self.tok, self.to_ap = tok, layout.to_ap
        self.item_of = {tuple(int(v) for v in row): i for i, row in enumerate(tok.item_features)}
        self.memo: dict[tuple[int, ...], int] = {}  # beams repeat a lot across users
        self.no_item: dict[tuple[int, ...], int] = {}  # feature tuple that is no item -> its key
        self._lock = threading.Lock()  # evaluation decodes from several threads

    def __call__(self, tokens: torch.Tensor) -> np.ndarray:
        """(..., T) model token ids -> (...) keys (see the class docstring)."""
        ap = self.to_ap[tokens.cpu().numpy()]
        flat = ap.reshape(-1, ap.shape[-1])
        out = np.empty(len(flat), dtype=np.int64)
        memo = self.memo
        for r, seq in enumerate(map(tuple, flat.tolist())):
            key = memo.get(seq)
            if key is None:
                key = memo[seq] = self._key(self.tok.decode(seq))
            out[r] = key
        return out.reshape(ap.shape[:-1])

    def _key(self, feats: tuple[int, ...] | None) -> int:
        if feats is None:
            return INVALID
        item = self.item_of.get(feats)
        if item is not None:
            return item
        with self._lock:
            return self.no_item.setdefault(feats, NO_ITEM - len(self.no_item))


def _valid_tuple(key: int):
    return (key,) if key != INVALID else None


def fuse_keys(lists, width: int) -> tuple[np.ndarray, np.ndarray, int]:
    """One user's decoded beam lists (q segmentations x beams of ItemDecoder keys) -> its fused
    rankings of ``width`` item ids, official (``keep_rank``: a tuple that is no item keeps its
    slot, as -1) and lenient (``drop``: removed), -1 padded, and how many distinct valid tuples
    were fused. Fusion (``fuse_beams``, spec section 10) skips INVALID beams, which still use
    their rank j; so the lenient ranking is the official one without the tuples that are no
    item (fusion scores do not depend on the mode)."""
    fused = [key for (key,) in fuse_beams(lists, _valid_tuple, topk=sum(map(len, lists))).items]
    official = np.full(width, -1, dtype=np.int64)
    lenient = np.full(width, -1, dtype=np.int64)
    top = np.asarray(fused[:width], dtype=np.int64)
    official[: len(top)] = np.maximum(top, -1)
    items = [k for k in fused if k >= 0][:width]
    lenient[: len(items)] = items
    return official, lenient, len(fused)


def evaluate_actionpiece(model, tok: ActionPieceTokenizer, layout: ActionPieceLayout, decoder: ItemDecoder,
                         examples, *, q: int, num_beams: int, batch_size: int, seed: int, device: torch.device,
                         autocast_dtype: torch.dtype | None = None, invalid_beams: str = "keep_rank",
                         keep_ranks: bool | None = None) -> dict:
    """Recall/NDCG by generation (spec sections 10-11): q SPR segmentations per user, beam search
    over n_categories steps each, beams decoded and fused with ``fuse_beams``.

    Returns the metrics of the ``invalid_beams`` scoring (``'keep_rank'``: official, or
    ``'drop'``; module docstring) as ``recall@k`` / ``ndcg@k``, both scorings as
    ``official/...`` and ``lenient/...``, ``err@10`` (official: empty slots among the top 10
    of the fused ranking), ``invalid_rate`` (beams that are no item, among all beams),
    ``no_item_rate`` (beams that are a valid feature tuple but no item: the ones the two
    scorings treat differently), ``users`` and ``users_per_second``.

    ``batch_size``: encoder rows (users x q) per beam search. Batch b's segmentations come from
    a generator seeded with (seed, b), so every validation sees the same inputs. On CPU the
    batches run in one Python thread per torch thread, each op single-threaded: decoding is
    many small ops, whose cross-core synchronisation costs more than it saves (far more on a
    busy machine), while the threads release the GIL inside torch.

    Under torchrun every rank must call it: each runs every world_size-th batch (the same
    segmentations, seeded by batch number) and the per-batch results are gathered and added in
    batch order, so every rank returns exactly the single-process figures.

    ``keep_ranks`` (None: whether inside ``modules.evaluation.keeping_ranks``): also ``ranks``
    (each user's target position in the top 10 of the ``invalid_beams`` scoring, -1: not there;
    in the order of ``examples``) and ``history_removed`` (that scoring's metrics and ranks
    with the user's history items dropped from its fused ranking of ``max(num_beams, 10)``
    items before the top 10), as ``modules.evaluation.evaluate_generative`` returns them.
    """
    if invalid_beams not in INVALID_BEAMS:
        raise ValueError(f"train_actionpiece.invalid_beams must be one of {INVALID_BEAMS}, got {invalid_beams!r}")
    was_training = model.training
    model.eval()
    n = len(examples.target)
    width = max(num_beams, ERR_K)
    users_per_batch = max(1, batch_size // q)
    starts = list(range(0, n, users_per_batch))

    @torch.inference_mode()
    def run_batch(b: int):
        start, stop = starts[b], min(n, starts[b] + users_per_batch)
        rng = np.random.default_rng([seed, b])
        input_ids, mask = layout.encode_inputs(tok, np.repeat(examples.history[start:stop], q, axis=0), rng)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            beams = beam_search_tokens(model, input_ids.to(device), mask.to(device), num_beams,
                                       num_steps=tok.n_categories)
        keys = decoder(beams.tokens).reshape(stop - start, q, num_beams)  # row u*q + j: user u, segmentation j
        official = np.empty((stop - start, width), dtype=np.int64)
        lenient = np.empty_like(official)
        empty = 0
        for u, lists in enumerate(keys.tolist()):
            official[u], lenient[u], n_fused = fuse_keys(lists, width)
            empty += max(0, ERR_K - n_fused)
        return official, lenient, empty, int((keys < 0).sum()), int((keys <= NO_ITEM).sum())

    keep = wants_ranks(keep_ranks)
    headline = "official" if invalid_beams == "keep_rank" else "lenient"
    acc = {name: MetricAccumulator(METRIC_KS, keep_ranks=keep and name == headline) for name in ("official", "lenient")}
    removed = MetricAccumulator(METRIC_KS, keep_ranks=True) if keep else None
    empty, invalid, no_item, t0 = 0, 0, 0, time.perf_counter()
    threads = torch.get_num_threads()
    workers = 1 if device.type != "cpu" else threads
    mine = distributed.my_batches(len(starts))  # all of them in one process
    try:
        torch.set_num_threads(1 if workers > 1 else threads)
        progress = UsersProgress(n, "actionpiece eval")
        with ThreadPoolExecutor(workers) as pool:
            for b, (official, lenient, e, bad, phantom) in zip(mine, pool.map(run_batch, mine)):
                target = examples.target[starts[b]: starts[b] + len(official)]
                acc["official"].update(official, target, key=b)
                acc["lenient"].update(lenient, target, key=b)
                if keep:
                    history = examples.history[starts[b]: starts[b] + len(official)]
                    kept = drop_items(official if headline == "official" else lenient, history)
                    removed.update(kept[:, :max(METRIC_KS)], target, key=b)
                progress.update(starts[b] + len(official))
                empty, invalid, no_item = empty + e, invalid + bad, no_item + phantom
    finally:
        torch.set_num_threads(threads)
    if distributed.active():  # integer counts: their sum over ranks is exact
        for a in acc.values():
            a.merge_ranks()
        if keep:
            removed.merge_ranks()
        empty, invalid, no_item = (sum(c) for c in zip(*distributed.all_gather_object((empty, invalid, no_item))))
    seconds = time.perf_counter() - t0
    if distributed.active():
        seconds = max(distributed.all_gather_object(seconds))
    model.train(was_training)
    scores = {name: a.compute() for name, a in acc.items()}
    beams = n * q * num_beams
    result = {**scores[headline],
              **{f"{name}/{k}": v for name, s in scores.items() for k, v in s.items()},
              "err@10": empty / (n * ERR_K), "invalid_rate": invalid / beams, "no_item_rate": no_item / beams,
              "users": n, "users_per_second": n / max(seconds, 1e-9)}
    if keep:
        result["ranks"] = acc[headline].ranks()
        result["history_removed"] = {**removed.compute(), "ranks": removed.ranks()}
    return result
