"""Use a trained recommender: :class:`GenerativeRecommender` wraps a TIGER (T5) / GPT, ActionPiece or
SASRec model with its tokenizer and item table, and turns histories of raw item ids into top-k
raw item ids with scores and titles.

One folder format for all of them (``save_pretrained`` / ``from_pretrained`` / ``push_to_hub``,
the last from huggingface_hub's ``ModelHubMixin``)::

    config.json          architecture, model config, decoding settings, the run it came from
    model.safetensors    the weights (best-validation checkpoint)
    items.json           {"raw_id": [...], "title": [...]}, row = item_id
    tokenizer/           SemanticIdTokenizer (t5, gpt, recgpt) or ActionPieceTokenizer (actionpiece)
    README.md            model card: dataset, split, tokenizer, metrics, command, gin config

``from_pretrained`` also takes a train run's ``out_dir``: its ``recommender/`` folder (written at
the end of train_decoder.py / train_actionpiece.py) when it belongs to the run's ``best.pt``,
else a recommender rebuilt from ``best.pt``, the gin config saved in it, the run's tokenizer and
the dataset (``data.prepare.load_dataset`` under that config). A run whose out_dir holds one
folder per stage (train_joint.py: ``joint/``, ``finetune/``; :data:`STAGED_RUNS`) is served
from its ``recommender/`` export only while that export belongs to the stages' current
``best.pt`` files, and a stage folder (``<out_dir>/finetune``) serves the same export; anything
else (a later run that has not finished, a stage copied elsewhere) raises
:class:`StaleExportError` saying why and what to load instead.

Recommendations are computed as the evaluation computes them (modules/evaluation.py,
modules/actionpiece/recommender.py), so ``recommend`` on a test user's history returns the
evaluator's ranking: trie-constrained beam search (score: the beam's log-probability), SPR
ensembles fused by ``fuse_beams`` (score: the fusion score; feature tuples that are no item are
dropped, i.e. the lenient ranking), or SASRec's exact top-k (score: the model's logit).
Under a cold-start / zero-shot split (``load_dataset.cold_items`` / ``holdout_domain``) the
export records the held-out items (``cold_items``) and, for semantic IDs, ``cold_slots``: SASRec
ranks only the items it trained on (``modules.evaluation.RestrictedScores``), and with
``cold_slots`` = m a second constrained search over the held-out items fills m of the top 10
(``modules.beam_search.merge_reserved``), as train_decoder.py's test does.
"""

from __future__ import annotations

import ast
import json
import os
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from huggingface_hub import ModelHubMixin

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
ITEMS_FILE = "items.json"
TOKENIZER_DIR = "tokenizer"
CARD_FILE = "README.md"
RUN_EXPORT = "recommender"  # the folder train scripts write into their out_dir
ARCHITECTURES = ("t5", "gpt", "recgpt", "rpg", "sasrec", "actionpiece")
EXACT = ("sasrec", "rpg")  # score every item: the top k of a full ranking
SEMANTIC_ID = ("t5", "gpt", "recgpt")  # beam search over a SemanticIdTokenizer's item trie
REPO_ROOT = Path(__file__).resolve().parents[1]
SLOT_TOP_K = 10  # the evaluation's top_k: cold_slots reserve m of these (modules/evaluation.py)
# Train scripts whose out_dir holds one folder per stage, each with its own best.pt, and the
# export (out_dir/recommender) made from the last stage's best.pt: script -> stage folders in
# order. A later stage's best.pt names the weights it started from in its identity, as
# f"{previous stage}_weights" (train_joint.py's ``joint_weights``).
STAGED_RUNS = {"train_joint": ("joint", "finetune")}


class StaleExportError(ValueError):
    """A staged run's ``recommender/`` export is missing or does not belong to the run's current
    checkpoints (a later run in the same out_dir has not finished), or a stage folder was given
    whose run has no such export: nothing can be served without guessing."""


class UnknownItemError(ValueError):
    """Histories hold raw item ids that are not in the model's catalogue (``.unknown`` lists them)."""

    def __init__(self, unknown: dict[int, list[str]], num_items: int):
        self.unknown = unknown
        shown = "; ".join(f"user {u}: {', '.join(map(repr, ids[:10]))}{' ...' if len(ids) > 10 else ''}"
                          for u, ids in list(unknown.items())[:10])
        more = f" (and {len(unknown) - 10} more users)" if len(unknown) > 10 else ""
        super().__init__(f"unknown item ids, not among the model's {num_items:,} items: {shown}{more}; "
                         "pass on_unknown='skip' to ignore them")


@dataclass
class Recommendation:
    """One user's top-k, best first."""

    items: list[str]  # raw item ids
    scores: list[float]
    titles: list[str | None]
    item_ids: list[int]  # dense item_ids of the processed dataset

    def to_dict(self) -> dict:
        return {"items": self.items, "scores": self.scores, "titles": self.titles}


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _build_model(architecture: str, model_config: dict) -> torch.nn.Module:
    if architecture == "gpt":
        from modules.transformers.gpt import GPT, GPTConfig
        return GPT(GPTConfig.from_dict(model_config))
    if architecture == "recgpt":  # item codes and text embeddings come with the weights (buffers)
        from modules.transformers.recgpt import RecGPT, RecGPTConfig
        return RecGPT(RecGPTConfig.from_dict(model_config))
    if architecture == "sasrec":
        from modules.sasrec import SASRec, SASRecConfig
        return SASRec(SASRecConfig(**model_config))
    if architecture == "rpg":  # the item codes are a buffer of the weights (placeholder until loaded)
        from modules.rpg import RPG, RPGConfig
        cfg = RPGConfig(**model_config)
        return RPG(cfg, torch.zeros(cfg.num_items, cfg.num_codebooks, dtype=torch.long))
    from modules.transformers.t5 import T5, T5Config  # t5 and actionpiece
    return T5(T5Config.from_dict(model_config))


class GenerativeRecommender(ModelHubMixin, library_name="sidrec", tags=["recommendation", "semantic-ids"]):
    """A trained recommender ready to serve (see the module docstring).

    ``config``: ``architecture`` (t5, gpt, sasrec, actionpiece), ``model_config`` (the model's
    dataclass as a dict), ``max_history`` (histories are cut to their last items), and per
    architecture ``layout`` + ``beam_size`` (t5, gpt, recgpt), ``output_vocab`` + ``num_beams`` +
    ``n_inference_ensemble`` + ``eval_seed`` (actionpiece), ``batch_size``; ``run``: what
    produced it (dataset, metrics, command, gin config), for the model card.
    """

    def __init__(self, model: torch.nn.Module, config: dict, tokenizer, raw_ids: Sequence[str],
                 titles: Sequence[str | None] | None = None):
        arch = config.get("architecture")
        if arch not in ARCHITECTURES:
            raise ValueError(f"GenerativeRecommender: config field 'architecture' = {arch!r} not in {ARCHITECTURES}")
        self.model = model.eval()
        self.config = dict(config)
        self.architecture = arch
        self.tokenizer = tokenizer
        self.raw_ids = [str(r) for r in raw_ids]
        self.titles = list(titles) if titles is not None else [None] * len(self.raw_ids)
        if len(self.titles) != len(self.raw_ids):
            raise ValueError(f"GenerativeRecommender: {len(self.titles)} titles for {len(self.raw_ids)} items")
        self.index = {r: i for i, r in enumerate(self.raw_ids)}
        if len(self.index) != len(self.raw_ids):
            raise ValueError("GenerativeRecommender: the item table repeats a raw item id")
        self.max_history = int(config["max_history"])
        self.layout = self.trie = self.item_codes = self.ap_layout = self.decoder = None
        self.cold = self.slot_tries = None  # held-out items of a cold split; cold_slots' tries
        if config.get("cold_items") is not None:
            cold_ids = np.asarray(config["cold_items"], dtype=np.int64)
            if cold_ids.size and (cold_ids.min() < 0 or cold_ids.max() >= len(self.raw_ids)):
                raise ValueError(f"GenerativeRecommender: config field 'cold_items' holds ids outside the "
                                 f"{len(self.raw_ids)} items")
            self.cold = np.zeros(len(self.raw_ids), dtype=bool)
            self.cold[cold_ids] = True
        self.cold_slots = int(config.get("cold_slots") or 0)
        if self.cold_slots and (arch not in SEMANTIC_ID or self.cold is None or not self.cold.any()
                                or not 0 < self.cold_slots <= SLOT_TOP_K):
            raise ValueError(f"GenerativeRecommender: cold_slots = {self.cold_slots} needs a semantic-ID model, "
                             f"held-out items (cold_items) and 0 < cold_slots <= {SLOT_TOP_K}")
        if arch in SEMANTIC_ID:
            from modules.beam_search import PrefixTrie
            from modules.tokens import TokenLayout
            self.layout = TokenLayout.from_dict(config["layout"])
            self.item_codes = tokenizer.item_codes.long()
            if self.item_codes.shape[0] != len(self.raw_ids):
                raise ValueError(f"GenerativeRecommender: tokenizer has codes for {self.item_codes.shape[0]} items, "
                                 f"the item table has {len(self.raw_ids)}")
            self.trie = PrefixTrie(self.item_codes, self.layout.codebook_sizes)
            if self.cold_slots:  # the items trained on and the held-out ones, searched apart (train_decoder.py)
                self.slot_tries = tuple(
                    PrefixTrie(self.item_codes[ids], self.layout.codebook_sizes, item_ids=ids)
                    for ids in (torch.as_tensor(np.flatnonzero(m)) for m in (~self.cold, self.cold)))
        elif arch == "actionpiece":
            from modules.actionpiece.recommender import ActionPieceLayout, ItemDecoder
            self.ap_layout = ActionPieceLayout.build(tokenizer, config["output_vocab"])
            self.decoder = ItemDecoder(tokenizer, self.ap_layout)
            if len(tokenizer.item_features) != len(self.raw_ids):
                raise ValueError(f"GenerativeRecommender: tokenizer has features for {len(tokenizer.item_features)} "
                                 f"items, the item table has {len(self.raw_ids)}")
        elif self.model.config.num_items != len(self.raw_ids):
            raise ValueError(f"GenerativeRecommender: SASRec scores {self.model.config.num_items} items, "
                             f"the item table has {len(self.raw_ids)}")
        self.to(next(self.model.parameters()).device)

    @property
    def num_items(self) -> int:
        return len(self.raw_ids)

    def to(self, device) -> "GenerativeRecommender":
        self.device = torch.device(device)
        self.model.to(self.device)
        if self.trie is not None:
            self.trie = self.trie.to(self.device)
            self.item_codes = self.item_codes.to(self.device)
        if self.slot_tries is not None:
            self.slot_tries = tuple(t.to(self.device) for t in self.slot_tries)
        return self

    # ------------------------------------------------------------------ recommend
    def item_ids(self, histories: Sequence[Sequence], on_unknown: str = "raise") -> list[list[int]]:
        """Raw item ids per user -> dense item_ids; unknown ids raise :class:`UnknownItemError`
        (``on_unknown='raise'``) or are dropped (``'skip'``)."""
        if on_unknown not in ("raise", "skip"):
            raise ValueError(f"on_unknown must be 'raise' or 'skip', got {on_unknown!r}")
        if isinstance(histories, (str, bytes)):
            raise TypeError("histories must be a list of histories (one list of raw item ids per user)")
        out, unknown = [], {}
        for u, history in enumerate(histories):
            if isinstance(history, (str, bytes)):
                raise TypeError(f"histories[{u}] is a string: give a list of raw item ids per user")
            ids = []
            for raw in history:
                i = self.index.get(str(raw))
                if i is None:
                    unknown.setdefault(u, []).append(str(raw))
                else:
                    ids.append(i)
            out.append(ids)
        if unknown and on_unknown == "raise":
            raise UnknownItemError(unknown, self.num_items)
        return out

    def _history_array(self, ids: list[list[int]]) -> np.ndarray:
        """(n, max_history) item_ids, the last items of each history, -1 padded (the evaluation's width)."""
        arr = np.full((len(ids), self.max_history), -1, dtype=np.int64)
        for u, h in enumerate(ids):
            if not h:
                raise ValueError(f"the history of user {u} is empty (after skipping unknown ids): "
                                 "a recommendation needs at least one known item")
            h = h[-self.max_history:]
            arr[u, : len(h)] = h
        return arr

    @torch.no_grad()
    def recommend(self, histories: Sequence[Sequence], k: int = 10, *, exclude_seen: bool = False,
                  on_unknown: str = "raise", users: Sequence[int] | None = None, beam_size: int | None = None,
                  batch_size: int | None = None) -> list[Recommendation]:
        """Top ``k`` items for each history (raw item ids, oldest first), best first.

        ``exclude_seen``: never return an item of the user's history (the search runs
        ``len(history)`` beams wider, then filters). ``users``: for models with hashed user
        tokens (TIGER), the users' dense ids in the training data (dataset user index); new users
        (default) all get user 0's token. ``beam_size``: beams per search (default: the run's
        ``beam_size`` / ``num_beams``; widened to at least ``k``). ``batch_size``: as in the
        evaluation (users per search; for ActionPiece encoder rows, users x segmentations).
        Histories longer than the model's ``max_history`` keep their last items. Fewer than ``k``
        items come back only when the model cannot produce ``k`` distinct items (a tiny catalogue,
        or ActionPiece beams that decode to too few items).

        Under a cold split, as the evaluation ranks: SASRec returns only items it trained on;
        with ``cold_slots`` = m (semantic IDs) the ranking is the evaluation's top 10 with m
        slots reserved for held-out items (``k`` < 10: its first ``k``; ``k`` > 10: m of the
        top ``k``), each item with its own search's score.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        ids = self.item_ids(histories, on_unknown)
        if not ids:
            return []
        history = self._history_array(ids)
        seen = [set(h) for h in ids] if exclude_seen else [set() for _ in ids]
        extra = max(len(s) for s in seen)
        if users is not None and len(users) != len(ids):
            raise ValueError(f"users has {len(users)} entries for {len(ids)} histories")
        self.model.eval()
        if self.architecture in EXACT:
            allowed = self.num_items if self.cold is None or self.architecture != "sasrec" else int((~self.cold).sum())
            ranked, scores = self._sasrec(history, min(k + extra, allowed), batch_size)
        elif self.architecture == "actionpiece":
            ranked, scores = self._actionpiece(history, k + extra, beam_size, batch_size)
        elif self.cold_slots:
            ranked, scores = self._beam_reserved(history, users, max(k, SLOT_TOP_K), seen, extra,
                                                 beam_size or self.config["beam_size"], batch_size)
        else:
            ranked, scores = self._beam(history, users, max(k + extra, beam_size or self.config["beam_size"]),
                                        batch_size)
        out = []
        for u in range(len(ids)):
            keep = [(i, s) for i, s in zip(ranked[u], scores[u]) if i >= 0 and i not in seen[u]][:k]
            out.append(Recommendation([self.raw_ids[i] for i, _ in keep], [float(s) for _, s in keep],
                                      [self.titles[i] for i, _ in keep], [int(i) for i, _ in keep]))
        return out

    def _batches(self, n: int, batch_size: int):
        for start in range(0, n, batch_size):
            yield slice(start, min(n, start + batch_size))

    def _beam(self, history, users, beam, batch_size):
        from modules.beam_search import beam_search

        use_user = self.layout.num_user_buckets > 0
        user_ids = np.zeros(len(history), dtype=np.int64) if users is None else np.asarray(users, dtype=np.int64)
        ranked, scores = [], []
        for sl in self._batches(len(history), batch_size or self.config.get("batch_size", 256)):
            user = torch.as_tensor(user_ids[sl], device=self.device) if use_user else None
            input_ids, mask = self.layout.encode_history(torch.as_tensor(history[sl], device=self.device),
                                                         self.item_codes, user)
            res = beam_search(self.model, input_ids, mask, self.trie, self.layout, beam_size=beam, top_k=beam)
            ranked += res.items.cpu().tolist()
            scores += res.scores.cpu().tolist()
        return ranked, scores

    def _beam_reserved(self, history, users, width, seen, extra, beam_size, batch_size):
        """cold_slots: as ``evaluate_generative(cold_slots=m)``: one constrained search over the
        items trained on and one over the held-out items, the users' seen items dropped from
        both (``exclude_seen``), then ``merge_reserved`` to ``width`` items of which m are reserved."""
        from modules.beam_search import BeamSearchOutput, beam_search, merge_reserved

        warm_trie, cold_trie = self.slot_tries
        slots = self.cold_slots
        use_user = self.layout.num_user_buckets > 0
        user_ids = np.zeros(len(history), dtype=np.int64) if users is None else np.asarray(users, dtype=np.int64)
        ranked, scores = [], []
        for sl in self._batches(len(history), batch_size or self.config.get("batch_size", 256)):
            user = torch.as_tensor(user_ids[sl], device=self.device) if use_user else None
            input_ids, mask = self.layout.encode_history(torch.as_tensor(history[sl], device=self.device),
                                                         self.item_codes, user)
            main = beam_search(self.model, input_ids, mask, warm_trie, self.layout,
                               beam_size=max(width + extra, beam_size), top_k=width + extra)
            cold = beam_search(self.model, input_ids, mask, cold_trie, self.layout,
                               beam_size=max(slots + extra, beam_size), top_k=slots + extra)
            main, cold = (_drop_seen(out, seen[sl], w) for out, w in ((main, width), (cold, slots)))
            items = merge_reserved(BeamSearchOutput(*main, None, None), BeamSearchOutput(*cold, None, None),
                                   width, slots)
            for row, its in enumerate(items.cpu().tolist()):
                score_of = {i: s for part in (main, cold) for i, s in zip(part[0][row].tolist(), part[1][row].tolist())
                            if i >= 0}
                ranked.append([i for i in its if i >= 0])
                scores.append([score_of[i] for i in its if i >= 0])
        return ranked, scores

    def _sasrec(self, history, width, batch_size):
        from modules.evaluation import RestrictedScores

        # Under a cold split the evaluation ranks only the items SASRec trained on (RPG's IDs come from text).
        scorer = self.model if self.cold is None or self.architecture != "sasrec" else RestrictedScores(self.model, ~self.cold)
        ranked, scores = [], []
        for sl in self._batches(len(history), batch_size or self.config.get("batch_size", 256)):
            s = scorer.scores(torch.as_tensor(history[sl], device=self.device)).float()
            top = s.topk(width, dim=1)
            ranked += top.indices.cpu().tolist()
            scores += top.values.cpu().tolist()
        return ranked, scores

    def _actionpiece(self, history, width, beam_size, batch_size):
        """As ``evaluate_actionpiece``: q SPR segmentations per user, segmentation batch b seeded
        with (eval_seed, b), beams decoded and fused; feature tuples that are no item dropped."""
        from modules.actionpiece.recommender import INVALID
        from modules.actionpiece.segment import fuse_beams
        from modules.beam_search import beam_search_tokens

        cfg = self.config
        q, seed = int(cfg["n_inference_ensemble"]), int(cfg["eval_seed"])
        num_beams = max(width, beam_size or int(cfg["num_beams"]))
        users_per_batch = max(1, (batch_size or int(cfg.get("batch_size", 64))) // q)
        ranked, scores = [], []
        for b, start in enumerate(range(0, len(history), users_per_batch)):
            stop = min(len(history), start + users_per_batch)
            rng = np.random.default_rng([seed, b])
            input_ids, mask = self.ap_layout.encode_inputs(self.tokenizer, np.repeat(history[start:stop], q, axis=0),
                                                           rng)
            beams = beam_search_tokens(self.model, input_ids.to(self.device), mask.to(self.device), num_beams,
                                       num_steps=self.tokenizer.n_categories)
            keys = self.decoder(beams.tokens).reshape(stop - start, q, num_beams)
            for lists in keys.tolist():
                fused = fuse_beams(lists, lambda key: (key,) if key != INVALID else None, topk=q * num_beams)
                pairs = [(key, s) for (key,), s in zip(fused.items, fused.scores) if key >= 0]
                ranked.append([key for key, _ in pairs])
                scores.append([s for _, s in pairs])
        return ranked, scores

    # ------------------------------------------------------------------ files
    def _save_pretrained(self, save_directory: Path) -> None:
        from safetensors.torch import save_model

        save_directory = Path(save_directory)
        save_directory.mkdir(parents=True, exist_ok=True)
        tmp = save_directory / f".{WEIGHTS_FILE}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            save_model(self.model, str(tmp))  # handles the tied input/output embeddings
            os.replace(tmp, save_directory / WEIGHTS_FILE)
        finally:
            tmp.unlink(missing_ok=True)
        _atomic_write_text(save_directory / ITEMS_FILE, json.dumps({"raw_id": self.raw_ids, "title": self.titles}))
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(save_directory / TOKENIZER_DIR)
        _atomic_write_text(save_directory / CARD_FILE, self.model_card())
        # Written last: the mixin writes its own config.json only when this one is missing.
        _atomic_write_text(save_directory / CONFIG_FILE,
                           json.dumps({"format_version": FORMAT_VERSION, **self.config}, indent=1, default=float))

    def model_card(self) -> str:
        run = self.config.get("run") or {}
        name = {"t5": "TIGER (T5 encoder-decoder over semantic IDs)", "gpt": "GPT decoder over semantic IDs",
                "recgpt": "RecGPT (block-causal decoder over semantic IDs + item text)",
                "rpg": "RPG (long semantic IDs predicted in parallel, exact ranking)",
                "sasrec": "SASRec (item IDs)", "actionpiece": "ActionPiece (T5)"}[self.architecture]
        if self.architecture in SEMANTIC_ID:
            tok = (f"semantic IDs, codebook sizes {list(self.layout.codebook_sizes)}, "
                   f"{self.layout.num_user_buckets} hashed user tokens, beam {self.config['beam_size']}")
        elif self.architecture == "actionpiece":
            tok = (f"ActionPiece vocabulary of {self.tokenizer.vocab_size:,} tokens, {self.tokenizer.n_categories} "
                   f"features per item; {self.config['num_beams']} beams x {self.config['n_inference_ensemble']} "
                   "SPR segmentations, fused")
        else:
            tok = "none (one embedding per item id), exact top-k over all items"
        lines = [f"---\nlibrary_name: sidrec\ntags:\n- recommendation\n- {self.architecture}\n---\n",
                 f"# {name}\n",
                 f"- dataset: `{run.get('dataset', '?')}` ({self.num_items:,} items); split: leave-one-out (test = "
                 "each user's last item, validation = the one before, training = the rest), full ranking",
                 f"- tokenizer: {tok}",
                 f"- histories: the last {self.max_history} items"]
        if self.cold is not None:
            how = (f"{self.cold_slots} of the top {SLOT_TOP_K} reserved for them" if self.cold_slots else
                   "ranks only the items it trained on" if self.architecture == "sasrec" else "no reserved slots")
            lines.append(f"- cold split: {int(self.cold.sum()):,} items held out of training ({how})")
        if run.get("best_step") is not None:
            lines.append(f"- best-validation checkpoint: step {run['best_step']} of {run.get('steps', '?')}")
        metrics = [(split, run[split]) for split in ("test", "valid", "popularity") if isinstance(run.get(split), dict)]
        if metrics:
            keys = list(metrics[0][1])
            lines += ["\n## Metrics of the run\n", "| split | " + " | ".join(keys) + " |",
                      "|---" * (len(keys) + 1) + "|"]
            lines += [f"| {split} | " + " | ".join(f"{m.get(key, float('nan')):.4f}" for key in keys) + " |"
                      for split, m in metrics]
        lines += ["\n## Use it\n", "```python", "from modules.recommender import GenerativeRecommender\n",
                  "rec = GenerativeRecommender.from_pretrained('<this repo id or folder>')",
                  f"print(rec.recommend([{json.dumps(self.raw_ids[:3])}], k=10))", "```\n",
                  "or `python recommend.py <this repo id or folder> --history ID ID ...` (sidrec repository).\n"]
        if run.get("command"):
            lines += ["## How it was made\n", "```", run["command"], "```\n"]
        if run.get("config"):
            lines += ["Gin config:\n", "```", run["config"].rstrip(), "```\n"]
        return "\n".join(lines)

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | Path, *, device: str | torch.device | None = None,
                        revision: str | None = None, cache_dir: str | Path | None = None,
                        local_files_only: bool = False, token: str | bool | None = None,
                        **unused) -> "GenerativeRecommender":
        """A folder written by :meth:`save_pretrained`, a Hub repo id (downloaded with
        huggingface_hub, cached; offline with ``HF_HUB_OFFLINE=1``), or a train run's out_dir.
        ``device``: where to run (default: CUDA when available)."""
        path = Path(path_or_hub_id)
        if path.is_dir():
            if (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file():
                rec = cls._load_folder(path)
            elif (path / "best.pt").is_file():
                rec = cls.from_run(path)
            elif _staged_script(path) is not None:  # a run whose best.pt files are its stages' (train_joint.py)
                rec = cls.from_staged_run(path)
            else:
                raise FileNotFoundError(f"{path}: neither a saved recommender ({CONFIG_FILE} + {WEIGHTS_FILE}) nor "
                                        "a train run directory (best.pt)")
        else:
            if str(path_or_hub_id).startswith((".", "/", "~")) or str(path_or_hub_id).count("/") != 1:
                raise FileNotFoundError(f"recommender not found: {path_or_hub_id} (a folder, a train run's out_dir "
                                        "or a Hub repo id 'user/name')")
            from huggingface_hub import snapshot_download

            folder = snapshot_download(str(path_or_hub_id), revision=revision, cache_dir=cache_dir,
                                       local_files_only=local_files_only, token=token)
            rec = cls._load_folder(Path(folder))
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return rec.to(device)

    @classmethod
    def _load_folder(cls, folder: Path) -> "GenerativeRecommender":
        from safetensors.torch import load_model

        config_path = folder / CONFIG_FILE
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{config_path}:{e.lineno}: malformed JSON ({e.msg})") from None
        for key in ("architecture", "model_config", "max_history"):
            if key not in config:
                raise ValueError(f"{config_path}: field {key!r} missing (not a sidrec recommender folder?)")
        if config.pop("format_version", FORMAT_VERSION) > FORMAT_VERSION:
            raise ValueError(f"{config_path}: format_version is newer than this code reads ({FORMAT_VERSION})")
        arch = config["architecture"]
        if arch not in ARCHITECTURES:
            raise ValueError(f"{config_path}: field 'architecture' = {arch!r} not in {ARCHITECTURES}")
        model = _build_model(arch, config["model_config"])
        try:
            load_model(model, str(folder / WEIGHTS_FILE), strict=True)
        except (RuntimeError, KeyError) as e:
            raise ValueError(f"{folder / WEIGHTS_FILE}: weights do not fit the model_config of {config_path}: {e}") \
                from None
        items = json.loads((folder / ITEMS_FILE).read_text(encoding="utf-8"))
        tokenizer = None
        if arch in SEMANTIC_ID:
            from modules.semantic_ids import SemanticIdTokenizer
            tokenizer = SemanticIdTokenizer.from_pretrained(str(folder / TOKENIZER_DIR))
        elif arch == "actionpiece":
            from modules.actionpiece.tokenizer import ActionPieceTokenizer
            tokenizer = ActionPieceTokenizer.from_pretrained(folder / TOKENIZER_DIR)
        return cls(model, config, tokenizer, items["raw_id"], items.get("title"))

    # ------------------------------------------------------------------ train runs
    @classmethod
    def from_run(cls, run_dir: str | Path) -> "GenerativeRecommender":
        """The recommender of a train_decoder.py / train_actionpiece.py out_dir: its
        ``recommender/`` export when it was made from the current ``best.pt``, else rebuilt from
        ``best.pt`` (weights, gin config, layout) + the run's tokenizer + the dataset."""
        run_dir = Path(run_dir)
        best_path = run_dir / "best.pt"
        if not best_path.is_file():
            raise FileNotFoundError(f"{best_path} not found: not a finished train run directory")
        state = torch.load(best_path, map_location="cpu", weights_only=False, mmap=True)
        stage_of = _stage_of(run_dir, state)
        if stage_of is not None:
            return cls._from_stage(run_dir, *stage_of)
        export = run_dir / RUN_EXPORT
        if (export / CONFIG_FILE).is_file():
            made_from = json.loads((export / CONFIG_FILE).read_text()).get("checkpoint")
            if made_from == checkpoint_id(state):
                return cls._load_folder(export)
            print(f"[recommender] {export} was not made from the current {best_path}: rebuilding from it",
                  file=sys.stderr)
        return cls._rebuild(run_dir, state)

    @classmethod
    def from_staged_run(cls, run_dir: str | Path) -> "GenerativeRecommender":
        """The recommender of a run with one folder per stage (:data:`STAGED_RUNS`, e.g. a
        train_joint.py out_dir): its ``recommender/`` export, only when made from the last
        stage's current ``best.pt`` and that stage from the earlier stages' current ones; else
        :class:`StaleExportError` (such a run's recommender cannot be rebuilt from one stage: its
        tokenizer is the run's final one, which only the finished run exports)."""
        run_dir = Path(run_dir)
        script = _staged_script(run_dir)
        if script is None:
            raise FileNotFoundError(f"{run_dir}: no stage folder of a staged train run "
                                    f"({', '.join(f'{k}.py: {v}' for k, v in STAGED_RUNS.items())})")
        problem = _staged_export_problem(run_dir, STAGED_RUNS[script])
        if problem is not None:
            export = run_dir / RUN_EXPORT
            old = (f"; the earlier export can still be loaded as it is: from_pretrained('{export}')"
                   if (export / CONFIG_FILE).is_file() else "")
            raise StaleExportError(f"{run_dir} ({script}.py run): {problem}. Finish the run (run its command again "
                                   f"with out_dir = '{run_dir}') to export its recommender{old}")
        return cls._load_folder(run_dir / RUN_EXPORT)

    @classmethod
    def _from_stage(cls, stage_dir: Path, script: str, stage: str) -> "GenerativeRecommender":
        """``stage_dir`` is one stage of a staged run: the run's export when ``stage_dir`` is its
        last stage, sits in the run's out_dir and the export belongs to it; else a clear error."""
        stages = STAGED_RUNS[script]
        run_dir = stage_dir.parent
        what = (f"{stage_dir} is the '{stage}' stage of a {script}.py run: its best.pt is not a recommender "
                f"on its own (the run's final tokenizer is exported with it in <out_dir>/{RUN_EXPORT})")
        if stage != stages[-1]:
            raise StaleExportError(f"{what}; the run serves its last stage, '{stages[-1]}': load the run's out_dir "
                                   f"({run_dir}) once it has finished")
        if stage_dir.name != stage:
            raise StaleExportError(f"{what}; it is not in its run's out_dir (folder named '{stage_dir.name}', "
                                   f"not '{stage}'): load the run's out_dir instead")
        problem = _staged_export_problem(run_dir, stages)
        if problem is not None:
            raise StaleExportError(f"{what}; {run_dir} cannot serve it: {problem}. Finish the run (run its command "
                                   f"again with out_dir = '{run_dir}') to export its recommender")
        return cls._load_folder(run_dir / RUN_EXPORT)

    @classmethod
    def _rebuild(cls, run_dir: Path, state: dict) -> "GenerativeRecommender":
        from data.prepare import load_dataset
        from modules.training import config_bindings

        bindings = config_bindings(state.get("config", ""))

        def value(key: str, default=None):
            text = bindings.get(key)
            if text is None:
                return default
            while text.startswith("%"):  # a gin macro
                text = bindings[text[1:]]
            try:
                return ast.literal_eval(text)
            except (ValueError, SyntaxError):
                raise ValueError(f"{run_dir / 'best.pt'}: gin binding {key} = {text} is not a literal") from None

        def local_path(p):
            if p is None or Path(p).exists() or not (REPO_ROOT / p).exists():
                return p
            return str(REPO_ROOT / p)  # relative to the repository, where the run started

        result = {}
        if (run_dir / "result.json").is_file():
            result = json.loads((run_dir / "result.json").read_text())
        kwargs = {k.split(".", 1)[1]: value(k) for k in bindings if k.startswith("load_dataset.")}
        for k in ("path", "items", "cache_dir"):
            if kwargs.get(k):
                kwargs[k] = local_path(kwargs[k])
        dataset = load_dataset(**{**kwargs, "verbose": False})
        run = run_info(result) if result else {"dataset": dataset.name, "config": state.get("config")}
        if "architecture" in state:  # train_decoder.py
            arch = state["architecture"]
            key = {"t5": "T5Config.", "gpt": "GPTConfig.", "recgpt": "GPTConfig.", "rpg": "RPGConfig.",
                   "sasrec": "SASRecConfig."}[arch]
            model_config = {k[len(key):]: value(k) for k in bindings if k.startswith(key)}
            tok = layout = None
            if arch == "sasrec":
                model_config.update(num_items=dataset.num_items, max_len=dataset.max_history)
            else:
                from modules.semantic_ids import SemanticIdTokenizer
                from modules.tokens import TokenLayout
                layout = TokenLayout.from_dict(state["layout"]) if state.get("layout") else None  # rpg: none
                name = local_path(value("train_decoder.tokenizer"))
                tok_dir = Path(name) / "tokenizer" if (Path(name) / "tokenizer").is_dir() else name
                tok = SemanticIdTokenizer.from_pretrained(str(tok_dir))
                if tok.raw_ids is not None:
                    tok.check_raw_ids(dataset.items["raw_id"].to_list())
                if layout is not None:
                    model_config.update(vocab_size=layout.vocab_size, output_vocab_size=layout.output_vocab_size)
            if arch in ("recgpt", "rpg"):  # sizes of its item tables too: the config the run saved (train_decoder.py)
                model_config = state["model_config"]
            model = _build_model(arch, model_config)
            beam = result.get("beam_size", value("train_decoder.beam_size", 20))  # 20: train_decoder's default
            rec = from_training(model, arch, tok, dataset, layout=layout, beam_size=beam,
                                batch_size=value("train_decoder.eval_batch_size", 256), run=run)
        elif "to_ap" in state:  # train_actionpiece.py
            from modules.actionpiece.recommender import ActionPieceLayout, load_tokenizer
            tok = load_tokenizer(local_path(state["tokenizer"]), dataset,
                                 value("train_actionpiece.vocab_size", 40_000))  # its default
            output_vocab = value("train_actionpiece.output_vocab", "targets")
            if not np.array_equal(ActionPieceLayout.build(tok, output_vocab).to_ap, np.asarray(state["to_ap"])):
                raise ValueError(f"{run_dir / 'best.pt'}: the tokenizer {state['tokenizer']} no longer gives the "
                                 "token layout the model was trained with")
            model = _build_model("actionpiece", state["model_config"])
            # Defaults of train_actionpiece's signature where the run did not bind them.
            rec = from_training(model, "actionpiece", tok, dataset, output_vocab=output_vocab,
                                num_beams=result.get("num_beams", value("train_actionpiece.num_beams", 50)),
                                n_inference_ensemble=result.get("n_inference_ensemble",
                                                                value("train_actionpiece.n_inference_ensemble", 5)),
                                eval_seed=value("train_actionpiece.eval_seed", 0),
                                batch_size=value("train_actionpiece.eval_batch_size", 64), run=run)
        else:
            raise ValueError(f"{run_dir / 'best.pt'}: no 'architecture' or 'to_ap' payload: not written by "
                             "train_decoder.py or train_actionpiece.py")
        try:
            rec.model.load_state_dict(state["model"])
        except RuntimeError as e:
            raise ValueError(f"{run_dir / 'best.pt'}: weights do not fit the model of its gin config: {e}") from None
        rec.config["checkpoint"] = checkpoint_id(state)
        return rec


def _drop_seen(out, seen: Sequence[set], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A search's (items, scores) cut to ``width`` per row after dropping each row's ``seen``
    items (kept in order; -1 / -inf where fewer remain)."""
    if not any(seen):
        return out.items[:, :width], out.scores[:, :width]
    items = out.items.new_full((len(seen), width), -1)
    scores = out.scores.new_full((len(seen), width), float("-inf"))
    for row, (its, scs) in enumerate(zip(out.items.tolist(), out.scores.tolist())):
        keep = [(i, s) for i, s in zip(its, scs) if i >= 0 and i not in seen[row]][:width]
        if keep:
            items[row, : len(keep)] = torch.tensor([i for i, _ in keep])
            scores[row, : len(keep)] = torch.tensor([s for _, s in keep], dtype=scores.dtype)
    return items, scores


def _staged_script(run_dir: Path) -> str | None:
    """The staged train script (:data:`STAGED_RUNS`) whose out_dir layout ``run_dir`` has: a
    stage folder with a checkpoint, or a ``recommender/`` export next to a stage folder."""
    for script, stages in STAGED_RUNS.items():
        if any((run_dir / stage / name).is_file() for stage in stages for name in ("best.pt", "last.pt")):
            return script
    return None


def _stage_of(run_dir: Path, state: dict) -> tuple[str, str] | None:
    """(script, stage) when the best.pt ``state`` in ``run_dir`` belongs to a stage of a staged
    run: its gin config binds that script, or its identity names an earlier stage's weights."""
    from modules.training import config_bindings

    bindings = config_bindings(state.get("config") or "")
    identity = state.get("identity") or {}
    for script, stages in STAGED_RUNS.items():
        if any(k.startswith(f"{script}.") for k in bindings) or any(f"{s}_weights" in identity for s in stages):
            stage = run_dir.name if run_dir.name in stages else \
                next((s for prev, s in zip(stages, stages[1:]) if f"{prev}_weights" in identity), stages[0])
            return script, stage
    return None


def _staged_export_problem(run_dir: Path, stages: Sequence[str]) -> str | None:
    """Why ``run_dir/recommender`` is not the staged run's current recommender (None: it is).
    The export must have been made from the last stage's ``best.pt`` (:func:`checkpoint_id`), and
    each stage's ``best.pt`` must have started from the previous stage's current one (its
    identity's ``<previous>_weights`` fingerprint): a later run that started over and stopped
    before the end leaves a missing or another ``best.pt`` behind."""
    from modules.training import fingerprint

    export = run_dir / RUN_EXPORT
    if not (export / CONFIG_FILE).is_file():
        return f"no {RUN_EXPORT}/ export: the run has not finished"
    states = []
    for stage in stages:
        path = run_dir / stage / "best.pt"
        if not path.is_file():
            return (f"{path} is missing: {export} is from an earlier run, and the run in {run_dir} has not "
                    f"finished its '{stage}' stage")
        states.append(torch.load(path, map_location="cpu", weights_only=False, mmap=True))
    made_from = json.loads((export / CONFIG_FILE).read_text(encoding="utf-8")).get("checkpoint")
    last = run_dir / stages[-1] / "best.pt"
    if made_from != checkpoint_id(states[-1]):
        return f"{export} was not made from the current {last} (an earlier run's export)"
    for prev, stage, prev_state, state in zip(stages, stages[1:], states, states[1:]):
        started = (state.get("identity") or {}).get(f"{prev}_weights")
        if started is not None and started != fingerprint(*prev_state["model"].values()):
            return (f"{run_dir / stage / 'best.pt'} did not start from the current {run_dir / prev / 'best.pt'}: "
                    f"a later run replaced the '{prev}' stage and has not finished")
    return None


def checkpoint_id(state: dict) -> str:
    """Identity of a best.pt (its step, gin config and input fingerprints): an export made from it
    records this, so a later run in the same out_dir is never served with an older export."""
    from modules.training import fingerprint

    return fingerprint(json.dumps([state.get("step"), state.get("config"), state.get("identity")], sort_keys=True,
                                  default=str))


def run_info(record: dict) -> dict:
    """What a model card shows of a run's result record (``out_dir/result.json`` layout)."""
    keep = ("dataset", "architecture", "train_mode", "valid", "test", "popularity", "steps", "best_step",
            "beam_size", "num_beams", "n_inference_ensemble", "protocol", "cold_slots", "command", "config")
    return {k: record[k] for k in keep if k in record}


def from_training(model, architecture: str, tokenizer, dataset, *, run: dict | None = None,
                  checkpoint: str | Path | None = None, batch_size: int | None = None, layout=None,
                  beam_size: int | None = None, output_vocab: str | None = None, num_beams: int | None = None,
                  n_inference_ensemble: int | None = None, eval_seed: int | None = None,
                  cold_slots: int | None = None) -> GenerativeRecommender:
    """A recommender from a train script's in-memory pieces (the model at its best weights, its
    tokenizer, the ``data.dataset.SeqDataset``); ``checkpoint``: the best.pt it was made from.
    Under a cold split (``dataset.cold``) the held-out items are recorded (SASRec ranks the
    others only) and, for semantic IDs, ``cold_slots`` (default: the ``run`` record's, i.e. the
    test the run reported)."""
    config: dict[str, Any] = {"architecture": architecture, "model_config": model.config.to_dict(),
                              "max_history": int(dataset.max_history), "dataset": dataset.name}
    if architecture in SEMANTIC_ID:
        config.update(layout=layout.to_dict(), beam_size=int(beam_size), batch_size=int(batch_size or 256))
    elif architecture == "actionpiece":
        config.update(output_vocab=output_vocab, num_beams=int(num_beams), n_inference_ensemble=int(n_inference_ensemble),
                      eval_seed=int(eval_seed), batch_size=int(batch_size or 64))
    else:
        config.update(batch_size=int(batch_size or 256))
    cold = getattr(dataset, "cold", None)
    if cold is not None and architecture in (*SEMANTIC_ID, "sasrec"):  # ranked as the evaluation ranks them
        config["cold_items"] = np.flatnonzero(cold).tolist()
        slots = int((run or {}).get("cold_slots") or 0) if cold_slots is None else int(cold_slots)
        if slots and architecture in SEMANTIC_ID:
            config["cold_slots"] = slots
    config["run"] = run or {"dataset": dataset.name}
    if checkpoint is not None:
        config["checkpoint"] = checkpoint_id(torch.load(checkpoint, map_location="cpu", weights_only=False, mmap=True))
    items = dataset.items
    titles = items["title"].to_list() if "title" in items.columns else None
    return GenerativeRecommender(model, config, tokenizer, items["raw_id"].to_list(), titles)


def run_record(result: dict) -> dict:
    """A train script's result as its result.json will hold it (with the command and gin config)."""
    from modules.training import resolved_config

    return run_info({**result, "command": " ".join(["python", *sys.argv]), "config": resolved_config()})


def export_run(out_dir: str | Path, rec: GenerativeRecommender, push_to_hub: str | None = None) -> Path:
    """The end of a train run: ``rec`` saved as ``out_dir/recommender`` (what ``from_pretrained(out_dir)``
    loads) and, with ``push_to_hub``, the same files pushed to that Hub repo."""
    folder = Path(out_dir) / RUN_EXPORT
    rec.save_pretrained(folder)
    if push_to_hub:
        rec.push_to_hub(push_to_hub, commit_message="sidrec recommender")
    return folder


__all__ = ["GenerativeRecommender", "Recommendation", "StaleExportError", "UnknownItemError", "from_training", "export_run", "run_info", "run_record"]
