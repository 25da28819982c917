"""Train a semantic-ID tokenizer (RQ-VAE, HiD-VAE, RQ-KMeans, FSQ or OPQ) on item text embeddings.

    python train_rqvae.py configs/rqvae_amazon.gin bench/configs/beauty_local.gin
    python train_rqvae.py configs/rqkmeans_amazon.gin bench/configs/beauty_local.gin
    python train_rqvae.py configs/hidvae_amazon.gin bench/configs/beauty_local.gin
    python train_rqvae.py configs/opq_amazon.gin bench/configs/beauty_local.gin    # RPG, no dedup level
    python train_rqvae.py configs/rqvae_amazon.gin --gin 'train_rqvae.max_steps = 2000'

Tiny CPU recipe (seconds): python train_rqvae.py configs/tiny/rqvae_tiny.gin

Reads top to bottom: dataset -> item embeddings -> quantizer -> (training loop with eval,
checkpoints and resume) -> codes -> dedup level -> tokenizer saved to ``out_dir/tokenizer``
(safetensors + config.json + item codes; loadable by path or Hub id). A run restarted with
the same out_dir resumes from ``out_dir/last.pt``. The last stdout line is one JSON object.

Several processes: ``torchrun --nproc_per_node N train_rqvae.py ...`` splits every batch over
them (gradients and the RQ-VAE's codebook statistics summed over all, see
``modules/distributed.py``); rank 0 alone writes; the item codes are checked to be identical on
every rank. RQ-KMeans and OPQ have no training loop: every rank fits, then takes rank 0's result.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import gin
import torch
from tqdm import tqdm

from data.prepare import load_dataset, load_item_embeddings
from modules import distributed
from modules.quantizers.fsq import FSQConfig
from modules.quantizers.hidvae import HiDVAE, HiDVAEConfig
from modules.quantizers.opq import OPQConfig, OPQTokenizer
from modules.quantizers.rqkmeans import RQKMeansConfig
from modules.quantizers.rqvae import RQVAE, RQVAEConfig
from modules.semantic_ids import SemanticIdTokenizer, build_quantizer, collision_stats, with_dedup_level
from modules.tokenizer_eval import (
    hidvae_supervision, log_eval, purity_tags, rebalanced_metrics, save_code_plots, tokenizer_card,
    tokenizer_metrics, train_figures,
)
from modules.training import (
    ProgressLine, batch_indices, fingerprint, load_checkpoint, make_logger, make_optimizer, parse_gin_cli,
    pick_device, print_result, resolved_config, save_checkpoint, seed_everything, warmup_cosine,
)

for _cfg in (RQVAEConfig, RQKMeansConfig, FSQConfig, HiDVAEConfig, OPQConfig):
    gin.external_configurable(_cfg)


@gin.configurable
def train_rqvae(
    quantizer=gin.REQUIRED,  # @RQVAEConfig(), @HiDVAEConfig(), @RQKMeansConfig(), @FSQConfig() or @OPQConfig()
    out_dir: str = "runs/rqvae",
    max_steps: int = 20_000,
    batch_size: int = 1024,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    warmup_steps: int = 500,
    gumbel_temperature: tuple[float, float] = (1.0, 0.1),  # annealed start -> end (gumbel mode)
    eval_every: int = 2_000,
    # Which weights give the final codes: "collision" - the periodic eval after warm-up with
    # the lowest collision rate (ties: lower recon loss), kept in out_dir/best.pt, as LC-Rec's
    # RQ-VAE trainer does (collisions creep up as the encoder learns to put near-duplicate
    # items together); "last" - the final weights.
    select_by: str = "collision",
    ckpt_every: int = 2_000,
    log_every: int = 100,
    # Codes in the extra dedup level; None: as many as the largest group; 0: no dedup level (the
    # IDs are the quantizer's codes, shared ones included: RPG's unordered OPQ codes).
    dedup_size: int | None = 256,
    # LC-Rec's assignment step (RQVAE.rebalance_collisions): after training, the items that share
    # a whole code get their last level re-chosen by Sinkhorn over their group, so fewer IDs need
    # the dedup level. Only the item table changes; encode() of a new item stays nearest-code.
    rebalance_last_level: bool = False,
    seed: int = 42,
    device: str = "auto",
    resume: bool = True,
    stop_after_steps: int | None = None,  # stop (with a checkpoint) after this many steps of this run
    wandb_mode: str = "offline",
    wandb_project: str = "sidrec",
    run_name: str | None = None,
    push_to_hub: str | None = None,  # Hub repo id to push the tokenizer to at the end
) -> dict:
    t_start = time.time()
    if select_by not in ("collision", "last"):
        raise ValueError(f"train_rqvae.select_by: {select_by!r} not in ('collision', 'last')")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(seed)
    dev = pick_device(device)

    with distributed.rank0_first():  # rank 0 prepares and caches data and embeddings, the others read them
        dataset = load_dataset()
        emb = torch.from_numpy(load_item_embeddings(dataset)).float().to(dev)
    hid = isinstance(quantizer, HiDVAEConfig)
    (quantizer.rqvae if hid else quantizer).input_dim = emb.shape[1]
    # HiD-VAE's supervision; for the other quantizers only the tag-purity metric uses them.
    tags, tag_names = None, None
    if hid:
        tags, tag_names, tag_emb = hidvae_supervision(dataset, quantizer.rqvae.num_levels, dev)
        quantizer.num_tags, quantizer.tag_dim = [len(n) for n in tag_names], tag_emb[0].shape[1]
    logger = make_logger(wandb_mode, wandb_project, run_name or out.name, out)
    print(f"[rqvae] {dataset.name}: {len(emb)} items x {emb.shape[1]} dims, {type(quantizer).__name__} on {dev}",
          file=sys.stderr)

    best = None  # the selected eval (select_by="collision")
    last_eval = None  # the latest periodic eval of this process (the last step's, once training ends)
    model = build_quantizer(quantizer).to(dev)
    if hid:
        model.set_tag_embeddings([e.to(dev) for e in tag_emb])
    elif not isinstance(model, OPQTokenizer):  # tag purity is a property of code prefixes; OPQ's codes are a set
        tags = purity_tags(dataset, model, dev)
    if isinstance(quantizer, (RQKMeansConfig, OPQConfig)):  # no training loop: fitted once on the embeddings
        t_fit = time.time()
        model.fit(emb)
        print(f"[rqvae] fitted in {time.time() - t_fit:.1f} s", file=sys.stderr)
        distributed.broadcast_module(model)  # rank 0's centroids (k-means on a GPU may differ in the last bits)
        step = 0
    else:
        optimizer = make_optimizer(model, lr, weight_decay)
        scheduler = warmup_cosine(optimizer, warmup_steps, max_steps)
        ckpt_path, best_path, step = out / "last.pt", out / "best.pt", 0
        # Checkpoints are resumed only by the same run: same bindings, same items and embeddings.
        identity = {"dataset": dataset.fingerprint(), "embeddings": fingerprint(emb)}
        if distributed.broadcast_object(resume and ckpt_path.exists()):  # rank 0's view decides for all
            step = load_checkpoint(ckpt_path, model=model, optimizer=optimizer, scheduler=scheduler,
                                   identity=identity, script="train_rqvae")["step"]
            if best_path.exists():
                best = torch.load(best_path, map_location="cpu", weights_only=False)["extra"]
            print(f"[rqvae] resumed from {ckpt_path} at step {step}", file=sys.stderr)
        else:
            # An earlier run's selection must not become this run's codes.
            if best_path.exists() and distributed.is_main():
                best_path.unlink()
            if isinstance(model, (RQVAE, HiDVAE)) and (quantizer.rqvae if hid else quantizer).kmeans_init:
                model.init_codebooks(emb)  # k-means on every item's latent, not just the first batch
            distributed.seed_per_rank(seed)  # ranks > 0: their own Gumbel noise (resume restores each rank's)
        if hid and distributed.active() and distributed.is_main():
            print("[rqvae] note: HiD-VAE's in-batch InfoNCE and uniqueness losses see one process's share "
                  "of each batch: a step is not exactly a single-process step", file=sys.stderr)
        distributed.broadcast_module(model)
        distributed.check_batches(len(emb), batch_size)

        model.train()
        stop_at = max_steps if stop_after_steps is None else min(max_steps, step + stop_after_steps)
        bar = tqdm(total=max_steps, initial=step, desc="rqvae", disable=None if distributed.is_main() else True,
                   file=sys.stderr)
        progress = ProgressLine("rqvae", max_steps, batch_size, step, enabled=bar.disable and distributed.is_main())
        t_train = time.time()
        batches = batch_indices(len(emb), batch_size, seed, start_step=step)
        while step < stop_at:
            step, _, idx = next(batches)
            t0, t1 = gumbel_temperature
            tau = t0 * (t1 / t0) ** (step / max(1, max_steps - 1))  # geometric anneal
            batch = torch.as_tensor(distributed.shard(idx), device=dev)  # this process's rows (all in one)
            output = model(emb[batch], temperature=tau, **({"tags": tags[batch]} if hid else {}))
            optimizer.zero_grad(set_to_none=True)
            if distributed.active():  # the losses are means over items: weigh each rank's by its share
                (output.loss * (len(batch) / len(idx))).backward()
                distributed.all_reduce_gradients(model.parameters())
            else:
                output.loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            bar.update(1)
            if step % log_every == 0:
                logger.log(train_figures(output, tau, scheduler.get_last_lr()[0]), step=step)
                bar.set_postfix(loss=f"{output.loss.item():.4f}")
            if progress.due():
                progress.print(step, output.loss.item(), time.time() - t_train)
            if step % eval_every == 0 or step == max_steps:
                distributed.assert_same(model, f"[rqvae] weights at step {step}")  # so the same codes and choices
                m = tokenizer_metrics(model, emb, tags=tags)
                last_eval = {"step": step, **{k: v for k, v in m.items() if k != "codes"}}
                log_eval(logger, m, step)
                score = {"collision_rate": m["collision_rate"], "recon_loss": m["recon_loss"], "step": step}
                key = (score["collision_rate"], score["recon_loss"])
                if step >= warmup_steps and (best is None or key < (best["collision_rate"], best["recon_loss"])):
                    best = score
                    save_checkpoint(best_path, model=model, step=step, extra=best, identity=identity)
            if step % ckpt_every == 0 or step == stop_at:
                save_checkpoint(ckpt_path, model=model, optimizer=optimizer, scheduler=scheduler, step=step,
                                identity=identity)
        bar.close()
        if step < max_steps:  # stopped early on purpose: the checkpoint is the result
            logger.finish()
            result = {"stopped_at_step": step, "checkpoint": str(ckpt_path), "seconds": round(time.time() - t_start, 2)}
            print_result(result)
            return result
        if select_by == "collision" and best is not None:
            load_checkpoint(best_path, model=model, restore_rng=False, identity=identity, script="train_rqvae")
            print(f"[rqvae] final codes from step {best['step']} (lowest collision rate after warm-up)", file=sys.stderr)

    m = tokenizer_metrics(model, emb, tags=tags)
    before_rebalance, m = rebalanced_metrics(model, emb, m, tags) if rebalance_last_level else (None, m)
    distributed.assert_same(m["codes"], "[rqvae] item codes")
    if not distributed.is_main():  # rank 0 alone saves the tokenizer, plots and result; wait for it
        logger.finish()
        distributed.barrier()
        return {}
    item_codes, sizes, dedup_level_size = with_dedup_level(m["codes"].cpu(), model.codebook_sizes, dedup_size)
    tokenizer = SemanticIdTokenizer(model.cpu(), item_codes, codebook_sizes=sizes,
                                    raw_ids=dataset.items["raw_id"].to_list())
    save_code_plots(logger, m["codes"].cpu(), model.codebook_sizes, out, step)
    result = {
        "dataset": dataset.name,
        "quantizer": type(model).__name__,
        **({"opq_backend": quantizer.backend} if isinstance(quantizer, OPQConfig) else {}),  # faiss or numpy
        "num_items": len(emb),
        "steps": step,
        "selected_step": best["step"] if best is not None and select_by == "collision" else step,
        "collision_rate": m["collision_rate"],
        "unique_after_dedup": bool(collision_stats(item_codes)["max_group"] == 1),
        "max_group": m["max_group"],
        "codebook_usage": m["codebook_usage"],
        "codebook_perplexity": m["codebook_perplexity"],
        "recon_loss": m["recon_loss"],
        **{k: m[k] for k in ("tag_purity", "tag_accuracy") if k in m},
        **({"tag_counts": [len(n) for n in tag_names]} if tag_names is not None else {}),
        **({"last_eval": last_eval} if last_eval is not None else {}),  # the last step's figures
        **({"before_rebalance": before_rebalance} if before_rebalance is not None else {}),
        "dedup_size": dedup_level_size,
        "tokenizer": str(out / "tokenizer"),
        "device": str(dev),
        "seconds": round(time.time() - t_start, 2),
    }
    # The model card of the saved (and pushed) tokenizer: what made it and how good it is.
    tokenizer.card_details = tokenizer_card(result, " ".join(["python", *sys.argv]), resolved_config())
    tokenizer.save_pretrained(out / "tokenizer")
    logger.summary({k: v for k, v in result.items() if isinstance(v, (int, float))})
    logger.finish()
    if push_to_hub:
        tokenizer.push_to_hub(push_to_hub)
        result["hub"] = push_to_hub
    print_result(result, out)
    distributed.barrier()
    return result


def main(argv: list[str] | None = None) -> dict:
    parse_gin_cli(argv, __doc__)
    return train_rqvae()


if __name__ == "__main__":
    main()
