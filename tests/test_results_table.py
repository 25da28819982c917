"""bench/results_table.py: regenerating RESULTS.md and results/beauty_curves.png from the
committed results/ gives the committed files; known answers on two hand-written JSONs (a
leaderboard run with intervals and a machine record, an older run without: its missing fields are
'-', never guessed); recorded commands re-quoted so that they run as written; and the fields the
table reads at their source: a tiny train_decoder.py run records ``machine`` (SIDREC_JOBS
included) and the validation ``curve``, which a resumed run continues."""

import json
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import results_table  # noqa: E402


def test_regenerating_gives_the_committed_files(tmp_path):
    out, curves = tmp_path / "RESULTS.md", tmp_path / "beauty_curves.png"
    assert results_table.main(["--results", str(ROOT / "results"), "--out", str(out), "--curves", str(curves)]) == 0
    assert out.read_text() == (ROOT / "RESULTS.md").read_text(), \
        "RESULTS.md is stale: run python bench/results_table.py and commit RESULTS.md and results/beauty_curves.png"
    assert curves.read_bytes() == (ROOT / "results" / "beauty_curves.png").read_bytes()


LEADERBOARD_RUN = {
    "test": {"ndcg@10": 0.0123, "recall@10": 0.0246},
    "valid": {"ndcg@10": 0.02},
    "popularity": {"ndcg@10": 0.0053},
    "intervals": {"test": {"ndcg@10": [0.011, 0.0136], "recall@10": [0.022, 0.027]},
                  "popularity": {"ndcg@10": [0.0047, 0.0059]}},
    "steps": 2800, "best_step": 2750, "train_seconds": 3612.0, "device": "cpu",
    "machine": {"cpu": "AMD EPYC 7B13", "cores": 2, "torch_threads": 1, "precision": "bf16", "clock": "process",
                "jobs_sharing_machine": 2},
    "curve": [[250, 300.0, 0.01], [2800, 3612.0, 0.02]],
    "command": "python train_decoder.py configs/decoder_amazon.gin bench/configs/cpu_60min_decoder.gin "
               "--gin RQVAE_DIR='runs/leaderboard/rqvae' --gin train_decoder.out_dir='runs/leaderboard/tiger'",
    "config": "# Macros:\nCPU_MINUTES = 60\n\n# Parameters for train_decoder:\n"
              "train_decoder.max_train_minutes = %CPU_MINUTES\ntrain_decoder.out_dir = 'runs/leaderboard/tiger'\n\n"
              "# Parameters for training_clock:\ntraining_clock.kind = 'process'\n",
}
OLDER_RUN = {  # before intervals and machine records; out_dir from the config's default
    "test": {"ndcg@10": 0.0408, "recall@10": 0.0765},
    "steps": 3972, "best_step": 3500, "train_seconds": 903.5, "device": "cpu",
    "command": "python train_decoder.py configs/sasrec_amazon.gin --gin train_decoder.max_train_minutes = 15",
    "config": "train_decoder.max_train_minutes = 15\ntrain_decoder.out_dir = 'runs/beauty/sasrec'\n"
              "train_decoder.precision = 'fp32'\n",
}


def test_known_answer_on_two_hand_written_jsons(tmp_path):
    results = tmp_path / "results"
    (results / "leaderboard").mkdir(parents=True)
    (results / "leaderboard" / "tiger.json").write_text(json.dumps(LEADERBOARD_RUN))
    (results / "old_sasrec.json").write_text(json.dumps(OLDER_RUN))
    (results / "a_tokenizer.json").write_text(json.dumps({"collision_rate": 0.03, "seconds": 180.0}))  # no test
    out = tmp_path / "RESULTS.md"
    assert results_table.main(["--results", str(results), "--out", str(out)]) == 0
    text = out.read_text()
    assert ("| tiger | 0.0123 [0.0110, 0.0136] | 0.0246 [0.0220, 0.0270] | 2,800 (best 2,750) | 60.2 | 60 | process "
            "| AMD EPYC 7B13, 2 cores | 1 | bf16 | 2 | `OMP_NUM_THREADS=1 python train_decoder.py "
            "configs/decoder_amazon.gin bench/configs/cpu_60min_decoder.gin --gin \"RQVAE_DIR='runs/leaderboard/rqvae'\" "
            "--gin \"train_decoder.out_dir='runs/leaderboard/tiger'\"` | `results/leaderboard/tiger.json` |") in text
    assert ("| old_sasrec | 0.0408, no interval (older run) | 0.0765, no interval (older run) | 3,972 (best 3,500) "
            "| 15.1 | 15 | - | - | - | fp32 | - | `python train_decoder.py configs/sasrec_amazon.gin --gin "
            "\"train_decoder.max_train_minutes = 15\"` (out_dir `runs/beauty/sasrec`) | `results/old_sasrec.json` |") in text
    assert "Most-popular baseline on the same test users: NDCG@10 0.0053 [0.0047, 0.0059]" in text
    assert "a_tokenizer" not in text
    # The leaderboard table, then the others; the older run is not on the leaderboard.
    board, others = text.split("## Other results")
    assert "| tiger |" in board and "old_sasrec" not in board and "| old_sasrec |" in others
    png = results / "beauty_curves.png"
    first = png.read_bytes()
    assert results_table.main(["--results", str(results), "--out", str(tmp_path / "again.md")]) == 0
    assert (tmp_path / "again.md").read_text() == text and png.read_bytes() == first  # deterministic
    assert _has_colour(png, results_table.PALETTE[0])  # TIGER's line


def _has_colour(png: Path, rgb) -> bool:
    import zlib

    data = png.read_bytes()
    w, h = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    idat = data.index(b"IDAT")
    size = int.from_bytes(data[idat - 4:idat], "big")
    rows = np.frombuffer(zlib.decompress(data[idat + 4:idat + 4 + size]), np.uint8).reshape(h, 1 + 3 * w)
    pixels = rows[:, 1:].reshape(h, w, 3)
    return bool((pixels == np.array(rgb, np.uint8)).all(-1).sum() > 20)


@pytest.mark.parametrize("argv", [
    ["train_decoder.py", "a.gin", "--gin", "train_joint.sia_weight = 0.0", "--gin", "x.out_dir='runs/a b'"],
    ["train_grpo.py", "--gin", "train_grpo.rewards=('rule', 'rank')", "--gin", "x.y=2", "--gin", 'x.s="q"'],
])
def test_recorded_commands_run_as_written(argv):
    recorded = " ".join(["python", *argv])  # what print_result records
    assert shlex.split(results_table.shell_command(recorded)) == ["python", *argv]


def test_missing_fields_are_dashes(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"test": {"ndcg@10": 0.1}}))
    row = results_table.run_row(results_table.Run(path, "r", "results/r.json"))
    assert row == ["r", "0.1000, no interval (older run)", "-", "-", "-", "-", "-", "-", "-", "-", "-", "-",
                   "`results/r.json`"]
    path.write_text(json.dumps({"test": {"ndcg@10": 0.1}, "machine": {"precision": "fp32"}}))  # a new run, no CI
    assert results_table.Run(path, "r", "r").metric("ndcg@10") == "0.1000, no interval (its script computes none)"


def test_a_run_records_its_machine_and_validation_curve(tmp_path, monkeypatch):
    import train_decoder
    import train_rqvae
    from tests.fixtures import dataset_bindings, run_script, write_p5_dataset

    monkeypatch.setenv("SIDREC_JOBS", "2")
    base = dataset_bindings(write_p5_dataset(tmp_path / "data"), tmp_path / "cache")
    run_script(train_rqvae.main, "configs/tiny/rqvae_tiny.gin",
               base + [f"train_rqvae.out_dir = '{tmp_path / 'rq'}'", "train_rqvae.max_steps = 50"])

    def run(out, *extra):
        return run_script(train_decoder.main, "configs/tiny/decoder_tiny.gin", base + [
            f"train_decoder.tokenizer = '{tmp_path / 'rq'}'", f"train_decoder.out_dir = '{out}'",
            "train_decoder.max_steps = 6", "train_decoder.eval_every = 2", "training_clock.kind = 'process'",
            "train_decoder.precision = 'fp32'", *extra])

    full = run(tmp_path / "full")
    machine = json.loads((tmp_path / "full" / "result.json").read_text())["machine"]
    assert machine == full["machine"]
    assert machine["precision"] == "fp32" and machine["clock"] == "process" and machine["jobs_sharing_machine"] == 2
    assert machine["torch_threads"] >= 1 and machine["cpu"] and machine["cores"] >= 1
    steps, seconds, values = zip(*full["curve"])
    assert steps == (2, 4, 6) and list(seconds) == sorted(seconds) and seconds[-1] <= full["train_seconds"] + 0.1
    # A run stopped and resumed keeps the validations of its first part.
    run(tmp_path / "split", "train_decoder.stop_after_steps = 4")
    resumed = run(tmp_path / "split")
    assert [c[0] for c in resumed["curve"]] == [2, 4, 6]
    assert [c[2] for c in resumed["curve"]] == list(values)  # exact resume: the same validations
