"""Building and loading the recommenders of train_decoder.py, shared by the scripts that train
them (train_decoder.py) and fine-tune them (train_grpo.py).

A new model's sizes come from the gin bindings ``T5Config.*`` / ``GPTConfig.*`` /
``SASRecConfig.*`` / ``RPGConfig.*`` (the recipe's config), its vocabulary from the token layout.
A trained one is rebuilt from the recommender record its ``best.pt`` carries
(modules/recommender/record.py), whatever gin config is in force.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import gin
import numpy as np
import torch

from modules.recommender import build_model as model_from_config
from modules.recommender import record_of, split_tries, tokenizer_fingerprint, tokenizer_location
from modules.rpg import RPG, RPGConfig
from modules.rpg_graph import GraphScores
from modules.sasrec import SASRec, SASRecConfig
from modules.semantic_ids import SemanticIdTokenizer
from modules.tokens import TokenLayout
from modules.training import autocast_dtype
from modules.transformers.gpt import GPT, GPTConfig
from modules.transformers.recgpt import build_recgpt
from modules.transformers.t5 import T5, T5Config

# Calling these (not the raw dataclasses) applies the gin bindings of T5Config.* / GPTConfig.*.
# RecGPT is sized by GPTConfig.* too (one set of decoder sizes, e.g. bench/configs/cpu_15min.gin's);
# the rest of its config comes from the tokenizer and the data, so it has no bindings of its own.
# gin needs them registered before a config is parsed, i.e. when the scripts import this module.
T5ConfigBound = gin.external_configurable(T5Config)
GPTConfigBound = gin.external_configurable(GPTConfig)
SASRecConfigBound = gin.external_configurable(SASRecConfig)
RPGConfigBound = gin.external_configurable(RPGConfig)
GraphScoresBound = gin.external_configurable(GraphScores)  # RPG's graph decoding: n_edges, graph_beams, ...
ARCHITECTURES = ("t5", "gpt", "recgpt", "rpg", "sasrec")
TRAIN_MODES = {"t5": ("sliding",), "gpt": ("sliding", "all_positions"), "recgpt": ("all_positions",),
               "rpg": ("all_positions",), "sasrec": ("all_positions",)}


def check_settings(architecture: str, train_mode: str, decoding: str, tokenizer: str | None) -> None:
    """train_decoder.py's settings that must fit together; a ValueError naming them otherwise."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"train_decoder.architecture must be one of {ARCHITECTURES}, got {architecture!r}")
    if decoding not in ("exact", "graph") or (decoding == "graph" and architecture != "rpg"):
        raise ValueError(f"train_decoder.decoding must be 'exact', or 'graph' for architecture 'rpg'; got "
                         f"{decoding!r} for {architecture!r}")
    if train_mode not in TRAIN_MODES[architecture]:
        raise ValueError(f"train_decoder.train_mode must be one of {TRAIN_MODES[architecture]} for architecture "
                         f"{architecture!r} ('all_positions' for gpt, recgpt or sasrec only), got {train_mode!r}")
    if architecture != "sasrec" and not tokenizer:
        raise ValueError(f"train_decoder.tokenizer is required for architecture {architecture!r}: a train_rqvae.py "
                         "output dir or a Hub repo id (only architecture 'sasrec' needs none)")


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


def build_model(architecture: str, layout: TokenLayout | None, dataset,
                tokenizer: SemanticIdTokenizer | None = None) -> torch.nn.Module:
    """``tokenizer``: needed by 'recgpt' (its item codes and how its codes chunk the text) and
    'rpg' (its item codes: every level is one of the item's unordered tokens)."""
    if architecture == "t5":
        return T5(T5ConfigBound(vocab_size=layout.vocab_size, output_vocab_size=layout.output_vocab_size))
    if architecture == "gpt":
        return GPT(GPTConfigBound(vocab_size=layout.vocab_size, output_vocab_size=layout.output_vocab_size))
    if architecture == "recgpt":
        from data.prepare import load_item_embeddings  # the text its inputs add (a fixed buffer)

        if tokenizer is None:
            raise ValueError("build_model: architecture 'recgpt' needs the tokenizer (its item codes)")
        sizes = GPTConfigBound(vocab_size=layout.vocab_size, output_vocab_size=layout.output_vocab_size)
        return build_recgpt(sizes, layout, tokenizer, load_item_embeddings(dataset))
    if architecture == "rpg":
        if tokenizer is None:
            raise ValueError("build_model: architecture 'rpg' needs the tokenizer (its item codes)")
        sizes = set(tokenizer.codebook_sizes)
        if len(sizes) != 1:
            raise ValueError(f"build_model: RPG needs codebooks of one size (OPQ: n x 256, configs/opq_amazon.gin), "
                             f"the tokenizer has {tokenizer.codebook_sizes}")
        return RPG(RPGConfigBound(num_items=dataset.num_items, num_codebooks=len(tokenizer.codebook_sizes),
                                  codebook_size=sizes.pop(), max_len=dataset.max_history), tokenizer.item_codes)
    # Positions = the evaluation histories' length (training segments feed at most as many).
    return SASRec(SASRecConfigBound(num_items=dataset.num_items, max_len=dataset.max_history))


def training_precision(dev: torch.device, precision: str, model: torch.nn.Module, loss, num_examples: int,
                       batch_size: int, seed: int, train_mode: str, train_chunk: int | None) -> torch.dtype | None:
    """A decoder's training autocast dtype (train_decoder.py's; train_joint.py's T5): ``precision``
    'auto' takes bf16 where one probe batch's forward + backward (``loss(idx, dtype)``, a
    SummedLoss) measures faster than fp32 on this machine, cached per model config, train mode,
    batch and chunk (``modules.training.autocast_dtype``); the probe's gradients are cleared."""
    probe = np.random.default_rng(seed).choice(num_examples, min(num_examples, batch_size), replace=False)
    amp = autocast_dtype(dev, precision, benchmark=lambda dt: loss(probe, dt).mean().backward(),
                         cache_key=f"decoder|{train_mode}|{model.config}|batch={len(probe)}|chunk={train_chunk}")
    model.zero_grad(set_to_none=True)
    return amp


def cold_slot_tries(cold_slots: int, item_codes: torch.Tensor | None, layout: TokenLayout | None, cold) -> tuple | None:
    """train_decoder.cold_slots: the item tries of the items trained on and of the held-out ones
    (``cold``, the dataset's mask), searched apart (None without slots). ``item_codes`` None: a
    model that ranks every item (sasrec, rpg), which has no tries to reserve slots in."""
    if not cold_slots:
        return None
    if item_codes is None or cold is None:
        raise ValueError(f"train_decoder.cold_slots = {cold_slots} needs beam search (not sasrec/rpg) and a cold-start "
                         "or zero-shot split (load_dataset.cold_items or load_dataset.holdout_domain)")
    return split_tries(item_codes, layout.codebook_sizes, cold)


class Recommender(NamedTuple):
    """A trained semantic-ID recommender as :func:`load_recommender` rebuilds it."""

    model: torch.nn.Module
    layout: TokenLayout
    tokenizer: SemanticIdTokenizer
    record: dict  # its recommender record (modules/recommender/record.py)
    state: dict  # the whole best.pt


def load_recommender(run_dir: str | Path, dataset, tokenizer: str | None = None) -> Recommender:
    """The best-validation T5 or GPT of a train_decoder.py run (or of a run that fine-tuned one),
    rebuilt from ``<run_dir>/best.pt``'s recommender record with its tokenizer (``tokenizer``: a
    path or Hub id of the same tokenizer elsewhere; default: where the record says).

    Refused, naming the file, when it has no record (an earlier version's checkpoint), is no
    T5/GPT, or was trained on other data or other item codes than ``dataset`` / the tokenizer."""
    path = Path(run_dir) / "best.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: train the recommender first (train_decoder.py with "
                                f"out_dir = '{run_dir}')")
    state = torch.load(path, map_location="cpu", weights_only=False)
    record = record_of(path, state)
    config = record["config"]
    if config["architecture"] not in ("t5", "gpt"):
        raise ValueError(f"{path}: architecture {config['architecture']!r}; need a semantic-ID recommender "
                         "('t5' or 'gpt') written by train_decoder.py")
    tok = load_tokenizer(tokenizer or tokenizer_location(config["tokenizer"]), dataset)
    stored = {"dataset": (state.get("identity") or {}).get("dataset"), "item_codes": config["tokenizer"]["fingerprint"]}
    current = {"dataset": dataset.fingerprint(), "item_codes": tokenizer_fingerprint(tok)}
    for name, value in current.items():
        if stored[name] is not None and stored[name] != value:
            raise ValueError(f"{path}: trained on other {name.replace('_', ' ')} (fingerprint {stored[name]}, "
                             f"now {value}): a retrained tokenizer or other data under the same names")
    model = model_from_config(config["architecture"], config["model_config"])
    model.load_state_dict(state["model"])
    return Recommender(model, TokenLayout.from_dict(config["layout"]), tok, record, state)
