"""Item texts' sentence embeddings, cached on disk: ``embed_items`` (computed once per encoder,
template, item order and texts) and ``load_embedding_file`` (a copied cache file, no encoder).

The texts come from data/text_templates.py (the template language is described there) and the
encoders from data/encoders.py; their public names are importable from here as well. Tests
replace ``data.text._load_encoder`` with a fake encoder: ``embed_items`` looks it up here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from data.encoders import (  # noqa: F401  (re-exported: callers import them from here)
    DEFAULT_ENCODER, OFFLINE_ENCODER_NAMES, _load_encoder, encoder_identity, encoder_path,
)
from data.text_templates import (  # noqa: F401  (re-exported: callers import them from here)
    DEFAULT_TEMPLATE, KNOWN_FIELDS, clean_text, item_texts, items_with_text,
)

log = logging.getLogger(__name__)

# Bump when the text cleaning or the cache layout changes, so old caches are not reused.
_CACHE_VERSION = 1


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
