"""Dedup level, collision/usage metrics, ItemCodeTable, SemanticIdTokenizer save/load, PNG plot."""

import json
import math
import struct
import zlib
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modules.quantizers.fsq import FSQConfig, FSQTokenizer
from modules.quantizers.rqkmeans import RQKMeans, RQKMeansConfig
from modules.quantizers.rqvae import RQVAE, RQVAEConfig
from modules.semantic_ids import (
    ItemCodeTable,
    SemanticIdTokenizer,
    add_dedup_level,
    codebook_perplexity,
    codebook_usage,
    collision_stats,
    plot_codebook_usage,
)

code_tables = st.integers(1, 3).flatmap(
    lambda length: st.lists(st.lists(st.integers(0, 3), min_size=length, max_size=length), min_size=1, max_size=60)
)


def naive_dedup(rows):
    seen = defaultdict(int)
    out = []
    for row in rows:
        out.append(list(row) + [seen[tuple(row)]])
        seen[tuple(row)] += 1
    return out


# ----------------------------------------------------------------------------- dedup


@settings(max_examples=150, deadline=None)
@given(code_tables)
def test_dedup_matches_naive_reference_and_rows_are_unique(rows):
    codes = torch.tensor(rows)
    out = add_dedup_level(codes)
    assert out.tolist() == naive_dedup(rows)
    assert torch.unique(out, dim=0).shape[0] == len(rows)
    assert collision_stats(out)["collision_rate"] == 0.0


@settings(max_examples=50, deadline=None)
@given(code_tables)
def test_dedup_raises_exactly_when_a_group_overflows(rows):
    codes = torch.tensor(rows)
    largest = collision_stats(codes)["max_group"]
    assert add_dedup_level(codes, max_size=largest).shape == (len(rows), codes.shape[1] + 1)
    if largest > 1:
        with pytest.raises(ValueError, match=f"largest group has {largest} items.*only {largest - 1} codes"):
            add_dedup_level(codes, max_size=largest - 1)


def test_dedup_known_answer_and_bad_input():
    codes = torch.tensor([[1, 2], [0, 0], [1, 2], [1, 2], [0, 1]])
    assert add_dedup_level(codes)[:, 2].tolist() == [0, 0, 1, 2, 0]
    with pytest.raises(ValueError, match="raise max_size or lower collisions"):
        add_dedup_level(codes, max_size=2)
    with pytest.raises(ValueError, match=">= 0"):
        add_dedup_level(torch.tensor([[0, -1]]))
    with pytest.raises(ValueError, match=r"\(N, L\)"):
        add_dedup_level(torch.tensor([0, 1]))


# ----------------------------------------------------------------------------- metrics


def test_collision_stats_known_answers():
    codes = torch.tensor([[0, 0], [0, 0], [0, 0], [1, 0], [1, 1], [1, 1], [2, 3]])
    assert collision_stats(codes) == {
        "collision_rate": 5 / 7,
        "max_group": 3,
        "num_groups": 4,
        "items_in_collisions": 5,
    }
    unique = torch.tensor([[0, 1], [1, 0], [1, 1]])
    assert collision_stats(unique) == {"collision_rate": 0.0, "max_group": 1, "num_groups": 3, "items_in_collisions": 0}
    assert collision_stats(torch.zeros(4, 3, dtype=torch.long))["collision_rate"] == 1.0


def test_codebook_usage_and_perplexity_known_answers():
    codes = torch.tensor([[0, 0], [1, 0], [2, 0], [3, 0]])
    assert codebook_usage(codes, [8, 4]) == [0.5, 0.25]
    assert codebook_perplexity(codes, [8, 4]) == pytest.approx([4.0, 1.0])
    skewed = torch.tensor([[0], [0], [1], [1], [1], [1]])  # p = (1/3, 2/3)
    expected = math.exp(-(1 / 3 * math.log(1 / 3) + 2 / 3 * math.log(2 / 3)))
    assert codebook_perplexity(skewed) == pytest.approx([expected])
    with pytest.raises(ValueError, match=r"codes\[:, 0\]: code 3 >= codebook size 2"):
        codebook_usage(codes, [2, 4])
    with pytest.raises(ValueError, match="2 sizes for 1 code levels"):
        codebook_usage(skewed, [2, 2])


# ----------------------------------------------------------------------------- ItemCodeTable


def test_item_code_table_round_trip():
    g = torch.Generator().manual_seed(0)
    codes = add_dedup_level(torch.randint(0, 16, (500, 3), generator=g))
    table = ItemCodeTable(codes)
    ids = torch.randperm(500, generator=g)
    assert torch.equal(table.ids_of(table.codes_of(ids)), ids)
    assert torch.equal(table.ids_of(codes.view(50, 10, 4)), torch.arange(500).view(50, 10))  # any batch shape
    unknown = torch.tensor([[15, 15, 15, 99], [0, 0, 0, 7]])
    assert table.ids_of(unknown).tolist() == [-1, -1]


def test_item_code_table_hash_mode_for_huge_code_spaces():
    # 2^20 codes per level over 4 levels: 2^80 combinations do not fit an int64 key.
    sizes = [2**20] * 4
    g = torch.Generator().manual_seed(1)
    codes = torch.unique(torch.randint(0, 2**20, (2000, 4), generator=g), dim=0)
    table = ItemCodeTable(codes, sizes)
    assert torch.equal(table.ids_of(codes), torch.arange(len(codes)))
    miss = codes[:5].clone()
    miss[:, 0] += 1  # levels beyond the 64 bits of an exact key must still matter
    assert not (miss[:, None] == codes[None]).all(-1).any()
    assert table.ids_of(miss).tolist() == [-1] * 5


def test_item_code_table_rejects_duplicates():
    with pytest.raises(ValueError, match=r"items 0 and 2 share the code \(1, 2\).*add_dedup_level"):
        ItemCodeTable(torch.tensor([[1, 2], [0, 0], [1, 2]]))


# ----------------------------------------------------------------------------- tokenizer


def _embeddings(n=120, dim=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, dim, generator=g)[torch.arange(n) % 8] + 0.3 * torch.randn(n, dim, generator=g)


def _quantizer(kind, x):
    torch.manual_seed(0)
    if kind == "rqvae":
        q = RQVAE(RQVAEConfig(input_dim=x.shape[1], hidden_dims=[32], latent_dim=8, codebook_size=16))
        q.init_codebooks(x)
        q.train()(x)  # touch usage buffers so that non-default state must round-trip
        return q.eval()
    if kind == "fsq":
        cfg = FSQConfig(input_dim=x.shape[1], hidden_dims=[32], fsq_levels=[3, 3, 3], num_levels=2)
        return FSQTokenizer(cfg).eval()
    q = RQKMeans(RQKMeansConfig(num_levels=2, codebook_size=8, normalize=True, balanced=True))
    q.fit(x)
    return q


@pytest.mark.parametrize("kind", ["rqvae", "fsq", "rqkmeans"])
def test_save_load_round_trip(kind, tmp_path):
    x = _embeddings()
    q = _quantizer(kind, x)
    item_codes = add_dedup_level(q.encode(x))
    raw_ids = [f"B{i:05d}" for i in range(len(x))]
    tok = SemanticIdTokenizer(q, item_codes, raw_ids=raw_ids)
    assert tok.kind == kind
    assert tok.codebook_sizes == q.codebook_sizes + [int(item_codes[:, -1].max()) + 1]
    tok.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {
        "config.json", "model.safetensors", "item_codes.safetensors", "raw_ids.json", "README.md",
    }  # and no temp files left behind
    loaded = SemanticIdTokenizer.from_pretrained(str(tmp_path))
    assert loaded.kind == kind and loaded.codebook_sizes == tok.codebook_sizes
    assert torch.equal(loaded.item_codes, item_codes)
    assert torch.equal(loaded.encode(x), q.encode(x))
    assert torch.equal(loaded.encode(x), item_codes[:, :-1])
    new_items = _embeddings(seed=1)
    assert torch.equal(loaded.encode(new_items), q.encode(new_items))
    loaded.check_raw_ids(raw_ids)
    with pytest.raises(ValueError, match="item_id 3 is 'X' in your data but 'B00003'"):
        loaded.check_raw_ids(raw_ids[:3] + ["X"] + raw_ids[4:])
    assert torch.equal(loaded.table.ids_of(item_codes[[5, 7]]), torch.tensor([5, 7]))


def test_codes_only_tokenizer_round_trip(tmp_path):
    codes = add_dedup_level(torch.tensor([[0, 1], [0, 1], [2, 2]]))
    tok = SemanticIdTokenizer(None, codes, codebook_sizes=[4, 4, 3])
    tok.save_pretrained(tmp_path)
    assert not (tmp_path / "model.safetensors").exists()
    loaded = SemanticIdTokenizer.from_pretrained(tmp_path)
    assert loaded.kind is None and loaded.quantizer is None and loaded.raw_ids is None
    assert torch.equal(loaded.item_codes, codes) and loaded.codebook_sizes == [4, 4, 3]
    with pytest.raises(RuntimeError, match="no quantizer"):
        loaded.encode(torch.zeros(1, 3))


@pytest.mark.parametrize("missing", ["config.json", "model.safetensors", "item_codes.safetensors", "raw_ids.json"])
def test_missing_file_is_named(missing, tmp_path):
    x = _embeddings()
    q = _quantizer("rqkmeans", x)
    raw_ids = [str(i) for i in range(len(x))]
    SemanticIdTokenizer(q, add_dedup_level(q.encode(x)), raw_ids=raw_ids).save_pretrained(tmp_path)
    (tmp_path / missing).unlink()
    with pytest.raises(FileNotFoundError, match=missing.replace(".", r"\.")):
        SemanticIdTokenizer.from_pretrained(tmp_path)


def test_inconsistent_files_are_reported(tmp_path):
    x = _embeddings()
    q = _quantizer("rqkmeans", x)
    SemanticIdTokenizer(q, add_dedup_level(q.encode(x))).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["num_items"] += 1
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="item_codes.safetensors: tensor 'item_codes' has shape"):
        SemanticIdTokenizer.from_pretrained(tmp_path)
    config["num_items"] -= 1
    config["quantizer_config"]["codebook_size"] = 9  # weights no longer fit
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="model.safetensors: weights do not match"):
        SemanticIdTokenizer.from_pretrained(tmp_path)
    config["quantizer_config"]["bogus"] = 1
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="field 'quantizer_config'"):
        SemanticIdTokenizer.from_pretrained(tmp_path)


def test_tokenizer_validates_codes():
    with pytest.raises(ValueError, match="code 5 >= codebook size 4"):
        SemanticIdTokenizer(None, torch.tensor([[5, 0]]), codebook_sizes=[4, 4])
    with pytest.raises(ValueError, match="raw_ids: 1 ids for 2 items"):
        SemanticIdTokenizer(None, torch.tensor([[0], [1]]), raw_ids=["a"])


# ----------------------------------------------------------------------------- plot


def read_png(path: Path) -> np.ndarray:
    """Decoder for the PNGs we write (8-bit RGB, filter 0)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, (w, h) = 8, b"", (0, 0)
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        tag, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(tag + body) & 0xFFFFFFFF
        if tag == b"IHDR":
            w, h, depth, color = struct.unpack(">IIBB", body[:10])
            assert (depth, color) == (8, 2)
        elif tag == b"IDAT":
            idat += body
        pos += 12 + length
    rows = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(h, 1 + 3 * w)
    assert (rows[:, 0] == 0).all()
    return rows[:, 1:].reshape(h, w, 3)


def test_plot_codebook_usage_draws_bars_in_proportion(tmp_path):
    # Level 0: codes 0..3 used 4, 2, 1, 0 times. Level 1: a single code.
    codes = torch.tensor([[0, 0]] * 4 + [[1, 0]] * 2 + [[2, 0]])
    path = plot_codebook_usage(codes, [4, 1], tmp_path / "usage.png", width=400)
    assert path == tmp_path / "usage.png"
    img = read_png(path)
    assert img.shape[1] == 400 + 16 and img.shape[0] > 200
    blue = (img == [40, 90, 200]).all(-1)
    red = (img == [220, 30, 30]).all(-1)
    panel = blue[: img.shape[0] // 2]  # level 0 panel
    heights = [int(panel[:, 8 + 100 * c + 50].sum()) for c in range(4)]  # middle of each bar
    assert heights == [100, 50, 25, 0]
    assert red[: img.shape[0] // 2, 8 + 350].any() and not red[: img.shape[0] // 2, 8 + 50].any()
    assert list(tmp_path.iterdir()) == [path]


def test_plot_group_sizes_and_curves(tmp_path):
    from modules.plots import plot_curves, plot_group_sizes
    from modules.semantic_ids import collision_group_sizes

    codes = torch.tensor([[0, 0]] * 3 + [[0, 1]] * 3 + [[1, 1]])  # groups of 3, 3 and 1
    assert sorted(collision_group_sizes(codes)) == [1, 3, 3]
    img = read_png(plot_group_sizes(collision_group_sizes(codes), tmp_path / "groups.png", width=300))
    blue = (img == [40, 90, 200]).all(-1).sum(0)  # size 1: 1 item; size 3: 6 items (red)
    red = (img == [220, 30, 30]).all(-1).sum(0)
    assert red.max() == 120 and blue.max() == 20  # bars in proportion to items: 6 -> 120 px, 1 -> 20
    img = read_png(plot_curves([("loss", [0, 10], [2.0, 1.0]), ("valid", [], [])], tmp_path / "c.png", width=100))
    curve = (img == [40, 90, 200]).all(-1)
    assert curve[:, 8].any() and curve[:, 107].any() and list(tmp_path.iterdir()) != []
    top_left = np.flatnonzero(curve[:, 8])[0]
    assert top_left < np.flatnonzero(curve[:, 107])[0]  # the loss falls from left to right
