"""The amazon2023 source: fixtures in the upstream JSON-lines format, read locally and downloaded
from a local HTTP server, a hand-computed 5-core result, item text, and bad input."""

import gzip
import json
import re
import subprocess
import sys
from pathlib import Path

import gin
import pytest

from data.download import DownloadError
from data.prepare import load_dataset
from data.preprocess import preprocess
from data.sources import amazon2023
from data.sources.base import DataFormatError
from data.text import item_texts
from tests.http_server import serve

ROOT = Path(__file__).resolve().parents[1]
CAT = "Musical_Instruments"
REVIEWS_NAME = f"{CAT}.jsonl.gz"
META_NAME = f"meta_{CAT}.jsonl.gz"
T0 = 1_600_000_000_000  # timestamps are unix milliseconds

# parent_asin of the products; P1 is also reviewed through two colour variants (own asin each)
P = {k: f"B0{k}XYZ00{k[-1]}" for k in ("P1", "P2", "P3", "P4", "P5", "P6", "P7")}
U = {k: f"AGKHLEW2SOWHNMFQIJGBECAF7{k}" for k in ("U1", "U2", "U3", "U4", "U5", "U6", "U7")}


def review_rows() -> list[tuple[str, str, str, int]]:
    """(user, asin, parent_asin, timestamp). The hand-computed 5-core is users U1..U5 x items
    P1..P5 (25 interactions):
    - U1 reviews P1 twice via two variants: one (user, parent) pair, the later review dropped;
    - U6 has 4 items -> dropped; P6 has 4 users (U1..U4) -> dropped;
    - P7 has 1 user (U7) -> dropped, which leaves U7 with 4 items -> dropped in the next round.
    U2 reviews in reverse file order; its P3 and P4 share a timestamp (tie -> file order)."""
    rows = []
    for u in range(1, 6):
        items = [1, 2, 3, 4, 5] if u != 2 else [5, 3, 4, 2, 1]
        for i in items:
            t = T0 + 1000 * (u * 10 + i)
            if u == 2 and i in (3, 4):
                t = T0 + 1000 * 23
            asin = f"{P[f'P{i}']}-red" if (u, i) == (1, 1) else P[f"P{i}"]
            rows.append((U[f"U{u}"], asin, P[f"P{i}"], t))
    rows.append((U["U1"], f"{P['P1']}-blue", P["P1"], T0 + 999_000))  # same parent, later: duplicate
    rows += [(U["U6"], P[f"P{i}"], P[f"P{i}"], T0 + 600_000 + i) for i in (1, 2, 3, 4)]
    rows += [(U[f"U{u}"], P["P6"], P["P6"], T0 + 700_000 + u) for u in (1, 2, 3, 4)]
    rows += [(U["U7"], P[f"P{i}"], P[f"P{i}"], T0 + 800_000 + i) for i in (1, 2, 3, 4, 7)]
    return rows


def review_line(user: str, asin: str, parent: str, ts: int) -> dict:
    return {"rating": 5.0, "title": "Great tone", "text": "Stays in tune.<br />Would buy again.", "images": [],
            "asin": asin, "parent_asin": parent, "user_id": user, "timestamp": ts, "helpful_vote": 0,
            "verified_purchase": True}


def meta_records() -> list[dict]:
    common = {"average_rating": 4.6, "rating_number": 120, "images": [], "videos": [], "bought_together": None}
    return [
        {**common, "main_category": "Musical Instruments", "title": "Fender Player Stratocaster",
         "features": ["Alder body", "Maple neck"], "description": ["The Player Stratocaster is a classic."],
         "price": 749.99, "store": "Fender",
         "images": [{"thumb": "https://m.media-amazon.com/images/I/1._SS40_.jpg",
                     "large": "https://m.media-amazon.com/images/I/1.jpg",
                     "variant": "MAIN", "hi_res": "https://m.media-amazon.com/images/I/1._SL1500_.jpg"}],
         "videos": [{"title": "Demo", "url": "https://www.amazon.com/vdp/1", "user_id": ""}],
         "categories": ["Musical Instruments", "Instruments", "Guitars", "Electric Guitars"],
         "details": {"Brand": "Fender", "Color": "Black", "Date First Available": "March 4, 2018"},
         "parent_asin": P["P1"], "bought_together": None},
        # no price, no store (brand from details), no categories (main_category instead)
        {**common, "main_category": "Musical Instruments", "title": "Ernie Ball Regular Slinky Strings",
         "features": [], "description": [], "price": None, "store": None, "categories": [],
         "details": {"Brand": "Ernie Ball", "Item Weight": "0.85 ounces"}, "parent_asin": P["P2"]},
        # as re-saved by the Hugging Face loader: details a JSON string, price a string
        {**common, "main_category": "Musical Instruments", "title": "Dunlop Tortex Picks &amp; Case",
         "features": ["12 picks"], "description": [], "price": "None", "store": "",
         "categories": ["Musical Instruments", "Instrument Accessories"],
         "details": json.dumps({"Brand": "Dunlop"}), "parent_asin": P["P3"]},
        {**common, "main_category": "Musical Instruments", "title": "Snark Clip-On Tuner", "features": [],
         "description": ["Tunes guitar, bass and violin."], "price": "12.99", "store": "Snark",
         "categories": ["Musical Instruments"], "details": {}, "parent_asin": P["P4"]},
        # P5 has no meta record at all
        {**common, "main_category": "Musical Instruments", "title": "Strap", "features": [], "description": [],
         "price": 9.0, "store": "Levy's", "categories": [], "details": {}, "parent_asin": P["P6"]},
        {**common, "main_category": "Musical Instruments", "title": "Not reviewed", "features": [],
         "description": [], "price": 1.0, "store": "X", "categories": [], "details": {}, "parent_asin": "B0NOREVIEW"},
    ]


def write_gz_lines(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    return path


def write_reviews(path: Path, rows=None) -> Path:
    return write_gz_lines(path, [json.dumps(review_line(*r)) for r in (rows or review_rows())])


def write_meta(path: Path) -> Path:
    return write_gz_lines(path, [json.dumps(m) for m in meta_records()])


@pytest.fixture
def folder(tmp_path) -> Path:
    d = tmp_path / "raw"
    write_reviews(d / REVIEWS_NAME)
    write_meta(d / META_NAME)
    return d


# ---------------------------------------------------------------- reading and the 5-core result


def test_local_folder_five_core_counts_and_order(folder):
    raw = amazon2023.load(CAT, path=folder)
    assert raw.name == "amazon2023-Musical_Instruments"
    assert raw.events.height == len(review_rows()) == 39
    assert set(raw.events["item"]) == set(P.values())  # keyed by parent_asin, never a variant asin
    assert raw.events["timestamp"][0] == T0 + 11_000  # milliseconds kept as they are
    tables = preprocess(raw)  # default 5-core
    s = tables.stats
    assert (s["duplicates_removed"], s["users"], s["items"], s["interactions"]) == (1, 5, 5, 25)
    assert sorted(tables.sequences["raw_user"]) == sorted(U[f"U{u}"] for u in range(1, 6))
    raw_of = dict(zip(tables.items["item_id"], tables.items["raw_id"]))
    seqs = {r["raw_user"]: [raw_of[i] for i in r["items"]] for r in tables.sequences.iter_rows(named=True)}
    # U2: P3 and P4 tie -> file order (P3 before P4); P5 comes from the file's first line but latest
    assert seqs[U["U2"]] == [P["P1"], P["P2"], P["P3"], P["P4"], P["P5"]]
    assert seqs[U["U1"]] == [P["P1"], P["P2"], P["P3"], P["P4"], P["P5"]]


def test_item_text_fields(folder):
    raw = amazon2023.load(CAT, path=folder)
    items = {r["raw_id"]: r for r in raw.items.iter_rows(named=True)}
    assert "B0NOREVIEW" not in items and P["P5"] not in items  # not reviewed / no meta record
    p1 = items[P["P1"]]
    assert p1["title"] == "Fender Player Stratocaster" and p1["brand"] == "Fender" and p1["price"] == 749.99
    assert p1["categories"] == "Musical Instruments, Instruments, Guitars, Electric Guitars"
    assert p1["description"] == "The Player Stratocaster is a classic. Alder body Maple neck"
    p2 = items[P["P2"]]
    assert (p2["brand"], p2["categories"], p2["price"], p2["description"]) == (
        "Ernie Ball", "Musical Instruments", None, None)
    p3 = items[P["P3"]]
    assert (p3["brand"], p3["price"], p3["description"]) == ("Dunlop", None, "12 picks")
    assert items[P["P4"]]["price"] == 12.99
    tables = preprocess(raw)
    texts = dict(zip(tables.items["raw_id"], item_texts(tables.items)))
    assert texts[P["P1"]].startswith("Title: Fender Player Stratocaster. Brand: Fender. Categories: Musical "
                                     "Instruments, Instruments, Guitars, Electric Guitars. Price: $749.99.")
    assert texts[P["P3"]].startswith("Title: Dunlop Tortex Picks & Case. Brand: Dunlop.")
    assert texts[P["P5"]] == ""
    assert tables.stats["items_in_metadata"] == 4


def test_uncompressed_files_and_review_file_path(tmp_path):
    (tmp_path / f"{CAT}.jsonl").write_text("".join(json.dumps(review_line(*r)) + "\n" for r in review_rows()))
    (tmp_path / f"meta_{CAT}.jsonl").write_text("".join(json.dumps(m) + "\n" for m in meta_records()))
    raw = amazon2023.load(CAT, path=tmp_path / f"{CAT}.jsonl")
    assert raw.events.height == 39 and raw.items.height == 5  # P1-P4 and P6 (reviewed, later cut)


def test_missing_meta_warns_and_wrong_category_hints(folder):
    (folder / META_NAME).unlink()
    with pytest.warns(UserWarning, match="item text missing"):
        raw = amazon2023.load(CAT, path=folder)
    assert raw.items.height == 0 and any("item text missing" in n for n in raw.notes)
    with pytest.raises(FileNotFoundError, match=f"no Video_Games.jsonl.gz here.*pass --category {CAT}"):
        amazon2023.load("Video_Games", path=folder)


def test_blocks_keep_line_numbers(tmp_path):
    """Files are parsed in blocks of lines: results and line numbers must not depend on the block size."""
    path = write_reviews(tmp_path / REVIEWS_NAME)
    whole = amazon2023.read_reviews(path)
    assert amazon2023.read_reviews(path, block_bytes=300).equals(whole)
    lines = gzip.decompress(path.read_bytes()).decode().splitlines()
    lines[30] = lines[30].replace('"user_id"', '"reviewer"')  # line 31, in a later block
    lines.insert(5, "")  # a blank line before it: now line 32
    path.write_bytes(gzip.compress("\n".join(lines).encode()))
    for block in (300, 1 << 20):
        with pytest.raises(DataFormatError, match=rf"{re.escape(REVIEWS_NAME)}:32: field 'user_id' is missing"):
            amazon2023.read_reviews(path, block_bytes=block)


# ---------------------------------------------------------------- bad input


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = write_reviews(tmp_path / REVIEWS_NAME)
    lines = gzip.decompress(path.read_bytes()).decode().splitlines()
    lines[3] = lines[3][:-5]  # cut the end of line 4
    path.write_bytes(gzip.compress("\n".join(lines).encode()))
    with pytest.raises(DataFormatError, match=rf"{re.escape(REVIEWS_NAME)}:4: malformed JSON"):
        amazon2023.read_reviews(path)


@pytest.mark.parametrize("field", ["user_id", "parent_asin", "timestamp"])
def test_missing_or_null_review_field(tmp_path, field):
    records = [review_line(*r) for r in review_rows()[:4]]
    del records[2][field]
    records[3][field] = None
    path = write_gz_lines(tmp_path / REVIEWS_NAME, [json.dumps(r) for r in records])
    with pytest.raises(DataFormatError, match=rf"{re.escape(REVIEWS_NAME)}:3: field '{field}' is missing or null"):
        amazon2023.read_reviews(path)
    del records[2]
    path = write_gz_lines(tmp_path / REVIEWS_NAME, [json.dumps(r) for r in records])
    with pytest.raises(DataFormatError, match=rf":3: field '{field}' is missing or null"):
        amazon2023.read_reviews(path)


def test_bad_timestamp_and_non_object(tmp_path):
    records = [review_line(*r) for r in review_rows()[:3]]
    records[1]["timestamp"] = "2020-09-13"
    path = write_gz_lines(tmp_path / REVIEWS_NAME, [json.dumps(r) for r in records])
    with pytest.raises(DataFormatError, match=r":2: field 'timestamp' must be an integer"):
        amazon2023.read_reviews(path)
    path = write_gz_lines(tmp_path / REVIEWS_NAME, [json.dumps(records[0]), "[1, 2]"])
    with pytest.raises(DataFormatError, match=r":2: expected a JSON object"):
        amazon2023.read_reviews(path)


def test_empty_and_corrupt_files(tmp_path):
    reviews, meta = tmp_path / REVIEWS_NAME, tmp_path / META_NAME
    for path, reader in ((reviews, amazon2023.read_reviews), (meta, amazon2023.read_meta)):
        path.write_bytes(gzip.compress(b""))
        with pytest.raises(DataFormatError, match=rf"{re.escape(path.name)}: file is empty"):
            reader(path)
        path.write_bytes(gzip.compress(b"\n\n"))
        with pytest.raises(DataFormatError, match="file is empty"):
            reader(path)
    good = write_reviews(reviews).read_bytes()
    reviews.write_bytes(good[: len(good) // 2])  # a truncated download
    with pytest.raises(DataFormatError, match=rf"{re.escape(REVIEWS_NAME)}: not a valid gzip file"):
        amazon2023.read_reviews(reviews)


def test_bad_meta_lines(tmp_path):
    meta = tmp_path / META_NAME
    ok = json.dumps(meta_records()[0])
    write_gz_lines(meta, [ok, '{"title": "Capo", "parent_asin": "B0CAPO", "price": '])
    with pytest.raises(DataFormatError, match=rf"{re.escape(META_NAME)}:2: malformed meta record"):
        amazon2023.read_meta(meta)
    write_gz_lines(meta, [ok, "", json.dumps({"title": "Capo", "asin": "B0CAPO"})])
    with pytest.raises(DataFormatError, match=rf"{re.escape(META_NAME)}:3: meta record has no 'parent_asin'"):
        amazon2023.read_meta(meta, wanted={P["P1"]})


# ---------------------------------------------------------------- downloads end to end


def _site(root: Path) -> Path:
    """The upstream layout: raw/review_categories/<Cat>.jsonl.gz, raw/meta_categories/meta_<Cat>.jsonl.gz."""
    write_reviews(root / "review_categories" / REVIEWS_NAME)
    write_meta(root / "meta_categories" / META_NAME)
    return root


def _cache_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_download_success_reuse_and_resume(tmp_path):
    site = _site(tmp_path / "site")
    cache = tmp_path / "cache"
    review_path = f"review_categories/{REVIEWS_NAME}"
    with serve(site) as url:
        raw = amazon2023.load(CAT, cache_dir=cache, base_url=url)
        assert raw.events.height == 39 and raw.items.height == 5
        assert url.count(review_path) == 1 and url.count(f"meta_categories/{META_NAME}") == 1
        amazon2023.load(CAT, cache_dir=cache, base_url=url.rstrip("/"))
        assert url.count(review_path) == 1  # second run: from the cache
    assert _cache_files(cache) == [f"raw/amazon2023/{REVIEWS_NAME}", f"raw/amazon2023/{META_NAME}"]
    size = (site / review_path).stat().st_size
    with serve(site, truncate={review_path: (size // 2, 1)}) as url:
        with pytest.warns(UserWarning, match="item text missing"):
            raw = amazon2023.load(CAT, cache_dir=tmp_path / "c2", base_url=url, download_meta=False)
        assert [r.range for r in url.for_path(review_path)] == [None, f"bytes={size // 2}-"]
    assert raw.events.height == 39


def test_download_404_names_the_url(tmp_path):
    site = _site(tmp_path / "site")
    (site / "meta_categories" / META_NAME).unlink()
    cache = tmp_path / "cache"
    with serve(site) as url:
        with pytest.raises(DownloadError, match=re.escape(f"{url}meta_categories/{META_NAME}") + ": HTTP 404"):
            amazon2023.load(CAT, cache_dir=cache, base_url=url)
        with pytest.raises(DownloadError, match=re.escape(f"{url}review_categories/Video_Games.jsonl.gz") + ".*404"):
            amazon2023.load("Video_Games", cache_dir=cache, base_url=url)
    assert _cache_files(cache) == [f"raw/amazon2023/{REVIEWS_NAME}"]  # nothing of the failed files


# ---------------------------------------------------------------- registration: CLI and gin


def test_prepare_cli(folder, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "data.prepare", "amazon2023", "--category", CAT, "--path",
                           str(folder), "--max-history", "50", "--cache-dir", str(tmp_path / "cache")],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (out["users"], out["items"], out["interactions"], out["items_with_text"]) == (5, 5, 25, 4)
    assert out["valid_users"] == out["test_users"] == 5 and out["max_history"] == 50
    assert out["dataset"] == f"amazon2023-{CAT}"


@pytest.mark.parametrize("name,category", [("instruments", CAT), ("scientific", "Industrial_and_Scientific"),
                                           ("video_games", "Video_Games")])
def test_gin_configs(folder, tmp_path, name, category):
    if category != CAT:  # same fixture under the config's category name
        for f in (REVIEWS_NAME, META_NAME):
            (folder / f).rename(folder / f.replace(CAT, category))
    gin.clear_config()
    try:
        gin.parse_config_files_and_bindings(
            [str(ROOT / "configs" / "data" / f"amazon2023_{name}.gin")],
            [f"load_dataset.path = '{folder}'", f"load_dataset.cache_dir = '{tmp_path / 'cache'}'",
             "load_dataset.verbose = False"])
        ds = load_dataset()
    finally:
        gin.clear_config()
    assert ds.name == f"amazon2023-{category}" and ds.max_history == 50
    assert (ds.num_users, ds.num_items) == (5, 5)
