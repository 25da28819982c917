"""P5 / S3-Rec format: ``sequential_data.txt`` (``user item item ...`` per line, items in
time order) + ``datamaps.json`` (P5 ids <-> Amazon ids), optionally gzipped.

Item text comes from a separate file keyed by ASIN: a P5/Amazon-2014 ``meta*.json[.gz]``
(Python-literal lines) or a RecBole atomic ``.item`` file.
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from data.sources import amazon2014, recbole
from data.sources.base import DataFormatError, RawData, empty_items, find_file, read_bytes


def load(path: str | Path, items: str | Path | None = None) -> RawData:
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: P5 folder not found")
    seq_file = find_file(folder, "sequential_data.txt", "sequential.txt")
    if seq_file is None:
        raise FileNotFoundError(f"{folder}: no sequential_data.txt[.gz] here")
    events = read_sequences(seq_file)
    files = [seq_file]

    maps_file = find_file(folder, "datamaps.json")
    if maps_file is not None:
        events = _map_ids(events, maps_file)
        files.append(maps_file)
    notes = []
    if items is None:
        item_table = empty_items()
        notes.append(f"item text missing: no --items file given for {folder}")
    else:
        items = Path(items)
        files.append(items)
        if ".item" in items.suffixes:
            item_table = recbole.read_atomic_items(items)
        else:
            item_table = amazon2014.read_meta(items, wanted=set(events["item"].unique().to_list()))
        if maps_file is None:
            notes.append(f"no datamaps.json in {folder}: item text is joined on the raw P5 ids")
    return RawData(name=f"p5-{folder.name}", events=events, items=item_table, files=files, notes=notes)


def read_sequences(path: Path) -> pl.DataFrame:
    """One line per user -> events; the position in the line is the timestamp. Ids are
    integers separated by spaces or tabs; blank lines are skipped. Lines are counted by
    ``\n`` (as an editor does), so an error's line number is the line a user finds."""
    raw = read_bytes(path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        lineno = raw.count(b"\n", 0, e.start) + 1
        raise DataFormatError(f"{path}:{lineno}: not UTF-8 text (byte {raw[e.start]:#04x}); ids must be integers") \
            from None
    lines = pl.DataFrame({"line": text.split("\n")})
    tokens = lines.with_row_index("lineno", offset=1).with_columns(
        pl.col("line").str.replace_all(r"[\t\r\x0b\x0c]", " ").str.split(" ")
        .list.eval(pl.element().filter(pl.element() != "")).alias("tokens")
    ).filter(pl.col("tokens").list.len() > 0)
    short = tokens.filter(pl.col("tokens").list.len() < 2)
    not_int = tokens.filter(~pl.col("tokens").list.eval(pl.element().str.contains(r"^[0-9]+$")).list.all())
    first_short = short["lineno"][0] if short.height else None
    first_bad = not_int["lineno"][0] if not_int.height else None
    if first_short is not None and (first_bad is None or first_short < first_bad):
        raise DataFormatError(f"{path}:{first_short}: a user line needs a user id and at least one item")
    if first_bad is not None:
        bad = not_int.row(0, named=True)["tokens"]
        raise DataFormatError(f"{path}:{first_bad}: ids must be integers, got "
                              f"{[t for t in bad if not t.isascii() or not t.isdigit()][:3]}")
    if tokens.height == 0:
        raise DataFormatError(f"{path}: file is empty (blank lines only)")
    events = tokens.select(
        "lineno",
        pl.col("tokens").list.first().alias("user"),
        pl.col("tokens").list.slice(1).alias("item"),
    ).explode("item").with_columns(
        pl.int_range(pl.len(), dtype=pl.Int64).over("lineno").alias("timestamp"),
        pl.int_range(pl.len(), dtype=pl.Int64).alias("order"),
    )
    return events.select("user", "item", "timestamp", "order")


def _map_ids(events: pl.DataFrame, maps_file: Path) -> pl.DataFrame:
    """Replace P5 integer ids by the Amazon ids (reviewerID, ASIN) so item text can be joined.
    ``datamaps.json`` is one JSON object; ``id2item`` (and ``id2user``, if there) map id
    strings to id strings."""
    raw = read_bytes(maps_file)
    try:
        maps = json.loads(raw)
    except json.JSONDecodeError as e:
        raise DataFormatError(f"{maps_file}:{e.lineno}: malformed JSON ({e.msg})") from None
    except UnicodeDecodeError as e:
        lineno = raw.count(b"\n", 0, e.start) + 1
        raise DataFormatError(f"{maps_file}:{lineno}: not UTF-8 ({e.reason})") from None
    except (ValueError, RecursionError) as e:  # e.g. an integer with too many digits
        raise DataFormatError(f"{maps_file}:1: malformed JSON ({e})") from None
    if not isinstance(maps, dict) or "id2item" not in maps:
        raise DataFormatError(f"{maps_file}:1: missing field 'id2item' (a JSON object of id -> ASIN)")
    for key in ("id2item", "id2user"):
        table = maps.get(key, {})
        if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
            raise DataFormatError(f"{maps_file}:1: field '{key}' must map ids to strings")
    id2item = pl.DataFrame({"item": list(maps["id2item"].keys()), "asin": list(maps["id2item"].values())},
                           schema={"item": pl.String, "asin": pl.String})
    out = events.join(id2item, on="item", how="left", maintain_order="left")
    missing = out.filter(pl.col("asin").is_null())
    if missing.height:
        raise DataFormatError(f"{maps_file}:1: id2item has no entry for item id {missing['item'][0]}")
    out = out.with_columns(pl.col("asin").alias("item")).drop("asin")
    if "id2user" in maps:
        id2user = pl.DataFrame({"user": list(maps["id2user"].keys()), "rid": list(maps["id2user"].values())},
                               schema={"user": pl.String, "rid": pl.String})
        out = out.join(id2user, on="user", how="left", maintain_order="left").with_columns(
            pl.coalesce("rid", "user").alias("user")).drop("rid")
    return out
