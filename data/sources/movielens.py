"""MovieLens from the GroupLens zips: 100K, 1M (``::``-separated, latin-1) and the CSV
releases (latest-small, 20M, 25M, 32M: ``ratings.csv`` + ``movies.csv``).

Item text = title + year + genres. Titles carry the year ("Toy Story (1995)"; a series
"(2006–2007)": its first year; some titles have none) and file a leading article after the
name ("Matrix, The", "Misérables, Les"): the year goes to ``year``, the article back in front.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
import shutil
import tempfile
import zipfile
from pathlib import Path

import polars as pl

from data.download import DownloadError, fetch
from data.sources.base import DataFormatError, RawData, conform_items, default_cache_dir, read_bytes

DEFAULT_BASE_URL = "https://files.grouplens.org/datasets/movielens/"
LAYOUTS = {"100k": "100k", "1m": "dat", "10m": "dat", "20m": "csv", "25m": "csv", "32m": "csv",
           "latest-small": "csv", "latest": "csv"}
_ML100K_GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
                  "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
                  "Romance", "Sci-Fi", "Thriller", "War", "Western"]


def load(version: str = "1m", path: str | Path | None = None, cache_dir: str | Path | None = None,
         base_url: str = DEFAULT_BASE_URL, min_rating: float | None = None,
         sha256: str | None = None) -> RawData:
    """Read one MovieLens release. ``path``: the unzipped folder (or the zip); without it the
    zip is downloaded and unpacked into ``cache_dir/raw/movielens`` (``sha256``: the zip's
    digest, verified when given). ``min_rating`` keeps only ratings >= it (None: every rating
    is an interaction)."""
    version = version.lower().removeprefix("ml-")
    if version not in LAYOUTS:
        raise ValueError(f"unknown MovieLens version {version!r}; choose one of {sorted(LAYOUTS)}")
    if path is None:
        folder = download(version, Path(cache_dir or default_cache_dir()) / "raw" / "movielens", base_url, sha256)
    else:
        path = Path(path)
        folder = unzip(path, path.parent) if path.suffix == ".zip" else path
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: MovieLens folder not found")
    layout = LAYOUTS[version]
    if layout == "100k":
        events, items, files = _read_100k(folder)
    elif layout == "dat":
        events, items, files = _read_dat(folder)
    else:
        events, items, files = _read_csv(folder)
    if min_rating is not None:
        events = events.filter(pl.col("rating") >= min_rating)
    events = events.drop("rating")
    return RawData(name=f"movielens-{version}", events=events, items=conform_items(items), files=files)


def download(version: str, dest_root: Path, base_url: str = DEFAULT_BASE_URL, sha256: str | None = None) -> Path:
    name = f"ml-{version}"
    folder = dest_root / name
    if folder.is_dir():  # only ever created by an atomic rename of a fully extracted zip
        return folder
    archive = fetch(base_url.rstrip("/") + f"/{name}.zip", dest_root / f"{name}.zip", sha256=sha256)
    try:
        return unzip(archive, dest_root)
    except DownloadError:
        archive.unlink(missing_ok=True)  # a corrupt archive must not be trusted next time
        raise


def unzip(archive: Path, dest_root: Path) -> Path:
    """Extract ``ml-x.zip`` to ``dest_root/ml-x`` via a temp folder renamed at the end."""
    target = dest_root / archive.stem
    if target.is_dir():
        return target
    try:
        with zipfile.ZipFile(archive) as zf:
            bad = zf.testzip()
            if bad is not None:
                raise DownloadError(f"{archive}: corrupt member {bad}; delete the zip and download again")
            tmp = Path(tempfile.mkdtemp(prefix=f".{archive.stem}-", dir=dest_root))
            try:
                zf.extractall(tmp)
                inner = tmp / archive.stem  # GroupLens zips hold one top folder named like the zip
                os.replace(inner if inner.is_dir() else tmp, target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    except zipfile.BadZipFile as e:
        raise DownloadError(f"{archive}: not a valid zip ({e}); delete it and download again") from e
    return target


def _need(folder: Path, name: str) -> Path:
    f = folder / name
    if not f.is_file():
        raise FileNotFoundError(f"{folder}: missing {name}")
    return f


# What this reader makes of the files; part of the cache key, so a change re-reads them.
# 2: year ranges parsed, articles moved back in front of titles.
READER_VERSION = 2

# The year in parentheses at the end of a title, or a series' range "(2006–2007)", "(2019– )"
# (en dash or hyphen); trailing spaces occur in the files.
_YEAR = r"^(.*?)\s*\((\d{4})(?:\s*[-–]\s*(?:\d{4})?\s*)?\)\s*$"
# "Matrix, The" -> "The Matrix", also before an alternative title in parentheses:
# "Postman, The (Postino, Il)" -> "The Postman (Postino, Il)". Capitalised articles only, so
# "Good, the Bad and the Ugly, The" keeps its inner "the".
_ARTICLE = r"^([^(]*?), (The|A|An|Les|La|Le|Il|Lo|Der|Die|Das|El|Los|Las)(\s*\(.*\))?$"
_ELIDED = r"^([^(]*?), (L')(\s*\(.*\))?$"  # "Auberge espagnole, L'" -> "L'Auberge espagnole"


def _split_title(titles: pl.Expr) -> list[pl.Expr]:
    """``title`` without its year and with its article in front, and ``year`` (null when the
    title has none; the title is then kept whole)."""
    title = pl.coalesce(titles.str.extract(_YEAR, 1), titles).str.strip_chars()
    title = title.str.replace(_ARTICLE, "${2} ${1}${3}").str.replace(_ELIDED, "${2}${1}${3}")
    return [title.alias("title"), titles.str.extract(_YEAR, 2).cast(pl.Int64).alias("year")]


def _read_table(path: Path, separator: str, names: list[str], encoding: str = "utf8",
                has_header: bool = False) -> pl.DataFrame:
    """A MovieLens table as strings: CSV with a header (``has_header``), or lines of exactly
    ``len(names)`` fields split at ``separator`` (no quoting), with a ``lineno`` column (lines
    counted by ``\\n``; blank lines skipped). Errors name the file and the line."""
    raw = read_bytes(path)
    if has_header:
        return _read_csv_table(path, raw, names)
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as e:
        lineno = raw.count(b"\n", 0, e.start) + 1
        raise DataFormatError(f"{path}:{lineno}: not {encoding} text (byte {raw[e.start]:#04x})") from None
    lines = pl.DataFrame({"line": text.split("\n")}).with_row_index("lineno", offset=1).with_columns(
        pl.col("line").str.strip_suffix("\r"))
    lines = lines.filter(pl.col("line").str.strip_chars(" \t\r") != "")
    fields = lines.select("lineno", pl.col("line").str.split(separator).alias("f"))
    wrong = fields.filter(pl.col("f").list.len() != len(names))
    if wrong.height:
        row = wrong.row(0, named=True)
        raise DataFormatError(f"{path}:{row['lineno']}: expected {len(names)} fields separated by {separator!r}, "
                              f"got {len(row['f'])}")
    return fields.select("lineno", *(pl.col("f").list.get(i).alias(n) for i, n in enumerate(names)))


def _read_csv_table(path: Path, raw: bytes, names: list[str]) -> pl.DataFrame:
    """A CSV file with a header naming (at least) ``names``: the header's fields, as strings,
    one row per record; the first malformed record (a field count other than the header's,
    a stray quote, text that is not UTF-8) is reported by line."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        lineno = raw.count(b"\n", 0, e.start) + 1
        raise DataFormatError(f"{path}:{lineno}: not UTF-8 text (byte {raw[e.start]:#04x})") from None
    rows, starts = [], []
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader)
        missing = [c for c in names if c not in header]
        if missing:
            raise DataFormatError(f"{path}:1: missing column(s) {missing}; header has {header}")
        last = reader.line_num
        for record in reader:
            if record and any(f.strip() for f in record):  # blank lines carry no record
                if len(record) != len(header):
                    raise DataFormatError(f"{path}:{last + 1}: expected {len(header)} fields as in the header, "
                                          f"got {len(record)}")
                rows.append(record)
                starts.append(last + 1)
            last = reader.line_num
    except csv.Error as e:
        raise DataFormatError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None
    except StopIteration:
        raise DataFormatError(f"{path}: file is empty") from None
    cols = {c: header.index(c) for c in names}
    return pl.DataFrame({"lineno": starts, **{c: [r[i] for r in rows] for c, i in cols.items()}},
                        schema={"lineno": pl.Int64, **{c: pl.String for c in names}})


# Numeric fields (spaces or tabs around them allowed): ids are unsigned integers.
_ID = r"^[ \t]*[0-9]+[ \t]*$"
_NUMBER = r"^[ \t]*[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?[ \t]*$"
_INTEGER = r"^[ \t]*[+-]?[0-9]+[ \t]*$"


def _genres(col: pl.Expr) -> pl.Expr:
    """"Drama|Musical" -> "Drama, Musical" (empty names dropped; none: null)."""
    names = col.str.split("|").list.eval(pl.element().str.strip_chars(" \t")).list.eval(
        pl.element().filter(pl.element() != ""))
    return pl.when(names.list.len() > 0).then(names.list.join(", ")).alias("genres")


def _first_bad(df: pl.DataFrame, path: Path, checks: list[tuple[str, str, str]], what_line: str = "") -> None:
    """Raise for the first line whose field ``name`` does not match ``pattern`` (``what`` it
    must be); the checks run in field order, the earliest bad line wins."""
    worst = None
    for name, pattern, what in checks:
        bad = df.filter(~pl.col(name).str.contains(pattern))
        if bad.height and (worst is None or bad["lineno"][0] < worst[0]):
            worst = (bad["lineno"][0], name, what, bad[name][0])
    if worst is not None:
        lineno, name, what, value = worst
        raise DataFormatError(f"{path}:{lineno}: {what_line}field '{name}' must be {what}, got {value!r}")


def _ratings(df: pl.DataFrame, path: Path) -> pl.DataFrame:
    _first_bad(df, path, [("user", _ID, "an integer id"), ("item", _ID, "an integer id"),
                          ("rating", _NUMBER, "a number"), ("timestamp", _INTEGER, "an integer")],
               "malformed rating record: ")
    out = df.select(
        "lineno", pl.col("user").str.strip_chars(" \t"), pl.col("item").str.strip_chars(" \t"),
        pl.col("rating").str.strip_chars(" \t").cast(pl.Float64, strict=False),
        pl.col("timestamp").str.strip_chars(" \t").cast(pl.Int64, strict=False),
        pl.int_range(pl.len(), dtype=pl.Int64).alias("order"),
    )
    bad = out.filter(pl.col("timestamp").is_null() | ~pl.col("rating").is_finite())
    if bad.height:  # digits beyond an i64, or a number beyond a float
        row = df.filter(pl.col("lineno") == bad["lineno"][0]).row(0, named=True)
        raise DataFormatError(f"{path}:{row['lineno']}: malformed rating record (rating {row['rating']!r}, "
                              f"timestamp {row['timestamp']!r}: out of range)")
    if out.height == 0:
        raise DataFormatError(f"{path}: file is empty (blank lines only)")
    return out.drop("lineno")


def _movie_ids(movies: pl.DataFrame, path: Path) -> pl.DataFrame:
    _first_bad(movies, path, [("raw_id", _ID, "an integer id")])
    return movies.with_columns(pl.col("raw_id").str.strip_chars(" \t"))


def _read_100k(folder: Path):
    ratings = _read_table(_need(folder, "u.data"), "\t", ["user", "item", "rating", "timestamp"])
    movies = _read_table(_need(folder, "u.item"), "|", ["raw_id", "raw_title", "release", "video", "url",
                                                        *_ML100K_GENRES], encoding="latin-1")
    movies = _movie_ids(movies, folder / "u.item")
    genres = pl.concat_list([pl.when(pl.col(g) == "1").then(pl.lit(g)) for g in _ML100K_GENRES]).list.drop_nulls()
    items = movies.select("raw_id", *_split_title(pl.col("raw_title")), genres.list.join(", ").alias("genres"))
    return _ratings(ratings, folder / "u.data"), items, [folder / "u.data", folder / "u.item"]


def _read_dat(folder: Path):
    ratings_path = _need(folder, "ratings.dat")
    ratings = _read_table(ratings_path, "::", ["user", "item", "rating", "timestamp"])
    movies = _read_table(_need(folder, "movies.dat"), "::", ["raw_id", "raw_title", "genres"], encoding="latin-1")
    movies = _movie_ids(movies, folder / "movies.dat")
    items = movies.select("raw_id", *_split_title(pl.col("raw_title")), _genres(pl.col("genres")))
    return _ratings(ratings, ratings_path), items, [ratings_path, folder / "movies.dat"]


# ratings.csv of the CSV releases. Ids fit 32 bits (ML-32M: users to 200,948, movies to
# 292,757): half the memory of i64 for 32M rows; a larger id is a parse error naming its line.
# Fields are plain (MovieLens never quotes them); a number may have leading spaces.
_RATINGS_SCHEMA = {"userId": pl.Int32, "movieId": pl.Int32, "rating": pl.Float64, "timestamp": pl.Int64}
_CSV_INT = re.compile(r" *[+-]?[0-9]+")
_CSV_NUMBER = re.compile(r" *[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def _bad_ratings_line(path: Path) -> str:
    """The first malformed data line of a ratings.csv, as ``path:line: what`` (only called after
    the fast typed read failed or found a missing or non-finite value, so its cost does not
    matter). Lines are counted by ``\\n``; blank lines are skipped, as the reader skips them."""
    raw = path.read_bytes()
    for lineno, line in enumerate(raw.split(b"\n")[1:], 2):
        line = line.removesuffix(b"\r")
        if not line.strip(b" \t\r"):
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            return f"{path}:{lineno}: not UTF-8 text, got {line!r}"
        fields = text.split(",")
        if len(fields) != len(_RATINGS_SCHEMA):
            return f"{path}:{lineno}: expected {len(_RATINGS_SCHEMA)} fields, got {text!r}"
        for value, (name, dtype) in zip(fields, _RATINGS_SCHEMA.items()):
            if dtype == pl.Float64:
                ok = _CSV_NUMBER.fullmatch(value) is not None and math.isfinite(float(value))
                kind = "a number"
            else:
                bits = 31 if dtype == pl.Int32 else 63
                ok = _CSV_INT.fullmatch(value) is not None and -(2 ** bits) <= int(value) < 2 ** bits
                kind = "an integer below 2^31" if dtype == pl.Int32 else "an integer"
            if not ok:
                return f"{path}:{lineno}: field '{name}' must be {kind}, got {text!r}"
    return f"{path}: malformed ratings"


def _has_stray_cr(path: Path, block: int = 1 << 26) -> bool:
    """Whether the file holds a carriage return that does not end a line (read in blocks)."""
    with open(path, "rb") as f:
        tail = b""
        while chunk := f.read(block):
            data = tail + chunk
            i = data.find(b"\r")
            while i >= 0:
                if i + 1 == len(data):  # the next block decides
                    break
                if data[i + 1] != 0x0A:
                    return True
                i = data.find(b"\r", i + 1)
            tail = data[-1:] if data.endswith(b"\r") else b""
        return False  # (a \r at the very end of the file ends its last line)


def _read_csv(folder: Path):
    ratings_path = _need(folder, "ratings.csv")
    with open(ratings_path, "rb") as f:
        first = f.readline()
    try:
        head = first.decode("utf-8").removesuffix("\n").removesuffix("\r").split(",")
    except UnicodeDecodeError as e:
        raise DataFormatError(f"{ratings_path}:1: not UTF-8 text") from e
    expected = list(_RATINGS_SCHEMA)
    if head != expected:
        raise DataFormatError(f"{ratings_path}:1: expected header {expected}, got {head}")
    try:  # typed, multi-threaded parse straight into narrow columns (no string stage)
        events = (pl.scan_csv(ratings_path, schema=_RATINGS_SCHEMA, has_header=True, quote_char=None)
                  .with_row_index("order").collect())
    except pl.exceptions.PolarsError as e:
        raise DataFormatError(_bad_ratings_line(ratings_path)) from e
    if events.null_count().sum_horizontal().item():  # blank lines, empty fields, short lines: nulls
        events = events.filter(~pl.all_horizontal(pl.exclude("order").is_null()))  # blank lines are skipped
        if events.null_count().sum_horizontal().item():
            raise DataFormatError(_bad_ratings_line(ratings_path))
    if not events["rating"].is_finite().all():  # "NaN", "inf": numbers to polars, not ratings
        raise DataFormatError(_bad_ratings_line(ratings_path))
    if _has_stray_cr(ratings_path):  # "4.0\r,..." parses as 4.0 in polars: a damaged line all the same
        raise DataFormatError(_bad_ratings_line(ratings_path))
    if events.height == 0:
        raise DataFormatError(f"{ratings_path}: file is empty (a header and no ratings)")
    events = events.select(pl.col("userId").alias("user"), pl.col("movieId").alias("item"), "rating", "timestamp",
                           pl.int_range(pl.len(), dtype=pl.Int64).alias("order"))  # (blank lines dropped)
    movies_path = _need(folder, "movies.csv")
    movies = _read_table(movies_path, ",", ["movieId", "title", "genres"], has_header=True)
    _first_bad(movies, movies_path, [("movieId", _ID, "an integer id")])
    too_big = movies.filter(pl.col("movieId").str.strip_chars(" \t").cast(pl.Int64, strict=False)
                            .fill_null(2 ** 31) >= 2 ** 31)  # the ids of ratings.csv are 32-bit
    if too_big.height:
        raise DataFormatError(f"{movies_path}:{too_big['lineno'][0]}: field 'movieId' must be an integer below 2^31, "
                              f"got {too_big['movieId'][0]!r}")
    items = movies.select(
        pl.col("movieId").str.strip_chars(" \t").cast(pl.Int64, strict=False).alias("raw_id"),
        *_split_title(pl.col("title")),
        _genres(pl.when(pl.col("genres") != "(no genres listed)").then(pl.col("genres"))),
    )
    return events, items, [ratings_path, movies_path]
