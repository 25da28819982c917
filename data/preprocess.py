"""Raw events -> the processed dataset: dedup, iterative k-core, id remapping, time order.

Everything is a polars expression over the whole table (no Python loop over interactions),
so ML-32M's 32M rows go through in about a minute on 2 cores.

Id remapping (deterministic, 0-based): users in order of their first row in the source
file, items in order of first appearance when users' histories are read in that order
(for a P5 file this reproduces the P5 ids minus one).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import polars as pl

from data.sources.base import RawData, conform_items


@dataclass(frozen=True)
class PreprocessOptions:
    min_count: int = 5  # k of the k-core, applied to users and items alike (0 or 1: no filter)
    dedup: bool = True  # keep only the first interaction of each (user, item) pair
    min_history: int = 3  # users need >= 3 items for a non-empty train split plus valid + test targets

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class ProcessedTables:
    items: pl.DataFrame  # item_id (i64, 0..N-1, row i = item i), raw_id, text fields
    sequences: pl.DataFrame  # user_id (i64, 0..U-1), raw_user (str), items (list[i64], time order)
    stats: dict


def _pair_key(events: pl.DataFrame) -> pl.Series:
    """One u64 per (user, item) pair: hashing one integer column is several times faster and
    leaner than hashing a struct of two (this made ML-32M's duplicate check 18 s -> ~1 s)."""
    codes = []
    for col in ("user", "item"):
        s = events[col]
        if not (s.dtype.is_integer() and s.min() >= 0 and s.max() < 2**32):
            s = s.cast(pl.String).cast(pl.Categorical).to_physical()
        codes.append(s.cast(pl.UInt64))
    return codes[0] * (1 << 32) + codes[1]


def k_core(events: pl.LazyFrame | pl.DataFrame, k: int, min_user: int = 0) -> pl.DataFrame:
    """Largest sub-table in which every item has >= k rows and every user >= max(k, min_user).

    Removing all under-threshold users and items at once and repeating converges to the
    same fixpoint as removing them one at a time (the union of two tables that meet the
    thresholds meets them too, so the largest one is unique and no round removes a row of it).
    The user threshold must be part of the same loop: dropping short users afterwards can
    push an item under k, and dropping that item can leave a user short again.
    """
    df = events.lazy().collect() if isinstance(events, pl.LazyFrame) else events
    user_k = max(k, min_user)
    if user_k <= 1:  # then k <= 1 too: nothing to filter
        return df
    while True:
        kept = df.filter((pl.len().over("user") >= user_k) & (pl.len().over("item") >= k))
        if kept.height == df.height:
            return kept
        df = kept


def preprocess(raw: RawData, options: PreprocessOptions = PreprocessOptions()) -> ProcessedTables:
    events = raw.events.select("user", "item", "timestamp", "order")
    if events.height == 0:
        raise ValueError(f"{raw.name}: the source has no interactions")
    n_raw = events.height
    if options.dedup:
        key = _pair_key(events)
        if key.n_unique() < n_raw:
            events = (events.with_columns(key.alias("pair")).sort("timestamp", "order")
                      .unique("pair", keep="first", maintain_order=True).drop("pair"))
    n_dedup = events.height
    events = k_core(events, options.min_count, min_user=options.min_history)
    if events.height == 0:
        raise ValueError(f"{raw.name}: nothing is left after the {options.min_count}-core filter "
                         f"(min_history={options.min_history})")

    events = (
        events.with_columns(pl.col("order").min().over("user").alias("first_row"))
        .sort("first_row", "timestamp", "order")  # stable: ties keep file order
        .with_columns(pl.col("first_row").rank("dense").cast(pl.Int64).sub(1).alias("user_id"))
        .with_row_index("pos")
    )
    first_pos = events.group_by("item").agg(pl.col("pos").min()).sort("pos")
    item_ids = first_pos.select("item", pl.int_range(pl.len(), dtype=pl.Int64).alias("item_id"))
    events = events.join(item_ids, on="item", how="left").sort("pos")

    sequences = events.group_by("user_id", maintain_order=True).agg(
        pl.col("user").first().cast(pl.String).alias("raw_user"), pl.col("item_id").alias("items"))
    text = conform_items(raw.items)
    items = (item_ids.select("item_id", pl.col("item").cast(pl.String).alias("raw_id"))
             .join(text, on="raw_id", how="left").sort("item_id"))
    stats = {
        "source": raw.name,
        "raw_interactions": n_raw,
        "duplicates_removed": n_raw - n_dedup,
        "users": sequences.height,
        "items": items.height,
        "interactions": events.height,
        "items_in_metadata": int(items["raw_id"].is_in(text["raw_id"].to_list()).sum()),
        "options": options.as_dict(),
        "notes": raw.notes,
    }
    return ProcessedTables(items=items, sequences=sequences, stats=stats)
