"""RecBole atomic files: ``<name>.inter`` (interactions) and optional ``<name>.item``.

Headers are typed (``item_id:token``, ``timestamp:float``, ``categories:token_seq``), fields
are tab separated with CSV quoting (a title may hold a quoted newline).
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import polars as pl

from data.sources.base import DataFormatError, RawData, conform_items, empty_items, find_file, read_bytes

# RecBole field names -> ours.
_ALIASES = {"item_id": "raw_id", "movie_title": "title", "genre": "genres", "release_year": "year",
            "categories": "categories", "title": "title", "brand": "brand", "price": "price",
            "description": "description"}


_PLAIN = re.compile(r"[^\t\n\r]*")  # an unquoted field, up to a tab, a line end or a carriage return


def atomic_records(path: Path, text: str):
    """(line, fields) of every record of an atomic file's ``text``, exactly: fields split at
    tabs; a field that starts with ``"`` is quoted (``""`` inside is one quote; tabs and line
    breaks inside are text) and must end at its closing quote; a quote elsewhere is text; a line
    ends at ``\\n`` (a ``\\r`` right before it is dropped); an empty line is no record. A
    quoted field left open or text after a closing quote raises :class:`DataFormatError`
    naming the line. The reader's exact path (see :func:`read_atomic`)."""
    i, n, line = 0, len(text), 1
    while i < n:
        end = text.find("\n", i)
        end = n if end < 0 else end
        if text.find('"', i, end) < 0:  # no quote on this line: a plain split
            record = text[i:end].removesuffix("\r") if end < n else text[i:end]
            if record:
                yield line, record.split("\t")
            i, line = end + 1, line + 1
            continue
        start, (fields, i, line) = line, _quoted_record(path, text, i, line)
        yield start, fields


def _quoted_record(path: Path, text: str, i: int, line: int) -> tuple[list[str], int, int]:
    """The record at ``text[i]`` (on ``line``), which has a quote: (fields, next i, next line)."""
    n, start, fields = len(text), line, []
    while True:  # one field
        if i < n and text[i] == '"':
            j, parts = i + 1, []
            while True:
                k = text.find('"', j)
                if k < 0:
                    raise DataFormatError(f"{path}:{start}: a quoted field is never closed")
                parts.append(text[j:k])
                if text.startswith('""', k):
                    parts.append('"')
                    j = k + 2
                    continue
                break
            value = "".join(parts)
            line += value.count("\n")
            i = k + 1
            if i < n and text[i] not in "\t\n" and not text.startswith("\r\n", i):
                raise DataFormatError(f"{path}:{line}: text after the closing quote of a field")
        else:
            j = _PLAIN.match(text, i).end()
            while j < n and text[j] == "\r" and not text.startswith("\r\n", j):  # a bare \r is text
                j = _PLAIN.match(text, j + 1).end()
            value, i = text[i:j], j
        fields.append(value)
        if i < n and text[i] == "\t":
            i += 1
            continue
        if i < n:  # the end of the line
            i += 1 if text[i] == "\n" else 2
            line += 1
        return fields, i, line


def _decode(path: Path, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        lineno = raw.count(b"\n", 0, e.start) + 1
        raise DataFormatError(f"{path}:{lineno}: not UTF-8 text (byte {raw[e.start]:#04x})") from None


_NUMBER = r"^[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?$"


def _exact_table(path: Path, text: str, header: list[str]) -> pl.DataFrame:
    """The records by :func:`atomic_records` (empty fields null; short records padded)."""
    rows, lines = [], []
    records = atomic_records(path, text)
    next(records)  # the header
    for lineno, fields in records:
        if len(fields) > len(header):
            raise DataFormatError(f"{path}:{lineno}: {len(fields)} fields, the header has {len(header)}")
        rows.append([f or None for f in fields] + [None] * (len(header) - len(fields)))
        lines.append(lineno)
    columns = {"lineno": lines, **{h: [r[k] for r in rows] for k, h in enumerate(header)}}
    return pl.DataFrame(columns, schema={"lineno": pl.Int64, **{h: pl.String for h in header}})


def _fast_table(path: Path, raw: bytes, text: str, header: list[str]) -> pl.DataFrame | None:
    """polars' parse of a file without quotes or carriage returns (where a line is a record
    and a tab separates fields), with the line numbers; None when polars refuses it."""
    try:
        df = pl.read_csv(io.BytesIO(raw), separator="\t", quote_char=None, infer_schema=False,
                         raise_if_empty=False)
    except pl.exceptions.PolarsError:
        return None
    lines = text.split("\n")[1:]
    if lines and lines[-1] == "":
        lines.pop()
    if df.columns != header or df.height != len(lines):
        return None
    df = df.with_columns(pl.Series("lineno", range(2, len(lines) + 2), dtype=pl.Int64)).select("lineno", *header)
    return df.filter(pl.Series([line != "" for line in lines], dtype=pl.Boolean))  # an empty line is no record


def read_atomic(path: Path, required: tuple[str, ...] = (), numeric: tuple[str, ...] = ()) -> pl.DataFrame:
    """Read an atomic file with its ``name:type`` header stripped to plain names (all strings;
    an empty field is null; a record shorter than the header ends in nulls; empty lines are
    skipped), and a ``lineno`` column. ``required``: fields that may not be empty; ``numeric``:
    fields that must be numbers (``1``, ``-2.5``, ``1e9``). Errors name the file and the line.

    A file without quotes or carriage returns is parsed by polars at native speed (large
    ``.inter`` files); one with them (titles in ``.item`` files) by :func:`atomic_records`, the
    exact reader, which also locates the line of anything polars refuses."""
    raw = read_bytes(path)
    text = _decode(path, raw)
    header = text.split("\n", 1)[0].removesuffix("\r").split("\t")
    for col in header:
        if '"' in col:
            raise DataFormatError(f"{path}:1: header field {col!r} holds a quote (RecBole atomic format)")
        if ":" not in col:
            raise DataFormatError(f"{path}:1: header field {col!r} lacks a ':type' suffix (RecBole atomic format)")
    names = [col.split(":", 1)[0] for col in header]
    if len(set(names)) != len(names) or not all(names):
        raise DataFormatError(f"{path}:1: header fields must have distinct non-empty names, got {header}")
    missing = [c for c in required if c not in names]
    if missing:
        raise DataFormatError(f"{path}:1: missing field(s) {missing} in header {names}")
    df = None if '"' in text or "\r" in text else _fast_table(path, raw, text, header)
    if df is None:
        df = _exact_table(path, text, header)
    df = df.rename(dict(zip(header, names)))
    for name in required:
        bad = df.filter(pl.col(name).is_null())
        if bad.height:
            raise DataFormatError(f"{path}:{bad['lineno'][0]}: field '{name}' is empty")
    for name in numeric:
        bad = df.filter(~pl.col(name).fill_null("").str.contains(_NUMBER))
        if bad.height:
            raise DataFormatError(f"{path}:{bad['lineno'][0]}: field '{name}' is not a number, got {bad[name][0]!r}")
    return df


def _clean_token_seq(expr: pl.Expr) -> pl.Expr:
    # "'Beauty', 'Makeup', 'Face'" -> "Beauty, Makeup, Face"
    return expr.str.replace_all(r"""(^|,\s*)['"]""", "$1").str.replace_all(r"""['"](\s*,|$)""", "$1")


def read_atomic_items(path: Path) -> pl.DataFrame:
    df = read_atomic(path, required=("item_id",))
    keep = {c: _ALIASES[c] for c in df.columns if c in _ALIASES}
    df = df.select(list(keep)).rename(keep)  # (not lineno)
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
    header = read_bytes(inter).split(b"\n", 1)[0].decode("utf-8", errors="replace")
    has_time = "timestamp" in [c.split(":", 1)[0] for c in header.rstrip("\r").split("\t")]
    df = read_atomic(inter, required=("user_id", "item_id"), numeric=("timestamp",) if has_time else ())
    ts = pl.col("timestamp").cast(pl.Float64, strict=False).cast(pl.Int64, strict=False) if has_time \
        else pl.lit(0, dtype=pl.Int64)
    events = df.select(pl.col("user_id").alias("user"), pl.col("item_id").alias("item"), ts.alias("timestamp"),
                       pl.int_range(pl.len(), dtype=pl.Int64).alias("order"))
    if has_time and events["timestamp"].is_null().any():  # beyond an i64
        row = df.row(int(events["timestamp"].is_null().arg_max()), named=True)
        raise DataFormatError(f"{inter}:{row['lineno']}: field 'timestamp' is out of range, got {row['timestamp']!r}")
    if events.height == 0:
        raise DataFormatError(f"{inter}: file is empty (a header and no interactions)")
    item_file = find_file(folder, f"{name}.item")
    items = read_atomic_items(item_file) if item_file is not None else empty_items()
    notes = [] if item_file is not None else [f"item text missing: no {name}.item beside {inter}"]
    files = [inter] + ([item_file] if item_file is not None else [])
    return RawData(name=f"recbole-{name}", events=events, items=items, files=files, notes=notes)
