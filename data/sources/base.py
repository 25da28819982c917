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
import re
import zlib
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
        except (OSError, EOFError, zlib.error) as e:
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


_INT64 = range(-(2 ** 63), 2 ** 63)
JSON_SPACE = b" \t\r\n"  # what JSON counts as whitespace: a line of these alone is blank


def json_line_error(line: bytes, schema: dict[str, pl.DataType]) -> str | None:
    """What is wrong with one JSON line (None: nothing) given the fields a reader needs:
    ``schema`` maps each to ``pl.String`` (a JSON string) or ``pl.Int64`` (a JSON integer)."""
    try:
        record = json.loads(line)
    except UnicodeDecodeError as e:
        return f"not UTF-8 ({e})"
    except json.JSONDecodeError as e:
        return f"malformed JSON ({e.msg} at column {e.colno})"
    except ValueError as e:  # e.g. an integer with too many digits
        return f"malformed JSON ({e})"
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    for name, dtype in schema.items():
        value = record.get(name)
        if value is None:
            return f"field '{name}' is missing or null"
        if dtype == pl.String and not isinstance(value, str):
            return f"field '{name}' must be a string, got {value!r:.40}"
        if dtype == pl.Int64 and (isinstance(value, bool) or not isinstance(value, int) or value not in _INT64):
            return f"field '{name}' must be an integer, got {value!r:.40}"
    return None


def first_bad_json_line(path: Path, first: int, lines: list[bytes], schema: dict[str, pl.DataType]) -> None:
    """Raise :class:`DataFormatError` for the first malformed line of ``lines`` (numbered from
    ``first``; blank lines are skipped, as the JSON-lines readers skip them)."""
    for k, line in enumerate(lines):
        if line.strip(JSON_SPACE):
            error = json_line_error(line, schema)
            if error is not None:
                raise DataFormatError(f"{path}:{first + k}: {error}")


def read_json_block(path: Path, first: int, lines: list[bytes], schema: dict[str, pl.DataType]) -> pl.DataFrame:
    """JSON lines (``lines``, split at ``\\n``, the first numbered ``first``) -> the ``schema``
    fields, parsed by polars at native speed. Other fields may hold anything. Any line polars
    fails on, a missing or null field, or a string field holding another JSON type (which
    polars would turn into its text: ``true`` -> "true") is reported by line from a check of
    the lines in Python (:func:`json_line_error`)."""
    data = b"".join(line if line.endswith(b"\n") else line + b"\n" for line in lines)
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        lineno = first + data.count(b"\n", 0, e.start)
        raise DataFormatError(f"{path}:{lineno}: not UTF-8 (byte {data[e.start]:#04x})") from None
    try:
        df = pl.read_ndjson(io.BytesIO(data), schema=schema)
    except Exception as polars_error:  # noqa: BLE001 - re-raised below with file and line
        first_bad_json_line(path, first, lines, schema)
        raise DataFormatError(f"{path}: lines {first}-{first + len(lines) - 1}: could not parse JSON lines "
                              f"({polars_error})") from polars_error
    text = pl.Series(data.decode("utf-8").split("\n")[: len(lines)])
    blank = text.str.strip_chars(JSON_SPACE.decode()) == ""
    suspect = pl.Series([False] * len(lines)) if df.height == int((~blank).sum()) else ~blank
    for name, dtype in schema.items():
        if dtype == pl.String:  # a string value: the key followed by an opening quote
            suspect = suspect | (~blank & ~text.str.contains(rf'"{re.escape(name)}"\s*:\s*"'))
    if df.select(pl.any_horizontal(pl.all().is_null()).any()).item() or suspect.any():
        first_bad_json_line(path, first, lines, schema)
    return df


def parse_json_lines(path: Path, raw: bytes, schema: dict[str, pl.DataType]) -> pl.DataFrame:
    """Strict JSON lines -> DataFrame of the ``schema`` fields; errors name file, line and field
    (:func:`read_json_block`; lines are counted by ``\\n``, blank lines skipped)."""
    lines = raw.split(b"\n")
    df = read_json_block(path, 1, lines, schema)
    if df.height == 0:
        raise DataFormatError(f"{path}: file is empty")
    return df


def fingerprint(files: list[Path]) -> str:
    """Cheap identity of input files (name, size, mtime) for cache keys."""
    h = hashlib.sha256()
    for f in sorted(Path(p).resolve() for p in files):
        st = os.stat(f)
        h.update(f"{f.name}:{st.st_size}:{int(st.st_mtime)}\n".encode())
    return h.hexdigest()[:16]


def default_cache_dir() -> Path:
    return Path(os.environ.get("SIDREC_CACHE", Path.home() / ".cache" / "sidrec"))
