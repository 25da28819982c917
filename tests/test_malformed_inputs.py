"""Malformed input files, property-based (hypothesis): random corruptions of every source's real
format -- P5 ``sequential_data.txt`` and ``datamaps.json``, Amazon 2014 review JSON lines and
Python-literal meta lines, Amazon 2023 review and meta JSON lines, MovieLens ``::`` / tab / ``|``
files and CSVs, RecBole atomic files -- each either loads *exactly* (what an independent
reference reader of the format, written here in plain Python, makes of the same bytes) or
raises the source's :class:`DataFormatError` naming the file and a line that really is
malformed (a damaged gzip stream: the file and "not a valid gzip file"); never another
exception, and never a cache entry left behind by the failure (``load_dataset``; a write that
fails half way through the cache is tested at the end).

Seeds are lines copied from the real files (../shared/data; the Amazon 2023 lines follow the
upstream release's fields, as tests/test_amazon2023.py). Corruptions: truncation at a random
byte, a random byte flipped, random bytes inserted, a byte range deleted, a blank or CRLF line,
a field dropped, a field given a value of the wrong type, the gzip bytes damaged. Examples are
derandomised so CI is repeatable (~20 s); ``SIDREC_HYPOTHESIS_EXAMPLES=2000`` explores with
random seeds locally.
"""

from __future__ import annotations

import ast
import csv
import gzip
import io
import json
import os
import re
import zlib
from pathlib import Path

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data.sources import amazon2014, amazon2023, movielens, p5, recbole
from data.sources.base import DataFormatError

_EXPLORE = int(os.environ.get("SIDREC_HYPOTHESIS_EXAMPLES", "0"))


def examples(n: int):
    """CI: ``n`` derandomised examples; SIDREC_HYPOTHESIS_EXAMPLES=k: k random ones."""
    return settings(max_examples=_EXPLORE or n, deadline=None, derandomize=not _EXPLORE, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large])


class Malformed(Exception):
    """The reference reader's verdict: these lines (1-based, counted by b'\\n') are malformed."""

    def __init__(self, lines):
        super().__init__(sorted(lines))
        self.lines = set(lines)


def _lines(data: bytes) -> list[bytes]:
    """Lines as an editor counts them (b'\\n'); a trailing '\\r' belongs to the line break."""
    return [line.removesuffix(b"\r") for line in data.split(b"\n")]


# ============================================================================ seeds (real lines)
P5_SEQ = b"""1 1 2 3 4 5
2 6 7 8 9 10 4 11
3 4 12 13 14 15 16 17 18 19
4 20 21 22 23 24 25
5 26 27 28 29 30 31 32 33 34 35
"""

A14_REVIEWS = b"""\
{"reviewerID": "A2IBPI20UZIR0U", "asin": "1384719342", "reviewerName": "cassandra tu \\"Yeah, well, that's just like, u...", "helpful": [0, 0], "reviewText": "Not much to write about here.", "overall": 5.0, "summary": "good", "unixReviewTime": 1393545600, "reviewTime": "02 28, 2014"}
{"reviewerID": "A14VAT5EAX3D9S", "asin": "1384719342", "reviewerName": "Jake", "helpful": [13, 14], "reviewText": "The product does exactly as it should.", "overall": 5.0, "summary": "Jake", "unixReviewTime": 1363392000, "reviewTime": "03 16, 2013"}
{"reviewerID": "A195EZSQDW3E21", "asin": "1384719342", "reviewerName": "Rick Bennette \\"Rick Bennette\\"", "helpful": [1, 1], "reviewText": "The primary job of this device is to block the breath.", "overall": 5.0, "summary": "It Does The Job Well", "unixReviewTime": 1377648000, "reviewTime": "08 28, 2013"}
{"reviewerID": "A2C00NNG1ZQQG2", "asin": "B00004Y2UT", "reviewerName": "RustyBill \\"Sunday Rocker\\"", "helpful": [0, 0], "reviewText": "Nice windscreen protects my MXL mic.", "overall": 5.0, "summary": "GOOD WINDSCREEN FOR THE MONEY", "unixReviewTime": 1392336000, "reviewTime": "02 14, 2014"}
"""

A14_META = b"""\
{'asin': 'A', 'title': 'Red Lipstick', 'price': 9.5, 'brand': 'Acme', 'categories': [['Beauty', 'Makeup'], ['Beauty', 'Lips']], 'salesRank': {'Beauty': 5}}
{'asin': 'B', 'title': "Women's Perfume", 'categories': [['Beauty']], 'description': 'Floral &amp; fresh'}
{'asin': 'C', 'categories': [['Beauty', 'Nails']]}
{"asin": "D", "title": "strict JSON is accepted too", "price": 3}
"""


# ============================================================================ corruptions
JSON_VALUES = [None, True, 0, -1, 1.5, 10 ** 20, "", "x", "1393545600", [], [1], {}, {"a": 1}]
FIELD_TEXT = [b"", b"x", b"abc", b"-1", b"1.5", b"1e9", b"NaN", b"99999999999999999999", b"\xe9", b"\xc3\xa9",
              b'"', b"0", b" 7 "]


@st.composite
def corrupted(draw, data: bytes, kind: str):
    """One random corruption of ``data`` (a file in the format ``kind``: 'json', 'pyliteral',
    'words', or a field separator for delimited text)."""
    lines = data.split(b"\n")
    how = draw(st.sampled_from(["truncate", "flip", "insert", "delete", "blank", "crlf", "drop_field",
                                "wrong_type"]))
    if how == "truncate":
        return data[: draw(st.integers(0, len(data) - 1))]
    if how == "flip":
        i = draw(st.integers(0, len(data) - 1))
        return data[:i] + bytes([data[i] ^ draw(st.integers(1, 255))]) + data[i + 1:]
    if how == "insert":
        i = draw(st.integers(0, len(data)))
        return data[:i] + draw(st.binary(min_size=1, max_size=4)) + data[i:]
    if how == "delete":
        i = draw(st.integers(0, len(data) - 1))
        return data[:i] + data[i + draw(st.integers(1, 12)):]
    if how == "blank":
        i = draw(st.integers(0, len(lines)))
        return b"\n".join(lines[:i] + [draw(st.sampled_from([b"", b" ", b"\t"]))] + lines[i:])
    if how == "crlf":
        return data.replace(b"\n", b"\r\n")
    i = draw(st.integers(0, max(0, len(lines) - 2)))  # a data line (not the empty tail)
    line = lines[i]
    if kind in ("json", "pyliteral"):
        try:
            record = json.loads(line) if kind == "json" else ast.literal_eval(line.decode())
        except (ValueError, SyntaxError):
            return data
        if not isinstance(record, dict) or not record:
            return data
        key = draw(st.sampled_from(sorted(record)))
        if how == "drop_field":
            del record[key]
        else:
            record[key] = draw(st.sampled_from(JSON_VALUES))
        line = json.dumps(record).encode() if kind == "json" else repr(record).encode()
    elif kind == "words":
        words = line.split(b" ")
        j = draw(st.integers(0, len(words) - 1))
        if how == "drop_field":
            del words[j]
        else:
            words[j] = draw(st.sampled_from(FIELD_TEXT))
        line = b" ".join(words)
    else:  # delimited by ``kind``
        sep = kind.encode()
        fields = line.split(sep)
        j = draw(st.integers(0, len(fields) - 1))
        if how == "drop_field":
            del fields[j]
        else:
            fields[j] = draw(st.sampled_from(FIELD_TEXT))
        line = sep.join(fields)
    return b"\n".join(lines[:i] + [line] + lines[i + 1:])


GZIP_ERROR = "not a valid gzip file"


@st.composite
def gz_corrupted(draw, data: bytes, kind: str):
    """``(content, gzip bytes)``: the content corrupted (:func:`corrupted`), or one time in four
    the compressed bytes themselves (content None when they no longer decompress)."""
    if draw(st.integers(0, 3)) == 0:
        packed = gzip.compress(data, mtime=0)
        i = draw(st.integers(0, len(packed) - 1))
        if draw(st.booleans()):
            packed = packed[:i] + bytes([packed[i] ^ draw(st.integers(1, 255))]) + packed[i + 1:]
        else:
            packed = packed[:i]
        try:
            return gzip.decompress(packed), packed
        except (OSError, EOFError, zlib.error):
            return None, packed
    content = draw(corrupted(data, kind))
    return content, gzip.compress(content)


def expect_gz(load, path: Path, content: bytes | None, reference):
    """:func:`expect`, or for a damaged gzip stream: the source's error, naming the file."""
    if content is not None:
        return expect(load, path, content, reference)
    with pytest.raises(DataFormatError) as info:
        load()
    assert str(info.value).startswith(f"{path}: {GZIP_ERROR}"), info.value
    return None


def check_error(error: DataFormatError, path: Path, bad_lines: set[int] | None, nlines: int,
                lineless: tuple[str, ...] = ("file is empty",)) -> None:
    """The error names ``path`` and a line; that line is one the reference found malformed
    (``bad_lines``; None: any line of the file). Messages in ``lineless`` name no line."""
    msg = str(error)
    assert msg.startswith(f"{path}:"), msg
    m = re.match(rf"{re.escape(str(path))}:(\d+): ", msg)
    if m is None:
        assert any(f"{path}: {what}" in msg for what in lineless), f"no line number: {msg}"
        return
    line = int(m.group(1))
    assert 1 <= line <= nlines, msg
    if bad_lines is not None:
        assert line in bad_lines, f"{msg}\n(the malformed lines are {sorted(bad_lines)})"


def expect(load, path: Path, data: bytes, reference, lineless=("file is empty",)):
    """The property: ``load()`` equals ``reference(data)``, or both find the file malformed and
    the error names a malformed line. Returns what loaded (None after an error)."""
    try:
        want, bad = reference(data), None
    except Malformed as e:
        want, bad = None, e.lines
    try:
        got = load()
    except DataFormatError as e:
        if want is not None and bad is None:
            # A well-formed file must load, unless the reference has no verdict for it (empty).
            assert not data.strip(), f"a well-formed file was refused: {e}"
        check_error(e, path, bad, data.count(b"\n") + 1, lineless)
        return None
    assert bad is None, f"loaded a malformed file (malformed lines {sorted(bad)})"
    assert got == want
    return got


# ============================================================================ P5
def ref_p5(data: bytes) -> list[tuple]:
    """sequential_data.txt: per line, a user id then item ids, integers separated by (ASCII)
    whitespace; blank lines skipped; the position in the line is the timestamp."""
    rows, bad = [], set()
    for lineno, line in enumerate(_lines(data), 1):
        tokens = line.split()
        if not tokens:
            continue
        if len(tokens) < 2 or not all(re.fullmatch(rb"[0-9]+", t) for t in tokens):
            bad.add(lineno)
            continue
        user, *items = (t.decode() for t in tokens)
        rows += [(user, item, pos) for pos, item in enumerate(items)]
    if bad:
        raise Malformed(bad)
    if not rows:
        raise Malformed(set())
    return [(u, i, t, order) for order, (u, i, t) in enumerate(rows)]


def _rows(df: pl.DataFrame, columns=("user", "item", "timestamp", "order")) -> list[tuple]:
    return [tuple(r) for r in df.select(columns).iter_rows()]


# datamaps.json: P5 ids -> Amazon ids (one JSON object on one line, as the real file)
P5_MAPS = json.dumps({
    "user2id": {f"AU{u}": str(u) for u in range(1, 6)}, "item2id": {f"B0{i:04d}": str(i) for i in range(1, 36)},
    "id2user": {str(u): f"AU{u}" for u in range(1, 6)}, "id2item": {str(i): f"B0{i:04d}" for i in range(1, 36)},
}).encode()


def ref_p5_mapped(seq: bytes, maps: bytes) -> list[tuple]:
    rows = ref_p5(seq)
    try:
        m = json.loads(maps)
    except json.JSONDecodeError as e:
        raise Malformed({e.lineno}) from None
    except ValueError as e:  # UnicodeDecodeError
        raise Malformed({maps.count(b"\n", 0, getattr(e, "start", 0)) + 1}) from None
    tables = [m.get(k, {}) if isinstance(m, dict) else None for k in ("id2item", "id2user")]
    if not isinstance(m, dict) or "id2item" not in m or not all(
            isinstance(t, dict) and all(isinstance(v, str) for v in t.values()) for t in tables):
        raise Malformed({1})
    id2item, id2user = tables
    if any(item not in id2item for _, item, _, _ in rows):
        raise Malformed({1})
    return [(id2user.get(u, u), id2item[i], t, o) for u, i, t, o in rows]


@examples(180)
@given(st.data())
def test_p5_sequences(tmp_path_factory, data):
    gz = data.draw(st.booleans())
    bad, packed = data.draw(gz_corrupted(P5_SEQ, "words")) if gz else (data.draw(corrupted(P5_SEQ, "words")),) * 2
    folder = tmp_path_factory.mktemp("p5")
    path = folder / ("sequential_data.txt.gz" if gz else "sequential_data.txt")
    path.write_bytes(packed)
    got = expect_gz(lambda: _rows(p5.read_sequences(path)), path, bad, ref_p5)
    if got is None:
        assert_no_cache_after_failure(folder, "p5", path=str(folder))


@examples(120)
@given(st.data())
def test_p5_datamaps(tmp_path_factory, data):
    bad = data.draw(corrupted(P5_MAPS, "json"))
    folder = tmp_path_factory.mktemp("p5maps")
    (folder / "sequential_data.txt").write_bytes(P5_SEQ)
    path = folder / "datamaps.json"
    path.write_bytes(bad)
    got = expect(lambda: _rows(p5.load(folder).events), path, bad, lambda d: ref_p5_mapped(P5_SEQ, d))
    if got is None:
        assert_no_cache_after_failure(folder, "p5", path=str(folder))


# ============================================================================ Amazon 2014
INT64 = range(-2 ** 63, 2 ** 63)


def _json_records(data: bytes, check) -> list:
    """Strict JSON lines: each non-blank line one object, ``check(record)`` -> row or raise."""
    out, bad = [], set()
    for lineno, line in enumerate(_lines(data), 1):
        if not line.strip(b" \t\r"):
            continue
        try:
            record = json.loads(line)
            row = check(record)
        except (ValueError, TypeError, KeyError, UnicodeDecodeError):
            bad.add(lineno)
            continue
        out.append(row)
    if bad:
        raise Malformed(bad)
    if not out:
        raise Malformed(set())
    return out


def _string(record: dict, key: str) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise TypeError(key)
    return value


def _integer(record: dict, key: str) -> int:
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, int) or value not in INT64:
        raise TypeError(key)
    return value


def ref_a14_reviews(data: bytes) -> list[tuple]:
    rows = _json_records(data, lambda r: (_string(r, "reviewerID"), _string(r, "asin"),
                                          _integer(r, "unixReviewTime")))
    return [(*row, order) for order, row in enumerate(rows)]


@examples(180)
@given(st.data())
def test_amazon2014_reviews(tmp_path_factory, data):
    bad, packed = data.draw(gz_corrupted(A14_REVIEWS, "json"))
    folder = tmp_path_factory.mktemp("a14")
    path = folder / "reviews_Beauty_5.json.gz"
    path.write_bytes(packed)
    got = expect_gz(lambda: _rows(amazon2014.read_reviews(path)), path, bad, ref_a14_reviews)
    if got is None:
        assert_no_cache_after_failure(folder, "amazon2014", path=str(folder), category="Beauty")


def ref_a14_meta(data: bytes) -> list[dict]:
    """Python-literal (or JSON) lines; 'asin' required; text fields that are not strings, and
    prices that are not numbers, count as missing."""
    rows, bad = [], set()
    for lineno, line in enumerate(_lines(data), 1):
        if not line.strip():
            continue
        text = line.decode("utf-8", errors="replace")
        try:
            record = json.loads(text)
        except ValueError:
            try:
                record = ast.literal_eval(text)
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                bad.add(lineno)
                continue
        if not isinstance(record, dict) or not isinstance(record.get("asin"), str):
            bad.add(lineno)
            continue
        rows.append(record)
    if bad:
        raise Malformed(bad)

    def text(v):
        return v if isinstance(v, str) and v.strip() else None

    def categories(v):
        if not isinstance(v, (list, tuple)):
            return None
        names = [str(n) for path in v for n in (path if isinstance(path, (list, tuple)) else [path])]
        return ", ".join(dict.fromkeys(names)) or None

    out = {}
    for r in rows:
        price = r.get("price")
        out.setdefault(r["asin"], {
            "title": text(r.get("title")), "brand": text(r.get("brand")), "categories": categories(r.get("categories")),
            "price": float(price) if isinstance(price, (int, float)) and not isinstance(price, bool) else None,
            "description": text(r.get("description"))})
    return out


def _items(df: pl.DataFrame, columns=("title", "brand", "categories", "price", "description")) -> dict:
    return {r["raw_id"]: {c: r[c] for c in columns} for r in df.iter_rows(named=True)}


@examples(180)
@given(st.data())
def test_amazon2014_meta(tmp_path_factory, data):
    bad = data.draw(corrupted(A14_META, "pyliteral"))
    path = tmp_path_factory.mktemp("a14meta") / "meta_Beauty.json.gz"
    path.write_bytes(gzip.compress(bad))
    expect(lambda: _items(amazon2014.read_meta(path)), path, bad, ref_a14_meta)


# ============================================================================ Amazon 2023
def _a23_seeds() -> tuple[bytes, bytes]:
    from tests.test_amazon2023 import meta_records, review_line, review_rows

    reviews = b"".join(json.dumps(review_line(*r)).encode() + b"\n" for r in review_rows()[:5])
    meta = b"".join(json.dumps(m).encode() + b"\n" for m in meta_records()[:4])
    return reviews, meta


A23_REVIEWS, A23_META = _a23_seeds()


def ref_a23_reviews(data: bytes) -> list[tuple]:
    rows = _json_records(data, lambda r: (_string(r, "user_id"), _string(r, "parent_asin"), _integer(r, "timestamp")))
    return [(*row, order) for order, row in enumerate(rows)]


@examples(180)
@given(st.data())
def test_amazon2023_reviews(tmp_path_factory, data):
    bad, packed = data.draw(gz_corrupted(A23_REVIEWS, "json"))
    block = data.draw(st.sampled_from([300, 1 << 20]))  # blocks of a line or two, or one block
    folder = tmp_path_factory.mktemp("a23")
    path = folder / "Musical_Instruments.jsonl.gz"
    path.write_bytes(packed)
    got = expect_gz(lambda: _rows(amazon2023.read_reviews(path, block_bytes=block)), path, bad, ref_a23_reviews)
    if got is None:
        assert_no_cache_after_failure(folder, "amazon2023", path=str(folder), category="Musical_Instruments")


def ref_a23_meta(data: bytes) -> dict:
    """JSON lines keyed by a string ``parent_asin``; text fields that are not strings (or lists
    of strings), prices that are neither numbers nor "$12.99"-like strings, count as missing."""
    def strings(v):
        v = [v] if isinstance(v, str) else v if isinstance(v, list) else []
        return [s.strip() for s in v if isinstance(s, str) and s.strip()]

    def price(v):
        if isinstance(v, bool) or v is None:
            return None
        if isinstance(v, (int, float)):
            return float(v) if abs(v) < float("inf") and v == v else None
        m = re.fullmatch(r"\$?\s*(\d[\d,]*(?:\.\d+)?)", v.strip()) if isinstance(v, str) else None
        return float(m.group(1).replace(",", "")) if m else None

    def nonblank(v):
        return v if isinstance(v, str) and v.strip() else None

    def check(r):
        if not isinstance(r.get("parent_asin"), str):
            raise TypeError("parent_asin")
        return r

    out = {}
    for r in _json_records(data, check):
        details = r.get("details")
        if isinstance(details, str):
            try:
                details = json.loads(details)
            except ValueError:
                details = {}
        details = details if isinstance(details, dict) else {}
        brand = r.get("store") if isinstance(r.get("store"), str) and r["store"].strip() else \
            details.get("Brand") if isinstance(details.get("Brand"), str) else None
        categories = strings(r.get("categories")) or strings(r.get("main_category"))
        text = strings(r.get("description")) + strings(r.get("features"))
        out.setdefault(r["parent_asin"], {
            "title": nonblank(r.get("title")), "brand": nonblank(brand),
            "categories": ", ".join(dict.fromkeys(categories)) or None, "price": price(r.get("price")),
            "description": " ".join(text) or None})
    return out


@examples(150)
@given(st.data())
def test_amazon2023_meta(tmp_path_factory, data):
    bad = data.draw(corrupted(A23_META, "json"))
    path = tmp_path_factory.mktemp("a23meta") / "meta_Musical_Instruments.jsonl"
    path.write_bytes(bad)
    expect(lambda: _items(amazon2023.read_meta(path)), path, bad, ref_a23_meta)


# ============================================================================ MovieLens
ML1M_RATINGS = b"1::1193::5::978300760\n1::661::3::978302109\n1::914::3::978301968\n1::3408::4::978300275\n"
ML1M_MOVIES = (b"1::Toy Story (1995)::Animation|Children's|Comedy\n2::Jumanji (1995)::Adventure|Children's|Fantasy\n"
               b"73::Mis\xe9rables, Les (1995)::Drama|Musical\n")  # latin-1, as the real file
ML100K_DATA = b"196\t242\t3\t881250949\n186\t302\t3\t891717742\n22\t377\t1\t878887116\n"
ML100K_ITEM = (b"1|Toy Story (1995)|01-Jan-1995||http://us.imdb.com/M/title-exact?Toy%20Story%20(1995)"
               b"|0|0|0|1|1|1|0|0|0|0|0|0|0|0|0|0|0|0|0\n"
               b"543|Mis\xe9rables, Les (1995)|01-Jan-1995||http://us.imdb.com/M/title-exact?Mis%E9rables,%20Les%20"
               b"(1995)|0|0|0|0|0|0|0|0|1|0|0|0|1|0|0|0|0|0|0\n")
MLCSV_RATINGS = b"userId,movieId,rating,timestamp\n1,1,4.0,964982703\n1,3,4.0,964981247\n1,6,4.0,964982224\n"
MLCSV_MOVIES = (b"movieId,title,genres\n1,Toy Story (1995),Adventure|Animation|Children|Comedy|Fantasy\n"
                b'11,"American President, The (1995)",Comedy|Drama|Romance\n'
                b'29,"City of Lost Children, The (Cit\xc3\xa9 des enfants perdus, La) (1995)",Adventure|Drama\n')
ML_GENRES = movielens._ML100K_GENRES
_ASCII_ID = re.compile(r"[ \t]*[0-9]+[ \t]*")
_ASCII_NUMBER = re.compile(r"[ \t]*[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?[ \t]*")
_ASCII_INT = re.compile(r"[ \t]*[+-]?[0-9]+[ \t]*")


def _split_lines(data: bytes, sep: bytes, n: int, encoding: str, check) -> list[tuple]:
    """Lines of exactly ``n`` fields split at ``sep`` (blank lines skipped); ``check(fields)``
    -> row or raise ValueError."""
    rows, bad = [], set()
    for lineno, line in enumerate(_lines(data), 1):
        if not line.strip(b" \t\r"):
            continue
        try:
            fields = line.decode(encoding).split(sep.decode())
            if len(fields) != n:
                raise ValueError("field count")
            rows.append(check(fields))
        except ValueError:  # also UnicodeDecodeError
            bad.add(lineno)
    if bad:
        raise Malformed(bad)
    if not rows:
        raise Malformed(set())
    return rows


def _rating_row(fields, ints=_ASCII_INT, ids=_ASCII_ID, id_bits=None):
    user, item, rating, ts = fields
    if not (ids.fullmatch(user) and ids.fullmatch(item) and _ASCII_NUMBER.fullmatch(rating) and ints.fullmatch(ts)):
        raise ValueError("field")
    value, stamp = float(rating), int(ts)
    if not (abs(value) < float("inf") and -2 ** 63 <= stamp < 2 ** 63):
        raise ValueError("range")
    if id_bits and not all(-2 ** id_bits <= int(x) < 2 ** id_bits for x in (user, item)):
        raise ValueError("range")
    return user.strip(" \t"), item.strip(" \t"), stamp


def _movie_row(fields):
    if not _ASCII_ID.fullmatch(fields[0]):
        raise ValueError("id")
    return fields


def _ref_movielens(ratings: bytes, movies: bytes, sep: bytes, movie_fields: int) -> tuple:
    events = [(*r, order) for order, r in enumerate(_split_lines(ratings, sep, 4, "utf-8", _rating_row))]
    movie_rows = _split_lines(movies, b"|" if movie_fields == 24 else sep, movie_fields, "latin-1", _movie_row)
    return events, movie_rows


def _ml_items(movie_rows: list, movie_fields: int) -> dict:
    """Item text of the reference's movie rows (title and year through the reader's own title
    parser, which tests/test_sources.py checks by known answers)."""
    ids = [r[0].strip(" \t") for r in movie_rows]
    titles = pl.DataFrame({"t": [r[1] for r in movie_rows]}, schema={"t": pl.String}).select(
        movielens._split_title(pl.col("t"))).rows()
    if movie_fields == 24:
        genres = [", ".join(g for g, flag in zip(ML_GENRES, r[5:]) if flag == "1") for r in movie_rows]
    else:
        genres = [", ".join(g.strip(" \t") for g in r[2].split("|") if g.strip(" \t")) for r in movie_rows]
    out = {}
    for i, (title, year), g in zip(ids, titles, genres):
        out.setdefault(i, {"title": title or None, "year": year, "genres": g or None})
    return out


def _ml_load(folder: Path, version: str) -> tuple:
    raw = movielens.load(version, path=folder)
    return ([tuple(map(str, r[:2])) + tuple(r[2:]) for r in _rows(raw.events)],
            _items(raw.items.with_columns(pl.col("raw_id").cast(pl.String)), ("title", "year", "genres")))


@pytest.mark.parametrize("layout", ["1m", "100k"])
@examples(120)
@given(data=st.data())
def test_movielens_dat_and_100k(tmp_path_factory, layout, data):
    names = {"1m": ("ratings.dat", "movies.dat", b"::", 3, ML1M_RATINGS, ML1M_MOVIES),
             "100k": ("u.data", "u.item", b"\t", 24, ML100K_DATA, ML100K_ITEM)}[layout]
    ratings_name, movies_name, sep, movie_fields, ratings, movies = names
    which = data.draw(st.sampled_from(["ratings", "movies"]))
    if which == "ratings":
        ratings = data.draw(corrupted(ratings, sep.decode()))
    else:
        movies = data.draw(corrupted(movies, "|" if movie_fields == 24 else sep.decode()))
    folder = tmp_path_factory.mktemp(f"ml{layout}")
    (folder / ratings_name).write_bytes(ratings)
    (folder / movies_name).write_bytes(movies)
    path = folder / (ratings_name if which == "ratings" else movies_name)

    def reference(_):
        events, movie_rows = _ref_movielens(ratings, movies, sep, movie_fields)
        return events, _ml_items(movie_rows, movie_fields)

    got = expect(lambda: _ml_load(folder, layout), path, ratings if which == "ratings" else movies, reference)
    if got is None:
        assert_no_cache_after_failure(folder, "movielens", path=str(folder), version=layout)


_CSV_INT = re.compile(r" *[+-]?[0-9]+")
_CSV_NUMBER = re.compile(r" *[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def _ref_csv_ratings(data: bytes) -> list[tuple]:
    lines = _lines(data)
    if lines[0] != b"userId,movieId,rating,timestamp":
        raise Malformed({1})
    rest = b"\n".join(lines[1:])

    def row(fields):
        user, item, rating, ts = fields
        if not (_CSV_INT.fullmatch(user) and _CSV_INT.fullmatch(item) and _CSV_INT.fullmatch(ts)
                and _CSV_NUMBER.fullmatch(rating)):
            raise ValueError("field")
        return _rating_row(fields, _CSV_INT, _CSV_INT, id_bits=31)

    try:
        rows = _split_lines(rest, b",", 4, "utf-8", row)
    except Malformed as e:
        raise Malformed({n + 1 for n in e.lines} or set()) from None
    return [(str(int(u)), str(int(i)), t, order) for order, (u, i, t) in enumerate(rows)]


def _ref_csv_movies(data: bytes) -> list:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Malformed({data.count(b"\n", 0, e.start) + 1}) from None
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    rows = []
    try:
        header = next(reader)
        if not {"movieId", "title", "genres"} <= set(header):
            raise Malformed({1})
        last = reader.line_num
        for record in reader:
            if record and any(f.strip() for f in record):
                movie_id = record[header.index("movieId")] if len(record) == len(header) else ""
                if not _ASCII_ID.fullmatch(movie_id) or int(movie_id) >= 2 ** 31:
                    raise Malformed({last + 1})
                rows.append([record[header.index(c)] for c in ("movieId", "title", "genres")])
            last = reader.line_num
    except csv.Error:
        raise Malformed({reader.line_num}) from None
    except (StopIteration, ValueError):  # no header, or one without the columns
        raise Malformed({1}) from None
    return rows


@examples(150)
@given(data=st.data())
def test_movielens_csv(tmp_path_factory, data):
    ratings, movies = MLCSV_RATINGS, MLCSV_MOVIES
    which = data.draw(st.sampled_from(["ratings", "movies"]))
    if which == "ratings":
        ratings = data.draw(corrupted(ratings, ","))
    else:
        movies = data.draw(corrupted(movies, ","))
    folder = tmp_path_factory.mktemp("mlcsv")
    (folder / "ratings.csv").write_bytes(ratings)
    (folder / "movies.csv").write_bytes(movies)
    path = folder / f"{which}.csv"

    def reference(_):
        events = _ref_csv_ratings(ratings)
        rows = _ref_csv_movies(movies)
        items = _ml_items([(str(int(r[0])), r[1], r[2].replace("(no genres listed)", "")) for r in rows], 3)
        return events, items

    got = expect(lambda: _ml_load(folder, "latest-small"), path, ratings if which == "ratings" else movies, reference)
    if got is None:
        assert_no_cache_after_failure(folder, "movielens", path=str(folder), version="latest-small")


# ============================================================================ RecBole
RB_ITEM = (  # lines of ../shared/data/amazon2014/beauty/Amazon_Beauty.item.gz
    b"item_id:token\ttitle:token\tsales_type:token\tsales_rank:float\tcategories:token_seq\tprice:float\tbrand:token\n"
    b"9759091062\tXtreme Brite Brightening Gel 1oz.\tBeauty\t52254.0\t'Beauty', 'Hair Care', 'Styling Products', "
    b"'Creams, Gels & Lotions'\t19.99\tXtreme Brite\n"
    b"9788072216\tPrada Candy By Prada Eau De Parfum Spray 1.7 Oz For Women\tBeauty\t78916.0\t\"'Beauty', "
    b"'Fragrance', \"\"Women's\"\", 'Eau de Parfum'\"\t65.86\tPrada\n"
    b"9790794231\tStella McCartney Stella\tBeauty\t142503.0\t\"'Beauty', 'Fragrance', \"\"Women's\"\", "
    b"'Eau de Parfum'\"\t\t\n")
RB_INTER = (b"user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
            b"A1YJEY40YUW4SE\t7806397051\t5.0\t1391040000\nA60XNB876KYML\t7806397051\t3.0\t1397779200\n"
            b"A3G6XNM240RMWA\t9759091062\t4.0\t1378425600\n")
_RB_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def ref_atomic(data: bytes, required=(), numeric=()) -> list[tuple]:
    """RecBole atomic file, as documented in data/sources/recbole.py, by a character state
    machine: rows of (line, field, ...) with empty fields None and short records padded."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Malformed({data.count(b"\n", 0, e.start) + 1}) from None
    if not text.strip():
        raise Malformed(set())
    header = text.split("\n", 1)[0].removesuffix("\r").split("\t")
    names = [h.split(":", 1)[0] for h in header]
    if any('"' in h or ":" not in h for h in header) or len(set(names)) != len(names) or not all(names) \
            or not set(required) <= set(names):
        raise Malformed({1})
    records, fields, field, state, line, start = [], [], [], "start", 1, 1
    body = text[len(text.split("\n", 1)[0]) + 1:] if "\n" in text else ""
    line = start = 2

    def end_record():
        nonlocal fields, start
        if fields != [""]:  # an empty line is no record
            records.append((start, fields))
        fields = []
        start = line

    k = 0
    while k < len(body):
        c = body[k]
        crlf = body.startswith("\r\n", k)
        if state == "start" and c == '"':
            state = "quoted"
        elif state in ("start", "plain"):
            if c == "\t":
                fields.append("".join(field))
                field, state = [], "start"
            elif c == "\n" or crlf:
                fields.append("".join(field))
                field, state = [], "start"
                line += 1
                end_record()
                k += 1 if crlf else 0
            else:
                field.append(c)
                state = "plain"
        elif state == "quoted":
            if c == '"':
                state = "closed"
            else:
                field.append(c)
                line += c == "\n"
        elif state == "closed":
            if c == '"':
                field.append('"')
                state = "quoted"
            elif c == "\t":
                fields.append("".join(field))
                field, state = [], "start"
            elif c == "\n" or crlf:
                fields.append("".join(field))
                field, state = [], "start"
                line += 1
                end_record()
                k += 1 if crlf else 0
            else:
                break  # text after a closing quote: no record from here on
        k += 1
    stop = {line} if state == "closed" and k < len(body) else {start} if state == "quoted" else set()
    if not stop and (state != "start" or field or fields):  # the last line, without its line break
        fields.append("".join(field))
        end_record()
    rows, bad = [], set(stop)
    for lineno, fields in records:  # every malformed record is a line the reader may name
        if len(fields) > len(header):
            bad.add(lineno)
            continue
        values = dict(zip(names, [f or None for f in fields] + [None] * (len(header) - len(fields))))
        if any(values[r] is None for r in required) or any(not _RB_NUMBER.fullmatch(values[n] or "")
                                                           for n in numeric):
            bad.add(lineno)
        rows.append((lineno, *values.values()))
    if bad:
        raise Malformed(bad)
    return rows


def ref_recbole_events(data: bytes) -> list[tuple]:
    names = [h.split(":", 1)[0] for h in data.split(b"\n", 1)[0].decode("utf-8", "replace").split("\t")]
    has_time = "timestamp" in names
    rows = ref_atomic(data, ("user_id", "item_id"), ("timestamp",) if has_time else ())
    if not rows:
        raise Malformed(set())
    out = []
    for order, (lineno, *values) in enumerate(rows):
        row = dict(zip(names, values))
        user, item, ts = row["user_id"], row["item_id"], row.get("timestamp") or "0"
        stamp = float(ts)
        if not -2 ** 63 <= stamp < 2 ** 63:
            raise Malformed({lineno})
        out.append((user, item, int(stamp), order))
    return out


@examples(150)
@given(data=st.data())
def test_recbole_atomic_files(tmp_path_factory, data):
    which = data.draw(st.sampled_from(["inter", "item"]))
    inter, item = RB_INTER, RB_ITEM
    if which == "inter":
        inter = data.draw(corrupted(inter, "\t"))
    else:
        item = data.draw(corrupted(item, "\t"))
    folder = tmp_path_factory.mktemp("recbole")
    (folder / "toy.inter").write_bytes(inter)
    (folder / "toy.item").write_bytes(item)
    path = folder / f"toy.{which}"
    if which == "item":  # the atomic reader itself, record by record and line by line
        expect(lambda: [tuple(r) for r in recbole.read_atomic(path, required=("item_id",)).iter_rows()],
               path, item, lambda d: ref_atomic(d, ("item_id",)))
        got = expect(lambda: _rows(recbole.load(folder, name="toy").events), path, item,
                     lambda _: (ref_atomic(item, ("item_id",)), ref_recbole_events(inter))[1])
    else:
        got = expect(lambda: _rows(recbole.load(folder, name="toy").events), path, inter, ref_recbole_events)
    if got is None:
        assert_no_cache_after_failure(folder, "recbole", path=str(folder), name="toy")


# ============================================================================ the cache
def assert_no_cache_after_failure(folder: Path, source: str, **args) -> None:
    """Through ``load_dataset`` the same input fails with the same error type and leaves nothing
    in the cache folder (no processed entry, no temp folder)."""
    from data.prepare import load_dataset

    cache = folder / "cache"
    with pytest.raises(DataFormatError):
        load_dataset(source, cache_dir=str(cache), min_count=1, verbose=False, **args)
    left = sorted(str(p.relative_to(cache)) for p in cache.rglob("*")) if cache.exists() else []
    assert not [p for p in left if p.endswith("meta.json") or ".parquet" in p], left
    assert not [p for p in left if Path(p).name.startswith(".")], left  # no temp folders either


def test_a_cache_write_that_fails_leaves_no_entry(tmp_path, monkeypatch):
    """A failure while the processed tables are written (disk full on the second file) leaves
    no entry under its final name and no temp folder; the next run writes a complete one."""
    import errno

    from data.prepare import load_dataset

    (tmp_path / "sequential_data.txt").write_bytes(P5_SEQ)
    cache = tmp_path / "cache"
    real = pl.DataFrame.write_parquet
    calls = []

    def write_parquet(self, path, *a, **k):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, path, *a, **k)

    monkeypatch.setattr(pl.DataFrame, "write_parquet", write_parquet)
    with pytest.raises(OSError, match="No space"):
        load_dataset("p5", path=str(tmp_path), cache_dir=str(cache), min_count=1, verbose=False)
    assert [p.name for p in (cache / "processed").iterdir()] == []
    monkeypatch.undo()
    ds = load_dataset("p5", path=str(tmp_path), cache_dir=str(cache), min_count=1, verbose=False)
    assert ds.num_users == 5 and len(list((cache / "processed").iterdir())) == 1
