"""GRPO fine-tuning of a trained generative recommender (train_decoder.py's T5 or GPT).

    python train_grpo.py configs/grpo_amazon.gin bench/configs/beauty_local.gin   # from the Beauty TIGER run

Tiny CPU recipe (about a minute after the tiny decoder recipe):
    python train_rqvae.py configs/tiny/rqvae_tiny.gin && python train_decoder.py configs/tiny/decoder_tiny.gin &&
    python train_grpo.py configs/tiny/grpo_tiny.gin

Reads top to bottom: dataset -> the SFT run's best-validation model and its tokenizer
(``<sft_dir>/best.pt``, rebuilt from the recommender record it carries: model config, token
layout, where its tokenizer is; the GRPO configs include the SFT recipe for its data settings,
and its ``train_decoder.*`` names parse without train_decoder.py: modules/decoder_models.py)
-> a frozen reference copy -> the SFT starting point's valid/test metrics -> the
shared training loop (modules.training.train_loop: validation NDCG@10 every ``eval_every``
steps, best/last checkpoints, early stopping, exact resume), where each step takes a batch of
training windows (history -> target), draws a group of G candidate items per user from the
current policy (trie-constrained sampling or constrained beam search: every candidate is a
real item), scores them (rule / rank-aware / semantic rewards, summed) and minimises the GRPO
loss (modules/grpo.py) -> test of the best-validation checkpoint, the SFT model counting as
step 0 (best.pt is the SFT model itself when no GRPO validation beats its figure on the same
validation users, so the output never validates below the input) -> ``out_dir/recommender``,
its export (what ``GenerativeRecommender.from_pretrained(out_dir)`` loads). The last stdout line is one
JSON object (train_decoder.py's keys from modules/reporting.py ``test_report``, constrained
search only: intervals, ``result.ranks.npz``; plus ``sft_valid`` / ``sft_test`` on the same users
and the means over the training steps of the reward, the in-group hit rate (fraction of
candidates that are the target), the fraction of groups holding it, KL, clip fraction and
entropy).

Several processes (``torchrun --nproc_per_node N train_grpo.py ...``): each rank draws the groups
of its share of every batch's users (the loss is a mean over users, weighted by share), and
evaluation is sharded (``modules/distributed.py``). The logged step statistics are averaged over
ranks; the ``train_*`` means of the result are over rank 0's share.

Departures from the papers (DeepSeekMath's GRPO, MiniOneRec):
- One update per group (on-policy, as nanochat's RL script): the policy that drew the group
  is the current one, so the ratio is exactly 1, the clip never binds (clip fraction 0) and the
  surrogate's gradient is the REINFORCE gradient with group-normalised advantages. The clipped
  objective is kept (modules/grpo.py takes any pi_old) for several updates per group, which
  the shared loop (one optimiser step per batch) does not do yet.
- Sequence-level, not token-level: one ratio per item from its summed code-token log-probs,
  and the loss is the mean over the n x G candidates (every item has L tokens, so
  DeepSeekMath's 1/|o| per-token normalisation is a constant factor).
- KL: the k3 estimator ``exp(d) - d - 1`` per token, summed over the item's tokens, against
  the frozen SFT model (DeepSeekMath's per-token estimator; the reference is never refreshed).
  Its unbiasedness assumes samples from the policy itself; trie-constrained, tempered or
  top-k samples (and beams) are not, so it is a penalty rather than an exact KL.
- The ratio and KL use the model's unconstrained token probabilities, not the renormalised
  trie-constrained ones the candidates were drawn from.
- Advantages use the sample std (eps 1e-4); groups of equal rewards give 0 (no update).
- Rank-aware reward: MiniOneRec's ranking penalty for the misses of groups that contain the
  target, normalised over the group's misses (modules/rewards.py); samples are ranked by the
  policy's sequence probability, beams by beam order.
- Dropout is off throughout (policy and reference in eval mode), training in fp32; no
  entropy bonus; the reward is computed from the leave-one-out training windows' next item.
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import gin
import torch

from data.prepare import load_dataset, load_item_embeddings
from modules import distributed
from modules.beam_search import PrefixTrie
from modules.decoder_models import load_recommender
from modules.evaluation import evaluate_generative
from modules.grpo import STAT_KEYS, grpo_batch_loss, mean_stats, sft_metrics
from modules.recommender import export_run, recommender_record, tokenizer_fingerprint, tokenizer_reference
from modules.reporting import (
    REPORT_KEYS, bound_max_users, reported_examples, run_facts, stopped_result, test_report,
)
from modules.training import (
    StepOutput, atomic_torch_save, fingerprint, load_best, make_optimizer, parse_gin_cli, pick_device, print_result,
    resolved_config, seed_everything, train_loop, warmup_cosine,
)


@gin.configurable
def train_grpo(
    sft_dir: str = "runs/decoder",  # a train_decoder.py out_dir (T5 or GPT) holding best.pt
    tokenizer: str | None = None,  # a copy of the SFT run's tokenizer elsewhere; None: where its best.pt says
    out_dir: str = "runs/grpo",
    candidates: str = "sample",  # "sample" (trie-constrained sampling) or "beam" (G distinct items)
    group_size: int = 16,
    temperature: float = 1.0,
    top_k: int | None = None,  # sampling: keep the k most likely valid codes per level (None: all)
    rewards: tuple = ("rule",),  # summed; any of "rule", "rank", "semantic"
    alpha: float = 0.5,  # weight of the semantic reward
    clip_eps: float = 0.2,
    beta: float = 0.04,  # KL coefficient
    batch_size: int = 32,  # users (training windows) per step; x group_size candidates
    lr: float = 1e-5,
    weight_decay: float = 0.0,
    warmup_steps: int = 20,
    max_steps: int = 1_000,
    max_train_minutes: float | None = None,
    grad_clip: float = 1.0,
    eval_every: int = 100,
    eval_users: int | None = 2_000,  # validate on a fixed random N users (None: all); test uses all
    eval_batch_size: int = 256,
    beam_size: int = 20,
    patience: int | None = 5,
    log_every: int = 10,
    seed: int = 42,
    device: str = "auto",
    resume: bool = True,
    stop_after_steps: int | None = None,
    wandb_mode: str = "offline",
    wandb_project: str = "sidrec",
    run_name: str | None = None,
) -> dict:
    t_start = time.time()
    out = Path(out_dir)
    if out.resolve() == Path(sft_dir).resolve():
        raise ValueError(f"train_grpo.out_dir = {out_dir!r} is the SFT run's folder: a fresh run there would "
                         "replace its best.pt; use another out_dir")
    if candidates not in ("sample", "beam"):
        raise ValueError(f"train_grpo.candidates must be 'sample' or 'beam', got {candidates!r}")
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(seed)
    dev = pick_device(device)

    with distributed.rank0_first():  # under torchrun rank 0 prepares and caches the data, the others read it
        dataset = load_dataset()
    sft = load_recommender(sft_dir, dataset, tokenizer)  # its model, layout, tokenizer, record, best.pt
    model, layout, tok, sft_state = sft.model.to(dev), sft.layout, sft.tokenizer, sft.state
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    architecture = sft.record["config"]["architecture"]
    item_codes = tok.item_codes.to(dev)
    trie = PrefixTrie(item_codes, layout.codebook_sizes).to(dev)
    use_user = layout.num_user_buckets > 0
    embeddings = None
    if "semantic" in rewards:
        embeddings = torch.as_tensor(load_item_embeddings(dataset), device=dev)
    # The run's inputs beyond its bindings: the SFT weights it starts from are one of them.
    identity = {"dataset": dataset.fingerprint(), "item_codes": tokenizer_fingerprint(tok),
                "sft_weights": fingerprint(*sft_state["model"].values())}
    # What best.pt and the export say the model is and how it is served (modules/recommender/record.py).
    record = recommender_record(model, architecture, dataset,
                                tokenizer_reference(tokenizer, tok) if tokenizer else sft.record["config"]["tokenizer"],
                                layout=layout, beam_size=beam_size, batch_size=eval_batch_size)
    train = dataset.train_examples()
    valid, test = dataset.eval_examples("valid"), dataset.eval_examples("test")
    optimizer = make_optimizer(model, lr, weight_decay)
    scheduler = warmup_cosine(optimizer, warmup_steps, max_steps)
    print(f"[grpo] {dataset.name}: {len(train):,} train windows, {architecture} from {sft_dir} (step "
          f"{sft_state['step']}), {candidates} x {group_size}, rewards {'+'.join(rewards)} on {dev}", file=sys.stderr)

    def evaluate(examples):
        return evaluate_generative(model, examples, item_codes, layout, trie, beam_size=beam_size,
                                   batch_size=eval_batch_size, use_user=use_user, device=dev)

    valid_sample = valid.sample(eval_users, seed)  # what every GRPO validation scores
    # The SFT start on the users the final report tests (all, or test_report.max_users' sample).
    max_users = bound_max_users()
    sft_valid, sft_test = reported_examples(valid, test, max_users)
    sft_scores = sft_metrics(out / "sft_metrics.json",
                             {"sft_weights": identity["sft_weights"], "eval_users": eval_users, "seed": seed,
                              "max_users": max_users},
                             lambda: (evaluate(sft_valid), evaluate(sft_test),
                                      None if valid_sample is valid else evaluate(valid_sample)))
    history: list[dict] = []  # per-step statistics of this process's steps

    def loss_fn(idx):
        batch = train.batch(idx)
        stats = grpo_batch_loss(
            model, reference, layout, item_codes, trie, torch.as_tensor(batch.history, device=dev),
            torch.as_tensor(batch.target, device=dev), torch.as_tensor(batch.user, device=dev) if use_user else None,
            mode=candidates, group_size=group_size, rewards=rewards, temperature=temperature, top_k=top_k,
            item_embeddings=embeddings, alpha=alpha, clip_eps=clip_eps, beta=beta)
        history.append({k: getattr(stats, k) for k in STAT_KEYS})
        return StepOutput(stats.loss, history[-1])  # logged per window as train/reward, train/kl, ...

    # The SFT model is the run's step 0: a GRPO checkpoint becomes best.pt only when it validates
    # above it, so the output is never worse on validation than the input.
    best_payload = {"recommender": record}
    loop, logger = train_loop(
        model=model, optimizer=optimizer, scheduler=scheduler, num_examples=len(train), batch_size=batch_size,
        loss_fn=loss_fn, validate=lambda: evaluate(valid_sample), out_dir=out,
        max_steps=max_steps, eval_every=eval_every, seed=seed, grad_clip=grad_clip, patience=patience,
        max_train_minutes=max_train_minutes, stop_after_steps=stop_after_steps, log_every=log_every,
        resume=resume, wandb_mode=wandb_mode, wandb_project=wandb_project, run_name=run_name, identity=identity,
        script="train_grpo", desc="grpo", best_payload=best_payload,
        initial_best=(sft_scores["valid_sample"]["ndcg@10"], 0))
    train_stats = {f"train_{k}": v for k, v in mean_stats(history).items()}
    if history:  # the in-group hit rate of the first and the last log window of this process
        train_stats["hit_rate_first"] = mean_stats(history[:log_every])["hit_rate"]
        train_stats["hit_rate_last"] = mean_stats(history[-log_every:])["hit_rate"]
    logger.summary(train_stats)
    if not loop.finished:  # stopped on purpose (stop_after_steps): resume later from last.pt
        logger.finish()
        return stopped_result(out, loop.step, **train_stats)

    # ---- test the best-validation checkpoint (the SFT model itself when no GRPO step beat it)
    if loop.best_step == 0:
        if distributed.is_main():
            atomic_torch_save({"model": sft_state["model"], "step": 0, "valid": sft_scores["valid_sample"],
                               "config": resolved_config(), "identity": identity, **best_payload}, out / "best.pt")
            print(f"[grpo] no validation beat the SFT model's ndcg@10 {sft_scores['valid_sample']['ndcg@10']:.4f}: "
                  f"{out / 'best.pt'} is the SFT model", file=sys.stderr)
        distributed.barrier()
    load_best(model, out, identity, "train_grpo")
    # modules/reporting.py: intervals, per-user ranks (result.ranks.npz), the history-removed test,
    # popularity, cold / warm groups; constrained search only (invalid_rate None: not measured).
    report = test_report(dataset, evaluate, valid, test, unconstrained=False)
    result = {
        "dataset": dataset.name,
        "architecture": architecture,
        "candidates": candidates,
        "group_size": group_size,
        "rewards": list(rewards),
        **report,
        "sft_valid": {k: sft_scores["valid"][k] for k in REPORT_KEYS},
        "sft_test": {k: sft_scores["test"][k] for k in REPORT_KEYS},
        **train_stats,
        "steps": loop.step,
        "best_step": loop.best_step,
        "train_seconds": round(loop.train_seconds, 1),
        "beam_size": beam_size,
        **run_facts(dev, None, t_start), "curve": loop.curve,  # fp32 training; RESULTS.md
    }
    logger.summary({f"test/{k}": v for k, v in result["test"].items()})
    logger.finish()
    if distributed.is_main():  # what from_pretrained(out_dir) loads: modules/recommender/
        result["recommender"] = str(export_run(out, record, model, tok, result))
    print_result(result, out)
    return result


def main(argv: list[str] | None = None) -> dict:
    # The SFT recipe in the configs gives the data settings; its train_decoder.* bindings are the
    # SFT script's own (the model comes from the SFT run's record), skipped without importing it.
    parse_gin_cli(argv, __doc__, skip_unknown=["train_decoder"])
    return train_grpo()


if __name__ == "__main__":
    main()
