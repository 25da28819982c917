"""``ActionPieceTokenizer``: the vocabulary (official ``actionpiece.json`` layout, spec
section 12), the item feature table, training, segmentation and Hub/disk round trips.

Directory layout written by :meth:`ActionPieceTokenizer.save_pretrained`::

    actionpiece.json     {"n_categories", "n_init_feats", "token2feat", "priority"}
    item_features.json   {"item_features": [[f_0, ..., f_{K-1}], ...]}  (row = item_id)
    config.json          what made it (mode, feature source, sizes, ...)
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from modules.actionpiece import segment
from modules.actionpiece.vocab import MergeResult, learn_merges

VOCAB_FILE = "actionpiece.json"
FEATURES_FILE = "item_features.json"
CONFIG_FILE = "config.json"


def _atomic_write_json(path: Path, obj: Any) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@dataclass
class ActionPieceTokenizer:
    """ActionPiece vocabulary: token 0 = pad ``(-1, -1)``, then the initial feature tokens
    ``(category, value)`` (category-major, values ascending), then merge rules
    ``(-1, u, v)`` in learning order. ``priority[t]`` = weighted count when t was learned.
    Model-side ids: BOS = ``vocab_size``, EOS = ``vocab_size + 1``."""

    n_categories: int
    n_init_feats: int
    token2feat: list[tuple[int, ...]]
    priority: list[float]
    item_features: np.ndarray | None = None  # (N, n_categories) feature values per item_id
    config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.token2feat = [tuple(int(x) for x in t) for t in self.token2feat]
        self.priority = [float(p) for p in self.priority]
        if len(self.token2feat) != len(self.priority):
            raise ValueError(f"token2feat has {len(self.token2feat)} entries, priority {len(self.priority)}")
        if not 1 <= self.n_init_feats <= len(self.token2feat):
            raise ValueError(f"n_init_feats={self.n_init_feats} outside [1, {len(self.token2feat)}]")
        for i, t in enumerate(self.token2feat):
            merged = i >= self.n_init_feats
            if (len(t) != 3) if merged else (len(t) != 2):
                raise ValueError(f"token2feat[{i}] = {list(t)}: expected "
                                 f"{'[-1, u, v]' if merged else '[category, value]'}")
            if merged and not (t[0] == -1 and 0 < t[1] <= t[2] < i):
                raise ValueError(f"token2feat[{i}] = {list(t)}: a rule must be [-1, u, v], 0 < u <= v < {i}")
            if not merged and i > 0 and not 0 <= t[0] < self.n_categories:
                raise ValueError(f"token2feat[{i}] = {list(t)}: category outside [0, {self.n_categories})")
        if self.item_features is not None:
            self.item_features = np.asarray(self.item_features, dtype=np.int64)
            if self.item_features.ndim != 2 or self.item_features.shape[1] != self.n_categories:
                raise ValueError(f"item_features must be (N, {self.n_categories}), got {self.item_features.shape}")

    # ------------------------------------------------------------------ construction
    @staticmethod
    def initial_vocab(item_features: np.ndarray) -> tuple[list[tuple[int, ...]], int]:
        """Spec section 3: pad, then every observed (category, value), category-major."""
        feats = np.asarray(item_features)
        token2feat: list[tuple[int, ...]] = [(-1, -1)]
        for c in range(feats.shape[1]):
            token2feat.extend((c, int(v)) for v in np.unique(feats[:, c]))
        return token2feat, len(token2feat)

    @classmethod
    def train(
        cls,
        item_features: np.ndarray,
        train_sequences: Sequence[Sequence[int]],
        vocab_size: int,
        mode: str = "correct",
        progress: bool | None = None,
        config: dict[str, Any] | None = None,
    ) -> "ActionPieceTokenizer":
        """Learn a vocabulary of ``vocab_size`` tokens (fewer if pairs run out).

        ``item_features``: (N, K) feature values per item_id; ``train_sequences``: item_ids
        of each training sequence, oldest first."""
        feats = np.asarray(item_features, dtype=np.int64)
        if feats.ndim != 2:
            raise ValueError(f"item_features must be (N, K), got shape {feats.shape}")
        token2feat, n_init = cls.initial_vocab(feats)
        if vocab_size < n_init:
            raise ValueError(f"vocab_size={vocab_size} < {n_init} initial tokens")
        tok = cls._feature_tokens(token2feat, feats)
        result: MergeResult = learn_merges(tok, train_sequences, n_init, vocab_size - n_init,
                                           mode=mode, progress=progress)
        token2feat += [(-1, int(u), int(v)) for u, v in result.pairs]
        priority = [0.0] * n_init + result.priorities.tolist()
        cfg = {"mode": mode, "requested_vocab_size": vocab_size,
               "phantom_merges": int(result.phantom.sum()), **(config or {})}
        return cls(feats.shape[1], n_init, token2feat, priority, feats, cfg)

    @staticmethod
    def _feature_tokens(token2feat: Sequence[tuple[int, ...]], feats: np.ndarray) -> np.ndarray:
        lookup = {t: i for i, t in enumerate(token2feat) if len(t) == 2 and t[0] >= 0}
        out = np.empty(feats.shape, dtype=np.int64)
        for c in range(feats.shape[1]):
            for v in np.unique(feats[:, c]):
                if (c, int(v)) not in lookup:
                    raise ValueError(f"feature value {int(v)} of category {c} has no token")
                out[feats[:, c] == v, c] = lookup[(c, int(v))]
        return out

    # ------------------------------------------------------------------ derived tables
    @property
    def vocab_size(self) -> int:
        return len(self.token2feat)

    @property
    def bos_id(self) -> int:
        return self.vocab_size

    @property
    def eos_id(self) -> int:
        return self.vocab_size + 1

    @cached_property
    def item_tokens(self) -> np.ndarray:
        """(N, K) initial token ids of every item's features."""
        if self.item_features is None:
            raise ValueError("this tokenizer has no item feature table")
        return self._feature_tokens(self.token2feat[: self.n_init_feats], self.item_features)

    @cached_property
    def rules(self) -> dict[tuple[int, int], int]:
        """Pair -> earliest merged token."""
        out: dict[tuple[int, int], int] = {}
        for i in range(self.n_init_feats, self.vocab_size):
            out.setdefault(self.token2feat[i][1:], i)  # type: ignore[arg-type]
        return out

    @cached_property
    def rule_table(self) -> tuple[np.ndarray, np.ndarray]:
        return segment.rule_table(self.token2feat)

    @cached_property
    def expand(self) -> list[tuple[tuple[int, int], ...]]:
        return segment.expand_table(self.token2feat)

    # ------------------------------------------------------------------ segmentation
    def spr(self, history: np.ndarray, rng: np.random.Generator | int | None = None) -> segment.Segmented:
        """SPR segmentation of a batch of histories ((n, H) item_ids, -1 padded)."""
        return segment.spr_encode(history, self.item_tokens, self.rule_table, rng)

    def encode_deterministic(self, item_ids: Sequence[int]) -> list[int]:
        """The deterministic (``none``) segmentation of a sequence of items."""
        items = [list(self.item_tokens[i]) for i in item_ids]
        return segment.none_encode(items, self.rules, self.priority)

    def encode_target(self, item_id: int) -> list[int]:
        return self.encode_deterministic([item_id])

    def decode(self, tokens: Sequence[int]) -> tuple[int, ...] | None:
        """Feature tuple of a generated sequence (cut at EOS), None if invalid."""
        return segment.decode_tokens(tokens, self.expand, self.n_categories, self.eos_id)

    # ------------------------------------------------------------------ files
    def to_json(self) -> dict[str, Any]:
        return {
            "n_categories": self.n_categories,
            "n_init_feats": self.n_init_feats,
            "token2feat": [list(t) for t in self.token2feat],
            "priority": self.priority,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any], vocab_size: int | None = None, source: str = "<json>",
                  item_features: np.ndarray | None = None) -> "ActionPieceTokenizer":
        """Build from the official layout, truncated to the first ``vocab_size`` tokens."""
        for key in ("n_categories", "n_init_feats", "token2feat", "priority"):
            if key not in obj:
                raise ValueError(f"{source}: missing field {key!r}")
        t2f, pri, n_init = obj["token2feat"], obj["priority"], int(obj["n_init_feats"])
        if vocab_size is not None:
            if not n_init <= vocab_size <= len(t2f):
                raise ValueError(f"{source}: vocab_size={vocab_size} outside [n_init_feats={n_init}, "
                                 f"stored {len(t2f)}]")
            t2f, pri = t2f[:vocab_size], pri[:vocab_size]
        try:
            return cls(int(obj["n_categories"]), n_init, t2f, pri, item_features)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    def save_json(self, path: str | Path) -> None:
        _atomic_write_json(Path(path), self.to_json())

    @classmethod
    def load_json(cls, path: str | Path, vocab_size: int | None = None) -> "ActionPieceTokenizer":
        path = Path(path)
        try:
            obj = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
        return cls.from_json(obj, vocab_size, source=str(path))

    def save_pretrained(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.save_json(directory / VOCAB_FILE)
        if self.item_features is not None:
            _atomic_write_json(directory / FEATURES_FILE, {"item_features": self.item_features.tolist()})
        cfg = {"tokenizer": "actionpiece", "vocab_size": self.vocab_size,
               "n_categories": self.n_categories, "n_init_feats": self.n_init_feats, **self.config}
        _atomic_write_json(directory / CONFIG_FILE, cfg)
        return directory

    @classmethod
    def from_pretrained(cls, repo_id_or_dir: str | Path, vocab_size: int | None = None,
                        revision: str | None = None, **hub_kwargs: Any) -> "ActionPieceTokenizer":
        """Load a directory written by :meth:`save_pretrained`, or download it from the Hub."""
        directory = Path(repo_id_or_dir)
        if not directory.is_dir():
            from huggingface_hub import snapshot_download

            directory = Path(snapshot_download(str(repo_id_or_dir), revision=revision, **hub_kwargs))
        tok = cls.load_json(directory / VOCAB_FILE, vocab_size)
        feat_path = directory / FEATURES_FILE
        if feat_path.exists():
            feats = json.loads(feat_path.read_text()).get("item_features")
            if feats is None:
                raise ValueError(f"{feat_path}: missing field 'item_features'")
            tok.item_features = np.asarray(feats, dtype=np.int64)
            if tok.item_features.ndim != 2 or tok.item_features.shape[1] != tok.n_categories:
                raise ValueError(f"{feat_path}: item_features must be (N, {tok.n_categories})")
        cfg_path = directory / CONFIG_FILE
        if cfg_path.exists():
            tok.config = {k: v for k, v in json.loads(cfg_path.read_text()).items()
                          if k not in ("tokenizer", "vocab_size", "n_categories", "n_init_feats")}
        return tok

    def push_to_hub(self, repo_id: str, private: bool = True, commit_message: str = "ActionPiece tokenizer",
                    **hub_kwargs: Any) -> str:
        """Upload :meth:`save_pretrained`'s files to a Hub model repo; returns the commit URL."""
        from huggingface_hub import HfApi

        api = HfApi(**hub_kwargs)
        api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp)
            info = api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message=commit_message)
        return str(info)
