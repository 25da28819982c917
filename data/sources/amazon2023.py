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
import json
import re
import zlib
from collections.abc import Iterator
from pathlib import Path

import polars as pl

from data.download import fetch
from data.sources.base import (
    JSON_SPACE, DataFormatError, RawData, conform_items, default_cache_dir, empty_items, find_file, read_json_block,
    reviews_and_meta,
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


def _drain(blocks: Iterator) -> None:
    """Read a :func:`_line_blocks` stream to its end: raises its gzip error, if it has one."""
    for _ in blocks:
        pass


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


def read_reviews(path: Path, block_bytes: int = BLOCK_BYTES) -> pl.DataFrame:
    """A review file -> events (``user`` = user_id, ``item`` = parent_asin, ``timestamp`` in ms).
    Each block of lines is parsed by polars; a malformed line, a missing or null field, or a
    field of the wrong JSON type is reported by file and line (:func:`read_json_block`)."""
    path = Path(path)
    frames = []
    blocks = _line_blocks(path, block_bytes)
    for first, lines in blocks:
        if not any(line.strip(JSON_SPACE) for line in lines):  # blank lines only (polars 1.x panics on them)
            continue
        try:
            frames.append(read_json_block(path, first, lines, REVIEW_FIELDS))
        except DataFormatError:
            _drain(blocks)  # a damaged gzip stream garbles lines: report it, not the line it broke
            raise
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
    """A str or a list of them (upstream uses both) -> the non-empty strings (anything else in
    the list, a number or a nested list, is not text and is left out)."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        return []
    return [s for s in (v.strip() for v in value if isinstance(v, str)) if s]


def _price(value) -> float | None:
    """Upstream prices are floats or null; copies re-saved by the HF loader hold strings
    ("None", "12.99"), and some scraped values are ranges or text: those count as missing."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        try:
            value = float(value)
        except OverflowError:  # an integer beyond a float
            return None
        return value if value == value and abs(value) != float("inf") else None
    if isinstance(value, str):
        m = _PRICE_RE.fullmatch(value.strip())
        if m:
            return float(m.group(1).replace(",", ""))
    return None


def _details(value) -> dict:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            return {}  # free-form and optional: an unparsable string is just no details
    return value if isinstance(value, dict) else {}


def read_meta(path: Path, wanted: set[str] | None = None) -> pl.DataFrame:
    """A meta file -> item text table keyed by ``parent_asin`` (``wanted``: keep only these)."""
    path = Path(path)
    rows = []
    seen_line = False
    blocks = _line_blocks(path, BLOCK_BYTES)
    for first, lines in blocks:
        try:
            _meta_rows(path, first, lines, wanted, rows)
        except DataFormatError:
            _drain(blocks)  # a damaged gzip stream garbles lines: report it, not the line it broke
            raise
        seen_line = seen_line or any(line.strip() for line in lines)
    if not seen_line:
        raise DataFormatError(f"{path}: file is empty")
    if not rows:
        return empty_items()
    return conform_items(pl.DataFrame(rows, schema={"raw_id": pl.String, "title": pl.String, "brand": pl.String,
                                                    "categories": pl.String, "price": pl.Float64,
                                                    "description": pl.String}))


def _meta_rows(path: Path, first: int, lines: list[bytes], wanted: set[str] | None, rows: list[dict]) -> None:
    """The item rows of one block of meta lines (the first numbered ``first``), appended to ``rows``."""
    for k, line in enumerate(lines):
        if not line.strip():
            continue
        lineno = first + k
        if wanted is not None:
            # Cheap pre-filter; an escaped quote inside a string value cannot match.
            m = _PARENT_RE.search(line)
            if m is not None and m.group(1).decode("utf-8", errors="replace") not in wanted:
                continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, too many digits
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
