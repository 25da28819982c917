"""Amazon Reviews 2014 (McAuley et al.): ``reviews_<Category>_5.json.gz`` + ``meta_<Category>.json.gz``.

The review file is strict JSON lines. The 2014 meta file is *not* JSON: each line is a
Python literal (single quotes), so it is parsed with ``ast.literal_eval``; lines of items
outside the review file are skipped before parsing, which keeps Beauty's 259k-line meta
file cheap.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import polars as pl

from data.download import fetch
from data.sources.base import (
    DataFormatError, RawData, conform_items, default_cache_dir, empty_items, find_file, reviews_and_meta,
    parse_json_lines, read_bytes,
)

# The URL the ActionPiece code uses; hosts have moved before, so it is configurable.
DEFAULT_BASE_URL = "https://snap.stanford.edu/data/amazon/productGraph/categoryFiles/"
CATEGORIES = ("Beauty", "Sports_and_Outdoors", "Toys_and_Games", "CDs_and_Vinyl",
              "Musical_Instruments", "Video_Games", "Office_Products", "Clothing_Shoes_and_Jewelry")
_ASIN_RE = re.compile(rb"""['"]asin['"]\s*:\s*['"]([^'"]+)['"]""")


def review_file_name(category: str) -> str:
    return f"reviews_{category}_5.json.gz"


def meta_file_name(category: str) -> str:
    return f"meta_{category}.json.gz"


def load(category: str = "Beauty", path: str | Path | None = None, cache_dir: str | Path | None = None,
         base_url: str = DEFAULT_BASE_URL, download_meta: bool = True,
         checksums: dict[str, str] | None = None) -> RawData:
    """Read one category. ``path``: a folder holding the files or the review file itself;
    without it the files are downloaded into ``cache_dir/raw/amazon2014``. ``checksums``:
    file name -> sha256, verified after download (upstream publishes none, so none by default)."""
    if path is not None:
        path = Path(path)
        folder = path if path.is_dir() else path.parent
        reviews = path if path.is_file() else find_file(folder, f"reviews_{category}_5.json", f"reviews_{category}.json")
        if reviews is None:
            found = sorted(f.name for f in folder.glob("reviews_*.json*"))
            hint = ""
            if found:
                other = found[0].removeprefix("reviews_").split(".json")[0].removesuffix("_5")
                hint = f" (found {', '.join(found)}: pass --category {other})"
            raise FileNotFoundError(f"{folder}: no {review_file_name(category)} here{hint}")
        meta = find_file(folder, f"meta_{category}.json")
    else:
        folder = Path(cache_dir or default_cache_dir()) / "raw" / "amazon2014"
        url = base_url.rstrip("/") + "/"
        checksums = checksums or {}

        def get(name: str) -> Path:
            return fetch(url + name, folder / name, sha256=checksums.get(name))

        reviews = get(review_file_name(category))
        meta = get(meta_file_name(category)) if download_meta else None

    return reviews_and_meta(f"amazon2014-{category}", reviews, meta, meta_file_name(category), read_reviews, read_meta)


def read_reviews(path: Path) -> pl.DataFrame:
    raw = read_bytes(path)
    df = parse_json_lines(path, raw, {"reviewerID": pl.String, "asin": pl.String, "unixReviewTime": pl.Int64})
    return df.select(
        pl.col("reviewerID").cast(pl.String).alias("user"),
        pl.col("asin").cast(pl.String).alias("item"),
        pl.col("unixReviewTime").cast(pl.Int64).alias("timestamp"),
        pl.int_range(pl.len(), dtype=pl.Int64).alias("order"),
    )


def _flatten_categories(value) -> str | None:
    """``[["Beauty", "Makeup"], ["Beauty", "Nails"]]`` -> "Beauty, Makeup, Nails" (first occurrence
    order); anything but a list of lists (or of names) is no categories."""
    if not isinstance(value, (list, tuple)):
        return None
    seen: dict[str, None] = {}
    for path in value:
        for name in (path if isinstance(path, (list, tuple)) else [path]):
            seen.setdefault(str(name), None)
    return ", ".join(seen) or None


def _price(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        return float(value)
    except OverflowError:  # an integer beyond a float
        return None


def _text(value) -> str | None:
    """A text field: a string, else missing (a number or a list is not a title)."""
    return value if isinstance(value, str) else None


def read_meta(path: Path, wanted: set[str] | None = None) -> pl.DataFrame:
    """Parse a 2014 meta file (Python-literal lines; strict JSON lines also accepted). Lines are
    counted by ``\\n``. A record needs a string ``asin``; text fields that are not strings and
    prices that are not numbers count as missing."""
    raw = read_bytes(path)
    rows = []
    for lineno, line in enumerate(raw.split(b"\n"), 1):
        if not line.strip():
            continue
        if wanted is not None:
            m = _ASIN_RE.search(line)
            if m is not None and m.group(1).decode(errors="replace") not in wanted:
                continue
        text = line.decode("utf-8", errors="replace")
        try:
            record = json.loads(text)
        except ValueError:
            try:
                record = ast.literal_eval(text)
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError) as e:
                raise DataFormatError(f"{path}:{lineno}: malformed meta record ({e.__class__.__name__}: {e})") from None
        if not isinstance(record, dict) or not isinstance(record.get("asin"), str):
            raise DataFormatError(f"{path}:{lineno}: meta record has no 'asin' field (a string)")
        price = record.get("price")
        rows.append({
            "raw_id": record["asin"],
            "title": _text(record.get("title")),
            "brand": _text(record.get("brand")),
            "categories": _flatten_categories(record.get("categories")),
            "price": _price(price),
            "description": _text(record.get("description")),
        })
    if not rows:
        return empty_items()
    return conform_items(pl.DataFrame(rows, schema={"raw_id": pl.String, "title": pl.String, "brand": pl.String,
                                                    "categories": pl.String, "price": pl.Float64,
                                                    "description": pl.String}))
