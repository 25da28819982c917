"""What every source reader returns, and the small file helpers they share.

A source turns upstream files into two polars tables:

* ``events``: one row per interaction, columns ``user`` (str), ``item`` (str),
  ``timestamp`` (i64; any order-preserving number, e.g. the position in a P5 line) and
  ``order`` (i64: the row's position in the source file, which breaks timestamp ties so
  that "ties keep file order" holds after sorting).
* ``items``: one row per known item, column ``raw_id`` (str) plus whatever text fields
  the source has (``title``, ``brand``, ``categories``, ``price``, ``description``,
  ``year``, ``genres``). It may be empty when the source has no item metadata; then
  ``notes`` says so.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

TEXT_FIELDS = ("title", "brand", "categories", "price", "description", "year", "genres")
TEXT_SCHEMA = {
    "raw_id": pl.String,
    "title": pl.String,
    "brand": pl.String,
    "categories": pl.String,
    "price": pl.Float64,
    "description": pl.String,
    "year": pl.Int64,
    "genres": pl.String,
}


class DataFormatError(ValueError):
    """A source file does not have the expected format; the message names file and line/field."""


@dataclass
class RawData:
    name: str  # e.g. "amazon2014-Beauty"; becomes part of the cache key
    events: pl.DataFrame
    items: pl.DataFrame
    files: list[Path] = field(default_factory=list)  # inputs, fingerprinted for the cache key
    notes: list[str] = field(default_factory=list)  # things the user should know (missing text, ...)


def empty_items() -> pl.DataFrame:
    return pl.DataFrame(schema=TEXT_SCHEMA)


def conform_items(items: pl.DataFrame) -> pl.DataFrame:
    """Give an item table every text column with the canonical dtype (missing -> null)."""
    cols = []
    for name, dtype in TEXT_SCHEMA.items():
        if name in items.columns:
            cols.append(pl.col(name).cast(dtype, strict=False))
        else:
            cols.append(pl.lit(None, dtype=dtype).alias(name))
    out = items.select(cols)
    # Empty strings carry no text; store them as null so "has text" is a null check.
    return out.with_columns(
        [pl.when(pl.col(c).str.strip_chars() == "").then(None).otherwise(pl.col(c)).alias(c)
         for c, t in TEXT_SCHEMA.items() if t == pl.String and c != "raw_id"]
    ).unique("raw_id", keep="first", maintain_order=True)


def reviews_and_meta(name: str, reviews: Path, meta: Path | None, meta_name: str,
                     read_reviews, read_meta) -> RawData:
    """An Amazon-style source from its review file and (optional) item metadata file: the
    events, then the metadata of the items that occur in them (ids only, with a warning and a
    note, when the metadata file is missing)."""
    import warnings

    notes: list[str] = []
    events = read_reviews(reviews)
    if meta is None:
        note = (f"item text missing: no {meta_name} beside {reviews}; items have ids only "
                "(embeddings need text: add the meta file or use a source with item text)")
        warnings.warn(note, stacklevel=3)
        notes.append(note)
        items = empty_items()
    else:
        items = read_meta(meta, wanted=set(events["item"].unique().to_list()))
    files = [reviews] + ([meta] if meta is not None else [])
    return RawData(name=name, events=events, items=items, files=files, notes=notes)


def read_bytes(path: Path) -> bytes:
    """Read a file, transparently un-gzipping ``.gz``; empty files are an error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise DataFormatError(f"{path}: not a valid gzip file ({e}); delete it and download again") from e
    if not raw.strip():
        raise DataFormatError(f"{path}: file is empty")
    return raw


def find_file(folder: Path, *names: str) -> Path | None:
    """First of ``names`` (also tried with ``.gz``) that exists in ``folder``."""
    for name in names:
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def parse_json_lines(path: Path, raw: bytes, columns: list[str]) -> pl.DataFrame:
    """Strict JSON lines -> DataFrame with ``columns``; errors name file, line and field.

    polars parses the whole file at native speed; only when it fails do we walk the lines
    in Python to find and report the first bad one.
    """
    try:
        df = pl.read_ndjson(io.BytesIO(raw), infer_schema_length=None)
    except Exception as polars_error:  # noqa: BLE001 - re-raised below with a better message
        for lineno, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFormatError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
        raise DataFormatError(f"{path}: could not parse JSON lines ({polars_error})") from polars_error
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataFormatError(f"{path}: missing field(s) {missing}; found {df.columns}")
    for c in columns:
        nulls = df[c].is_null()
        if nulls.any():
            lineno = int(nulls.arg_max()) + 1
            raise DataFormatError(f"{path}:{lineno}: field '{c}' is missing or null")
    return df.select(columns)


def fingerprint(files: list[Path]) -> str:
    """Cheap identity of input files (name, size, mtime) for cache keys."""
    h = hashlib.sha256()
    for f in sorted(Path(p).resolve() for p in files):
        st = os.stat(f)
        h.update(f"{f.name}:{st.st_size}:{int(st.st_mtime)}\n".encode())
    return h.hexdigest()[:16]


def default_cache_dir() -> Path:
    return Path(os.environ.get("SIDREC_CACHE", Path.home() / ".cache" / "sidrec"))
