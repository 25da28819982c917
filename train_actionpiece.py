"""Train an ActionPiece recommender (Hou et al., ICML 2025; ``shared/design/actionpiece.md``):
a T5 that reads a user's history tokenized by ActionPiece (with Set Permutation
Regularization) and generates the next item's tokens.

    python train_actionpiece.py configs/actionpiece_amazon.gin bench/configs/beauty_local.gin \
        bench/configs/cpu_30min_actionpiece.gin   # 30 minutes of training on a CPU

Tiny CPU recipe (a minute): python train_actionpiece.py configs/tiny/actionpiece_tiny.gin

Reads top to bottom: dataset -> item features (text embeddings -> PCA + OPQ codes + hash
bucket, quantizer fitted on the train-split items) -> ActionPiece vocabulary learned on the
train split (or loaded: ``tokenizer=`` path / Hub id, or ``out_dir/tokenizer`` on resume) ->
token layout -> T5 -> training loop (modules.training.train_loop) whose batches are
re-segmented with SPR each time they are built -> validation (one SPR segmentation per user,
beam search, NDCG@10) -> test of the best checkpoint with ``n_inference_ensemble`` SPR
segmentations per user, beams decoded to items and fused (spec section 10) -> most-popular
baseline. Restarting with the same out_dir resumes exactly. The last stdout line is one JSON
object.

Token layout (model ids): PAD 0, BOS 1, EOS 2 as in ``modules.tokens`` (so the shared
``shift_right`` and beam search apply), then the ActionPiece tokens 1..V-1; ActionPiece's own
pad (token 0) is the model's PAD, so the model vocabulary is V + 2 as in the official code
(which puts BOS/EOS at V and V+1 instead). ``output_vocab = 'targets'`` (default) orders the
tokens that occur in some item's deterministic encoding first and lets the decoder emit only
those (and the specials): like TIGER's user tokens, the others never occur in a label, and
on Beauty this cuts the output layer from 40k to ~13k tokens, the bulk of the decoding
cost. ``'all'``: every token, as the official code.
"""

from __future__ import annotations

import hashlib
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import gin
import numpy as np
import torch
import torch.nn.functional as F

from data.prepare import load_dataset, load_item_embeddings
from modules.actionpiece import ActionPieceTokenizer
from modules.actionpiece.features import item_features_from_embeddings
from modules.actionpiece.segment import fuse_beams
from modules.beam_search import beam_search_tokens
from modules.evaluation import MetricAccumulator, popularity_ranking, ranking_metrics
from modules.tokens import BOS, EOS, NUM_SPECIAL, PAD
from modules.training import (
    autocast_dtype, length_chunks, load_best, make_optimizer, parse_gin_cli, pick_device, print_result,
    seed_everything, train_loop, warmup_cosine,
)
from modules.transformers.generation import shift_right
from modules.transformers.t5 import T5, T5Config

# Calling this (not the raw dataclass) applies the gin bindings of T5Config.*.
T5ConfigBound = gin.external_configurable(T5Config)
REPORT_KEYS = ("recall@1", "recall@5", "recall@10", "ndcg@5", "ndcg@10")
IGNORE = -100  # label padding, ignored by the loss


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
    """Generated model tokens -> item ids with the tokenizer's decoding (cut at EOS, expand merges,
    every category exactly once); a feature tuple that is no item is invalid too (-1)."""

    def __init__(self, tok: ActionPieceTokenizer, layout: ActionPieceLayout):
        self.tok, self.to_ap = tok, layout.to_ap
        self.item_of = {tuple(int(v) for v in row): i for i, row in enumerate(tok.item_features)}
        self.memo: dict[tuple[int, ...], int] = {}  # beams repeat a lot across users

    def __call__(self, tokens: torch.Tensor) -> np.ndarray:
        """(..., T) model token ids -> (...) item ids, -1 = invalid."""
        ap = self.to_ap[tokens.cpu().numpy()]
        flat = ap.reshape(-1, ap.shape[-1])
        out = np.empty(len(flat), dtype=np.int64)
        memo, item_of, decode = self.memo, self.item_of, self.tok.decode
        for r, seq in enumerate(map(tuple, flat.tolist())):
            item = memo.get(seq)
            if item is None:
                feats = decode(seq)
                item = memo[seq] = -1 if feats is None else item_of.get(feats, -1)
            out[r] = item
        return out.reshape(ap.shape[:-1])


def _item_tuple(item: int):
    return (item,) if item >= 0 else None


def evaluate_actionpiece(model, tok: ActionPieceTokenizer, layout: ActionPieceLayout, decoder: ItemDecoder,
                         examples, *, q: int, num_beams: int, batch_size: int, seed: int, device: torch.device,
                         autocast_dtype: torch.dtype | None = None) -> dict:
    """Recall/NDCG by generation (spec sections 10-11): q SPR segmentations per user, beam search
    over n_categories steps each, beams decoded to items and fused with ``fuse_beams``.

    ``batch_size``: encoder rows (users x q) per beam search. Batch b's segmentations come from
    a generator seeded with (seed, b), so every validation sees the same inputs. On CPU the
    batches run in one Python thread per torch thread, each op single-threaded: decoding is
    many small ops, whose cross-core synchronisation costs more than it saves (far more on a
    busy machine), while the threads release the GIL inside torch. Also returns ``err@10``
    (invalid beams among each segmentation's top 10, before fusion), ``invalid_rate`` (among
    all its beams), ``users`` and ``users_per_second``.
    """
    was_training = model.training
    model.eval()
    n = len(examples.target)
    width = max(num_beams, 10)
    users_per_batch = max(1, batch_size // q)
    starts = list(range(0, n, users_per_batch))

    @torch.inference_mode()
    def run_batch(b: int) -> tuple[np.ndarray, int, int]:
        start, stop = starts[b], min(n, starts[b] + users_per_batch)
        rng = np.random.default_rng([seed, b])
        input_ids, mask = layout.encode_inputs(tok, np.repeat(examples.history[start:stop], q, axis=0), rng)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            beams = beam_search_tokens(model, input_ids.to(device), mask.to(device), num_beams,
                                       num_steps=tok.n_categories)
        items = decoder(beams.tokens).reshape(stop - start, q, num_beams)  # row u*q + j: user u, segmentation j
        ranked = np.full((stop - start, width), -1, dtype=np.int64)
        for u, lists in enumerate(items.tolist()):
            fused = fuse_beams(lists, _item_tuple, topk=width).items
            ranked[u, : len(fused)] = [i for (i,) in fused]
        return ranked, int((items[..., :10] < 0).sum()), int((items < 0).sum())

    acc, invalid10, invalid_all, t0 = MetricAccumulator((1, 5, 10)), 0, 0, time.perf_counter()
    threads = torch.get_num_threads()
    workers = 1 if device.type != "cpu" else threads
    try:
        torch.set_num_threads(1 if workers > 1 else threads)
        with ThreadPoolExecutor(workers) as pool:
            for b, (ranked, bad10, bad) in enumerate(pool.map(run_batch, range(len(starts)))):
                acc.update(ranked, examples.target[starts[b]: starts[b] + len(ranked)])
                invalid10, invalid_all = invalid10 + bad10, invalid_all + bad
    finally:
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - t0
    model.train(was_training)
    return {**acc.compute(), "err@10": invalid10 / (n * q * min(10, num_beams)),
            "invalid_rate": invalid_all / (n * q * num_beams), "users": n, "users_per_second": n / max(seconds, 1e-9)}


# ----------------------------------------------------------------------------- training
@gin.configurable
def train_actionpiece(
    tokenizer: str | None = None,  # saved ActionPiece tokenizer (dir or Hub id); None: learn one into out_dir/tokenizer
    vocab_size: int = 40_000,
    vocab_mode: str = "correct",  # 'correct' or 'faithful' (the official stale-count quirk, spec section 6)
    n_hash_buckets: int = 64,  # item features (spec section 2): PCA dims, OPQ codebooks x size, hash buckets
    pca_dim: int = 128,
    n_codebooks: int = 4,
    codebook_size: int = 256,
    opq_iter: int = 20,
    feature_seed: int = 12345,
    output_vocab: str = "targets",  # 'targets' or 'all' (see the module docstring)
    out_dir: str = "runs/actionpiece",
    batch_size: int = 256,
    lr: float = 1e-3,
    weight_decay: float = 0.15,
    warmup_steps: int = 10_000,
    max_steps: int = 200_000,
    max_train_minutes: float | None = None,  # wall-clock cap on training (then test the best checkpoint)
    grad_clip: float = 1.0,
    train_chunk: int | None = 64,  # rows per encoder pass, grouped by length (less padding; same loss); None: one
    eval_every: int = 2_000,
    eval_users: int | None = None,  # validate on a fixed random N users (None: all); the test uses all
    eval_batch_size: int = 64,  # encoder rows (users x segmentations) per beam search
    num_beams: int = 50,
    n_inference_ensemble: int = 5,  # SPR segmentations per test user (validation: 1)
    eval_seed: int = 0,  # seeds the evaluation segmentations
    patience: int | None = 20,  # evaluations without improvement before stopping; None: never
    num_threads: int | None = None,  # torch CPU threads (None: torch's default)
    log_every: int = 100,
    seed: int = 42,
    device: str = "auto",
    precision: str = "auto",  # "auto" (bf16 on CUDA / bf16-capable CPUs), "bf16" or "fp32"
    resume: bool = True,
    stop_after_steps: int | None = None,  # stop (with a checkpoint) after this many steps of this run
    wandb_mode: str = "offline",
    wandb_project: str = "sidrec",
    run_name: str | None = None,
) -> dict:
    t_start = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    seed_everything(seed)
    dev = pick_device(device)
    amp = autocast_dtype(dev, precision)

    # ---- data, item features, vocabulary
    dataset = load_dataset()
    features = dict(n_hash_buckets=n_hash_buckets, pca_dim=pca_dim, n_codebooks=n_codebooks,
                    codebook_size=codebook_size, seed=feature_seed, opq_iter=opq_iter)
    tok_dir = out / "tokenizer"
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer, dataset, vocab_size)
    elif tok_dir.is_dir():  # resume: the vocabulary this run learned before
        tok = load_tokenizer(str(tok_dir), dataset, vocab_size)
        made = {k: tok.config.get(k) for k in (*features, "mode", "requested_vocab_size")}
        wanted = {**features, "mode": vocab_mode, "requested_vocab_size": vocab_size}
        if made != wanted:
            diff = {k: (made[k], wanted[k]) for k in wanted if made[k] != wanted[k]}
            raise ValueError(f"{tok_dir} was built with other settings (stored, requested): {diff}; "
                             "use another out_dir or delete it")
    else:
        print(f"[actionpiece] learning a {vocab_size:,}-token vocabulary on {dataset.name} ...", file=sys.stderr)
        tok = build_tokenizer(dataset, vocab_size, vocab_mode, features)
        tok.save_pretrained(tok_dir)
    layout = ActionPieceLayout.build(tok, output_vocab)
    decoder = ItemDecoder(tok, layout)
    train, valid, test = dataset.train_examples(), dataset.eval_examples("valid"), dataset.eval_examples("test")
    labels_of = torch.from_numpy(layout.labels)

    model = T5(T5ConfigBound(vocab_size=layout.vocab_size, output_vocab_size=layout.output_vocab_size)).to(dev)
    optimizer = make_optimizer(model, lr, weight_decay)
    scheduler = warmup_cosine(optimizer, warmup_steps, max_steps)
    print(f"[actionpiece] {dataset.name}: {len(train):,} train examples, {dataset.num_users:,} users, vocabulary "
          f"{tok.vocab_size:,} (decoder emits {layout.output_vocab_size:,}), "
          f"{sum(p.numel() for p in model.parameters()):,} parameters on {dev}", file=sys.stderr)

    def loss_fn(idx):
        batch = train.batch(idx)
        # A fresh SPR segmentation every time a batch is built, drawn from the global numpy RNG,
        # which the checkpoints save: a resumed run segments exactly as an uninterrupted one.
        rng = np.random.default_rng(np.random.randint(0, 2**31, size=2))
        input_ids, mask = layout.encode_inputs(tok, batch.history, rng)
        labels = labels_of[batch.target]
        labels = labels[:, : int((labels != IGNORE).sum(1).max())]
        total = torch.zeros((), device=dev)
        for sel, width in length_chunks(mask.sum(1), train_chunk):
            x, m = input_ids[sel, :width].to(dev), mask[sel, :width].to(dev)
            y = labels[sel].to(dev)
            with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
                logits = model(x, m, shift_right(y.clamp(min=PAD)))
            total = total + F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE,
                                            reduction="sum")
        return total / (labels != IGNORE).sum().to(dev)

    common = dict(num_beams=num_beams, batch_size=eval_batch_size, seed=eval_seed, device=dev, autocast_dtype=amp)

    valid_sample = valid.sample(eval_users, seed)

    def validate():
        return evaluate_actionpiece(model, tok, layout, decoder, valid_sample, q=1, **common)

    loop, logger = train_loop(
        model=model, optimizer=optimizer, scheduler=scheduler, num_examples=len(train), batch_size=batch_size,
        loss_fn=loss_fn, validate=validate, out_dir=out, max_steps=max_steps, eval_every=eval_every, seed=seed,
        grad_clip=grad_clip, patience=patience, max_train_minutes=max_train_minutes,
        stop_after_steps=stop_after_steps, log_every=log_every, resume=resume, wandb_mode=wandb_mode,
        wandb_project=wandb_project, run_name=run_name, desc="actionpiece",
        best_payload={"model_config": model.config.to_dict(), "to_ap": layout.to_ap.tolist(),
                      "tokenizer": str(tokenizer or tok_dir)})
    if not loop.finished:  # stopped on purpose (stop_after_steps): resume later from last.pt
        logger.finish()
        result = {"stopped_at_step": loop.step, "checkpoint": str(out / "last.pt")}
        print_result(result)
        return result

    # ---- test the best-validation checkpoint
    # Its validation metrics are the ones it was selected on (eval_users users): decoding
    # every validation user again would cost a fifth of the test for the same protocol.
    valid_metrics = load_best(model, out)["valid"]
    print(f"[actionpiece] testing the best checkpoint (step {loop.best_step}) on {len(test):,} users x "
          f"{n_inference_ensemble} segmentations", file=sys.stderr)
    test_metrics = evaluate_actionpiece(model, tok, layout, decoder, test, q=n_inference_ensemble, **common)
    popular = popularity_ranking(dataset.train_item_counts(), len(test), 10)
    pop_metrics = ranking_metrics(popular, test.target, ks=(1, 5, 10))
    result = {
        "dataset": dataset.name,
        "valid": {k: valid_metrics[k] for k in REPORT_KEYS},
        "valid_users": valid_metrics["users"],
        "test": {k: test_metrics[k] for k in REPORT_KEYS},
        "err@10": test_metrics["err@10"],
        "invalid_rate": test_metrics["invalid_rate"],
        "popularity": {k: pop_metrics[k] for k in REPORT_KEYS},
        "steps": loop.step,
        "best_step": loop.best_step,
        "train_seconds": round(loop.train_seconds, 1),
        "eval_users_per_second": round(test_metrics["users_per_second"], 2),
        "test_eval_seconds": round(test_metrics["users"] / test_metrics["users_per_second"], 1),
        "vocab_size": tok.vocab_size,
        "vocab_seconds": tok.config.get("vocab_seconds"),
        "output_vocab_size": layout.output_vocab_size,
        "num_beams": num_beams,
        "n_inference_ensemble": n_inference_ensemble,
        "device": str(dev) if dev.type != "cuda" else torch.cuda.get_device_name(dev),
        "seconds": round(time.time() - t_start, 1),
    }
    logger.summary({f"test/{k}": v for k, v in result["test"].items()})
    logger.finish()
    print_result(result)
    return result


def main(argv: list[str] | None = None) -> dict:
    parse_gin_cli(argv, __doc__)
    return train_actionpiece()


if __name__ == "__main__":
    main()
