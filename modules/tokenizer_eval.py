"""How good a semantic-ID tokenizer is, and what its model card says: the codes of every
item with collision, usage, perplexity and reconstruction figures, tag purity against the
items' category paths (any quantizer) and HiD-VAE's tag accuracy, plus the category tags and
tag-name embeddings HiD-VAE is supervised with. Used by train_rqvae.py."""

from __future__ import annotations

import gin
import numpy as np
import torch
import torch.nn.functional as F

from data.text import DEFAULT_ENCODER
from modules.quantizers.hidvae import HiDVAE, category_tags, embed_tag_names, tag_purity
from modules.semantic_ids import codebook_perplexity, codebook_usage, collision_stats


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
