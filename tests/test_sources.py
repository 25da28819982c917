"""Source readers: real files from ../shared/data, fixtures in the upstream formats, bad input,
and the download path end to end against a local HTTP server."""

import gzip
import json
import shutil
import zipfile
from pathlib import Path

import polars as pl
import pytest

from data.download import DownloadError
from data.preprocess import preprocess
from data.sources import amazon2014, movielens, p5, recbole
from data.sources.base import DataFormatError
from data.text import item_texts
from tests.http_server import serve

# ---------------------------------------------------------------- fixtures in real formats

REVIEWS = [  # reviewerID, asin, unixReviewTime (out of order, with a tie)
    ("U1", "A", 300), ("U1", "B", 100), ("U2", "A", 50), ("U1", "C", 100), ("U2", "B", 60),
    ("U2", "C", 70), ("U3", "B", 10), ("U3", "C", 20), ("U3", "A", 30),
]


def write_reviews(path: Path, rows=REVIEWS) -> Path:
    lines = [json.dumps({"reviewerID": u, "asin": a, "reviewerName": "x", "helpful": [0, 0], "reviewText": "ok",
                         "overall": 5.0, "summary": "s", "unixReviewTime": t, "reviewTime": "01 1, 2014"})
             for u, a, t in rows]
    path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    return path


def write_meta(path: Path) -> Path:
    # 2014 meta files are Python literals (single quotes), not JSON.
    lines = [
        "{'asin': 'A', 'title': 'Red Lipstick', 'price': 9.5, 'brand': 'Acme', "
        "'categories': [['Beauty', 'Makeup'], ['Beauty', 'Lips']], 'salesRank': {'Beauty': 5}}",
        "{'asin': 'B', 'title': \"Women's Perfume\", 'categories': [['Beauty']], 'description': 'Floral &amp; fresh'}",
        "{'asin': 'C', 'categories': [['Beauty', 'Nails']]}",
        "{'asin': 'Z', 'title': 'not in the reviews'}",
    ]
    path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    return path


def ml_zip(path: Path, name: str = "ml-1m") -> Path:
    ratings = "1::10::5::978300760\n1::20::3::978302109\n2::10::4::978300000\n"
    movies = "10::Toy Story (1995)::Animation|Children's|Comedy\n20::Caf\xe9 Society (2016)::Drama\n"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{name}/ratings.dat", ratings)
        zf.writestr(f"{name}/movies.dat", movies.encode("latin-1"))
    return path


# ml-32m.zip's layout: one top folder; CSVs with a header, rows sorted by user then movie (not
# by time), titles quoted when they hold a comma or a quote, years in the title (a range for
# series, none for some), a trailing space, "(no genres listed)"; README, links and tags beside.
ML32M_RATINGS = ("userId,movieId,rating,timestamp\n"
                 "1,17,4.0,944249077\n1,25,1.0,944250228\n1,29,2.0,943230976\n1,30,5.0,944249077\n"
                 "2,17,3.5,1112486027\n2,29,0.5,1112484676\n")
ML32M_MOVIES = ('movieId,title,genres\n'
                '17,"American President, The (1995)",Comedy|Drama|Romance\n'
                '25,"""Great Performances"" Cats (1998)",Musical\n'
                '29,"City of Lost Children, The (Cité des enfants perdus, La) (1995)",Adventure|Drama|Fantasy\n'
                '30,Death Note: Desu nôto (2006–2007),(no genres listed)\n'
                '31,Babylon 5,Sci-Fi\n'
                '32,Runaway Brain (1995) ,Animation|Comedy|Sci-Fi\n')


def ml_csv_zip(path: Path, name: str = "ml-32m") -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(f"{name}/ratings.csv", ML32M_RATINGS)
        zf.writestr(f"{name}/movies.csv", ML32M_MOVIES.encode())
        zf.writestr(f"{name}/links.csv", "movieId,imdbId,tmdbId\n17,0112346,9087\n")
        zf.writestr(f"{name}/tags.csv", "userId,movieId,tag,timestamp\n1,17,politics,944249077\n")
        zf.writestr(f"{name}/README.txt", "Summary\n=======\n")
    return path


# ---------------------------------------------------------------- real data


def test_p5_beauty_counts(shared_data):
    beauty = shared_data / "amazon2014" / "beauty"
    raw = p5.load(beauty, items=beauty / "Amazon_Beauty.item.gz")
    tables = preprocess(raw)
    assert tables.stats["users"] == 22363
    assert tables.stats["items"] == 12101
    assert tables.stats["interactions"] == 198502  # 5-core filtering leaves the 5-core set unchanged
    assert tables.items["title"].is_not_null().sum() >= 12094
    # first-seen remapping reproduces the P5 ids (minus one) on the first line "1 1 2 3 4 5"
    assert tables.sequences["items"][0].to_list() == [0, 1, 2, 3, 4]
    row = tables.items.filter(pl.col("raw_id") == "B004756YJA").row(0, named=True)
    assert row["title"].startswith("OPI Nail Lacquer") and row["price"] == 12.0 and row["brand"] == "OPI"


def test_amazon_musical_instruments_raw_reviews(shared_data):
    folder = shared_data / "amazon2014" / "musical_instruments"
    with pytest.warns(UserWarning, match="item text missing"):
        raw = amazon2014.load("Musical_Instruments", path=folder)
    stats = preprocess(raw).stats
    assert (stats["users"], stats["items"], stats["interactions"]) == (1429, 900, 10261)
    assert any("item text missing" in n for n in stats["notes"])


def test_wrong_category_names_the_review_files_found(tmp_path):
    (tmp_path / "reviews_Musical_Instruments_5.json.gz").write_bytes(gzip.compress(b""))
    with pytest.raises(FileNotFoundError, match="no reviews_Beauty_5.json.gz.*pass --category Musical_Instruments"):
        amazon2014.load("Beauty", path=tmp_path)


def test_movielens_100k_and_latest_small(shared_data):
    ml100k = movielens.load("100k", path=shared_data / "movielens" / "ml-100k")
    assert ml100k.events.height == 100000 and ml100k.items.height == 1682
    toy = ml100k.items.filter(pl.col("raw_id") == "1").row(0, named=True)
    assert (toy["title"], toy["year"]) == ("Toy Story", 1995)
    assert toy["genres"] == "Animation, Children's, Comedy"
    small = movielens.load("latest-small", path=shared_data / "movielens" / "ml-latest-small")
    assert small.events.height == 100836 and small.items.height == 9742
    jumanji = small.items.filter(pl.col("raw_id") == "2").row(0, named=True)
    assert (jumanji["title"], jumanji["year"], jumanji["genres"]) == ("Jumanji", 1995, "Adventure, Children, Fantasy")


def test_movielens_1m_dat_format(shared_data, tmp_path):
    src = shared_data / "movielens" / "ml-1m"
    shutil.copy(src / "ratings_first10_per_user.dat", tmp_path / "ratings.dat")  # only a subset ships
    shutil.copy(src / "movies.dat", tmp_path / "movies.dat")
    raw = movielens.load("1m", path=tmp_path)
    assert raw.events.height == 60400 and raw.events["user"].n_unique() == 6040
    assert raw.items.height == 3883
    first = raw.events.row(0, named=True)
    assert (first["user"], first["item"], first["timestamp"]) == ("1", "1193", 978300760)


# ---------------------------------------------------------------- format details


def test_amazon_orders_by_time_ties_keep_file_order(tmp_path):
    write_reviews(tmp_path / "reviews_Beauty_5.json.gz")
    write_meta(tmp_path / "meta_Beauty.json.gz")
    tables = preprocess(amazon2014.load("Beauty", path=tmp_path), preprocess_opts(k=1))
    seqs = {r["raw_user"]: r["items"] for r in tables.sequences.iter_rows(named=True)}
    raw_of = dict(zip(tables.items["item_id"], tables.items["raw_id"]))
    # U1: B(100) and C(100) tie -> file order B then C; A(300) last
    assert [raw_of[i] for i in seqs["U1"]] == ["B", "C", "A"]
    assert [raw_of[i] for i in seqs["U3"]] == ["B", "C", "A"]
    items = {r["raw_id"]: r for r in tables.items.iter_rows(named=True)}
    assert items["A"]["categories"] == "Beauty, Makeup, Lips" and items["A"]["price"] == 9.5
    assert items["B"]["title"] == "Women's Perfume"
    assert items["C"]["title"] is None  # no title in the meta record
    assert "Z" not in items


def preprocess_opts(k):
    from data.preprocess import PreprocessOptions
    return PreprocessOptions(min_count=k)


def test_recbole_atomic(tmp_path):
    (tmp_path / "toy.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        "u1\ti1\t5\t3\nu1\ti2\t4\t1\nu1\ti3\t4\t2\n")
    (tmp_path / "toy.item").write_text(
        'item_id:token\ttitle:token\tcategories:token_seq\tprice:float\n'
        'i1\t"A ""quoted""\ntitle"\t\'Beauty\', "Women\'s"\t1.5\n'
        'i2\tPlain\t\'Beauty\'\t\n')
    raw = recbole.load(tmp_path, name="toy")
    assert raw.items.filter(pl.col("raw_id") == "i1")["title"][0] == 'A "quoted"\ntitle'
    assert raw.items.filter(pl.col("raw_id") == "i1")["categories"][0] == "Beauty, Women's"
    tables = preprocess(raw, preprocess_opts(k=1))
    order = tables.sequences["items"][0].to_list()
    assert [tables.items["raw_id"][i] for i in order] == ["i2", "i3", "i1"]


# ---------------------------------------------------------------- bad input


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = write_reviews(tmp_path / "reviews_Beauty_5.json.gz")
    lines = gzip.decompress(path.read_bytes()).decode().splitlines()
    lines[3] = lines[3][:-5]  # cut the closing of line 4
    path.write_bytes(gzip.compress("\n".join(lines).encode()))
    with pytest.raises(DataFormatError, match=r"reviews_Beauty_5\.json\.gz:4: malformed JSON"):
        amazon2014.read_reviews(path)


def test_missing_field_and_empty_file(tmp_path):
    path = tmp_path / "reviews_Beauty_5.json.gz"
    path.write_bytes(gzip.compress(b'{"reviewerID": "u", "asin": "a"}\n'))
    with pytest.raises(DataFormatError, match=r"\.json\.gz:1: field .unixReviewTime. is missing"):
        amazon2014.read_reviews(path)
    path.write_bytes(gzip.compress(b'{"reviewerID": "u", "asin": "a", "unixReviewTime": 1}\n'
                                   b'{"reviewerID": "u", "asin": "b", "unixReviewTime": null}\n'))
    with pytest.raises(DataFormatError, match=r"\.json\.gz:2: field 'unixReviewTime'"):
        amazon2014.read_reviews(path)
    path.write_bytes(gzip.compress(b""))
    with pytest.raises(DataFormatError, match="empty"):
        amazon2014.read_reviews(path)


def test_bad_meta_line(tmp_path):
    meta = tmp_path / "meta_Beauty.json.gz"
    meta.write_bytes(gzip.compress(b"{'asin': 'A', 'title': 'x'}\n{'asin': 'B', 'title': \n"))
    with pytest.raises(DataFormatError, match=r"meta_Beauty\.json\.gz:2: malformed meta"):
        amazon2014.read_meta(meta)


def test_bad_p5_and_recbole_and_csv(tmp_path):
    (tmp_path / "sequential_data.txt").write_text("1 1 2 3\n2 4 x 6\n")
    with pytest.raises(DataFormatError, match=r"sequential_data\.txt:2: ids must be integers"):
        p5.load(tmp_path)
    (tmp_path / "sequential_data.txt").write_text("")
    with pytest.raises(DataFormatError, match="empty"):
        p5.load(tmp_path)
    (tmp_path / "bad.inter").write_text("user_id\titem_id:token\nu\ti\n")
    with pytest.raises(DataFormatError, match="lacks a ':type' suffix"):
        recbole.load(tmp_path / "bad.inter")
    (tmp_path / "x.inter").write_text("user_id:token\tts:float\nu\t1\n")
    with pytest.raises(DataFormatError, match=r"missing field\(s\) \['item_id'\]"):
        recbole.load(tmp_path / "x.inter")
    ml = tmp_path / "ml"
    ml.mkdir()
    (ml / "ratings.csv").write_text("user,movie,rating,timestamp\n1,2,3,4\n")
    (ml / "movies.csv").write_text("movieId,title,genres\n2,X (2000),Drama\n")
    with pytest.raises(DataFormatError, match=r"ratings\.csv:1: expected header"):
        movielens.load("32m", path=ml)
    for body, message in [("1,abc,3.0,5", r"ratings\.csv:3: field 'movieId' must be an integer"),
                          ("1,3,,5", r"ratings\.csv:3: field 'rating' must be a number, got '1,3,,5'"),
                          ("1,3,4.0", r"ratings\.csv:3: expected 4 fields"),
                          ("1,3,4.0,5,6", r"ratings\.csv:3: expected 4 fields"),
                          ("1,3,4.0,1e9", r"ratings\.csv:3: field 'timestamp' must be an integer")]:
        (ml / "ratings.csv").write_text(f"userId,movieId,rating,timestamp\n1,2,3.0,4\n{body}\n")
        with pytest.raises(DataFormatError, match=message):
            movielens.load("32m", path=ml)
    dat = tmp_path / "dat"
    dat.mkdir()
    (dat / "ratings.dat").write_text("1::2::3::4\n1::2::x::5\n")
    (dat / "movies.dat").write_text("2::X (2000)::Drama\n")
    with pytest.raises(DataFormatError, match=r"ratings\.dat:2: malformed rating"):
        movielens.load("1m", path=dat)


# ---------------------------------------------------------------- downloads end to end


def _cache_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_amazon_download_success_and_reuse(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    write_reviews(site / "reviews_Beauty_5.json.gz")
    write_meta(site / "meta_Beauty.json.gz")
    cache = tmp_path / "cache"
    with serve(site) as url:
        raw = amazon2014.load("Beauty", cache_dir=cache, base_url=url)
        assert raw.events.height == len(REVIEWS) and raw.items.height == 3
        assert url.count("reviews_Beauty_5.json.gz") == 1
        amazon2014.load("Beauty", cache_dir=cache, base_url=url)
        assert url.count("reviews_Beauty_5.json.gz") == 1  # second run: from the cache
    assert _cache_files(cache) == ["raw/amazon2014/meta_Beauty.json.gz", "raw/amazon2014/reviews_Beauty_5.json.gz"]


def test_amazon_download_truncated_is_resumed(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    size = write_reviews(site / "reviews_Beauty_5.json.gz").stat().st_size
    write_meta(site / "meta_Beauty.json.gz")
    with serve(site, truncate={"reviews_Beauty_5.json.gz": (size // 2, 1)}) as url:
        raw = amazon2014.load("Beauty", cache_dir=tmp_path / "cache", base_url=url)
        assert [r.range for r in url.for_path("reviews_Beauty_5.json.gz")] == [None, f"bytes={size // 2}-"]
    assert raw.events.height == len(REVIEWS)


def test_download_failures_leave_no_file(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    write_reviews(site / "reviews_Beauty_5.json.gz")
    ml_zip(site / "ml-1m.zip")
    cache = tmp_path / "cache"
    with serve(site, truncate={"ml-1m.zip": 20}) as url:
        # 404: meta file absent upstream
        with pytest.raises(DownloadError, match="404"):
            amazon2014.load("Beauty", cache_dir=cache, base_url=url)
        assert not (cache / "raw" / "amazon2014" / "meta_Beauty.json.gz").exists()
        # checksum mismatch
        with pytest.raises(DownloadError, match="sha256"):
            amazon2014.load("Beauty", cache_dir=tmp_path / "c2", base_url=url, download_meta=False,
                            checksums={"reviews_Beauty_5.json.gz": "0" * 64})
        assert _cache_files(tmp_path / "c2") == []
        # truncated every time: only the resumable .part remains, never a file under the real name
        with pytest.raises(DownloadError, match="resume"):
            movielens.load("1m", cache_dir=tmp_path / "c3", base_url=url)
        assert _cache_files(tmp_path / "c3") == ["raw/movielens/ml-1m.zip.part"]


def test_movielens_zip_download_and_corrupt_zip(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    ml_zip(site / "ml-1m.zip")
    good = (site / "ml-1m.zip").read_bytes()
    with serve(site) as url:
        raw = movielens.load("1m", cache_dir=tmp_path / "cache", base_url=url)
    assert raw.events.height == 3
    assert raw.items.filter(pl.col("raw_id") == "20")["title"][0] == "Caf\xe9 Society"
    assert _cache_files(tmp_path / "cache") == ["raw/movielens/ml-1m.zip", "raw/movielens/ml-1m/movies.dat",
                                                "raw/movielens/ml-1m/ratings.dat"]
    # a complete transfer of a damaged archive: detected when unzipping, archive removed
    (site / "ml-1m.zip").write_bytes(good[: len(good) // 2] + bytes(len(good) - len(good) // 2))
    with serve(site) as url:
        with pytest.raises(DownloadError, match="zip"):
            movielens.load("1m", cache_dir=tmp_path / "c2", base_url=url)
    assert _cache_files(tmp_path / "c2") == []


def test_movielens_32m_download_csv_layout(tmp_path):
    """ml-32m.zip from the GroupLens URL layout, through load_dataset (what configs/data/ml32m.gin
    runs), then from the cache without the network."""
    from data.prepare import load_dataset

    assert movielens.DEFAULT_BASE_URL + "ml-32m.zip" == "https://files.grouplens.org/datasets/movielens/ml-32m.zip"
    site = tmp_path / "site"
    site.mkdir()
    ml_csv_zip(site / "ml-32m.zip")
    cache = tmp_path / "cache"
    with serve(site) as url:
        ds = load_dataset("movielens", version="32m", base_url=url, cache_dir=str(cache), min_count=1, verbose=False)
        assert url.count("ml-32m.zip") == 1
        raw = movielens.load("32m", cache_dir=cache, base_url=url)  # unpacked folder reused
        assert url.count("ml-32m.zip") == 1
    assert sorted(p.name for p in (cache / "raw" / "movielens" / "ml-32m").iterdir()) == [
        "README.txt", "links.csv", "movies.csv", "ratings.csv", "tags.csv"]
    assert raw.events.height == 6 and raw.events["user"].dtype.is_integer()
    items = {r["raw_id"]: r for r in raw.items.iter_rows(named=True)}
    assert (items["17"]["title"], items["17"]["year"]) == ("The American President", 1995)
    assert items["17"]["genres"] == "Comedy, Drama, Romance"
    assert items["25"]["title"] == '"Great Performances" Cats'
    assert items["29"]["title"] == "The City of Lost Children (Cité des enfants perdus, La)"
    assert (items["30"]["title"], items["30"]["year"], items["30"]["genres"]) == ("Death Note: Desu nôto", 2006, None)
    assert (items["31"]["title"], items["31"]["year"]) == ("Babylon 5", None)
    assert (items["32"]["title"], items["32"]["year"]) == ("Runaway Brain", 1995)
    # user 2 has 2 ratings, too few for leave-one-out; user 1's in time order (the file is sorted
    # by movie), the tie of 17 and 30 at 944249077 in file order
    raw_of = ds.items["raw_id"].to_list()
    assert ds.raw_users == ["1"] and [raw_of[i] for i in ds.sequence(0)] == ["29", "17", "30", "25"]
    texts = item_texts(ds.items)
    assert texts[raw_of.index("17")] == "Title: The American President. Genres: Comedy, Drama, Romance. Year: 1995."


def test_movie_titles_year_and_article():
    titles = ["Toy Story (1995)", "Runaway Brain (1995) ", "Babylon 5", "Sherlock (2010– )",
              "Good, the Bad and the Ugly, The (Buono, il brutto, il cattivo, Il) (1966)",
              "Auberge espagnole, L' (2002)", "Misérables, Les (1995)", "Few Good Men, A (1992)",
              "Hello, Dolly! (1969)", "1900 (Novecento) (1976)", "(500) Days of Summer (2009)"]
    got = pl.DataFrame({"t": titles}).select(movielens._split_title(pl.col("t"))).rows()
    assert got == [("Toy Story", 1995), ("Runaway Brain", 1995), ("Babylon 5", None), ("Sherlock", 2010),
                   ("The Good, the Bad and the Ugly (Buono, il brutto, il cattivo, Il)", 1966),
                   ("L'Auberge espagnole", 2002), ("Les Misérables", 1995), ("A Few Good Men", 1992),
                   ("Hello, Dolly!", 1969), ("1900 (Novecento)", 1976), ("(500) Days of Summer", 2009)]
