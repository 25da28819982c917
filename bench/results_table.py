"""RESULTS.md and results/beauty_curves.png from the committed result JSONs (issue 21).

    python bench/results_table.py                  # writes RESULTS.md and results/beauty_curves.png
    python bench/results_table.py --results DIR --out FILE --curves FILE.png

Tables, in this order: the leaderboard (``results/leaderboard/*.json``, written by
``bench/leaderboard.sh``: every method at 60 CPU minutes of one core), sorted by test NDCG@10;
the tokenizers it trained (``results/leaderboard/tokenizers/*.json``, time reported apart); every
other ``results/*.json`` that has test metrics, by file name. Each row: test NDCG@10 and
Recall@10 with the 95% bootstrap interval over users (``intervals.test``; a JSON without one
says ``no interval (older run)``, or, when it has a ``machine`` record, that its script
computes none), steps (best step), minutes of training on the training clock
(``train_seconds``, ETEGRec's two stages summed), the cap (``max_train_minutes`` of the resolved
gin config), the clock kind, the machine (CPU model), torch threads, training precision, jobs
sharing the machine (``SIDREC_JOBS``), the command as recorded and its out_dir. These come from
the JSON's ``machine`` (``modules.reporting.machine_record``) or, for older JSONs, from explicit
bindings of its ``config`` (``training_clock.kind``, ``<script>.precision``,
``<script>.num_threads``); a field found in neither is ``-``, never guessed.

The picture: validation NDCG@10 (on the validation sample the run selected on) against minutes
of the training clock, one line per leaderboard method, from each JSON's ``curve``
(``[step, seconds, ndcg@10]`` per validation, ``modules.training.LoopResult.curve``). Drawn with
numpy (modules/plots.py; matplotlib is not a dependency).

The output depends on the JSONs only (sorted, no dates): tests/test_results_table.py regenerates
it from the committed results/ and compares it with the committed RESULTS.md.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import shlex
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from modules.plots import GREY, draw_text, write_png  # noqa: E402

MISSING = "-"
NO_INTERVAL = "no interval (older run)"
NO_INTERVAL_SCRIPT = "no interval (its script computes none)"  # a run with a machine record: not an older one
SCRIPTS = ("train_grpo", "train_joint", "train_actionpiece", "train_decoder", "train_rqvae")  # (GRPO configs hold train_decoder bindings too)


# ----------------------------------------------------------------------------- reading a JSON

def config_bindings(config: str) -> dict[str, str]:
    """``gin.config_str()`` text -> {binding: value text} (as modules.training.config_bindings,
    without importing torch)."""
    bindings: dict[str, str] = {}
    key = None
    for line in config.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0].isspace() and key is not None:
            bindings[key] = f"{bindings[key]} {line.strip()}".strip()
        elif " = " in line:
            key, value = line.split(" = ", 1)
            bindings[key] = value.strip().removesuffix("\\").strip()
    return bindings


class Run:
    """One result JSON and what RESULTS.md shows of it."""

    def __init__(self, path: Path, shown_as: str, shown_as_path: str):
        self.path, self.shown_as, self.shown_as_path = path, shown_as, shown_as_path
        self.d = json.loads(path.read_text())
        self.bindings = config_bindings(self.d.get("config") or "")
        command = self.d.get("command") or ""
        self.script = next((Path(w).stem for w in command.split() if w.endswith(".py")), None)
        if self.script not in SCRIPTS:  # no command: the script whose bindings the config holds
            self.script = next((s for s in SCRIPTS if f"{s}.out_dir" in self.bindings), None)

    def binding(self, name: str):
        """The value of a binding of the resolved config, macros followed; None when unbound."""
        seen = set()
        text = self.bindings.get(name)
        while text is not None and text.startswith("%") and text not in seen:
            seen.add(text)
            text = self.bindings.get(text[1:])
        if text is None:
            return None
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text

    def own(self, name: str):
        return None if self.script is None else self.binding(f"{self.script}.{name}")

    @property
    def machine(self) -> dict:
        return self.d.get("machine") or {}

    def metric(self, key: str) -> str:
        test = self.d.get("test") or {}
        if key not in test:
            return MISSING
        interval = ((self.d.get("intervals") or {}).get("test") or {}).get(key)
        if interval is None:
            return f"{test[key]:.4f}, {NO_INTERVAL_SCRIPT if self.machine else NO_INTERVAL}"
        return f"{test[key]:.4f} [{interval[0]:.4f}, {interval[1]:.4f}]"

    def steps(self) -> str:
        d = self.d
        if "steps" not in d:
            return MISSING
        best = f" (best {d['best_step']:,})" if "best_step" in d else ""
        joint = d.get("joint")
        if isinstance(joint, dict) and "steps" in joint:  # ETEGRec: stage 1, then the fine-tuning
            return f"joint {joint['steps']:,} + fine-tune {d['steps']:,}{best}"
        return f"{d['steps']:,}{best}"

    def train_minutes(self) -> str:
        if "train_seconds" not in self.d:
            return MISSING
        seconds = self.d["train_seconds"] + ((self.d.get("joint") or {}).get("train_seconds") or 0)
        return f"{seconds / 60:.1f}"

    def cap(self) -> str:
        cap = self.own("max_train_minutes")
        if self.script == "train_joint" and cap is not None:
            return f"{_num(cap)} + {_num(self.own('finetune_minutes'))}"
        return MISSING if cap is None else _num(cap)

    def clock(self) -> str:
        return self.machine.get("clock") or self.binding("training_clock.kind") or MISSING

    def cpu(self) -> str:
        m = self.machine
        if not m.get("cpu"):
            return MISSING
        return f"{m['cpu']}, {m['cores']} cores" if m.get("cores") else m["cpu"]

    def device(self) -> str:
        """The machine: its CPU model, with the GPU when the run trained on one."""
        device = self.d.get("device")
        gpu = device if device and device != "cpu" and not str(device).startswith("cpu") else None
        cpu = self.cpu()
        if gpu:
            return gpu if cpu == MISSING else f"{gpu} ({cpu})"
        return cpu

    def threads(self) -> str:
        threads = self.machine.get("torch_threads") or self.own("num_threads")
        return MISSING if threads is None else str(threads)

    def precision(self) -> str:
        precision = self.machine.get("precision") or self.own("precision")
        return precision if precision in ("bf16", "fp32") else MISSING

    def jobs(self) -> str:
        jobs = self.machine.get("jobs_sharing_machine")
        return MISSING if jobs is None else str(jobs)

    def command(self) -> str:
        command = self.d.get("command")
        out_dir = self.own("out_dir")
        if not command:
            return MISSING if out_dir is None else f"- (out_dir `{out_dir}`)"
        threads = self.machine.get("torch_threads")  # what OMP_NUM_THREADS gives torch
        shown = f"`{'' if threads is None else f'OMP_NUM_THREADS={threads} '}{shell_command(command)}`"
        if out_dir is not None and str(out_dir) not in command:
            shown += f" (out_dir `{out_dir}`)"
        return shown

    def method(self) -> str:
        start = self.d.get("started_from")
        return f"{self.shown_as} (from {start})" if start else self.shown_as


def shell_command(recorded: str) -> str:
    """A recorded command (``" ".join(["python", *sys.argv])``: the shell quotes are gone) as a line
    that runs as written: the words from each ``--gin`` to the next one are one binding, put in
    double quotes when it holds spaces, quotes or brackets (``--gin "train_decoder.out_dir='x'"``).
    Exact unless a binding held two spaces in a row or the text `` --gin ``."""
    out, binding = [], None
    for word in recorded.split(" "):
        if word == "--gin":
            if binding is not None:
                out.append(_quoted(" ".join(binding)))
            out.append(word)
            binding = []
        elif binding is not None:
            binding.append(word)
        else:
            out.append(_quoted(word))
    if binding is not None:
        out.append(_quoted(" ".join(binding)))
    return " ".join(out)


def _quoted(word: str) -> str:
    if re.fullmatch(r"[A-Za-z0-9_./:=@,+%-]+", word):
        return word
    if not re.search(r'["$`\\!]', word):
        return f'"{word}"'
    return shlex.quote(word)


def _num(v) -> str:
    if v is None:
        return MISSING
    return f"{v:g}" if isinstance(v, (int, float)) else str(v)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


RUN_HEADER = ["method", "test NDCG@10 [95% CI]", "test Recall@10 [95% CI]", "steps (best)", "training min",
              "cap min", "clock", "machine", "threads", "precision", "jobs sharing", "command", "result"]


def run_row(run: Run, method: str | None = None) -> list[str]:
    return [method or run.method(), run.metric("ndcg@10"), run.metric("recall@10"), run.steps(), run.train_minutes(),
            run.cap(), run.clock(), run.device(), run.threads(), run.precision(), run.jobs(), run.command(),
            f"`{run.shown_as_path}`"]


def has_test(d: dict) -> bool:
    return isinstance(d.get("test"), dict) and "ndcg@10" in d["test"]


# ----------------------------------------------------------------------------- the picture

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (0, 0, 128), (128, 0, 0)]


def _line(img: np.ndarray, x0: int, y0: int, x1: int, y1: int, color) -> None:
    n = max(abs(x1 - x0), abs(y1 - y0)) + 1
    cols = np.round(np.linspace(x0, x1, n)).astype(int)
    rows = np.round(np.linspace(y0, y1, n)).astype(int)
    img[rows, cols] = color
    img[np.minimum(rows + 1, img.shape[0] - 1), cols] = color  # 2 px thick


def plot_curves(curves: list[tuple[str, list]], path: Path, width: int = 640, height: int = 320) -> Path:
    """Validation NDCG@10 against minutes, one coloured line per (name, [[step, seconds, value], ...]),
    a legend on the right. Axes from 0 to the largest minute and value."""
    left, top, bottom, legend_w, margin = 64, 28, 30, 190, 8
    img = np.full((top + height + bottom, left + width + legend_w + margin, 3), 255, np.uint8)
    draw_text(img, "valid ndcg@10 against training minutes, one line per method", 6, margin)
    base = top + height - 1
    img[top:base + 1, left] = GREY
    img[base, left:left + width] = GREY
    points = [(name, np.asarray([[s / 60.0, v] for _, s, v in curve], float).reshape(-1, 2)) for name, curve in curves]
    points = [(name, p[np.isfinite(p).all(1)]) for name, p in points]
    if not any(len(p) for _, p in points):
        draw_text(img, "no leaderboard curves yet: bash bench/leaderboard.sh", top + height // 2, left + 16)
        return write_png(img, path)
    x_max = max(max(float(p[:, 0].max()) for _, p in points if len(p)), 1e-9)
    y_max = max(max(float(p[:, 1].max()) for _, p in points if len(p)), 1e-9)
    for frac in (0.0, 0.5, 1.0):  # axis labels
        y = base - int(round(frac * (height - 1)))
        img[y, left - 4:left] = GREY
        draw_text(img, f"{frac * y_max:.3f}", max(y - 5, 0), margin)
        x = left + int(round(frac * (width - 1)))
        img[base:base + 4, x] = GREY
        draw_text(img, f"{frac * x_max:.0f}", base + 8, min(x, left + width - 24))
    draw_text(img, "min", base + 8, left + width + 6)
    for k, (name, p) in enumerate(points):
        color = PALETTE[k % len(PALETTE)]
        ly = top + 14 * k
        img[ly + 3:ly + 7, left + width + margin:left + width + margin + 14] = color
        draw_text(img, name, ly, left + width + margin + 18, color=color)
        if not len(p):
            continue
        px = left + np.round(p[:, 0] / x_max * (width - 1)).astype(int)
        py = base - np.round(p[:, 1] / y_max * (height - 1)).astype(int)
        if len(p) == 1:
            img[py[0] - 1:py[0] + 2, px[0] - 1:px[0] + 2] = color
        for i in range(len(p) - 1):
            _line(img, int(px[i]), int(py[i]), int(px[i + 1]), int(py[i + 1]), color)
    return write_png(img, path)


# ----------------------------------------------------------------------------- RESULTS.md

def load_runs(folder: Path, shown_root: Path) -> list[Run]:
    runs = []
    for path in sorted(folder.glob("*.json")):
        runs.append(Run(path, path.stem, f"{shown_root.name}/{path.relative_to(shown_root).as_posix()}"))
    return runs


def build(results: Path, curves_path: Path) -> str:
    board = [r for r in load_runs(results / "leaderboard", results) if has_test(r.d)]
    board.sort(key=lambda r: (-r.d["test"]["ndcg@10"], r.shown_as))
    tokenizers = load_runs(results / "leaderboard" / "tokenizers", results)
    others = [r for r in load_runs(results, results) if has_test(r.d)]
    picture = f"{results.name}/{curves_path.name}"

    out = ["# Results", "",
           "Generated by `python bench/results_table.py` from the result JSONs under `results/`; do not edit by "
           "hand (tests/test_results_table.py checks that regenerating it gives this file). Test metrics are on "
           "all test users; an interval is the 95% percentile bootstrap over users (`intervals.test`). "
           "`-`: not recorded in the JSON. \"training min\" counts the run's training clock (`clock`: `process` = "
           "the process's CPU seconds, `wall` = elapsed time) up to the cap; \"jobs sharing\" is how many training "
           "jobs shared the machine (`SIDREC_JOBS`; two one-thread runs at a time on a 2-core machine is how "
           "these were meant to run). Commands are as each run recorded them (`sys.argv`); the leaderboard ran "
           "them with `OMP_NUM_THREADS=1`.", "",
           "## Leaderboard: Beauty, 60 CPU minutes of one core per method", "",
           "`bash bench/leaderboard.sh` (methods, budgets and commands: that script and "
           "`bench/configs/cpu_60min*.gin`), sorted by test NDCG@10. GRPO trains 60 CPU minutes on top of the "
           "run it starts from (`started_from`, chosen on validation NDCG@10); tokenizers are trained "
           "beforehand and reported in the next table.", ""]
    if board:
        out += _table(RUN_HEADER, [run_row(r) for r in board])
        pop = next((r for r in sorted(board, key=lambda r: r.shown_as) if "popularity" in r.d), None)
        if pop is not None:
            p = pop.d["popularity"]
            iv = (pop.d.get("intervals") or {}).get("popularity") or {}
            cell = f"{p['ndcg@10']:.4f}" + (f" [{iv['ndcg@10'][0]:.4f}, {iv['ndcg@10'][1]:.4f}]"
                                            if "ndcg@10" in iv else f", {NO_INTERVAL}")
            out += ["", f"Most-popular baseline on the same test users: NDCG@10 {cell} (`{pop.shown_as_path}`)."]
    else:
        out += ["No leaderboard results yet: `bash bench/leaderboard.sh` writes `results/leaderboard/<method>.json`."]
    out += ["", f"![validation NDCG@10 against training minutes, one line per leaderboard method]({picture})", "",
            "Validation NDCG@10 on each run's validation sample (what it selected its checkpoint on) against minutes "
            "of its training clock (`curve` in each JSON).", "",
            "## Tokenizers of the leaderboard (trained before it, outside the 60 minutes)", ""]
    if tokenizers:
        rows = [[r.shown_as, _num(r.d.get("seconds")), _num(r.d.get("collision_rate")), _num(r.d.get("max_group")),
                 r.device(), r.threads(), r.command(), f"`{r.shown_as_path}`"] for r in tokenizers]
        out += _table(["tokenizer", "seconds (wall, whole script)", "collision rate", "max group", "machine", "threads",
                       "command", "result"], rows)
    else:
        out += ["None yet."]
    out += ["", "## Other results", "",
            "Every other `results/*.json` with test metrics, by file name: runs of the README's sections, at other "
            "budgets and on other machines' loads (see the README for each one's context).", ""]
    out += _table(RUN_HEADER, [run_row(r) for r in others]) if others else ["None."]
    plot_curves([(r.method(), r.d.get("curve") or []) for r in sorted(board, key=lambda r: r.shown_as)], curves_path)
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", type=Path, default=ROOT / "results", help="the results folder to read")
    ap.add_argument("--out", type=Path, default=ROOT / "RESULTS.md")
    ap.add_argument("--curves", type=Path, default=None, help="the picture (default: RESULTS/beauty_curves.png)")
    a = ap.parse_args(argv)
    curves = a.curves or a.results / "beauty_curves.png"
    text = build(a.results, curves)
    tmp = a.out.with_name(f".{a.out.name}.tmp")
    tmp.write_text(text)
    tmp.replace(a.out)
    print(json.dumps({"out": str(a.out), "curves": str(curves), "bytes": len(text.encode())}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
