"""Semantic IDs: item <-> code lookup and a saveable tokenizer (Hugging Face Hub mixin). The
dedup level, collision/usage metrics and the codebook-usage plot live in modules/code_stats.py
and are importable from here too.

Typical use (after training a quantizer `q` on item embeddings `emb`):

    codes = q.encode(emb)                                   # (N, L)
    item_codes = add_dedup_level(codes, max_size=256)       # (N, L+1), unique rows
    tok = SemanticIdTokenizer(q, item_codes, raw_ids=raw_ids)
    tok.save_pretrained("out/tokenizer")                    # or tok.push_to_hub("user/repo")
    tok = SemanticIdTokenizer.from_pretrained("out/tokenizer")
"""

from __future__ import annotations

import json
import math
import os
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Sequence

import torch
from huggingface_hub import ModelHubMixin, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from modules.code_stats import _check_codes, _level_counts
from modules.code_stats import (  # noqa: F401  (re-exported: callers import them from here)
    add_dedup_level, codebook_perplexity, codebook_usage, collision_group_sizes, collision_stats,
    plot_codebook_usage, with_dedup_level,
)
from modules.quantizers.fsq import FSQConfig, FSQTokenizer
from modules.quantizers.hidvae import HiDVAE, HiDVAEConfig
from modules.quantizers.opq import OPQConfig, OPQTokenizer
from modules.quantizers.rqkmeans import RQKMeans, RQKMeansConfig
from modules.quantizers.rqvae import RQVAE, RQVAEConfig

# kind -> (module class, config dataclass); the kind string is what config.json stores.
QUANTIZERS: dict[str, tuple[type[nn.Module], type]] = {
    "rqvae": (RQVAE, RQVAEConfig),
    "rqkmeans": (RQKMeans, RQKMeansConfig),
    "fsq": (FSQTokenizer, FSQConfig),
    "hidvae": (HiDVAE, HiDVAEConfig),  # wraps an RQVAE (not a subclass), so the isinstance lookup is unambiguous
    "opq": (OPQTokenizer, OPQConfig),  # RPG: n unordered codes, saved without a dedup level
}


def build_quantizer(config) -> nn.Module:
    """The (untrained) quantizer of a config dataclass: QUANTIZERS' module class for it."""
    for module_cls, config_cls in QUANTIZERS.values():
        if isinstance(config, config_cls):
            return module_cls(config)
    raise TypeError(f"build_quantizer: {type(config).__name__} is none of "
                    f"{[c.__name__ for _, c in QUANTIZERS.values()]}")


# ----------------------------------------------------------------------------- item <-> code


class ItemCodeTable:
    """Both-way map item_id <-> code row.

    code row -> item_id: each row is folded into one int64 key, key = key * m_l + code_l. With
    m_l = codebook size this is exact mixed radix while prod(sizes) < 2^63; for bigger code
    spaces m_l is a large odd constant and the (wrapping) key is a hash. Keys are sorted once;
    a lookup is a searchsorted plus a check that the found row equals the query, so a hash
    can never return a wrong item (and colliding table rows are rejected at build time).
    """

    _HASH_MULT = -7046029254386353131  # 0x9E3779B97F4A7C15 as int64 (odd, golden-ratio mixing)

    def __init__(self, item_codes: Tensor, codebook_sizes: Sequence[int] | None = None):
        self.codes = _check_codes(item_codes, "item_codes")
        n, length = self.codes.shape
        sizes = [int(c.numel()) for c in _level_counts(self.codes, codebook_sizes)]
        exact = math.prod(sizes) < 2**63
        self._mult = sizes if exact else [self._HASH_MULT] * length
        keys = self._keys(self.codes)
        self._sorted_keys, self._order = keys.sort()
        same = (self._sorted_keys[1:] == self._sorted_keys[:-1]).nonzero()
        if same.numel():
            i, j = (int(self._order[int(same[0]) + k]) for k in (0, 1))
            if torch.equal(self.codes[i], self.codes[j]):
                raise ValueError(
                    f"ItemCodeTable: items {i} and {j} share the code {tuple(self.codes[i].tolist())}, so code -> item "
                    f"is ambiguous; make rows unique first with add_dedup_level"
                )
            raise ValueError(f"ItemCodeTable: hash collision between items {i} and {j}; please report")

    def _keys(self, codes: Tensor) -> Tensor:
        key = torch.zeros(codes.shape[:-1], dtype=torch.long, device=codes.device)
        for level, mult in enumerate(self._mult):
            key = key * mult + codes[..., level]
        return key

    def __len__(self) -> int:
        return self.codes.shape[0]

    def codes_of(self, item_ids: Tensor) -> Tensor:
        """(..., ) item ids -> (..., L) codes."""
        return self.codes[item_ids]

    def ids_of(self, codes: Tensor) -> Tensor:
        """(..., L) codes -> (...,) item ids, -1 where no item has that code row."""
        codes = codes.long().to(self.codes.device)
        if codes.shape[-1] != self.codes.shape[1]:
            raise ValueError(
                f"ItemCodeTable.ids_of: codes have {codes.shape[-1]} levels, the table {self.codes.shape[1]}"
            )
        keys = self._keys(codes)
        pos = torch.searchsorted(self._sorted_keys, keys).clamp_max(len(self) - 1)
        cand = self._order[pos]
        ok = (self._sorted_keys[pos] == keys) & (self.codes[cand] == codes).all(-1)
        return torch.where(ok, cand, torch.full_like(cand, -1))


# ----------------------------------------------------------------------------- files


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """write(tmp_path) then rename over `path`, so readers never see a half-written file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_text(path: Path, text: str) -> None:
    _atomic_write(path, lambda p: Path(p).write_text(text, encoding="utf-8"))


CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CODES_FILE = "item_codes.safetensors"
RAW_IDS_FILE = "raw_ids.json"
FORMAT_VERSION = 1


class SemanticIdTokenizer(nn.Module, ModelHubMixin, library_name="sidrec", tags=["semantic-ids", "recommendation"]):
    """A trained quantizer plus the semantic IDs of every item of the dataset.

    quantizer: RQVAE | RQKMeans | FSQTokenizer, or None when only the code table is kept.
    item_codes: (N, L') with L' = quantizer levels + dedup level(s) (item_id = row index).
    codebook_sizes: per level of item_codes; default = quantizer's sizes, then max + 1 for
        the extra (dedup) levels.
    raw_ids: optional dataset ids (e.g. ASINs) of item 0..N-1, saved so a downstream user can
        `check_raw_ids` against their own processed dataset.

    Files: config.json, model.safetensors (quantizer state), item_codes.safetensors,
    raw_ids.json (if raw_ids), README.md. `from_pretrained` takes a local directory or a Hub
    repo id; `push_to_hub(repo_id)` comes from huggingface_hub.ModelHubMixin.
    """

    def __init__(
        self,
        quantizer: nn.Module | None,
        item_codes: Tensor,
        codebook_sizes: Sequence[int] | None = None,
        raw_ids: Sequence[str] | None = None,
    ):
        super().__init__()
        self.kind = None
        if quantizer is not None:
            kinds = [k for k, (cls, _) in QUANTIZERS.items() if isinstance(quantizer, cls)]
            if not kinds:
                raise TypeError(f"SemanticIdTokenizer: unsupported quantizer {type(quantizer).__name__}")
            self.kind = kinds[0]
        self.quantizer = quantizer
        item_codes = _check_codes(torch.as_tensor(item_codes), "item_codes")
        if codebook_sizes is None:
            known = list(quantizer.codebook_sizes) if quantizer is not None else []
            extra = _level_counts(item_codes[:, len(known) :], None) if item_codes.shape[1] > len(known) else []
            codebook_sizes = known + [c.numel() for c in extra]
        self.codebook_sizes = [int(s) for s in codebook_sizes]
        _level_counts(item_codes, self.codebook_sizes)  # validates ranges and the number of levels
        # Non-persistent: moves with .to(device) but lives in its own file, not the weights.
        self.register_buffer("item_codes", item_codes, persistent=False)
        if raw_ids is not None and len(raw_ids) != len(item_codes):
            raise ValueError(f"raw_ids: {len(raw_ids)} ids for {len(item_codes)} items")
        self.raw_ids = list(raw_ids) if raw_ids is not None else None
        self._table: ItemCodeTable | None = None
        self.card_details = ""  # markdown appended to the saved README.md (the run that made it)

    @property
    def num_items(self) -> int:
        return self.item_codes.shape[0]

    @property
    def table(self) -> ItemCodeTable:
        """item_id <-> code lookup, built on first use."""
        if self._table is None or self._table.codes.device != self.item_codes.device:
            self._table = ItemCodeTable(self.item_codes, self.codebook_sizes)
        return self._table

    def encode(self, x: Tensor) -> Tensor:
        """Quantizer codes (B, L) of embeddings x (no dedup level: that only exists for items in the table)."""
        if self.quantizer is None:
            raise RuntimeError("SemanticIdTokenizer.encode: this tokenizer has no quantizer")
        return self.quantizer.encode(x)

    def check_raw_ids(self, raw_ids: Sequence[str]) -> None:
        """Raise ValueError unless raw_ids equals the saved item order."""
        if self.raw_ids is None:
            raise ValueError("check_raw_ids: this tokenizer was saved without raw_ids")
        if len(raw_ids) != len(self.raw_ids):
            raise ValueError(f"check_raw_ids: {len(raw_ids)} ids given, tokenizer has {len(self.raw_ids)} items")
        for i, (a, b) in enumerate(zip(raw_ids, self.raw_ids)):
            if str(a) != str(b):
                raise ValueError(f"check_raw_ids: item_id {i} is {a!r} in your data but {b!r} in the tokenizer")

    # -- ModelHubMixin hooks ---------------------------------------------------------------

    def _save_pretrained(self, save_directory: Path) -> None:
        save_directory = Path(save_directory)
        config = {
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "quantizer_config": asdict(self.quantizer.config) if self.quantizer is not None else None,
            "codebook_sizes": self.codebook_sizes,
            "num_items": self.num_items,
            "code_length": self.item_codes.shape[1],
            "has_raw_ids": self.raw_ids is not None,
        }
        if self.quantizer is not None:
            state = {k: v.detach().cpu().contiguous() for k, v in self.quantizer.state_dict().items()}
            _atomic_write(save_directory / WEIGHTS_FILE, lambda p: save_file(state, p))
        codes = {"item_codes": self.item_codes.detach().cpu().contiguous()}
        _atomic_write(save_directory / CODES_FILE, lambda p: save_file(codes, p))
        if self.raw_ids is not None:
            _write_text(save_directory / RAW_IDS_FILE, json.dumps([str(r) for r in self.raw_ids]))
        card = (
            f"# Semantic-ID tokenizer ({self.kind or 'code table only'})\n\n"
            f"{self.num_items} items, {self.item_codes.shape[1]} codes per item, "
            f"codebook sizes {self.codebook_sizes}. Saved by sidrec (`SemanticIdTokenizer.from_pretrained`).\n"
            + (f"\n{self.card_details.strip()}\n" if self.card_details else "")
        )
        _write_text(save_directory / "README.md", card)
        # Written last: the mixin only writes its own config.json if this one is missing.
        _write_text(save_directory / CONFIG_FILE, json.dumps(config, indent=2, sort_keys=True))

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        force_download: bool = False,
        local_files_only: bool = False,
        token: str | bool | None = None,
        map_location: str | torch.device = "cpu",
        **unused,  # the mixin also passes config.json values that match __init__ argument names
    ) -> "SemanticIdTokenizer":
        def fetch(filename: str) -> str:
            if os.path.isdir(model_id):
                path = os.path.join(model_id, filename)
                if not os.path.isfile(path):
                    raise FileNotFoundError(
                        f"{path}: missing; a SemanticIdTokenizer directory (save_pretrained) needs it"
                    )
                return path
            try:
                return hf_hub_download(
                    repo_id=model_id, filename=filename, revision=revision, cache_dir=cache_dir,
                    force_download=force_download, local_files_only=local_files_only, token=token,
                )
            except EntryNotFoundError as e:
                if isinstance(e, FileNotFoundError):  # offline and not cached: the hub's message says so
                    raise
                raise FileNotFoundError(f"{model_id}/{filename}: missing in the Hub repo") from e

        config_path = fetch(CONFIG_FILE)
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
        for key in ("kind", "quantizer_config", "codebook_sizes", "num_items", "code_length", "has_raw_ids"):
            if key not in config:
                raise ValueError(f"{config_path}: field {key!r} missing")
        quantizer = None
        if config["kind"] is not None:
            if config["kind"] not in QUANTIZERS:
                raise ValueError(f"{config_path}: field 'kind' = {config['kind']!r} not in {sorted(QUANTIZERS)}")
            module_cls, config_cls = QUANTIZERS[config["kind"]]
            try:
                quantizer = module_cls(config_cls(**config["quantizer_config"]))
            except TypeError as e:
                raise ValueError(
                    f"{config_path}: field 'quantizer_config' does not fit {config_cls.__name__}: {e}"
                ) from e
            weights_path = fetch(WEIGHTS_FILE)
            try:
                quantizer.load_state_dict(load_file(weights_path, device=str(map_location)), strict=True)
            except RuntimeError as e:
                raise ValueError(f"{weights_path}: weights do not match {config_path}: {e}") from e
            quantizer.eval()
        codes_path = fetch(CODES_FILE)
        item_codes = load_file(codes_path, device=str(map_location)).get("item_codes")
        expected = (config["num_items"], config["code_length"])
        if item_codes is None or tuple(item_codes.shape) != expected:
            got = None if item_codes is None else tuple(item_codes.shape)
            raise ValueError(f"{codes_path}: tensor 'item_codes' has shape {got}, {config_path} says {expected}")
        raw_ids = None
        if config["has_raw_ids"]:
            with open(fetch(RAW_IDS_FILE), encoding="utf-8") as f:
                raw_ids = json.load(f)
        return cls(quantizer, item_codes, config["codebook_sizes"], raw_ids)
