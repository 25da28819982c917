"""The data.prepare CLI: the last stdout line is one JSON object with the dataset statistics."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_prepare(*args: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "data.prepare", *args], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_prepare_movielens_100k(shared_data, tmp_path):
    out = run_prepare("movielens", "--version", "100k", "--path", str(shared_data / "movielens" / "ml-100k"),
                      "--cache-dir", str(tmp_path))
    assert out["users"] == 943 and out["valid_users"] == out["test_users"] == 943
    assert out["items"] == 1349 and out["interactions"] == 99287 and out["items_with_text"] == 1349
    assert out["train_examples"] == out["interactions"] - 3 * out["users"]


def test_prepare_p5_folder_with_recbole_items(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "sequential_data.txt").write_text("1 1 2 3\n2 2 3 1 4\n")
    (data / "toy.item").write_text("item_id:token\ttitle:token\n1\tRed\n2\tBlue\n3\t\n")
    out = run_prepare("p5", "--path", str(data), "--items", str(data / "toy.item"), "--min-count", "1",
                      "--cache-dir", str(tmp_path / "cache"))
    assert (out["users"], out["items"], out["interactions"], out["items_with_text"]) == (2, 4, 7, 2)
    assert out["train_examples"] == 0 + 1


def test_prepare_bad_input_exits_with_message(tmp_path):
    (tmp_path / "sequential_data.txt").write_text("1 1 2 3\n2 x\n")
    proc = subprocess.run([sys.executable, "-m", "data.prepare", "p5", "--path", str(tmp_path), "--cache-dir",
                           str(tmp_path / "c")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0 and "sequential_data.txt:2" in proc.stderr


def test_cache_follows_file_contents_not_paths_or_mtimes(tmp_path):
    """A fresh copy of the same input files (another folder, new mtimes) reuses the cache; an
    edited file does not."""
    import os
    import shutil

    from data.prepare import load_dataset

    first = tmp_path / "a" / "beauty"
    first.mkdir(parents=True)
    (first / "sequential_data.txt").write_text("1 1 2 3\n2 2 3 1 4\n3 1 2 4\n")
    copy = tmp_path / "b" / "beauty"
    shutil.copytree(first, copy)
    os.utime(copy / "sequential_data.txt", (1_000_000, 1_000_000))

    def path_of(folder):
        return load_dataset(source="p5", path=str(folder), min_count=1, cache_dir=str(tmp_path / "cache"),
                            verbose=False).path

    assert path_of(first) == path_of(copy)
    (copy / "sequential_data.txt").write_text("1 1 2 3\n2 2 3 1 4\n3 1 2 3\n")
    assert path_of(copy) != path_of(first)
