"""bench/gpu_reproduce.sh --smoke: the GPU reproduction script end to end on a CPU (a P5 fixture
carried as bench/gpu_prepare.sh carries Beauty, the tiny recipes on top of the GPU configs): every
stage ends ok and writes its JSON line with test metrics, then the summary line. And the
``file:`` item embeddings that carry Beauty's MiniLM vectors to a machine without the encoder."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest

from data import text
from data.prepare import load_item_embeddings

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("tiger", "sasrec", "gpt", "actionpiece")


def test_gpu_reproduce_smoke(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "WORK": str(tmp_path / "work"), "OMP_NUM_THREADS": "1",
           "PYTHON": sys.executable, "STAGES": "rqvae tiger sasrec gpt actionpiece"}
    proc = subprocess.run(["bash", "bench/gpu_reproduce.sh", "--smoke"], cwd=ROOT, env=env, capture_output=True,
                          text=True)
    results = tmp_path / "out" / "results.jsonl"
    assert results.is_file(), proc.stderr[-3000:]
    lines = [json.loads(line) for line in results.read_text().splitlines()]
    by_stage = {line["stage"]: line for line in lines}
    assert [line["stage"] for line in lines] == ["setup", "rqvae", *MODELS, "summary"], proc.stderr[-3000:]
    failed = {s: line.get("error") for s, line in by_stage.items() if line.get("status", "ok") != "ok"}
    assert not failed, failed
    assert proc.returncode == 0, proc.stderr[-3000:]

    setup = by_stage["setup"]
    assert setup["smoke"] is True and setup["torch"] and "polars" in setup
    rqvae = by_stage["rqvae"]
    assert 0 <= rqvae["collision_rate"] <= 1 and rqvae["result"]["unique_after_dedup"] is True
    for stage in MODELS:
        line = by_stage[stage]
        assert line["minutes"] > 0 and 0 < line["max_train_minutes"] <= 2.5
        for split in ("valid", "test", "popularity"):
            assert set(line[split]) >= {"recall@10", "ndcg@10"}, (stage, split)
            assert all(0 <= v <= 1 for v in line[split].values()), (stage, split)
        assert line["result"]["dataset"] == "p5-beauty"
        assert (tmp_path / "out" / line["log"]).is_file()
    # The fixture is learnable: the ID baseline beats popularity.
    assert by_stage["sasrec"]["test"]["ndcg@10"] > by_stage["sasrec"]["popularity"]["ndcg@10"]
    summary = by_stage["summary"]
    assert summary["ok"] is True and summary["smoke"] is True and summary["total_minutes"] > 0
    assert set(summary["stages"]) == {"setup", "rqvae", *MODELS}
    assert all(s["status"] == "ok" and s["minutes"] >= 0 for s in summary["stages"].values())


class FakeEncoder:
    def encode(self, texts, batch_size, show_progress_bar, convert_to_numpy, normalize_embeddings):
        seeds = [int.from_bytes(hashlib.sha256(t.encode()).digest()[:4], "little") for t in texts]
        return np.array([np.random.default_rng(s).normal(size=5) for s in seeds], dtype=np.float32)


def items(titles, raw_ids=None):
    raw_ids = raw_ids or [f"R{i}" for i in range(len(titles))]
    return pl.DataFrame({"item_id": list(range(len(titles))), "raw_id": raw_ids, "title": titles})


def test_embeddings_file_is_checked_against_items_and_texts(tmp_path, monkeypatch):
    monkeypatch.setattr(text, "_load_encoder", lambda name, device: FakeEncoder())
    table = items(["Red lipstick", None, "Green soap"])  # an item without text: "Item R1", as embedded
    with pytest.warns(UserWarning, match="1 of 3 items have no text"):
        emb = text.embed_items(table, tmp_path / "cache", model="fake", normalize=False)
    manifest = next((tmp_path / "cache").glob("embeddings-*.json"))
    copy = tmp_path / "carry" / "beauty-minilm.npy"
    copy.parent.mkdir()
    shutil.copyfile(manifest.with_suffix(".npy"), copy)
    shutil.copyfile(manifest, copy.with_suffix(".json"))
    monkeypatch.setattr(text, "_load_encoder", lambda *a: pytest.fail("the file needs no encoder"))
    got = load_item_embeddings(SimpleNamespace(items=table), model=f"file:{copy}")
    np.testing.assert_array_equal(got, emb)
    with pytest.raises(ValueError, match="other items"):
        text.load_embedding_file(items(["Red lipstick", None, "Green soap"], ["R0", "R2", "R1"]), copy)
    with pytest.raises(ValueError, match="other items"):
        text.load_embedding_file(items(["Red lipstick", None]), copy)
    with pytest.raises(ValueError, match="texts differ"):
        text.load_embedding_file(items(["Red lipstick", None, "Blue soap"]), copy)
    copy.with_suffix(".json").unlink()
    with pytest.raises(FileNotFoundError, match="beauty-minilm.json"):
        text.load_embedding_file(table, copy)
