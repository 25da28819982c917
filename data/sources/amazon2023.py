"""Amazon Reviews 2023 (McAuley lab, Hou et al. 2024): ``<Category>.jsonl.gz`` + ``meta_<Category>.jsonl.gz``.

Both files are strict JSON lines. A review line has ``rating``, ``title``, ``text``,
``images``, ``asin``, ``parent_asin``, ``user_id``, ``timestamp`` (unix time in
milliseconds), ``helpful_vote`` and ``verified_purchase``; a meta line has
``main_category``, ``title``, ``average_rating``, ``rating_number``, ``features`` (list),
``description`` (list), ``price`` (float or null), ``images``, ``videos``, ``store``,
``categories`` (list), ``details`` (dict; the Hugging Face loader turns it into a JSON
string, and both are accepted), ``parent_asin`` and ``bought_together``.

Items are keyed by ``parent_asin``, not ``asin``: colour/size variants of one product share a
parent, upstream says to use the parent id to find the meta record, and ETEGRec and the
release's own benchmark scripts (``benchmark_scripts/kcore_filtering.py``) count
interactions per parent_asin. A user reviewing two variants of one product is therefore a
repeated (user, item) pair, which preprocessing deduplicates (first kept).

Item text: ``title``; ``brand`` = ``store`` (else ``details["Brand"]``); ``categories`` =
the category path joined with ", " (else ``main_category``); ``price``; ``description`` =
the description paragraphs followed by the feature bullets.

The review files are GBs uncompressed (Musical_Instruments: 1.6 GB, 3M lines), so they are
decompressed as a stream and parsed by polars in blocks of lines keeping only the three
needed fields; meta lines of items outside the review file are skipped before parsing.
"""

from __future__ import annotations

import gzip
import io
import json
import re
import zlib
from collections.abc import Iterator
from pathlib import Path

import polars as pl

from data.download import fetch
from data.sources.base import (
    DataFormatError, RawData, conform_items, default_cache_dir, empty_items, find_file, reviews_and_meta,
)

# The release's host (links on amazon-reviews-2023.github.io and the Hugging Face card);
# https://mcauleylab.ucsd.edu/public_datasets/data/amazon_2023/raw/ serves the same files.
DEFAULT_BASE_URL = "https://datarepo.eng.ucsd.edu/mcauley_group/data/amazon_2023/raw/"
REVIEW_DIR = "review_categories"
META_DIR = "meta_categories"
# The ETEGRec categories (Instruments, Scientific, Games) first; any upstream name works.
CATEGORIES = ("Musical_Instruments", "Industrial_and_Scientific", "Video_Games", "All_Beauty",
              "Beauty_and_Personal_Care", "Sports_and_Outdoors", "Toys_and_Games", "CDs_and_Vinyl",
              "Office_Products", "Books", "Movies_and_TV", "Electronics")
REVIEW_FIELDS = {"user_id": pl.String, "parent_asin": pl.String, "timestamp": pl.Int64}
BLOCK_BYTES = 64 << 20  # lines handed to polars at once: bounded memory, native parsing speed
_PARENT_RE = re.compile(rb'"parent_asin"\s*:\s*"([^"]+)"')
_PRICE_RE = re.compile(r"\$?\s*(\d[\d,]*(?:\.\d+)?)")


def review_file_name(category: str) -> str:
    return f"{category}.jsonl.gz"


def meta_file_name(category: str) -> str:
    return f"meta_{category}.jsonl.gz"


def load(category: str = "Musical_Instruments", path: str | Path | None = None,
         cache_dir: str | Path | None = None, base_url: str = DEFAULT_BASE_URL, download_meta: bool = True,
         checksums: dict[str, str] | None = None) -> RawData:
    """Read one category. ``path``: a folder holding ``<Category>.jsonl[.gz]`` and
    ``meta_<Category>.jsonl[.gz]``, or the review file itself; without it the files are
    downloaded from ``base_url`` + ``review_categories/`` and ``meta_categories/`` into
    ``cache_dir/raw/amazon2023``. ``checksums``: file name -> sha256, verified after
    download (upstream publishes none for the .gz files, so none by default)."""
    if path is not None:
        path = Path(path)
        folder = path if path.is_dir() else path.parent
        reviews = path if path.is_file() else find_file(folder, f"{category}.jsonl")
        if reviews is None:
            found = sorted(f.name for f in folder.glob("*.jsonl*")
                           if not f.name.startswith("meta_") and not f.name.endswith(".part"))
            hint = f" (found {', '.join(found)}: pass --category {found[0].split('.jsonl')[0]})" if found else ""
            raise FileNotFoundError(f"{folder}: no {review_file_name(category)} here{hint}")
        meta = find_file(folder, f"meta_{category}.jsonl")
    else:
        folder = Path(cache_dir or default_cache_dir()) / "raw" / "amazon2023"
        url = base_url.rstrip("/") + "/"
        checksums = checksums or {}

        def get(subdir: str, name: str) -> Path:
            return fetch(f"{url}{subdir}/{name}", folder / name, sha256=checksums.get(name))

        reviews = get(REVIEW_DIR, review_file_name(category))
        meta = get(META_DIR, meta_file_name(category)) if download_meta else None

    return reviews_and_meta(f"amazon2023-{category}", reviews, meta, meta_file_name(category), read_reviews, read_meta)


# --------------------------------------------------------------------------------------------
# Reading


def _line_blocks(path: Path, block_bytes: int) -> Iterator[tuple[int, list[bytes]]]:
    """(number of the block's first line, its lines), streaming through gzip when ``.gz``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    opener = gzip.open if path.suffix == ".gz" else open
    first = 1
    try:
        with opener(path, "rb") as f:
            while lines := f.readlines(block_bytes):
                yield first, lines
                first += len(lines)
    except (OSError, EOFError, zlib.error) as e:
        raise DataFormatError(f"{path}: not a valid gzip file ({e}); delete it and download again") from e


def _check_review_line(path: Path, lineno: int, line: bytes) -> None:
    """Raise the precise error for one review line, if it has one."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataFormatError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise DataFormatError(f"{path}:{lineno}: not UTF-8 ({e})") from None
    if not isinstance(record, dict):
        raise DataFormatError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
    for name in REVIEW_FIELDS:
        if record.get(name) is None:
            raise DataFormatError(f"{path}:{lineno}: field '{name}' is missing or null")
    ts = record["timestamp"]
    if isinstance(ts, bool) or not isinstance(ts, int):
        raise DataFormatError(f"{path}:{lineno}: field 'timestamp' must be an integer (unix ms), got {ts!r}")


def read_reviews(path: Path, block_bytes: int = BLOCK_BYTES) -> pl.DataFrame:
    """A review file -> events (``user`` = user_id, ``item`` = parent_asin, ``timestamp`` in ms)."""
    path = Path(path)
    frames = []
    for first, lines in _line_blocks(path, block_bytes):
        if not any(line.strip() for line in lines):  # blank lines only (polars 1.x panics on them)
            continue
        try:
            df = pl.read_ndjson(io.BytesIO(b"".join(lines)), schema=REVIEW_FIELDS)
        except Exception as polars_error:  # noqa: BLE001 - re-raised below with file and line
            for k, line in enumerate(lines):
                if line.strip():
                    _check_review_line(path, first + k, line)
            raise DataFormatError(f"{path}: lines {first}-{first + len(lines) - 1}: could not parse JSON lines "
                                  f"({polars_error})") from polars_error
        if df.select(pl.any_horizontal(pl.all().is_null()).any()).item():
            # polars skips blank lines, so row != line: find the line itself
            for k, line in enumerate(lines):
                if line.strip():
                    _check_review_line(path, first + k, line)
        frames.append(df)
    events = pl.concat(frames) if frames else pl.DataFrame(schema=REVIEW_FIELDS)
    if events.height == 0:
        raise DataFormatError(f"{path}: file is empty")
    return events.select(
        pl.col("user_id").alias("user"),
        pl.col("parent_asin").alias("item"),
        pl.col("timestamp"),
        pl.int_range(pl.len(), dtype=pl.Int64).alias("order"),
    )


def _strings(value) -> list[str]:
    """A str or a list of them (upstream uses both) -> the non-empty strings."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        return []
    return [s for s in (str(v).strip() for v in value if v is not None) if s]


def _price(value) -> float | None:
    """Upstream prices are floats or null; copies re-saved by the HF loader hold strings
    ("None", "12.99"), and some scraped values are ranges or text: those count as missing."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value) if value == value else None
    if isinstance(value, str):
        m = _PRICE_RE.fullmatch(value.strip())
        if m:
            return float(m.group(1).replace(",", ""))
    return None


def _details(value) -> dict:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return {}  # free-form and optional: an unparsable string is just no details
    return value if isinstance(value, dict) else {}


def read_meta(path: Path, wanted: set[str] | None = None) -> pl.DataFrame:
    """A meta file -> item text table keyed by ``parent_asin`` (``wanted``: keep only these)."""
    path = Path(path)
    rows = []
    seen_line = False
    for first, lines in _line_blocks(path, BLOCK_BYTES):
        for k, line in enumerate(lines):
            if not line.strip():
                continue
            seen_line = True
            lineno = first + k
            if wanted is not None:
                # Cheap pre-filter; an escaped quote inside a string value cannot match.
                m = _PARENT_RE.search(line)
                if m is not None and m.group(1).decode("utf-8", errors="replace") not in wanted:
                    continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise DataFormatError(f"{path}:{lineno}: malformed meta record ({e.__class__.__name__}: {e})") from None
            if not isinstance(record, dict) or not isinstance(record.get("parent_asin"), str):
                raise DataFormatError(f"{path}:{lineno}: meta record has no 'parent_asin' field")
            if wanted is not None and record["parent_asin"] not in wanted:
                continue
            details = _details(record.get("details"))
            title = record.get("title")
            brand = record.get("store") if isinstance(record.get("store"), str) else None
            if not (brand or "").strip():
                brand = details.get("Brand") if isinstance(details.get("Brand"), str) else None
            categories = _strings(record.get("categories")) or _strings(record.get("main_category"))
            text = _strings(record.get("description")) + _strings(record.get("features"))
            rows.append({
                "raw_id": record["parent_asin"],
                "title": title if isinstance(title, str) else None,
                "brand": brand,
                "categories": ", ".join(dict.fromkeys(categories)) or None,
                "price": _price(record.get("price")),
                "description": " ".join(text) or None,
            })
    if not seen_line:
        raise DataFormatError(f"{path}: file is empty")
    if not rows:
        return empty_items()
    return conform_items(pl.DataFrame(rows, schema={"raw_id": pl.String, "title": pl.String, "brand": pl.String,
                                                    "categories": pl.String, "price": pl.Float64,
                                                    "description": pl.String}))
