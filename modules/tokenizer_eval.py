"""How good a semantic-ID tokenizer is, and what its model card says: the codes of every
item with collision, usage, perplexity and reconstruction figures, tag purity against the
items' category paths (any quantizer) and HiD-VAE's tag accuracy, plus the category tags and
tag-name embeddings HiD-VAE is supervised with; and how train_rqvae.py logs and plots them."""

from __future__ import annotations

import sys
from pathlib import Path

import gin
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from data.text import DEFAULT_ENCODER
from modules import distributed
from modules.code_stats import (
    codebook_perplexity, codebook_usage, collision_group_sizes, collision_stats, plot_codebook_usage,
)
from modules.plots import plot_group_sizes
from modules.quantizers.hidvae import HiDVAE, category_tags, embed_tag_names, tag_purity


def tokenizer_card(result: dict, command: str, config: str) -> str:
    """Markdown for the tokenizer's README.md: dataset, quality figures, how to load, provenance."""
    keys = ("collision_rate", "max_group", "codebook_usage", "codebook_perplexity", "recon_loss", "tag_purity",
            "tag_accuracy", "selected_step")
    figures = "\n".join(f"- {k}: {result[k]}" for k in keys if k in result)
    return (f"- dataset: `{result['dataset']}` ({result['num_items']:,} items); quantizer: {result['quantizer']}\n"
            f"{figures}\n\nLoad it: `SemanticIdTokenizer.from_pretrained('<this repo id or folder>')` (sidrec), "
            f"or pass it as `train_decoder.tokenizer`.\n\n## How it was made\n\n```\n{command}\n```\n\n"
            f"Gin config:\n\n```\n{config.rstrip()}\n```")


def item_tags(dataset, num_levels: int) -> tuple[np.ndarray, list[list[str]]] | None:
    """Category tags per item (category_tags), or None when the items have no category paths."""
    if "categories" not in dataset.items.columns:
        return None
    tag_ids, names = category_tags(dataset.items, num_levels)
    return None if all(n == ["unknown"] for n in names) else (tag_ids, names)


def purity_tags(dataset, model: torch.nn.Module, dev: torch.device) -> torch.Tensor | None:
    """Tag ids (N, L) to measure any quantizer's tag purity against, or None without tags."""
    found = item_tags(dataset, len(model.codebook_sizes))
    return torch.from_numpy(found[0]).to(dev) if found is not None else None


def tag_encoder_name() -> str:
    """The sentence encoder of the item texts (load_item_embeddings.model) to embed tag names
    with; for collaborative or concatenated sources, its first text part or the default."""
    try:
        name = gin.query_parameter("load_item_embeddings.model")
    except ValueError:
        return DEFAULT_ENCODER
    parts = name[len("concat:"):].split("+") if name.startswith("concat:") else [name]
    text = [p for p in parts if not p.startswith("sasrec:")]
    return text[0] if text else DEFAULT_ENCODER


@torch.no_grad()
def tokenizer_metrics(quantizer: torch.nn.Module, emb: torch.Tensor, batch_size: int = 8192,
                      tags: torch.Tensor | None = None, codes: torch.Tensor | None = None) -> dict:
    """Codes of every item plus the quality figures logged during and after training; with
    tags (N, L): tag purity per level, and for HiD-VAE the heads' tag accuracy per level.
    ``codes``: figures of these codes (e.g. after rebalancing) instead of the nearest codes."""
    was_training = quantizer.training
    quantizer.eval()
    if codes is None:
        codes = torch.cat([quantizer.encode(emb[i: i + batch_size]) for i in range(0, len(emb), batch_size)])
    recon = torch.cat([quantizer.decode_codes(codes[i: i + batch_size]) for i in range(0, len(emb), batch_size)]) \
        if hasattr(quantizer, "decode_codes") else quantizer.decode(codes)
    extra = {}
    if tags is not None:
        extra["tag_purity"] = tag_purity(codes, tags)
        if isinstance(quantizer, HiDVAE):
            pred = torch.cat([quantizer.predict_tags(codes[i: i + batch_size]) for i in range(0, len(codes), batch_size)])
            extra["tag_accuracy"] = (pred.cpu() == tags.cpu()).float().mean(0).tolist()
    quantizer.train(was_training)
    sizes = quantizer.codebook_sizes
    stats = collision_stats(codes)
    return {
        "codes": codes,
        "collision_rate": stats["collision_rate"],
        "max_group": stats["max_group"],
        "codebook_usage": codebook_usage(codes, sizes),
        "codebook_perplexity": codebook_perplexity(codes, sizes),
        "recon_loss": F.mse_loss(recon, emb).item(),
        **extra,
    }


def hidvae_supervision(dataset, num_levels: int, device) -> tuple[torch.Tensor, list[list[str]], list[torch.Tensor]]:
    """HiD-VAE's tags per item (N, L) on ``device``, the tag names per level and their text
    embeddings per level (embedded with the items' sentence encoder, one encoder load)."""
    found = item_tags(dataset, num_levels)
    if found is None:
        raise ValueError(f"train_rqvae.quantizer = @HiDVAEConfig(): the items of {dataset.name} have no "
                         "'categories' field with category paths to take tags from")
    tags, tag_names = torch.from_numpy(found[0]).to(device), found[1]
    flat = embed_tag_names([n for names in tag_names for n in names], tag_encoder_name())
    return tags, tag_names, list(flat.split([len(names) for names in tag_names]))


def rebalanced_metrics(model: torch.nn.Module, emb: torch.Tensor, m: dict, tags: torch.Tensor | None = None
                       ) -> tuple[dict, dict]:
    """After LC-Rec's assignment step (``model.rebalance_collisions`` of the codes of ``m``, the
    tokenizer_metrics of the nearest codes): (the collision figures before it, the new metrics)."""
    if not hasattr(model, "rebalance_collisions"):
        raise ValueError(f"train_rqvae.rebalance_last_level: {type(model).__name__} has no rebalance_collisions "
                         "(RQ-VAE and HiD-VAE have)")
    before = {k: m[k] for k in ("collision_rate", "max_group")}
    with torch.no_grad():
        m = tokenizer_metrics(model, emb, tags=tags, codes=model.rebalance_collisions(emb, m["codes"]))
    print(f"[rqvae] rebalanced the last level: collision {before['collision_rate']:.4f} -> "
          f"{m['collision_rate']:.4f}", file=sys.stderr)
    return before, m


def train_figures(output, temperature: float, lr: float) -> dict:
    """The logged figures of a training step's output (RQVAEOutput; HiD-VAE adds its terms)."""
    hid = ("align_loss", "classify_loss", "unique_loss", "tag_accuracy")
    return {"train/loss": output.loss.item(), "train/recon_loss": output.recon_loss.item(),
            "train/quant_loss": output.quant_loss.item(), "train/temperature": temperature, "train/lr": lr,
            **{f"train/{k}": getattr(output, k).item() for k in hid if k in output._fields}}


def log_eval(logger, m: dict, step: int) -> None:
    """A periodic evaluation's tokenizer_metrics to the logger, and one line on rank 0's stderr."""
    logger.log({"eval/collision_rate": m["collision_rate"], "eval/max_group": m["max_group"],
                "eval/recon_loss": m["recon_loss"],
                **{f"eval/usage_l{i}": u for i, u in enumerate(m["codebook_usage"])},
                **{f"eval/perplexity_l{i}": p for i, p in enumerate(m["codebook_perplexity"])},
                **{f"eval/tag_purity_l{i}": p for i, p in enumerate(m.get("tag_purity", []))},
                **{f"eval/tag_accuracy_l{i}": a for i, a in enumerate(m.get("tag_accuracy", []))}},
               step=step)
    if distributed.is_main():
        tqdm.write(f"[rqvae] step {step}: collision {m['collision_rate']:.4f} max_group {m['max_group']} "
                   f"usage {[round(u, 3) for u in m['codebook_usage']]} recon {m['recon_loss']:.5f}"
                   + (f" tag purity {[round(p, 3) for p in m['tag_purity']]}" if "tag_purity" in m else "")
                   + (f" tag acc {[round(a, 3) for a in m['tag_accuracy']]}" if "tag_accuracy" in m
                      else ""), file=sys.stderr)


def save_code_plots(logger, codes: torch.Tensor, codebook_sizes, out: Path, step: int) -> None:
    """codebook_usage.png and collision_groups.png of the item codes in ``out``, also to the logger."""
    plot = plot_codebook_usage(codes, codebook_sizes, out / "codebook_usage.png")
    logger.log_image("codebook_usage", plot, step=step)
    groups = plot_group_sizes(collision_group_sizes(codes), out / "collision_groups.png")
    logger.log_image("collision_groups", groups, step=step)
