"""Run every command of the docs as written, in document order, in a fresh working copy.

    python bench/check_docs.py                    # every command of README.md and docs/*.md
    python bench/check_docs.py --list             # only print the extracted commands and their plan
    python bench/check_docs.py --match configs/tiny/ --match recommend.py   # only these
    python bench/check_docs.py --source working   # the working tree (uncommitted edits) instead of HEAD

What counts as a command: the lines of fenced (no language, ``bash``/``sh``/``shell``/``console``)
and indented code blocks whose program is ``python``, ``python3``, ``torchrun``, ``bash``, ``sh``
or ``pip`` with arguments (``\\`` continuations joined, trailing ``# comments`` dropped, ``&&``
chains run part by part), a ``python`` code block (run as a script), inline code spans of prose and
tables that start with such a program (a span may wrap a line), and prose lines that start with one.

Where: ``git clone`` of HEAD (or, with ``--source working``, a copy of the tracked and untracked
non-ignored files) into a temporary folder, with ``../shared`` beside it linked to this checkout's
``../shared`` (the ``bench/configs/*_local.gin`` data paths are relative to the repository). Every
command runs there, with that folder as its working directory and ``TMPDIR`` inside the temporary
folder, so every ``runs/...`` or ``exported/...`` path a command names lands in the copy without
rewriting any path, and one command's output is the next one's input as a user following the
README would have it. Caches (processed datasets, MiniLM item embeddings) stay in ``$SIDREC_CACHE``
(default ``~/.cache/sidrec``): the MiniLM embeddings of Beauty's 12,101 items take a few CPU
minutes the first time. ``OMP_NUM_THREADS`` is 1 unless set.

Tiny overrides (``TINY``, ``CONFIG_TINY``, ``BENCH_ARGS``, ``DATA_REWRITES``), appended to each
command, never replacing anything it says: ``--gin`` bindings after the command's own (gin applies
the last binding of a name) that cut training to a handful of steps, validate on a few users,
shrink the models, switch W&B off and skip the fp32/bf16 timing (``precision='fp32'``); the same
bindings for every command of a script, so a later command resumes or reads an earlier one's folder
as in the full-size run. Benchmarks get small sizes as flags after theirs (argparse keeps the
last). Recipes whose data would be downloaded read the same files from ``../shared/data`` where a
copy is there (``load_dataset.path``). ``--also-gin`` appends more bindings (the test points the
data at a fixture with it). The final valid and test passes rank a fixed sample of 256 users
(``test_report.max_users``).

Static checks, before anything runs (``folder_problems``), reported as failures: every train
command names its ``out_dir`` (``--gin "train_x.out_dir='runs/...'"``), and no two commands train
into one folder with settings other than those a resume may change (``RESUME_MAY_CHANGE``): run as
written, the later one would stop with ``ResumeMismatchError``, while under the overrides, which
make both runs the same tiny run, it would pass.

Skipped, with the reason printed: the test suite, package installs, downloads with no local copy,
GPU-only commands, more processes than ``--max-procs``, and commands with placeholders (``DIR``,
``user/repo``). Each command is reported ok / failed (with the tail of its output; the full log
under ``<workdir>/logs``) / skipped; the last stdout line is one JSON object; the exit status is 1
when any command failed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROGRAMS = ("python", "python3", "torchrun", "bash", "sh", "pip", "pip3")
SHELL_LANGS = ("", "bash", "sh", "shell", "console", "zsh")
PYTHON_LANGS = ("python", "py", "python3")


@dataclass(frozen=True)
class DocCommand:
    """One command of a doc: ``text`` as written (continuations joined, comment dropped)."""
    text: str
    doc: str
    line: int
    kind: str = "shell"  # or "python": a ```python block, run as a script

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"


# ---------------------------------------------------------------------------------------------
# Extraction

def _strip_comment(line: str) -> str:
    """``line`` without a trailing shell comment (a ``#`` outside quotes at a word start)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
            elif ch == "\\" and quote == '"':
                continue
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def is_command(text: str) -> bool:
    """Whether a line runs one of ``PROGRAMS`` with arguments (after ``NAME=value`` assignments)."""
    try:
        words = shlex.split(text)
    except ValueError:
        words = text.split()
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
        words = words[1:]
    return len(words) >= 2 and words[0] in PROGRAMS


def _shell_commands(lines: list[tuple[int, str]], doc: str) -> list[DocCommand]:
    """Commands in the lines of a code block (``(line number, text)``, indentation removed)."""
    out: list[DocCommand] = []
    pending, start = "", 0
    for num, raw in lines:
        text = raw.rstrip()
        if text.startswith("$ "):
            text = text[2:]
        if not pending:
            start = num
        body = _strip_comment(text) if not pending else text
        if body.endswith("\\"):
            pending += body[:-1].rstrip() + " "
            continue
        full = (pending + (_strip_comment(body) if pending else body)).strip()
        pending = ""
        full = re.sub(r"\s+", " ", full)
        if full and is_command(full):
            out.append(DocCommand(full, doc, start))
    return out


_FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")
_SPAN = re.compile(r"(`+)(.+?)\1", re.S)


def extract_commands(markdown: str, doc: str = "README.md") -> list[DocCommand]:
    """The commands of one markdown text, in document order (see the module docstring)."""
    lines = markdown.splitlines()
    found: list[DocCommand] = []
    prose: list[tuple[int, str]] = []  # the current paragraph (or table), for inline spans

    def flush_prose():
        if not prose:
            return
        text = "\n".join(t for _, t in prose)
        starts = [0]
        for _, t in prose:
            starts.append(starts[-1] + len(t) + 1)
        hits: list[tuple[int, DocCommand]] = []  # (offset in the paragraph, command)
        for m in _SPAN.finditer(text):
            body = re.sub(r"\s+", " ", m.group(2)).strip()
            if is_command(body):
                row = max(i for i, s in enumerate(starts[:-1]) if s <= m.start())
                hits.append((m.start(), DocCommand(body, doc, prose[row][0])))
        for row, (num, t) in enumerate(prose):  # a bare command line in prose
            s = t.strip()
            if re.match(r"(python3?|torchrun|bash) \S", s) and is_command(s):
                hits.append((starts[row], DocCommand(re.sub(r"\s+", " ", s), doc, num)))
        found.extend(c for _, c in sorted(hits, key=lambda h: h[0]))
        prose.clear()

    i, prev_blank = 0, True
    while i < len(lines):
        line, num = lines[i], i + 1
        fence = _FENCE.match(line)
        if fence:
            flush_prose()
            indent, mark, lang = len(fence.group(1)), fence.group(2), fence.group(3).lower()
            body: list[tuple[int, str]] = []
            i += 1
            while i < len(lines) and not re.match(rf"^\s*{re.escape(mark[0])}{{{len(mark)},}}\s*$", lines[i]):
                text = lines[i]
                body.append((i + 1, text[indent:] if text[:indent].strip() == "" else text.lstrip()))
                i += 1
            i += 1  # the closing fence
            if lang in PYTHON_LANGS:
                code = "\n".join(t for _, t in body).strip("\n")
                if code.strip():
                    found.append(DocCommand(code + "\n", doc, num + 1, kind="python"))
            elif lang in SHELL_LANGS:
                found.extend(_shell_commands(body, doc))
            prev_blank = True
            continue
        if prev_blank and (line.startswith("    ") or line.startswith("\t")) and line.strip():
            flush_prose()
            body = []
            while i < len(lines) and (lines[i].startswith("    ") or lines[i].startswith("\t") or not lines[i].strip()):
                if lines[i].strip():
                    body.append((i + 1, lines[i][4:] if lines[i].startswith("    ") else lines[i][1:]))
                i += 1
            found.extend(_shell_commands(body, doc))
            prev_blank = True
            continue
        if line.strip():
            prose.append((num, line))
            prev_blank = False
        else:
            flush_prose()
            prev_blank = True
        i += 1
    flush_prose()
    return found


def doc_files(root: Path) -> list[Path]:
    return [p for p in [root / "README.md", *sorted((root / "docs").glob("*.md"))] if p.is_file()]


def all_commands(root: Path) -> list[DocCommand]:
    cmds: list[DocCommand] = []
    for path in doc_files(root):
        cmds.extend(extract_commands(path.read_text(encoding="utf-8"), str(path.relative_to(root))))
    return cmds


# ---------------------------------------------------------------------------------------------
# Overrides and skips

# Per train script: bindings appended to every command of it. Few steps, a few validation users,
# small models, no W&B, no precision timing. Schedules keep warm-up < max_steps so that every
# recipe validates (and selects a checkpoint) at least once.
TINY: dict[str, list[str]] = {
    "train_rqvae.py": [
        "train_rqvae.max_steps = 200", "train_rqvae.eval_every = 100", "train_rqvae.warmup_steps = 50",
        "train_rqvae.ckpt_every = 100", "train_rqvae.log_every = 50", "train_rqvae.wandb_mode = 'disabled'",
    ],
    "train_decoder.py": [
        "train_decoder.max_steps = 4", "train_decoder.warmup_steps = 1", "train_decoder.eval_every = 2",
        "train_decoder.eval_users = 64", "train_decoder.log_every = 2", "train_decoder.precision = 'fp32'",
        "train_decoder.wandb_mode = 'disabled'",
    ],
    "train_joint.py": [
        "train_joint.max_steps = 8", "train_joint.epoch_steps = 2", "train_joint.warm_epochs = 1",
        "train_joint.warmup_steps = 1", "train_joint.finetune_steps = 4", "train_joint.finetune_warmup_steps = 1",
        "train_joint.finetune_eval_every = 2", "train_joint.eval_users = 64", "train_joint.log_every = 2",
        "train_joint.precision = 'fp32'", "train_joint.wandb_mode = 'disabled'",
    ],
    "train_grpo.py": [
        "train_grpo.max_steps = 2", "train_grpo.warmup_steps = 1", "train_grpo.eval_every = 1",
        "train_grpo.eval_users = 64", "train_grpo.batch_size = 4", "train_grpo.log_every = 1",
        "train_grpo.wandb_mode = 'disabled'",
    ],
    "train_actionpiece.py": [
        "train_actionpiece.vocab_size = 2000", "train_actionpiece.max_steps = 4", "train_actionpiece.warmup_steps = 1",
        "train_actionpiece.eval_every = 2", "train_actionpiece.eval_users = 64", "train_actionpiece.num_beams = 10",
        "train_actionpiece.n_inference_ensemble = 1", "train_actionpiece.log_every = 2",
        "train_actionpiece.precision = 'fp32'", "train_actionpiece.wandb_mode = 'disabled'",
    ],
}
# Small models for the scripts that build a recommender (the GRPO recipe rebuilds its SFT model
# from the same bindings, so they must be the same there). Two encoder layers: RASTP's command
# prunes after layer 2, which must exist.
MODEL_TINY = [
    "T5Config.d_model = 32", "T5Config.num_heads = 2", "T5Config.d_head = 16", "T5Config.d_ff = 64",
    "T5Config.num_encoder_layers = 2", "T5Config.num_decoder_layers = 1",
    "GPTConfig.d_model = 32", "GPTConfig.num_heads = 2", "GPTConfig.d_head = 16", "GPTConfig.d_ff = 64",
    "GPTConfig.num_layers = 1", "SASRecConfig.d_model = 32", "SASRecConfig.d_ff = 64",
]
for _script in ("train_decoder.py", "train_joint.py", "train_grpo.py", "train_actionpiece.py"):
    TINY[_script] = TINY[_script] + [b for b in MODEL_TINY
                                     if _script != "train_actionpiece.py" or b.startswith("T5Config")]
# The final valid / test passes on a fixed sample of 256 users each instead of Beauty's 22,363
# (modules/reporting.py test_report; the JSON says "test_users"): a check, not a result.
for _script in ("train_decoder.py", "train_joint.py", "train_grpo.py", "train_actionpiece.py"):
    TINY[_script] = TINY[_script] + ["test_report.max_users = 256"]

# Per gin file a command names: bindings added for it (after TINY's).
CONFIG_TINY: dict[str, list[str]] = {
    # A fresh chunked-FSQ projection puts nearly every item on one code for its first ~1,000 steps
    # (README: collision 0.97 at step 500; 7,308 Beauty items on one prefix at 200 steps, all of
    # them with 64 codes a chunk), more than the 256-code dedup level holds: RecGPT's tokenizer
    # gets 1,500 steps (collision ~0.03 in the README's run), its dedup level as large as needed.
    "configs/recgpt_fsq_amazon.gin": ["train_rqvae.max_steps = 1500", "train_rqvae.eval_every = 500",
                                      "train_rqvae.dedup_size = None"],
    # RecGPT's beam search ranks 15,360 codes per level (~45 users/s on one core even at the tiny
    # size): 10 beams and no unconstrained pass keep its test passes to minutes.
    "configs/recgpt_amazon.gin": ["train_decoder.beam_size = 10", "train_decoder.unconstrained_test = False"],
}

# Benchmarks: their own flags for a small size, after the command's.
BENCH_ARGS: dict[str, list[str]] = {
    "bench/bench_decoder.py": ["--train-steps", "2", "--warmup", "1", "--beam-calls", "1", "--users", "16",
                               "--batch-size", "32", "--epoch-steps", "1"],
    "bench/bench_grpo.py": ["--users", "4", "--group", "4", "--repeats", "1"],
    "bench/bench_actionpiece.py": ["--vocab-size", "2000", "--n-deterministic", "100"],
    "bench/bench_ml32m.py": ["--rows", "200000", "--train-steps", "2", "--train-warmup", "1"],
    "bench/bench_rpg.py": ["--steps", "2", "--batch-size", "32", "--users", "500"],
}

# Data that a config would download, read from the copy in ../shared/data instead:
# (a config file the command names, binding, the shared path that must exist).
DATA_REWRITES = [
    ("configs/tiny/", "load_dataset.path = '../shared/data/movielens/ml-100k'", "../shared/data/movielens/ml-100k"),
]


def _may_change(root: Path) -> frozenset[str]:
    """``RESUME_MAY_CHANGE`` of ``modules/training.py``, read without importing torch."""
    import ast

    tree = ast.parse((root / "modules" / "training.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "RESUME_MAY_CHANGE" for t in node.targets):
            return frozenset(ast.literal_eval(node.value.args[0]))
    raise ValueError(f"{root}/modules/training.py: no RESUME_MAY_CHANGE")


def _train_args(part: str) -> tuple[str, list[str], list[str]] | None:
    """(train function, gin files, --gin bindings) of a part that runs a ``train_*.py`` script."""
    try:
        words = shlex.split(part)
    except ValueError:
        return None
    prog, args = _script_of(words)
    if prog not in ("python", "python3", "torchrun"):
        return None
    script = next((a for a in args if a.endswith(".py")), None)
    if script is None or not re.fullmatch(r"train_\w+\.py", script):
        return None
    rest = args[args.index(script) + 1:]
    configs = [a for a in rest if a.endswith(".gin")]
    bindings = [re.sub(r"\s*=\s*", "=", rest[i + 1].strip(), count=1)
                for i, a in enumerate(rest[:-1]) if a == "--gin"]
    return script[:-3], configs, bindings


def folder_problems(cmds: list[DocCommand], root: Path) -> dict[int, str]:
    """Static checks of the train commands, by index into ``cmds``: each names its ``out_dir``
    (``--gin "train_x.out_dir='...'"``), and two commands that train into one folder differ only
    in bindings a resume may change (otherwise the later one stops with ResumeMismatchError, or,
    under the check's overrides that make both tiny, passes when it should not)."""
    may_change = _may_change(root)
    seen: dict[str, tuple[tuple, DocCommand]] = {}
    problems: dict[int, list[str]] = {}
    for i, c in enumerate(cmds):
        if c.kind != "shell":
            continue
        for part in split_chain(c.text):
            parsed = _train_args(part)
            if parsed is None:
                continue
            fn, configs, bindings = parsed
            key = f"{fn}.out_dir"
            out = [b.split("=", 1)[1].strip("'\"") for b in bindings if b.split("=", 1)[0] == key]
            if not out:
                problems.setdefault(i, []).append(f"{fn} names no out_dir: add --gin \"{key}='runs/...'\"")
                continue
            rest = sorted(b for b in bindings if b.split("=", 1)[0] != key
                          and b.split("=", 1)[0].rsplit(".", 1)[-1] not in may_change)
            identity = (fn, tuple(configs), tuple(rest))
            folder = out[-1]
            if folder in seen and seen[folder][0] != identity:
                (fn0, configs0, rest0), prev = seen[folder]
                diff = [f"script {fn0} -> {fn}"] if fn0 != fn else []
                if configs0 != identity[1]:
                    diff.append(f"gin files {' '.join(configs0)} -> {' '.join(configs)}")
                diff += [f"-{x}" for x in sorted(set(rest0) - set(rest))]
                diff += [f"+{x}" for x in sorted(set(rest) - set(rest0))]
                problems.setdefault(i, []).append(f"trains into {folder} as {prev.where} did, with other settings "
                               f"({'; '.join(diff)}): run as written it stops with ResumeMismatchError")
            else:
                seen[folder] = (identity, c)
    return {i: "; ".join(v) for i, v in problems.items()}


@dataclass
class Step:
    """One part of a ``&&`` chain: what runs (``run``) or why not (``skip``)."""
    written: str
    run: str | None = None
    skip: str | None = None


@dataclass
class Plan:
    command: DocCommand
    steps: list[Step] = field(default_factory=list)

    @property
    def skip(self) -> str | None:
        """The reason when no step runs."""
        if all(s.run is None for s in self.steps):
            return "; ".join(dict.fromkeys(s.skip for s in self.steps if s.skip)) or "nothing to run"
        return None


def split_chain(text: str) -> list[str]:
    """``a && b && c`` -> ``[a, b, c]`` (``&&`` outside quotes)."""
    parts, cur, quote, i = [], "", None, 0
    while i < len(text):
        ch = text[i]
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif text.startswith("&&", i):
            parts.append(cur.strip())
            cur, i = "", i + 2
            continue
        cur += ch
        i += 1
    parts.append(cur.strip())
    return [p for p in parts if p]


def _script_of(words: list[str]) -> tuple[str | None, list[str]]:
    """(program, arguments after env assignments) of a split shell part."""
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
        words = words[1:]
    return (words[0], words[1:]) if words else (None, [])


def _placeholder(args: list[str]) -> str | None:
    for a in args:
        if re.fullmatch(r"[A-Z][A-Z_]+", a) or a.startswith("[") or a == "user/repo":
            return f"placeholder {a!r}"
        if a.endswith(".jsonl") and "/" not in a:
            return f"placeholder file {a!r}"
    return None


def plan_step(part: str, root: Path, max_procs: int, also_gin: tuple[str, ...] = ()) -> Step:
    """What to run for one part of a command (``root``: the working copy), or why it is skipped;
    ``also_gin``: bindings appended to every train command after the tiny ones (the test points
    the data at a fixture with them)."""
    try:
        words = shlex.split(part)
    except ValueError as e:
        return Step(part, skip=f"cannot parse ({e})")
    prog, args = _script_of(words)
    step = Step(part)
    if prog in ("python", "python3") and args[:2] == ["-m", "pytest"]:
        step.skip = "the test suite (minutes; run on its own, e.g. .ci/run)"
        return step
    if prog in ("pip", "pip3") or (prog in ("python", "python3") and args[:2] == ["-m", "pip"]):
        step.skip = "installs packages (needs the network; this environment has them)"
        return step
    reason = _placeholder(args)
    if reason:
        step.skip = reason
        return step
    if prog == "torchrun":
        nproc = next((int(args[i + 1]) for i, a in enumerate(args[:-1]) if a in ("--nproc_per_node", "--nproc-per-node")), 1)
        if nproc > max_procs:
            step.skip = f"{nproc} processes (one per GPU of a multi-GPU machine; --max-procs {max_procs})"
            return step
        script = next((a for a in args if a.endswith(".py")), None)
    elif prog in ("python", "python3"):
        if args[:1] == ["-m"]:
            script = "-m " + args[1] if len(args) > 1 else None
        else:
            script = args[0] if args else None
    elif prog in ("bash", "sh"):
        script = args[0] if args else None
    else:
        step.skip = f"unknown program {prog!r}"
        return step

    if script == "bench/gpu_prepare.sh":
        step.skip = "downloads wheels (needs the network)"
        return step
    if script == "bench/gpu_reproduce.sh" and "--smoke" not in args:
        step.skip = "needs a GPU (its --smoke run is tests/test_gpu_reproduce.py)"
        return step
    if script == "-m data.prepare":
        source = args[2] if len(args) > 2 else ""
        if "--path" not in args and source in ("amazon2014", "amazon2023", "movielens"):
            step.skip = f"downloads {source} (needs the network)"
            return step
        step.run = part
        return step
    if script == "recommend.py" and args[1:2] and not (root / args[1]).exists() and "/" in args[1] \
            and not args[1].startswith(("runs/", "exported/", "./", "/")):
        step.skip = f"Hub repo id {args[1]!r} (needs the network)"
        return step

    extra: list[str] = []
    if script in TINY:
        configs = [a for a in args if a.endswith(".gin")]
        if any("ml32m" in c for c in configs) and not any("_local.gin" in c for c in configs):
            step.skip = "downloads MovieLens 32M (239 MB; needs the network)"
            return step
        bindings = list(TINY[script]) + [b for c in configs for b in CONFIG_TINY.get(c, [])]
        own_data = any(b.replace(" ", "").startswith("load_dataset.path=") for b in also_gin)
        for marker, binding, path in DATA_REWRITES:
            if any(marker in c for c in configs) and not own_data:
                if not (root / path).exists():
                    step.skip = f"downloads its data (needs the network; no copy at {path})"
                    return step
                bindings.append(binding)
        for b in [*bindings, *also_gin]:
            extra += ["--gin", b]
    elif script in BENCH_ARGS:
        extra = list(BENCH_ARGS[script])
    step.run = part + "".join(" " + shlex.quote(x) for x in extra)
    return step


def plan(cmd: DocCommand, root: Path, max_procs: int = 2, also_gin: tuple[str, ...] = ()) -> Plan:
    p = Plan(cmd)
    if cmd.kind == "python":
        p.steps.append(Step(cmd.text, run=cmd.text))
        return p
    for part in split_chain(cmd.text):
        p.steps.append(plan_step(part, root, max_procs, also_gin))
    return p


# ---------------------------------------------------------------------------------------------
# Working copy and runs

def make_workspace(repo: Path, dest: Path, source: str = "head") -> Path:
    """A fresh copy of ``repo`` at ``dest/<name>``, with ``dest/shared`` -> ``repo/../shared``."""
    dest.mkdir(parents=True, exist_ok=True)
    work = dest / repo.name
    if work.exists():  # --workdir of an earlier check: go on in it (its runs/ included)
        print(f"[check_docs] reusing the working copy {work}", file=sys.stderr)
    elif source == "head":
        subprocess.run(["git", "clone", "--quiet", str(repo), str(work)], check=True)
    else:
        files = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=repo, check=True,
                               capture_output=True).stdout.decode().split("\0")
        for f in filter(None, files):
            src = repo / f
            if src.is_file():
                (work / f).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, work / f)
    shared = repo.parent / "shared"
    if shared.exists() and not (dest / "shared").exists():
        (dest / "shared").symlink_to(shared.resolve(), target_is_directory=True)
    return work


def run_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    env["WANDB_MODE"] = "disabled"
    env.pop("PYTHONPATH", None)
    return env


def tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def run_plan(p: Plan, work: Path, log_dir: Path, index: int, timeout: float, env: dict[str, str]) -> dict:
    """Run the steps of ``p`` in ``work``, stopping at the first failure; one result dict."""
    t0 = time.time()
    res = {"where": p.command.where, "command": p.command.text if p.command.kind == "shell" else "<python block>",
           "status": "ok", "skipped_parts": [s.skip for s in p.steps if s.skip], "seconds": 0.0}
    log = log_dir / f"{index:03d}.log"
    with open(log, "w") as fh:
        for s in p.steps:
            if s.run is None:
                fh.write(f"# skipped: {s.written}  ({s.skip})\n")
                continue
            if p.command.kind == "python":
                argv, stdin = [sys.executable, "-"], s.run
            else:
                argv, stdin = ["bash", "-c", s.run], ""
            fh.write(f"$ {s.run if p.command.kind == 'shell' else '<python block>'}\n")
            fh.flush()
            try:
                out = subprocess.run(argv, cwd=work, env=env, input=stdin, text=True, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, timeout=timeout)
                output, rc = out.stdout, out.returncode
            except subprocess.TimeoutExpired as e:
                output = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
                output += f"\n[check_docs] timed out after {timeout:.0f} s"
                rc = -1
            fh.write(output)
            if rc != 0:
                res.update(status="failed", returncode=rc, error=tail(output), failed_part=s.run)
                break
    res["seconds"] = round(time.time() - t0, 1)
    res["log"] = str(log)
    return res


def _python_first(env: dict[str, str]) -> dict[str, str]:
    """``python`` in the commands is this interpreter (a venv's, when the check runs from one)."""
    bindir = Path(sys.executable).parent
    env = dict(env)
    env["PATH"] = f"{bindir}{os.pathsep}{env.get('PATH', '')}"
    return env


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--list", action="store_true", help="print the extracted commands (and their plan) and exit")
    ap.add_argument("--match", action="append", default=[], metavar="SUBSTR",
                    help="run only the commands containing SUBSTR (repeatable: any of them)")
    ap.add_argument("--start-at", metavar="SUBSTR",
                    help="begin at the first command containing SUBSTR (go on with an interrupted check in its --workdir)")
    ap.add_argument("--source", choices=["head", "working"], default="head",
                    help="what to copy: a git clone of HEAD (default) or the working tree")
    ap.add_argument("--workdir", type=Path, help="where the fresh copy goes (default: a new temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep the working copy (its path is printed)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per command (default 1800)")
    ap.add_argument("--max-procs", type=int, default=2, help="torchrun commands with more processes are skipped")
    ap.add_argument("--stop-on-failure", action="store_true")
    ap.add_argument("--also-gin", action="append", default=[], metavar="BINDING",
                    help="a gin binding appended to every train command after the tiny ones (repeatable)")
    a = ap.parse_args(argv)

    if a.list:
        cmds = all_commands(REPO)
        problems = folder_problems(cmds, REPO)
        for i, c in enumerate(cmds):
            p = plan(c, REPO, a.max_procs, tuple(a.also_gin))
            if a.match and not any(m in c.text for m in a.match):
                continue
            head = c.text if c.kind == "shell" else "<python block>\n    " + c.text.rstrip().replace("\n", "\n    ")
            print(f"{c.where}: {head}")
            if i in problems:
                print(f"    -> PROBLEM: {problems[i]}")
            if p.skip:
                print(f"    -> skip: {p.skip}")
            else:
                for s in p.steps:
                    print(f"    -> skip part: {s.skip}" if s.run is None else f"    -> run: {s.run}" if s.run != c.text else "    -> run as written")
        return 0

    tmp = a.workdir or Path(tempfile.mkdtemp(prefix="check_docs-"))
    work = make_workspace(REPO, tmp, a.source)
    log_dir = tmp / "logs"
    log_dir.mkdir(exist_ok=True)
    print(f"[check_docs] working copy {work} ({a.source}); logs in {log_dir}", file=sys.stderr)
    env = _python_first(run_env())
    env["TMPDIR"] = str(tmp / "tmp")  # what the commands put in temp folders goes with the copy
    (tmp / "tmp").mkdir(exist_ok=True)
    results = []
    cmds = all_commands(work)
    problems = folder_problems(cmds, work)
    started = a.start_at is None
    for i, c in enumerate(cmds):
        started = started or a.start_at in c.text
        if not started or (a.match and not any(m in c.text for m in a.match)):
            continue
        p = plan(c, work, a.max_procs, tuple(a.also_gin))
        if i in problems:
            r = {"where": c.where, "command": c.text, "status": "failed", "error": problems[i]}
            print(f"FAILED {c.where}: {c.text[:110]}\n       | {problems[i]}", flush=True)
        elif p.skip:
            r = {"where": c.where, "command": c.text, "status": "skipped", "reason": p.skip}
            print(f"SKIP   {c.where}: {c.text[:110]}\n       ({p.skip})", flush=True)
        else:
            print(f"RUN    {c.where}: {(c.text if c.kind == 'shell' else '<python block>')[:110]}", file=sys.stderr, flush=True)
            r = run_plan(p, work, log_dir, i, a.timeout, env)
            if r["status"] == "ok":
                print(f"OK     {c.where} ({r['seconds']} s): {r['command'][:110]}", flush=True)
            else:
                print(f"FAILED {c.where} ({r['seconds']} s): {r['command'][:110]}\n"
                      + "\n".join("       | " + ln for ln in r["error"].splitlines()), flush=True)
        results.append(r)
        if a.stop_on_failure and r["status"] == "failed":
            break
    counts = {k: sum(r["status"] == k for r in results) for k in ("ok", "failed", "skipped")}
    if not a.keep and a.workdir is None:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps({**counts, "source": a.source, "workdir": str(tmp) if a.keep or a.workdir else None,
                      "results": results}))
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
