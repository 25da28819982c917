"""The serving class, :class:`GenerativeRecommender`: a TIGER (T5) / GPT / RecGPT, RPG,
ActionPiece or SASRec model with its tokenizer and item table, turning histories of raw item
ids into top-k raw item ids with scores and titles, ranked as the evaluation ranks them (see
modules/recommender/__init__.py). Where one comes from (folders, the Hub, train runs) and how
it is saved live beside it: modules/recommender/runs.py, folder.py, record.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from huggingface_hub import ModelHubMixin

from modules.recommender.record import ARCHITECTURES, EXACT, SEMANTIC_ID

SLOT_TOP_K = 10  # the evaluation's top_k: cold_slots reserve m of these (modules/evaluation.py)


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


def build_model(architecture: str, model_config: dict) -> torch.nn.Module:
    """The model of a recommender record's ``architecture`` and ``model_config`` (weights to be loaded)."""
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


def split_tries(item_codes: torch.Tensor, codebook_sizes, cold: np.ndarray) -> tuple:
    """cold_slots' two item tries, searched apart: the items trained on and the held-out ones
    (``cold``: the split's mask), as train_decoder.py's test and :class:`GenerativeRecommender` rank."""
    from modules.beam_search import PrefixTrie

    return tuple(PrefixTrie(item_codes[ids], codebook_sizes, item_ids=ids)
                 for ids in (torch.as_tensor(np.flatnonzero(m), device=item_codes.device) for m in (~cold, cold)))


class GenerativeRecommender(ModelHubMixin, library_name="sidrec", tags=["recommendation", "semantic-ids"]):
    """A trained recommender ready to serve.

    ``config``: a recommender record's config (modules/recommender/record.py: ``architecture``,
    ``model_config``, ``max_history``, the ``tokenizer`` reference, per architecture ``layout`` +
    ``beam_size`` (t5, gpt, recgpt) or ``output_vocab`` + ``num_beams`` + ``n_inference_ensemble``
    + ``eval_seed`` (actionpiece), ``batch_size``, and ``cold_items`` / ``cold_slots`` under a cold
    split), plus ``run``: what produced it (dataset, metrics, command, gin config), for the model
    card, and ``checkpoint``: the best.pt it was made from.
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
            if self.cold_slots:
                self.slot_tries = split_tries(self.item_codes, self.layout.codebook_sizes, self.cold)
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

    # ------------------------------------------------------------------ made from, saved as
    @classmethod
    def from_record(cls, record: dict, model: torch.nn.Module, tokenizer, *, run: dict | None = None,
                    checkpoint_id: str | None = None) -> "GenerativeRecommender":
        """The recommender of a recommender ``record`` (modules/recommender/record.py), ``model``
        at the weights it belongs to and the ``tokenizer`` it references; ``run``: what produced
        it (for the model card), ``checkpoint_id``: the best.pt it was made from."""
        config = {**record["config"], "run": run or {"dataset": record["config"].get("dataset")}}
        if checkpoint_id is not None:
            config["checkpoint"] = checkpoint_id
        return cls(model, config, tokenizer, record["items"]["raw_id"], record["items"].get("title"))

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | Path, *, device: str | torch.device | None = None,
                        revision: str | None = None, cache_dir: str | Path | None = None,
                        local_files_only: bool = False, token: str | bool | None = None,
                        **unused) -> "GenerativeRecommender":
        """A folder written by :meth:`save_pretrained`, a Hub repo id (downloaded with
        huggingface_hub, cached; offline with ``HF_HUB_OFFLINE=1``), or a train run's out_dir
        (modules/recommender/runs.py). ``device``: where to run (default: CUDA when available)."""
        from modules.recommender.runs import open_recommender  # that module builds this class: imported here

        rec = open_recommender(cls, path_or_hub_id, revision=revision, cache_dir=cache_dir,
                               local_files_only=local_files_only, token=token)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return rec.to(device)

    @classmethod
    def from_run(cls, run_dir: str | Path) -> "GenerativeRecommender":
        """The recommender of a train run's out_dir (modules/recommender/runs.py)."""
        from modules.recommender.runs import from_run

        return from_run(cls, run_dir)

    @classmethod
    def from_staged_run(cls, run_dir: str | Path) -> "GenerativeRecommender":
        """The recommender of a train_joint.py out_dir (modules/recommender/runs.py)."""
        from modules.recommender.runs import from_staged_run

        return from_staged_run(cls, run_dir)

    def _save_pretrained(self, save_directory: Path) -> None:  # save_pretrained and push_to_hub write this
        from modules.recommender.folder import save_folder

        save_folder(self, save_directory)

    def model_card(self) -> str:
        from modules.recommender.folder import model_card

        return model_card(self)

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

    def _encoded_batches(self, history, users, batch_size):
        """(rows, input_ids, mask) per batch of histories: their codes, with TIGER's hashed user
        token when the layout has user buckets (user 0 where ``users`` is not given)."""
        use_user = self.layout.num_user_buckets > 0
        user_ids = np.zeros(len(history), dtype=np.int64) if users is None else np.asarray(users, dtype=np.int64)
        for sl in self._batches(len(history), batch_size or self.config.get("batch_size", 256)):
            user = torch.as_tensor(user_ids[sl], device=self.device) if use_user else None
            input_ids, mask = self.layout.encode_history(torch.as_tensor(history[sl], device=self.device),
                                                         self.item_codes, user)
            yield sl, input_ids, mask

    def _beam(self, history, users, beam, batch_size):
        from modules.beam_search import beam_search

        ranked, scores = [], []
        for sl, input_ids, mask in self._encoded_batches(history, users, batch_size):
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
        ranked, scores = [], []
        for sl, input_ids, mask in self._encoded_batches(history, users, batch_size):
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

