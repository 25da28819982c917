"""Train a generative recommender (T5 encoder-decoder as in TIGER, or a GPT decoder) that
generates the semantic ID of the next item, and evaluate it with trie-constrained beam search.

    python train_rqvae.py configs/rqvae_amazon.gin bench/configs/beauty_local.gin
    python train_decoder.py configs/decoder_amazon.gin bench/configs/beauty_local.gin
    python train_decoder.py configs/decoder_amazon.gin bench/configs/beauty_local.gin \
        bench/configs/cpu_30min_decoder.gin   # 30 minutes of training on a CPU

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
import numpy as np
import torch

from data.prepare import load_dataset
from modules.beam_search import PrefixTrie
from modules.evaluation import evaluate_generative, popularity_ranking, ranking_metrics
from modules.objectives import all_positions_loss, sliding_window_loss
from modules.semantic_ids import SemanticIdTokenizer
from modules.tokens import TokenLayout
from modules.training import (
    autocast_dtype, load_best, make_optimizer, parse_gin_cli, pick_device, print_result,
    fingerprint, seed_everything, train_loop, warmup_cosine,
)
from modules.transformers.gpt import GPT, GPTConfig
from modules.transformers.t5 import T5, T5Config

# Calling these (not the raw dataclasses) applies the gin bindings of T5Config.* / GPTConfig.*.
T5ConfigBound = gin.external_configurable(T5Config)
GPTConfigBound = gin.external_configurable(GPTConfig)
REPORT_KEYS = ("recall@1", "recall@5", "recall@10", "ndcg@5", "ndcg@10")


def load_tokenizer(name: str, dataset) -> SemanticIdTokenizer:
    """A train_rqvae.py tokenizer by path (its dir, or the run dir holding ``tokenizer/``) or Hub id,
    checked against the dataset's items."""
    path = Path(name)
    if (path / "tokenizer").is_dir():
        path = path / "tokenizer"
    if not path.exists() and (name.startswith((".", "/")) or name.count("/") != 1):
        raise FileNotFoundError(f"tokenizer not found: {name} (run train_rqvae.py first, or give a Hub repo id)")
    tok = SemanticIdTokenizer.from_pretrained(str(path) if path.exists() else name)
    if tok.num_items != dataset.num_items:
        raise ValueError(f"tokenizer {name} has codes for {tok.num_items} items but dataset {dataset.name} has "
                         f"{dataset.num_items}: it was trained on another dataset or other preprocessing options")
    if tok.raw_ids is not None:
        try:
            tok.check_raw_ids(dataset.items["raw_id"].to_list())
        except ValueError as e:
            raise ValueError(f"tokenizer {name} does not match dataset {dataset.name}: {e}") from None
    return tok


def build_model(architecture: str, layout: TokenLayout) -> torch.nn.Module:
    if architecture == "t5":
        return T5(T5ConfigBound(vocab_size=layout.vocab_size, output_vocab_size=layout.output_vocab_size))
    if architecture == "gpt":
        return GPT(GPTConfigBound(vocab_size=layout.vocab_size, output_vocab_size=layout.output_vocab_size))
    raise ValueError(f"train_decoder.architecture must be 't5' or 'gpt', got {architecture!r}")


@gin.configurable
def train_decoder(
    tokenizer: str = gin.REQUIRED,  # train_rqvae.py output dir or Hub repo id
    architecture: str = "t5",
    # "sliding": one example per target (history = the items before it, up to max_history);
    # "all_positions" (GPT): one causal pass per sequence segment predicts all its targets.
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
    push_to_hub: str | None = None,  # Hub repo id for the best model + token layout
) -> dict:
    t_start = time.time()
    if train_mode not in ("sliding", "all_positions") or (train_mode == "all_positions" and architecture != "gpt"):
        raise ValueError(f"train_decoder.train_mode must be 'sliding' or (for architecture 'gpt') 'all_positions', "
                         f"got {train_mode!r} with architecture {architecture!r}")
    all_positions = train_mode == "all_positions"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(seed)
    dev = pick_device(device)

    dataset = load_dataset()
    tok = load_tokenizer(tokenizer, dataset)
    layout = TokenLayout(tuple(tok.codebook_sizes), num_user_buckets=num_user_buckets)
    item_codes = tok.item_codes.to(dev)
    trie = PrefixTrie(item_codes, layout.codebook_sizes).to(dev)
    train = dataset.train_segments() if all_positions else dataset.train_examples()
    valid, test = dataset.eval_examples("valid"), dataset.eval_examples("test")
    use_user = num_user_buckets > 0
    # What the run trains on beyond its gin bindings: a checkpoint is resumed / tested only
    # with the same data and the same item codes (a retrained tokenizer under the same path).
    identity = {"dataset": dataset.fingerprint(), "item_codes": fingerprint(tok.item_codes, str(tok.codebook_sizes))}

    model = build_model(architecture, layout).to(dev)
    optimizer = make_optimizer(model, lr, weight_decay)
    scheduler = warmup_cosine(optimizer, warmup_steps, max_steps)
    print(f"[decoder] {dataset.name}: {len(train):,} train {'segments' if all_positions else 'examples'}, "
          f"{dataset.num_users:,} users, "
          f"{sum(p.numel() for p in model.parameters()):,} parameters ({architecture}) on {dev}", file=sys.stderr)

    def as_user(user):
        return torch.as_tensor(user, device=dev) if use_user else None

    def batch_loss(idx, amp: torch.dtype | None):
        if all_positions:  # whole segments: every target of a sequence in one causal pass
            user, items = train.batch(idx)
            total, count = all_positions_loss(model, layout, item_codes, torch.as_tensor(items, device=dev),
                                              as_user(user), amp, train_chunk)
        else:  # one sliding window per target
            batch = train.batch(idx)
            total, count = sliding_window_loss(
                model, layout, item_codes, torch.as_tensor(batch.history, device=dev),
                torch.as_tensor(batch.target, device=dev), as_user(batch.user), amp, train_chunk)
        return total / count

    # bf16 autocast where it measures faster on this machine (cached); evaluation is fp32.
    probe = np.random.default_rng(seed).choice(len(train), min(len(train), batch_size), replace=False)
    amp = autocast_dtype(dev, precision, benchmark=lambda dt: batch_loss(probe, dt).backward(),
                         cache_key=f"decoder|{train_mode}|{model.config}|batch={len(probe)}|chunk={train_chunk}")
    model.zero_grad(set_to_none=True)
    print(f"[decoder] training precision: {'bf16 autocast' if amp else 'fp32'}", file=sys.stderr)

    def loss_fn(idx):
        return batch_loss(idx, amp)

    common = dict(batch_size=eval_batch_size, use_user=use_user, device=dev)

    valid_sample = valid.sample(eval_users, seed)

    def validate():
        return evaluate_generative(model, valid_sample, item_codes, layout, trie, beam_size=beam_size, **common)

    loop, logger = train_loop(
        model=model, optimizer=optimizer, scheduler=scheduler, num_examples=len(train), batch_size=batch_size,
        loss_fn=loss_fn, validate=validate, out_dir=out, max_steps=max_steps, eval_every=eval_every, seed=seed,
        grad_clip=grad_clip, patience=patience, max_train_minutes=max_train_minutes,
        stop_after_steps=stop_after_steps, log_every=log_every, resume=resume, wandb_mode=wandb_mode,
        wandb_project=wandb_project, run_name=run_name, identity=identity, script="train_decoder", desc="decoder",
        best_payload={"layout": layout.to_dict(), "architecture": architecture})
    if not loop.finished:  # stopped on purpose (stop_after_steps): resume later from last.pt
        logger.finish()
        result = {"stopped_at_step": loop.step, "checkpoint": str(out / "last.pt")}
        print_result(result)
        return result

    # ---- test the best-validation checkpoint
    load_best(model, out, identity, "train_decoder")
    valid_metrics = evaluate_generative(model, valid, item_codes, layout, trie, beam_size=beam_size, **common)
    test_metrics = evaluate_generative(model, test, item_codes, layout, trie, beam_size=beam_size, **common)
    free = evaluate_generative(model, test, item_codes, layout, trie, beam_size=beam_size, unconstrained=True,
                               **common)
    popular = popularity_ranking(dataset.train_item_counts(), len(test), 10)
    pop_metrics = ranking_metrics(popular, test.target, ks=(1, 5, 10))
    result = {
        "dataset": dataset.name,
        "architecture": architecture,
        "train_mode": train_mode,
        "valid": {k: valid_metrics[k] for k in REPORT_KEYS},
        "test": {k: test_metrics[k] for k in REPORT_KEYS},
        "unconstrained_test": {k: free[k] for k in REPORT_KEYS},
        "invalid_rate": free["invalid_rate"],
        "popularity": {k: pop_metrics[k] for k in REPORT_KEYS},
        "steps": loop.step,
        "best_step": loop.best_step,
        "train_seconds": round(loop.train_seconds, 1),
        "eval_users_per_second": round(test_metrics["users_per_second"], 1),
        "beam_size": beam_size,
        "device": str(dev) if dev.type != "cuda" else torch.cuda.get_device_name(dev),
        "seconds": round(time.time() - t_start, 1),
    }
    logger.summary({f"test/{k}": v for k, v in result["test"].items()})
    logger.finish()
    if push_to_hub:
        push_recommender(push_to_hub, out / "best.pt", tok)
        result["hub"] = push_to_hub
    print_result(result, out)
    return result


def push_recommender(repo_id: str, best_path: Path, tok: SemanticIdTokenizer) -> None:
    """Upload the best checkpoint and the tokenizer it needs to one Hub repo."""
    import tempfile

    from huggingface_hub import HfApi

    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(Path(tmp) / "tokenizer")
        api = HfApi()
        api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=tmp)
        api.upload_file(repo_id=repo_id, path_or_fileobj=str(best_path), path_in_repo="recommender.pt")


def main(argv: list[str] | None = None) -> dict:
    parse_gin_cli(argv, __doc__)
    return train_decoder()


if __name__ == "__main__":
    main()
