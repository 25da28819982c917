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
beam search, NDCG@10, on a fixed sample of ``eval_users`` users) -> the best checkpoint
validated again on every validation user (one segmentation each) and tested with
``n_inference_ensemble`` SPR segmentations per user, beams decoded to items and fused (spec
section 10) -> most-popular baseline, 95% bootstrap intervals and the per-user ranks of the
headline scoring (``result.ranks.npz``: modules/reporting.py ``test_report``, which also honours
``test_report.max_users``). Restarting with the same out_dir resumes exactly. The last stdout
line is one JSON object.

The token layout, item decoding, evaluation and tokenizer helpers live in
``modules/actionpiece/recommender.py``. ``invalid_beams``: how a generated feature tuple that
is no item is scored, ``'keep_rank'`` (default: it takes its slot and misses, as the official
code) or ``'drop'`` (lenient); the result reports both (``test_official``, ``test_lenient``).

Several processes (``torchrun --nproc_per_node N train_actionpiece.py ...``): the vocabulary is
learned (or loaded) once, on rank 0, and broadcast; each rank trains on its share of every batch
and evaluates its share of the users (``modules/distributed.py``); rank 0 alone writes.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import gin
import numpy as np
import torch
import torch.nn.functional as F

from data.prepare import load_dataset
from modules import distributed
from modules.actionpiece.recommender import (
    IGNORE, ActionPieceLayout, ItemDecoder, evaluate_actionpiece, run_vocabulary,
)
from modules.decoder_models import T5ConfigBound
from modules.recommender import export_run, recommender_record, tokenizer_fingerprint, tokenizer_reference
from modules.reporting import REPORT_KEYS, run_facts, stopped_result, test_report
from modules.tokens import PAD
from modules.training import (
    SummedLoss, autocast_dtype, length_chunks, load_best, make_optimizer, parse_gin_cli, pick_device, print_result,
    seed_everything, train_loop, warmup_cosine,
)
from modules.transformers.generation import shift_right
from modules.transformers.t5 import T5


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
    output_vocab: str = "targets",  # 'targets' or 'all' (modules/actionpiece/recommender.py)
    invalid_beams: str = "keep_rank",  # a decoded tuple that is no item: 'keep_rank' (official) or 'drop'
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
    push_to_hub: str | None = None,  # Hub repo id for the recommender (modules/recommender/)
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
    with distributed.rank0_first():  # under torchrun rank 0 prepares and caches the data, the others read it
        dataset = load_dataset()
    features = dict(n_hash_buckets=n_hash_buckets, pca_dim=pca_dim, n_codebooks=n_codebooks,
                    codebook_size=codebook_size, seed=feature_seed, opq_iter=opq_iter)
    tok_source = tokenizer or out / "tokenizer"  # given, else learned into (or, on resume, loaded from) out_dir
    tok = distributed.on_main(  # learned or loaded once, by rank 0, and broadcast
        lambda: run_vocabulary(tokenizer, out / "tokenizer", dataset, vocab_size, vocab_mode, features))
    layout = ActionPieceLayout.build(tok, output_vocab)
    decoder = ItemDecoder(tok, layout)
    train, valid, test = dataset.train_examples(), dataset.eval_examples("valid"), dataset.eval_examples("test")
    labels_of = torch.from_numpy(layout.labels)

    model = T5(T5ConfigBound(vocab_size=layout.vocab_size, output_vocab_size=layout.output_vocab_size)).to(dev)
    # What best.pt and the final export say the model is and how it is served (modules/recommender/record.py).
    record = recommender_record(model, "actionpiece", dataset, tokenizer_reference(tok_source, tok),
                                output_vocab=output_vocab, num_beams=num_beams, eval_seed=eval_seed,
                                n_inference_ensemble=n_inference_ensemble, batch_size=eval_batch_size)
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
        # Summed, not averaged: the loop divides by the label count of the whole (global) batch.
        return SummedLoss(total, (labels != IGNORE).sum().to(dev))

    common = dict(num_beams=num_beams, batch_size=eval_batch_size, seed=eval_seed, device=dev, autocast_dtype=amp,
                  invalid_beams=invalid_beams)

    valid_sample = valid.sample(eval_users, seed)

    def validate():
        return evaluate_actionpiece(model, tok, layout, decoder, valid_sample, q=1, **common)

    # Beyond the bindings, a checkpoint belongs to this data and this exact vocabulary.
    identity = {"dataset": dataset.fingerprint(), "tokenizer": tokenizer_fingerprint(tok)}
    loop, logger = train_loop(
        model=model, optimizer=optimizer, scheduler=scheduler, num_examples=len(train), batch_size=batch_size,
        loss_fn=loss_fn, validate=validate, out_dir=out, max_steps=max_steps, eval_every=eval_every, seed=seed,
        grad_clip=grad_clip, patience=patience, max_train_minutes=max_train_minutes,
        stop_after_steps=stop_after_steps, log_every=log_every, resume=resume, wandb_mode=wandb_mode,
        wandb_project=wandb_project, run_name=run_name, identity=identity, script="train_actionpiece",
        desc="actionpiece", best_payload={"recommender": record})
    if not loop.finished:  # stopped on purpose (stop_after_steps): resume later from last.pt
        logger.finish()
        return stopped_result(out, loop.step)

    # ---- the best-validation checkpoint on every validation user, then the test
    # It was selected on the eval_users sample, whose score is biased upward by the selection:
    # "valid" reports it again on every validation user (one segmentation each, as during
    # training; on Beauty at 50 beams ~10 min on 2 CPU cores), "valid_selection" the sample
    # (when that is every user, "valid" repeats its figures, now with the per-user ranks).
    selection = load_best(model, out, identity, "train_actionpiece")["valid"]

    def final_evaluate(examples, q, what):
        print(f"[actionpiece] {what} the best checkpoint (step {loop.best_step}) on {len(examples):,} users x {q} "
              "segmentations", file=sys.stderr)
        return evaluate_actionpiece(model, tok, layout, decoder, examples, q=q, **common)

    def extra(valid_metrics, test_metrics):  # beyond the headline ("test": the invalid_beams scoring)
        return {"valid_users": valid_metrics["users"],
                "test_official": {k: test_metrics[f"official/{k}"] for k in REPORT_KEYS},
                "test_lenient": {k: test_metrics[f"lenient/{k}"] for k in REPORT_KEYS},
                **{k: test_metrics[k] for k in ("err@10", "invalid_rate", "no_item_rate")},  # its only search's
                # A few users a second on CPU (q segmentations x num_beams each): two decimals.
                "eval_users_per_second": round(test_metrics["users_per_second"], 2),
                "test_eval_seconds": round(test_metrics["users"] / test_metrics["users_per_second"], 1)}

    # modules/reporting.py: intervals, per-user ranks (result.ranks.npz), the history-removed test,
    # popularity, cold / warm groups; test_report.max_users for smoke runs.
    report = test_report(dataset, lambda examples: final_evaluate(examples, n_inference_ensemble, "testing"),
                         valid, test, unconstrained=False, extra=extra,
                         valid_evaluate=lambda examples: final_evaluate(examples, 1, "validating"))
    if not distributed.is_main():  # evaluations ran sharded on every rank (above); rank 0 alone reports, exports
        logger.finish()
        distributed.barrier()
        return {}
    result = {
        "dataset": dataset.name,
        **report,
        "valid_selection": {k: selection[k] for k in REPORT_KEYS},
        "valid_selection_users": selection["users"],
        "invalid_beams": invalid_beams,
        "steps": loop.step,
        "best_step": loop.best_step,
        "train_seconds": round(loop.train_seconds, 1),
        "vocab_size": tok.vocab_size,
        "vocab_seconds": tok.config.get("vocab_seconds"),
        "output_vocab_size": layout.output_vocab_size,
        "num_beams": num_beams,
        "n_inference_ensemble": n_inference_ensemble,
        **run_facts(dev, amp, t_start), "curve": loop.curve,  # RESULTS.md (bench/results_table.py)
    }
    logger.summary({f"test/{k}": v for k, v in result["test"].items()})
    logger.finish()
    # What from_pretrained(out_dir) loads, and exactly what push_to_hub sends: modules/recommender/.
    result["recommender"] = str(export_run(out, record, model, tok, result, push_to_hub))
    if push_to_hub:
        result["hub"] = push_to_hub
    print_result(result, out)
    distributed.barrier()  # the other ranks return once rank 0's files are written
    return result


def main(argv: list[str] | None = None) -> dict:
    parse_gin_cli(argv, __doc__)
    return train_actionpiece()


if __name__ == "__main__":
    main()
