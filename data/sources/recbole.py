"""RecBole atomic files: ``<name>.inter`` (interactions) and optional ``<name>.item``.

Headers are typed (``item_id:token``, ``timestamp:float``, ``categories:token_seq``), fields
are tab separated with CSV quoting (a title may hold a quoted newline).
"""

from __future__ import annotations

import io
from pathlib import Path

import polars as pl

from data.sources.base import DataFormatError, RawData, conform_items, empty_items, find_file, read_bytes

# RecBole field names -> ours.
_ALIASES = {"item_id": "raw_id", "movie_title": "title", "genre": "genres", "release_year": "year",
            "categories": "categories", "title": "title", "brand": "brand", "price": "price",
            "description": "description"}


def read_atomic(path: Path) -> pl.DataFrame:
    """Read an atomic file with its ``name:type`` header stripped to plain names (all strings)."""
    raw = read_bytes(path)
    try:
        df = pl.read_csv(io.BytesIO(raw), separator="\t", quote_char='"', infer_schema=False)
    except pl.exceptions.PolarsError as e:
        raise DataFormatError(f"{path}: cannot parse RecBole atomic file ({str(e).splitlines()[0]})") from e
    names = []
    for col in df.columns:
        if ":" not in col:
            raise DataFormatError(f"{path}:1: header field {col!r} lacks a ':type' suffix (RecBole atomic format)")
        names.append(col.split(":", 1)[0])
    return df.rename(dict(zip(df.columns, names)))


def _clean_token_seq(expr: pl.Expr) -> pl.Expr:
    # "'Beauty', 'Makeup', 'Face'" -> "Beauty, Makeup, Face"
    return expr.str.replace_all(r"""(^|,\s*)['"]""", "$1").str.replace_all(r"""['"](\s*,|$)""", "$1")


def read_atomic_items(path: Path) -> pl.DataFrame:
    df = read_atomic(path)
    if "item_id" not in df.columns:
        raise DataFormatError(f"{path}:1: missing field 'item_id' in header {df.columns}")
    keep = {c: _ALIASES[c] for c in df.columns if c in _ALIASES}
    df = df.select(list(keep)).rename(keep)
    if "categories" in df.columns:
        df = df.with_columns(_clean_token_seq(pl.col("categories")).alias("categories"))
    if "genres" in df.columns:
        df = df.with_columns(pl.col("genres").str.replace_all(" ", ", ", literal=True))
    return conform_items(df)


def load(path: str | Path, name: str | None = None) -> RawData:
    """``path``: a folder with ``<name>.inter`` (and maybe ``<name>.item``), or the .inter file."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    name = name or (path.name.split(".")[0] if path.is_file() else folder.name)
    inter = path if path.is_file() else find_file(folder, f"{name}.inter")
    if inter is None:
        raise FileNotFoundError(f"{folder}: no {name}.inter here")
    df = read_atomic(inter)
    missing = [c for c in ("user_id", "item_id") if c not in df.columns]
    if missing:
        raise DataFormatError(f"{inter}:1: missing field(s) {missing} in header {df.columns}")
    ts = pl.col("timestamp").cast(pl.Float64, strict=False).cast(pl.Int64) if "timestamp" in df.columns \
        else pl.lit(0, dtype=pl.Int64)
    events = df.select(pl.col("user_id").alias("user"), pl.col("item_id").alias("item"), ts.alias("timestamp"),
                       pl.int_range(pl.len(), dtype=pl.Int64).alias("order"))
    if "timestamp" in df.columns:
        bad = events["timestamp"].is_null()
        if bad.any():
            raise DataFormatError(f"{inter}:{int(bad.arg_max()) + 2}: field 'timestamp' is not a number")
    item_file = find_file(folder, f"{name}.item")
    items = read_atomic_items(item_file) if item_file is not None else empty_items()
    notes = [] if item_file is not None else [f"item text missing: no {name}.item beside {inter}"]
    files = [inter] + ([item_file] if item_file is not None else [])
    return RawData(name=f"recbole-{name}", events=events, items=items, files=files, notes=notes)
