"""MovieLens from the GroupLens zips: 100K, 1M (``::``-separated, latin-1) and the CSV
releases (latest-small, 20M, 25M, 32M: ``ratings.csv`` + ``movies.csv``).

Item text = title + year + genres. Titles carry the year ("Toy Story (1995)"; a series
"(2006–2007)": its first year; some titles have none) and file a leading article after the
name ("Matrix, The", "Misérables, Les"): the year goes to ``year``, the article back in front.
"""

from __future__ import annotations

import io
import os
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
    raw = read_bytes(path)
    if encoding != "utf8":
        raw = raw.decode(encoding).encode("utf8")
    if len(separator) > 1:  # polars wants one byte; "::" never occurs inside ML-1M fields
        raw = raw.replace(separator.encode(), b"\x1f")
        separator = "\x1f"
    try:
        df = pl.read_csv(io.BytesIO(raw), separator=separator, has_header=has_header,
                         infer_schema=False, quote_char=None if not has_header else '"')
    except pl.exceptions.PolarsError as e:
        raise DataFormatError(f"{path}: cannot parse ({e})") from e
    if has_header:
        missing = [c for c in names if c not in df.columns]
        if missing:
            raise DataFormatError(f"{path}: missing column(s) {missing}; header has {df.columns}")
        return df.select(names)
    if df.width < len(names):
        raise DataFormatError(f"{path}:1: expected {len(names)} fields separated by {separator!r}, got {df.width}")
    return df.select(df.columns[: len(names)]).rename(dict(zip(df.columns, names)))


def _ratings(df: pl.DataFrame, path: Path) -> pl.DataFrame:
    out = df.select(
        pl.col("user").str.strip_chars(), pl.col("item").str.strip_chars(),
        pl.col("rating").cast(pl.Float64, strict=False),
        pl.col("timestamp").str.strip_chars().cast(pl.Int64, strict=False),
        pl.int_range(pl.len(), dtype=pl.Int64).alias("order"),
    )
    null_rows = out.select(pl.any_horizontal(pl.all().is_null()).alias("bad"))["bad"]
    if null_rows.any():
        row = int(null_rows.arg_max())
        raise DataFormatError(f"{path}:{row + 1}: malformed rating record {df.row(row)}")
    return out


def _read_100k(folder: Path):
    ratings = _read_table(_need(folder, "u.data"), "\t", ["user", "item", "rating", "timestamp"])
    movies = _read_table(_need(folder, "u.item"), "|", ["raw_id", "raw_title", "release", "video", "url",
                                                        *_ML100K_GENRES], encoding="latin-1")
    genres = pl.concat_list([pl.when(pl.col(g) == "1").then(pl.lit(g)) for g in _ML100K_GENRES]).list.drop_nulls()
    items = movies.select("raw_id", *_split_title(pl.col("raw_title")), genres.list.join(", ").alias("genres"))
    return _ratings(ratings, folder / "u.data"), items, [folder / "u.data", folder / "u.item"]


def _read_dat(folder: Path):
    ratings_path = _need(folder, "ratings.dat")
    ratings = _read_table(ratings_path, "::", ["user", "item", "rating", "timestamp"])
    movies = _read_table(_need(folder, "movies.dat"), "::", ["raw_id", "raw_title", "genres"], encoding="latin-1")
    items = movies.select("raw_id", *_split_title(pl.col("raw_title")),
                          pl.col("genres").str.replace_all("|", ", ", literal=True))
    return _ratings(ratings, ratings_path), items, [ratings_path, folder / "movies.dat"]


# ratings.csv of the CSV releases. Ids fit 32 bits (ML-32M: users to 200,948, movies to
# 292,757): half the memory of i64 for 32M rows; a larger id is a parse error naming its line.
_RATINGS_SCHEMA = {"userId": pl.Int32, "movieId": pl.Int32, "rating": pl.Float64, "timestamp": pl.Int64}


def _bad_ratings_line(path: Path) -> str:
    """The first malformed data line of a ratings.csv, as ``path:line: what`` (only called after
    the fast typed read failed or found a missing value, so its cost does not matter)."""
    lines = pl.read_csv(path, has_header=False, skip_rows=1, separator="\x1f", quote_char=None,
                        schema={"line": pl.String})["line"]
    fields = lines.str.split(",")
    blank = lines.str.strip_chars().fill_null("") == ""  # skipped by the reader, not an error
    checks = [(fields.list.len() != len(_RATINGS_SCHEMA), f"expected {len(_RATINGS_SCHEMA)} fields")]
    for i, (name, dtype) in enumerate(_RATINGS_SCHEMA.items()):
        kind = {pl.Int32: "an integer below 2^31", pl.Int64: "an integer", pl.Float64: "a number"}[dtype]
        value = fields.list.get(i, null_on_oob=True).cast(dtype, strict=False)
        checks.append((value.is_null(), f"field '{name}' must be {kind}"))
    for bad, what in checks:
        bad = bad & ~blank
        if bad.any():
            row = int(bad.arg_max())
            return f"{path}:{row + 2}: {what}, got {lines[row]!r}"
    return f"{path}: malformed ratings"


def _read_csv(folder: Path):
    ratings_path = _need(folder, "ratings.csv")
    try:
        head = ratings_path.open().readline().strip().split(",")
    except UnicodeDecodeError as e:
        raise DataFormatError(f"{ratings_path}:1: not UTF-8 text") from e
    expected = list(_RATINGS_SCHEMA)
    if head != expected:
        raise DataFormatError(f"{ratings_path}:1: expected header {expected}, got {head}")
    try:  # typed, multi-threaded parse straight into narrow columns (no string stage)
        events = (pl.scan_csv(ratings_path, schema=_RATINGS_SCHEMA, has_header=True).with_row_index("order")
                  .collect())
    except pl.exceptions.PolarsError as e:
        raise DataFormatError(_bad_ratings_line(ratings_path)) from e
    if events.null_count().sum_horizontal().item():  # blank lines, empty fields, short lines: nulls
        events = events.filter(~pl.all_horizontal(pl.exclude("order").is_null()))  # blank lines are skipped
        if events.null_count().sum_horizontal().item():
            raise DataFormatError(_bad_ratings_line(ratings_path))
    events = events.select(pl.col("userId").alias("user"), pl.col("movieId").alias("item"), "rating", "timestamp",
                           pl.col("order").cast(pl.Int64))
    movies = _read_table(_need(folder, "movies.csv"), ",", ["movieId", "title", "genres"], has_header=True)
    items = movies.select(
        pl.col("movieId").cast(pl.Int64).alias("raw_id"), *_split_title(pl.col("title")),
        pl.when(pl.col("genres") == "(no genres listed)").then(None)
        .otherwise(pl.col("genres").str.replace_all("|", ", ", literal=True)).alias("genres"),
    )
    return events, items, [ratings_path, folder / "movies.csv"]
