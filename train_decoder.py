"""Train a generative recommender (T5 encoder-decoder as in TIGER, a GPT decoder, or RecGPT's
block-causal decoder, ``architecture = 'recgpt'``) that generates the semantic ID of the next
item, and evaluate it with trie-constrained beam search; RPG (``architecture = 'rpg'``), which
predicts an item's long unordered semantic ID in parallel and ranks all items exactly (or by
graph-constrained decoding); or the ID-based SASRec baseline
(``architecture = 'sasrec'``, no tokenizer), which ranks all items exactly and saves its item
embeddings for ``load_item_embeddings('sasrec:<out_dir>')``.

    python train_rqvae.py configs/rqvae_amazon.gin bench/configs/beauty_local.gin
    python train_decoder.py configs/decoder_amazon.gin bench/configs/beauty_local.gin
    python train_decoder.py configs/decoder_amazon.gin bench/configs/beauty_local.gin \
        bench/configs/cpu_30min_decoder.gin   # 30 minutes of training on a CPU
    python train_decoder.py configs/sasrec_amazon.gin bench/configs/beauty_local.gin   # SASRec
    python train_decoder.py configs/rpg_amazon.gin bench/configs/beauty_local.gin      # RPG (OPQ tokenizer)
    torchrun --nproc_per_node 8 train_decoder.py ...   # data parallel on 8 GPUs (modules/distributed.py)

Tiny CPU recipe (a minute): python train_rqvae.py configs/tiny/rqvae_tiny.gin &&
    python train_decoder.py configs/tiny/decoder_tiny.gin

Reads top to bottom: dataset -> tokenizer (path or Hub id) -> token layout + item trie ->
model -> training loop (AdamW, warm-up + cosine, grad clipping, bf16 autocast on GPU and bf16-capable CPUs) with
validation on NDCG@10 every ``eval_every`` steps (best + last checkpoints, early stopping)
-> test metrics of the best-validation checkpoint, the invalid-ID rate of unconstrained
search, and a most-popular baseline. Restarting with the same out_dir resumes exactly.
The last stdout line is one JSON object.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import gin
import torch

from data.prepare import load_dataset
from modules import distributed
from modules.beam_search import PrefixTrie
from modules.decoder_models import (
    GraphScoresBound, build_model, check_settings, cold_slot_tries, load_tokenizer,
    training_precision,
)
from modules.evaluation import RestrictedScores, evaluate_exact_topk, evaluate_generative
from modules.recommender import export_run, recommender_record, tokenizer_fingerprint, tokenizer_reference
from modules.reporting import REPORT_KEYS, run_facts, stopped_result, test_report  # noqa: F401 - REPORT_KEYS: train_decoder.REPORT_KEYS
from modules.rpg import rpg_loss
from modules.objectives import all_positions_loss, full_softmax_loss, next_item_block_loss, sliding_window_loss
from modules.sasrec import save_item_embeddings
from modules.tokens import TokenLayout
from modules.training import (
    SummedLoss, load_best, make_optimizer, parse_gin_cli, pick_device, print_result,
    resolved_config, seed_everything, train_loop, warmup_cosine,
)


@gin.configurable
def train_decoder(
    tokenizer: str | None = None,  # train_rqvae.py output dir or Hub repo id (t5, gpt, recgpt; sasrec needs none)
    architecture: str = "t5",  # "t5", "gpt", "recgpt", "rpg" (semantic IDs) or "sasrec" (item IDs)
    # "sliding": one example per target (history = the items before it, up to max_history);
    # "all_positions" (GPT, RecGPT, SASRec): one causal pass per sequence segment predicts all its targets.
    train_mode: str = "sliding",
    out_dir: str = "runs/decoder",
    num_user_buckets: int = 2000,  # TIGER's hashed user token; 0: none
    batch_size: int = 256,
    lr: float = 1e-3,
    weight_decay: float = 0.15,
    warmup_steps: int = 10_000,
    max_steps: int = 200_000,
    max_train_minutes: float | None = None,  # wall-clock cap on training (then test the best checkpoint)
    grad_clip: float = 1.0,
    train_chunk: int | None = 64,  # rows per encoder pass, grouped by history length; None: the whole batch
    eval_every: int = 2_000,
    eval_users: int | None = None,  # validate on a fixed random N users (None: all); test always uses all
    eval_batch_size: int = 256,
    beam_size: int = 20,
    decoding: str = "exact",  # rpg: "exact" (score every item) or "graph" (RPG's graph-constrained decoding)
    unconstrained_test: bool = True,  # also test without the item trie (invalid-ID rate): one more test pass
    # Cold-start / zero-shot test (load_dataset.cold_items or holdout_domain), semantic IDs only:
    # TIGER's cold-start share, this many of the top 10 reserved for held-out items (0: none).
    cold_slots: int = 0,
    patience: int | None = 10,  # evaluations without improvement before stopping; None: never
    log_every: int = 100,
    seed: int = 42,
    device: str = "auto",
    precision: str = "auto",  # training: "auto" (bf16 on CUDA, the faster one measured on a CPU), "bf16", "fp32"
    resume: bool = True,
    stop_after_steps: int | None = None,  # stop (with a checkpoint) after this many steps of this run
    wandb_mode: str = "offline",
    wandb_project: str = "sidrec",
    run_name: str | None = None,
    push_to_hub: str | None = None,  # Hub repo id for the recommender (modules/recommender/)
) -> dict:
    t_start = time.time()
    check_settings(architecture, train_mode, decoding, tokenizer)
    sasrec = architecture == "sasrec"
    exact = architecture in ("sasrec", "rpg")  # models that score every item: exact top-K, no beam search
    all_positions = train_mode == "all_positions"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(seed)
    dev = pick_device(device)

    with distributed.rank0_first():  # under torchrun rank 0 prepares and caches the data, the others read it
        dataset = load_dataset()
    # What the run trains on beyond its gin bindings: a checkpoint is resumed / tested only
    # with the same data and the same item codes (a retrained tokenizer under the same path).
    identity = {"dataset": dataset.fingerprint()}
    tok = layout = item_codes = trie = None
    if not sasrec:
        tok = load_tokenizer(tokenizer, dataset)
        item_codes = tok.item_codes.to(dev)
        identity["item_codes"] = tokenizer_fingerprint(tok)
    if not exact:  # beam search over the trie of the items' token sequences
        layout = TokenLayout(tuple(tok.codebook_sizes), num_user_buckets=num_user_buckets)
        trie = PrefixTrie(item_codes, layout.codebook_sizes).to(dev)
    train = dataset.train_segments() if all_positions else dataset.train_examples()
    valid, test = dataset.eval_examples("valid"), dataset.eval_examples("test")
    use_user = num_user_buckets > 0 and not exact

    model = build_model(architecture, layout, dataset, tok).to(dev)
    # What best.pt and the final export say the model is and how it is served (modules/recommender/record.py).
    record = recommender_record(model, architecture, dataset, None if sasrec else tokenizer_reference(tokenizer, tok),
                                layout=layout, beam_size=beam_size, batch_size=eval_batch_size, cold_slots=cold_slots)
    optimizer = make_optimizer(model, lr, weight_decay)
    scheduler = warmup_cosine(optimizer, warmup_steps, max_steps)
    print(f"[decoder] {dataset.name}: {len(train):,} train {'segments' if all_positions else 'examples'}, "
          f"{dataset.num_users:,} users, "
          f"{sum(p.numel() for p in model.parameters()):,} parameters ({architecture}) on {dev}", file=sys.stderr)

    def as_user(user):
        return torch.as_tensor(user, device=dev) if use_user else None

    def batch_loss(idx, amp: torch.dtype | None):
        if sasrec:  # whole segments, a softmax over all items at every position
            total, count = full_softmax_loss(model, torch.as_tensor(train.batch(idx)[1], device=dev), amp, train_chunk)
        elif architecture == "rpg":  # whole segments, every position predicts the next item's n codes
            total, count = rpg_loss(model, torch.as_tensor(train.batch(idx)[1], device=dev), amp, train_chunk)
        elif architecture == "recgpt":  # whole segments: each item's block predicts the next item's codes
            items = torch.as_tensor(train.batch(idx)[1], device=dev)
            total, count = next_item_block_loss(model, layout, item_codes, items, amp, train_chunk)
        elif all_positions:  # whole segments: every target of a sequence in one causal pass
            user, items = train.batch(idx)
            total, count = all_positions_loss(model, layout, item_codes, torch.as_tensor(items, device=dev),
                                              as_user(user), amp, train_chunk)
        else:  # one sliding window per target
            batch = train.batch(idx)
            total, count = sliding_window_loss(
                model, layout, item_codes, torch.as_tensor(batch.history, device=dev),
                torch.as_tensor(batch.target, device=dev), as_user(batch.user), amp, train_chunk)
        # Summed, not averaged: the loop divides by the label count of the whole (global) batch.
        return SummedLoss(total, count)

    # bf16 autocast where it measures faster on this machine (cached); evaluation is fp32.
    amp = training_precision(dev, precision, model, batch_loss, len(train), batch_size, seed, train_mode, train_chunk)
    print(f"[decoder] training precision: {'bf16 autocast' if amp else 'fp32'}", file=sys.stderr)

    def loss_fn(idx):
        return batch_loss(idx, amp)

    # Under a cold split an item-ID model ranks only the items it trained on (0 on cold targets);
    # semantic-ID models search all items, cold ones included (their IDs come from text).
    scorer = model if dataset.cold is None or not sasrec else RestrictedScores(model, ~dataset.cold)

    # cold_slots: the items trained on and the held-out ones, searched apart (None: no slots)
    slot_tries = cold_slot_tries(cold_slots, item_codes if not exact else None, layout, dataset.cold)

    def evaluate(examples, unconstrained: bool = False, slots: int = 0):
        if exact:  # exact top-K over all items
            # RPG's graph decoding: a new graph from the weights being evaluated, each time.
            ranker = GraphScoresBound(model, seed=seed) if decoding == "graph" else scorer
            return evaluate_exact_topk(ranker, examples, batch_size=eval_batch_size, device=dev)
        searched, cold_trie = slot_tries if slots else (trie, None)
        return evaluate_generative(model, examples, item_codes, layout, searched, beam_size=beam_size,
                                   unconstrained=unconstrained, batch_size=eval_batch_size, use_user=use_user,
                                   device=dev, cold_trie=cold_trie, cold_slots=slots)

    def final_evaluate(examples, unconstrained: bool = False):  # the test report's: cold slots, if any, apply
        return evaluate(examples, unconstrained, 0 if unconstrained else cold_slots)

    valid_sample = valid.sample(eval_users, seed)

    def validate():
        return evaluate(valid_sample)

    loop, logger = train_loop(
        model=model, optimizer=optimizer, scheduler=scheduler, num_examples=len(train), batch_size=batch_size,
        loss_fn=loss_fn, validate=validate, out_dir=out, max_steps=max_steps, eval_every=eval_every, seed=seed,
        grad_clip=grad_clip, patience=patience, max_train_minutes=max_train_minutes,
        stop_after_steps=stop_after_steps, log_every=log_every, resume=resume, wandb_mode=wandb_mode,
        wandb_project=wandb_project, run_name=run_name, identity=identity, script="train_decoder", desc="decoder",
        best_payload={"recommender": record})
    if not loop.finished:  # stopped on purpose (stop_after_steps): resume later from last.pt
        logger.finish()
        return stopped_result(out, loop.step)

    # ---- test the best-validation checkpoint
    load_best(model, out, identity, "train_decoder")
    # Exact ranking returns items only: nothing invalid to measure (no unconstrained search).
    report = test_report(dataset, final_evaluate, valid, test, unconstrained=unconstrained_test and not exact,
                         exact=exact)
    if not distributed.is_main():  # evaluations ran sharded on every rank (above); rank 0 alone reports, exports
        logger.finish()
        distributed.barrier()
        return {}
    result = {
        "dataset": dataset.name,
        "architecture": architecture,
        "train_mode": train_mode,
        **report,
        "steps": loop.step,
        "best_step": loop.best_step,
        "train_seconds": round(loop.train_seconds, 1),
        **({"decoding": decoding} if architecture == "rpg" else {} if sasrec else {"beam_size": beam_size}),
        **({"cold_slots": cold_slots} if cold_slots else {}),
        **run_facts(dev, amp, t_start), "curve": loop.curve,  # RESULTS.md (bench/results_table.py)
    }
    if sasrec:  # the best checkpoint's item table, for train_rqvae.py via load_item_embeddings
        result["item_embeddings"] = str(save_item_embeddings(out, model, {
            "dataset": dataset.name, "dataset_fingerprint": dataset.fingerprint(), "best_step": loop.best_step,
            "valid_ndcg@10": report["valid"]["ndcg@10"], "config": resolved_config()}))
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
    return train_decoder()


if __name__ == "__main__":
    main()
