"""P5 / S3-Rec format: ``sequential_data.txt`` (``user item item ...`` per line, items in
time order) + ``datamaps.json`` (P5 ids <-> Amazon ids), optionally gzipped.

Item text comes from a separate file keyed by ASIN: a P5/Amazon-2014 ``meta*.json[.gz]``
(Python-literal lines) or a RecBole atomic ``.item`` file.
"""

from __future__ import annotations

import io
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
    """One line per user -> events; the position in the line is the timestamp."""
    lines = pl.DataFrame({"line": read_bytes(path).decode("utf-8").splitlines()})
    tokens = lines.with_row_index("lineno", offset=1).with_columns(
        pl.col("line").str.strip_chars().str.split(" ").list.eval(pl.element().filter(pl.element() != ""))
        .alias("tokens")
    ).filter(pl.col("tokens").list.len() > 0)
    short = tokens.filter(pl.col("tokens").list.len() < 2)
    if short.height:
        raise DataFormatError(f"{path}:{short['lineno'][0]}: a user line needs a user id and at least one item")
    events = tokens.select(
        "lineno",
        pl.col("tokens").list.first().alias("user"),
        pl.col("tokens").list.slice(1).alias("item"),
    ).explode("item").with_columns(
        pl.int_range(pl.len(), dtype=pl.Int64).over("lineno").alias("timestamp"),
        pl.int_range(pl.len(), dtype=pl.Int64).alias("order"),
    )
    bad = events.filter(~pl.col("item").str.contains(r"^\d+$") | ~pl.col("user").str.contains(r"^\d+$"))
    if bad.height:
        raise DataFormatError(f"{path}:{bad['lineno'][0]}: ids must be integers, got {bad.row(0)[1:3]}")
    return events.select("user", "item", "timestamp", "order")


def _map_ids(events: pl.DataFrame, maps_file: Path) -> pl.DataFrame:
    """Replace P5 integer ids by the Amazon ids (reviewerID, ASIN) so item text can be joined."""
    try:
        maps = json.load(io.BytesIO(read_bytes(maps_file)))
    except json.JSONDecodeError as e:
        raise DataFormatError(f"{maps_file}:{e.lineno}: malformed JSON ({e.msg})") from None
    for key in ("id2item",):
        if key not in maps:
            raise DataFormatError(f"{maps_file}: missing field '{key}'")
    id2item = pl.DataFrame({"item": list(maps["id2item"].keys()), "asin": list(maps["id2item"].values())})
    out = events.join(id2item, on="item", how="left", maintain_order="left")
    missing = out.filter(pl.col("asin").is_null())
    if missing.height:
        raise DataFormatError(f"{maps_file}: id2item has no entry for item id {missing['item'][0]}")
    out = out.with_columns(pl.col("asin").alias("item")).drop("asin")
    if "id2user" in maps:
        id2user = pl.DataFrame({"user": list(maps["id2user"].keys()), "rid": list(maps["id2user"].values())})
        out = out.join(id2user, on="user", how="left", maintain_order="left").with_columns(
            pl.coalesce("rid", "user").alias("user")).drop("rid")
    return out
