"""The figures that README.md and docs/*.md quote beside a result JSON come from that JSON.

A *unit* is a table row, or one sentence of a prose paragraph (code blocks are not read: their
numbers are settings). For every unit that names a ``results/....json`` file:

- each JSON it names exists (a pointer to a removed result fails);
- each decimal number written in it (``0.0365``, ``8.2``, ``3.83``; not integers, not dotted
  versions such as ``2.13.0``, not what inline code spans hold) equals, at the precision it is
  written with (half a unit of its last digit), a number of one of the JSONs the unit names: any
  numeric value at any depth, or a number written inside one of its strings (the recorded
  command, gin config and notes are part of the record).

Units the docs convert, and only these: a number followed by ``%`` may be a JSON value x 100; one
followed by ``min``/``minutes``/``CPU min`` may be JSON seconds / 60; one followed by ``M`` may be a
JSON count / 1e6; a ratio written ``1.38x`` may also be the quotient of two numbers written in the
same unit. A figure read from a log instead is written with ``(log)`` after it (e.g. ``0.850/0.949/
0.998 (log)``), and the page says which command's log. Anything else quoted beside a JSON must be
in it, so editing a figure fails here.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

JSON_REF = re.compile(r"results/[\w.\-/]+?\.json")
CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.S)
FENCE = re.compile(r"^\s*(`{3,}|~{3,})")
# A decimal number, not part of a dotted version (2.13.0) or of a longer word; its unit after it.
NUMBER = re.compile(r"(?<![\w.])(\d[\d,]*\.\d+)(?![\w]*\.\d)(\s*(?:%|CPU minutes\b|CPU min\b|minutes\b|min\b)|M\b|x\b)?")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\[*])")


def doc_paths(root: Path = ROOT) -> list[Path]:
    return [p for p in [root / "README.md", *sorted((root / "docs").glob("*.md"))] if p.is_file()]


def units(markdown: str) -> list[tuple[int, str]]:
    """(first line number, text) of every table row and prose sentence, outside code blocks."""
    out: list[tuple[int, str]] = []
    para: list[tuple[int, str]] = []

    def flush():
        if para:
            text = " ".join(t.strip() for _, t in para)
            for sentence in SENTENCE_END.split(text):
                out.append((para[0][0], sentence))
            para.clear()

    lines = markdown.splitlines()
    i, prev_blank = 0, True
    while i < len(lines):
        line, num = lines[i], i + 1
        fence = FENCE.match(line)
        if fence:
            flush()
            mark = fence.group(1)
            i += 1
            while i < len(lines) and not re.match(rf"^\s*{re.escape(mark[0])}{{{len(mark)},}}\s*$", lines[i]):
                i += 1
            i += 1
            prev_blank = True
            continue
        if prev_blank and line.startswith(("    ", "\t")) and line.strip():  # an indented code block
            flush()
            while i < len(lines) and (lines[i].startswith(("    ", "\t")) or not lines[i].strip()):
                i += 1
            prev_blank = True
            continue
        stripped = line.strip()
        if not stripped:
            flush()
            prev_blank = True
        elif stripped.startswith("|"):
            flush()
            out.append((num, stripped))
            prev_blank = False
        elif stripped.startswith("#"):
            flush()
            prev_blank = True
        else:
            para.append((num, line))
            prev_blank = False
        i += 1
    flush()
    return out


def json_numbers(path: Path) -> list[float]:
    """Every number of a JSON file: numeric values at any depth and numbers inside its strings."""
    found: list[float] = []

    def walk(x):
        if isinstance(x, bool) or x is None:
            return
        if isinstance(x, (int, float)):
            if math.isfinite(x):
                found.append(abs(float(x)))
        elif isinstance(x, str):
            found.extend(abs(float(m)) for m in re.findall(r"\d+(?:\.\d+)?(?:[eE]-?\d+)?", x))
        elif isinstance(x, dict):
            for k, v in x.items():
                walk(k)
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(json.loads(path.read_text()))
    return found


def _matches(quoted: str, candidates) -> bool:
    value = float(quoted.replace(",", ""))
    decimals = len(quoted.split(".")[1])
    tol = 0.5 * 10 ** -decimals + 1e-9 * max(1.0, value)
    return any(abs(c - value) <= tol for c in candidates)


def check_unit(text: str, root: Path = ROOT, cache: dict | None = None) -> list[str]:
    """What is wrong with one unit (empty when nothing is, or when it names no JSON)."""
    cache = {} if cache is None else cache
    refs = sorted(set(JSON_REF.findall(text)))
    if not refs:
        return []
    problems, values = [], []
    for ref in refs:
        path = root / ref
        if not path.is_file():
            problems.append(f"names {ref}, which does not exist")
            continue
        if ref not in cache:
            cache[ref] = json_numbers(path)
        values.extend(cache[ref])
    if problems:
        return problems
    prose = CODE_SPAN.sub(" ", text)  # settings and paths in code spans are not figures
    prose = JSON_REF.sub(" ", prose)
    prose = re.sub(r"arXiv \S+", " ", prose)
    prose = re.sub(r"\S+\s*\(log\)", " ", prose)  # marked as read from a log (the doc says which)
    written = [float(n.replace(",", "")) for n in re.findall(r"(?<![\w.])\d[\d,]*(?:\.\d+)?", prose)]
    for m in NUMBER.finditer(prose):
        quoted, unit = m.group(1), (m.group(2) or "").strip()
        candidates = list(values)
        if unit == "%":
            candidates += [v * 100 for v in values]
        elif unit in ("min", "minutes", "CPU min", "CPU minutes"):
            candidates += [v / 60 for v in values]
        elif unit == "M":
            candidates += [v / 1e6 for v in values]
        elif unit == "x":
            candidates += [a / b for i, a in enumerate(written) for j, b in enumerate(written) if b and i != j]
        if not _matches(quoted, candidates):
            problems.append(f"{quoted}{(' ' + unit) if unit else ''} is in none of {', '.join(refs)}")
    return problems


def doc_problems(root: Path = ROOT) -> list[str]:
    cache: dict = {}
    out = []
    for path in doc_paths(root):
        for line, text in units(path.read_text(encoding="utf-8")):
            for p in check_unit(text, root, cache):
                out.append(f"{path.relative_to(root)}:{line}: {p}")
    return out


def test_every_figure_beside_a_result_json_is_in_it():
    problems = doc_problems()
    assert not problems, "\n".join(problems)


def test_the_docs_quote_result_jsons_at_all():
    """The check above reads something: the docs name many result JSONs, in tables and prose."""
    named = set()
    for path in doc_paths():
        for _, text in units(path.read_text(encoding="utf-8")):
            named.update(JSON_REF.findall(text))
    assert len(named) >= 30, sorted(named)


@pytest.fixture
def fake_repo(tmp_path):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "run.json").write_text(json.dumps({
        "test": {"ndcg@10": 0.036478, "recall@10": 0.06586}, "train_seconds": 491.9,
        "hit": 0.09743, "rows": 31946827, "command": "python train.py --gin x.lr=0.003"}))
    return tmp_path


@pytest.mark.parametrize("text, bad", [
    ("Test NDCG@10 0.0365 and Recall@10 0.0659 (`results/run.json`).", []),
    ("Test NDCG@10 0.0366 (`results/run.json`).", ["0.0366"]),            # an edited figure
    ("Test NDCG@10 0.036 and 0.04 (`results/run.json`).", []),             # coarser precision
    ("8.2 minutes, 9.7% of the groups, 31.9M rows, lr 0.003 (`results/run.json`).", []),
    ("8.3 minutes (`results/run.json`).", ["8.3 min"]),
    ("0.0365 against 0.0330 is 1.11x (`results/run.json`).", ["0.0330"]),  # 0.0330 is in no JSON
    ("0.0365 against 0.0659 is 0.55x (`results/run.json`).", []),          # a ratio of the two
    ("| run | 0.0365 | 0.0700 | `results/run.json` |", ["0.0700"]),
    ("Torch 2.13.0 gave 0.0365 (`results/run.json`).", []),                # a version is no figure
    ("Removed: 0.0365 (`results/gone.json`).", ["does not exist"]),
    ("No JSON named: 0.1234.", []),
    ("Purity 0.850/0.949 (log), NDCG@10 0.0365 (`results/run.json`).", []),  # marked as from a log
    ("Purity 0.850/0.949, NDCG@10 0.0365 (`results/run.json`).", ["0.850", "0.949"]),
])
def test_known_answers(fake_repo, text, bad):
    problems = check_unit(text, fake_repo)
    assert len(problems) == len(bad) and all(b in p for b, p in zip(bad, problems)), problems


def test_units_split_rows_and_sentences_and_skip_code():
    md = ("# T\n\nOne 0.1 (`results/a.json`). Two 0.2.\nStill two.\n\n    python x.py 0.3 results/a.json\n\n"
          "```\n0.4 results/a.json\n```\n| a | 0.5 |\n")
    got = units(md)
    assert [t for _, t in got] == ["One 0.1 (`results/a.json`).", "Two 0.2.", "Still two.", "| a | 0.5 |"]
    assert [n for n, _ in got] == [3, 3, 3, 11]
