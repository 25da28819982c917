"""Building and loading the semantic-ID recommenders of train_decoder.py, shared by the scripts
that train them (train_decoder.py) and fine-tune them (train_grpo.py).

The model sizes come from the gin bindings ``T5Config.*`` / ``GPTConfig.*`` / ``SASRecConfig.*``
(the recipe's config), the vocabulary from the token layout: a checkpoint is rebuilt by
parsing the same config and the layout stored in its ``best.pt`` payload.
"""

from __future__ import annotations

from pathlib import Path

import gin
import torch

from modules.rpg import RPG, RPGConfig
from modules.rpg_graph import GraphScores
from modules.sasrec import SASRec, SASRecConfig
from modules.semantic_ids import SemanticIdTokenizer
from modules.tokens import TokenLayout
from modules.training import fingerprint
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


def load_recommender(run_dir: str | Path, dataset, tok: SemanticIdTokenizer) -> tuple[torch.nn.Module, TokenLayout, dict]:
    """The best-validation semantic-ID recommender of a train_decoder.py run: ``(model, layout, state)``.

    Rebuilt from ``<run_dir>/best.pt``'s ``architecture`` and ``layout`` payload with the model
    sizes of the gin config in force; refused, naming the file, when it is no T5/GPT checkpoint,
    was trained on other data or other item codes than ``dataset`` / ``tok``, or does not fit the
    rebuilt model (another recipe's sizes). ``state`` is the whole checkpoint dict."""
    path = Path(run_dir) / "best.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: train the recommender first (train_decoder.py with "
                                f"out_dir = '{run_dir}')")
    state = torch.load(path, map_location="cpu", weights_only=False)
    architecture, layout_dict = state.get("architecture"), state.get("layout")
    if architecture not in ("t5", "gpt") or layout_dict is None:
        raise ValueError(f"{path}: architecture {architecture!r} with layout {layout_dict!r}; need a semantic-ID "
                         "recommender ('t5' or 'gpt') written by train_decoder.py")
    layout = TokenLayout.from_dict(layout_dict)
    if layout.codebook_sizes != tuple(tok.codebook_sizes):
        raise ValueError(f"{path}: layout codebook_sizes {layout.codebook_sizes} but the tokenizer has "
                         f"{tuple(tok.codebook_sizes)}: the recommender was trained on another tokenizer")
    stored = state.get("identity") or {}
    current = {"dataset": dataset.fingerprint(), "item_codes": fingerprint(tok.item_codes, str(tok.codebook_sizes))}
    for name, value in current.items():
        if name in stored and stored[name] != value:
            raise ValueError(f"{path}: trained on other {name.replace('_', ' ')} (fingerprint {stored[name]}, "
                             f"now {value}): a retrained tokenizer or other data under the same names")
    model = build_model(architecture, layout, dataset)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise RuntimeError(f"{path}: its weights do not fit the {architecture} built from the current gin config "
                           f"(include the recipe the recommender was trained with):\n{e}") from e
    return model, layout, state
