"""bench/check_docs.py: the commands it pulls out of markdown (known answer), the tiny overrides and
skips it plans, its static folder checks on the real README, and a run of the README's tiny
RQ-VAE and tiny decoder commands, in that order, in a fresh copy, on a fixture dataset."""

import importlib.util
import shlex
import sys
from pathlib import Path

import pytest

from tests.fixtures import dataset_bindings, write_p5_dataset

ROOT = Path(__file__).resolve().parents[1]


def _check_docs():
    spec = importlib.util.spec_from_file_location("check_docs", ROOT / "bench" / "check_docs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["check_docs"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


cd = _check_docs()

DOC = """# Title

Run this:

    pip install foo && python train_x.py a.gin   # a comment
    python b.py \\
        --gin "x.y='a # b'"   # trailing

```bash
$ bash run.sh --smoke
echo not a command
```

```python
for i in range(2):
    print(i)
```

```
data/    a folder tree, not a command
```

```gin
python not.gin
```

Inline `python c.py --flag` and `not a command` and `python` alone, a wrapped `python d.py
--two` span, then
python f.py --x
at the start of a prose line.

| a | `OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 e.py` |
"""


def test_extracts_the_commands_in_document_order():
    got = [(c.text, c.line, c.kind) for c in cd.extract_commands(DOC, "DOC.md")]
    assert got == [
        ("pip install foo && python train_x.py a.gin", 5, "shell"),
        ("python b.py --gin \"x.y='a # b'\"", 6, "shell"),
        ("bash run.sh --smoke", 10, "shell"),
        ("for i in range(2):\n    print(i)\n", 15, "python"),
        ("python c.py --flag", 27, "shell"),
        ("python d.py --two", 27, "shell"),
        ("python f.py --x", 29, "shell"),
        ("OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 e.py", 32, "shell"),
    ]


def _gin_args(run: str) -> list[str]:
    words = shlex.split(run)
    return [words[i + 1] for i, w in enumerate(words[:-1]) if w == "--gin"]


def test_overrides_are_appended_after_the_command_as_written(tmp_path):
    (tmp_path / "../shared/data/movielens/ml-100k").resolve().mkdir(parents=True)
    root = tmp_path
    cmd = cd.DocCommand("python train_decoder.py configs/decoder_amazon.gin --gin \"train_decoder.out_dir='runs/a'\"",
                        "README.md", 1)
    p = cd.plan(cmd, root)
    assert p.skip is None and p.steps[0].run.startswith(cmd.text + " ")
    assert _gin_args(p.steps[0].run) == ["train_decoder.out_dir='runs/a'", *cd.TINY["train_decoder.py"]]
    assert "train_decoder.max_steps = 4" in cd.TINY["train_decoder.py"]

    # a recipe that would download its data reads the copy beside the repository instead
    tiny = cd.plan(cd.DocCommand("python train_rqvae.py configs/tiny/rqvae_tiny.gin", "README.md", 1), root)
    assert _gin_args(tiny.steps[0].run)[-1] == "load_dataset.path = '../shared/data/movielens/ml-100k'"
    # ... unless the caller points the data elsewhere itself
    own = cd.plan(cd.DocCommand("python train_rqvae.py configs/tiny/rqvae_tiny.gin", "README.md", 1), root,
                  also_gin=("load_dataset.path='/x'",))
    assert _gin_args(own.steps[0].run)[-1] == "load_dataset.path='/x'"
    nocopy = cd.plan(cd.DocCommand("python train_rqvae.py configs/tiny/rqvae_tiny.gin", "README.md", 1),
                     tmp_path / "elsewhere")
    assert nocopy.skip and "network" in nocopy.skip

    bench = cd.plan(cd.DocCommand("python bench/bench_grpo.py --users 32", "README.md", 1), root)
    assert bench.steps[0].run == "python bench/bench_grpo.py --users 32 --users 4 --group 4 --repeats 1"

    chain = cd.plan(cd.DocCommand("pip install torch && python recommend.py runs/x --history a", "R", 1), root)
    assert [s.run for s in chain.steps] == [None, "python recommend.py runs/x --history a"]
    assert chain.skip is None and "installs packages" in chain.steps[0].skip

    for text, reason in [
        ("torchrun --nproc_per_node 8 train_decoder.py c.gin", "8 processes"),
        ("python -m pytest -q", "test suite"),
        ("python -m data.prepare amazon2014 --category Beauty", "network"),
        ("python -m data.prepare recbole --path DIR --name x", "placeholder"),
        ("python recommend.py user/repo --users histories.jsonl", "placeholder"),
        ("bash bench/gpu_reproduce.sh", "GPU"),
        ("python train_rqvae.py configs/rqvae_ml32m.gin", "MovieLens 32M"),
    ]:
        skip = cd.plan(cd.DocCommand(text, "R", 1), root).skip
        assert skip and reason in skip, (text, skip)
    assert cd.plan(cd.DocCommand("bash bench/gpu_reproduce.sh --smoke", "R", 1), root).skip is None


def test_folder_problems_name_the_missing_out_dir_and_the_clash():
    def cmds(*texts):
        return [cd.DocCommand(t, "R.md", i + 1) for i, t in enumerate(texts)]

    base = "python train_decoder.py configs/a.gin --gin \"train_decoder.out_dir='runs/x'\""
    assert cd.folder_problems(cmds(base, base + " --gin train_decoder.cold_slots=1",
                                   base.replace("out_dir = ", "out_dir=")), ROOT) == {}
    problems = cd.folder_problems(cmds(
        base,
        "python train_decoder.py configs/a.gin",                                    # no out_dir
        base + " --gin train_decoder.lr=0.01",                                       # same folder, other run
        base.replace("a.gin", "b.gin"),                                              # other gin file
        "python train_grpo.py g.gin --gin \"train_grpo.out_dir='runs/x'\"",          # other script
    ), ROOT)
    assert sorted(problems) == [1, 2, 3, 4]
    assert "names no out_dir" in problems[1]
    assert "runs/x as R.md:1" in problems[2] and "+train_decoder.lr=0.01" in problems[2]
    assert "ResumeMismatchError" in problems[2]
    assert "gin files configs/a.gin -> configs/b.gin" in problems[3]
    assert "script train_decoder -> train_grpo" in problems[4]


def test_the_readme_passes_the_static_checks():
    cmds = cd.all_commands(ROOT)
    assert len(cmds) > 30
    assert cd.folder_problems(cmds, ROOT) == {}
    for c in cmds:  # every command either runs or says why not
        p = cd.plan(c, ROOT)
        assert all(s.run or s.skip for s in p.steps)
        assert not any(s.skip and s.skip.startswith(("unknown program", "cannot parse")) for s in p.steps), c


def test_a_failing_command_reports_its_output_tail(tmp_path):
    p = cd.plan(cd.DocCommand("python -c \"print('hello'); raise SystemExit(3)\"", "R.md", 7), tmp_path)
    res = cd.run_plan(p, tmp_path, tmp_path, 0, timeout=60, env=cd.run_env())
    assert res["status"] == "failed" and res["returncode"] == 3 and "hello" in res["error"]
    ok = cd.plan(cd.DocCommand("python -c \"print(1)\" && python -c \"print(2)\"", "R.md", 8), tmp_path)
    assert cd.run_plan(ok, tmp_path, tmp_path, 1, timeout=60, env=cd.run_env())["status"] == "ok"


def test_the_readme_tiny_recipes_run_in_order_in_a_fresh_copy(tmp_path, monkeypatch, capsys):
    """The tiny RQ-VAE command, then the tiny decoder command that reads its folder, as the README
    writes them, in a copy of this working tree, on a fixture (the --also-gin bindings)."""
    data = write_p5_dataset(tmp_path / "data", num_users=60, num_items=30)
    monkeypatch.setenv("SIDREC_CACHE", str(tmp_path / "cache"))
    args = ["--source", "working", "--workdir", str(tmp_path / "check"),
            "--match", "python train_rqvae.py configs/tiny/rqvae_tiny.gin",
            "--match", "python train_decoder.py configs/tiny/decoder_tiny.gin"]
    for b in dataset_bindings(data, tmp_path / "cache"):
        args += ["--also-gin", b]
    rc = cd.main(args)
    out = capsys.readouterr().out
    assert rc == 0, out
    lines = [ln for ln in out.splitlines() if ln.startswith(("OK", "FAILED", "SKIP"))]
    assert len(lines) == 2 and all(ln.startswith("OK") for ln in lines), out
    assert "rqvae_tiny" in lines[0] and "decoder_tiny" in lines[1]
    work = tmp_path / "check" / ROOT.name
    assert (work / "runs/tiny/rqvae/tokenizer").is_dir() and (work / "runs/tiny/decoder/result.json").is_file()


@pytest.mark.parametrize("flag", ["--list"])
def test_list_prints_every_command_without_running(flag, capsys):
    assert cd.main([flag, "--match", "configs/tiny/"]) == 0
    out = capsys.readouterr().out
    assert "python train_rqvae.py configs/tiny/rqvae_tiny.gin" in out and "-> run:" in out
