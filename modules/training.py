"""What every train script shares: gin CLI, seeding, batches, optimiser + schedule,
atomic checkpoints with the resolved config inside, and a W&B logger with a no-op twin.

Exact resume: batch order is a pure function of (seed, epoch), and the checkpoint holds the
model, optimiser, scheduler, step and every RNG state, so a run restarted from a checkpoint
takes the same batches and draws the same dropout masks as one that never stopped.

Under torchrun the same loop runs data-parallel (``modules/distributed.py``; see
:func:`train_loop`): a single process never touches a process group and runs as before.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import math
import os
import platform
import random
import signal
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import gin
import numpy as np
import torch
from tqdm import tqdm

from data.sources.base import default_cache_dir
from modules import distributed
from modules.plots import plot_curves

# ----------------------------------------------------------------------------- gin CLI


def parse_gin_cli(argv: list[str] | None, description: str = "") -> argparse.Namespace:
    """``script.py a.gin b.gin --gin 'f.x = 1' --gin ...`` -> parsed and applied to gin."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("configs", nargs="*", help=".gin files, applied in order")
    ap.add_argument("--gin", action="append", default=[], metavar="BINDING",
                    help="a gin binding applied after the files, e.g. --gin 'train.max_steps = 10'")
    args = ap.parse_args(argv)
    for path in args.configs:
        if not Path(path).is_file():
            ap.error(f"config file not found: {path}")
    # `include 'configs/x.gin'` resolves from the repo root whatever the working directory.
    gin.add_config_file_search_path(str(Path(__file__).resolve().parents[1]))
    try:
        gin.parse_config_files_and_bindings(args.configs, args.gin)
    except Exception as e:  # noqa: BLE001 - gin raises ValueError, SyntaxError or tokenize errors
        where = ", ".join(args.configs + [f"--gin {b!r}" for b in args.gin])
        raise SystemExit(f"error in gin config ({where}):\n  {e}") from None
    return args


def resolved_config() -> str:
    """The full gin configuration in force (saved in checkpoints and W&B runs)."""
    return gin.config_str()


def print_result(result: dict, out_dir: str | Path | None = None) -> None:
    """The last stdout line of every script: one JSON object. With ``out_dir``, also written
    (atomically) to ``out_dir/result.json`` with the command line and the resolved config, so
    that a reported figure can be traced to what produced it (README rows: results/).
    Under torchrun only rank 0 prints and writes (the others hold the same figures).
    A ``ranks`` entry (``modules.intervals.RunRanks``, from ``modules.reporting.test_report``)
    is written to ``out_dir/result.ranks.npz`` (atomically, before the JSON, which names it
    under ``ranks_file``) and left out of the JSON and the printed line."""
    if not distributed.is_main():
        return
    from modules.intervals import RANKS_SUFFIX, RunRanks

    ranks = result.get("ranks")
    if isinstance(ranks, RunRanks):
        result = {k: v for k, v in result.items() if k != "ranks"}
    if out_dir is not None:
        path = Path(out_dir) / "result.json"
        record = {**result, "command": " ".join(["python", *sys.argv]), "config": resolved_config()}
        if isinstance(ranks, RunRanks):
            record["ranks_file"] = ranks.save(path.with_name(path.stem + RANKS_SUFFIX)).name
        if distributed.world_size() > 1:
            record["processes"] = distributed.world_size()
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(record, indent=1, default=float) + "\n")
        os.replace(tmp, path)
    sys.stdout.flush()
    print(json.dumps(result, default=float), flush=True)


# ----------------------------------------------------------------------------- seeding / device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(device: str = "auto") -> torch.device:
    """``device`` ("auto": CUDA if available). Under torchrun, also joins the process group and
    gives this process its own GPU, ``cuda:LOCAL_RANK`` (:func:`modules.distributed.init`)."""
    if distributed.launched():
        return distributed.init(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def autocast_dtype(device: torch.device, precision: str = "auto",
                   benchmark: Callable[[torch.dtype | None], None] | None = None,
                   cache_key: str | None = None) -> torch.dtype | None:
    """The torch.autocast dtype for training: "fp32" (None: no autocast), "bf16", or "auto".

    "auto" is bf16 on CUDA. On a CPU it is whichever is faster *measured on this machine*:
    whether bf16 pays depends on the chip, not on a CPU flag (2 AVX512-BF16 cores of an AMD
    EPYC trained 1.8x faster in bf16; 2 AVX512-BF16 cores of an Intel Xeon without AMX ran
    ~10% slower in bf16). ``benchmark(dtype)`` runs one representative training step under
    that autocast dtype; both are timed (after a warm-up) and the choice is cached in
    ``$SIDREC_CACHE/precision.json`` under ``cache_key`` (the model and batch shape) plus the
    CPU, thread count and torch version. Without a benchmark, "auto" is fp32 on a CPU.
    Evaluation never uses this: beam search ranks in fp32 (modules/beam_search.py).
    """
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision must be 'auto', 'bf16' or 'fp32', got {precision!r}")
    if precision == "auto":
        if device.type == "cuda":
            precision = "bf16"
        elif benchmark is None:
            precision = "fp32"
        else:  # under torchrun rank 0 measures and every rank takes its choice
            precision = distributed.on_main(lambda: _measured_precision(benchmark, cache_key or "default"))
    return torch.bfloat16 if precision == "bf16" else None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _measured_precision(benchmark: Callable[[torch.dtype | None], None], cache_key: str, repeats: int = 3) -> str:
    """Time ``benchmark`` in fp32 and bf16 (interleaved, median of ``repeats``); cached."""
    key = f"{cache_key}|{_cpu_name()}|threads={torch.get_num_threads()}|torch={torch.__version__}"
    path = default_cache_dir() / "precision.json"
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    if key in cached:
        return cached[key]["precision"]
    # The calibration must not shift the run's random streams (dropout masks): seeded runs
    # would otherwise depend on whether the cache existed.
    saved = rng_state()
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    try:
        for dtype in (None, torch.bfloat16):  # warm-up (oneDNN kernel selection, allocations)
            benchmark(dtype)
        for _ in range(repeats):
            for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
                t0 = time.perf_counter()
                benchmark(dtype)
                times[name].append(time.perf_counter() - t0)
    finally:
        set_rng_state(saved)
    median = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    choice = "bf16" if median["bf16"] < median["fp32"] else "fp32"
    print(f"[precision] a training step takes {median['fp32'] * 1e3:.0f} ms in fp32, "
          f"{median['bf16'] * 1e3:.0f} ms in bf16 -> {choice} (cached in {path})", file=sys.stderr)
    cached = {**cached, key: {"precision": choice, "fp32_ms": round(median["fp32"] * 1e3, 1),
                              "bf16_ms": round(median["bf16"] * 1e3, 1)}}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(cached, indent=1))
    os.replace(tmp, path)
    return choice


def length_chunks(lengths: torch.Tensor, chunk: int | None) -> Iterator[tuple[torch.Tensor, int]]:
    """Split a batch into chunks of at most ``chunk`` rows of similar length: yields (row
    indices, longest length in the chunk), shortest first. Running each chunk cut to its own
    width skips most padding when lengths vary (``None``: one chunk, the whole batch)."""
    order = torch.argsort(lengths, stable=True)
    for sel in order.split(chunk or max(1, len(order))):
        yield sel, int(lengths[sel].max())


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        if distributed.active():  # this rank's GPU only: reading all would open a context on every GPU
            state["cuda_local"] = torch.cuda.get_rng_state()
        else:
            state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and not distributed.active():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "cuda_local" in state and torch.cuda.is_available() and distributed.active():
        torch.cuda.set_rng_state(state["cuda_local"])


# ----------------------------------------------------------------------------- batches


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The example order of one epoch, a pure function of (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def batch_indices(n: int, batch_size: int, seed: int, start_step: int = 0,
                  drop_last: bool = False) -> Iterator[tuple[int, int, np.ndarray]]:
    """Endless ``(step, epoch, indices)`` from global step ``start_step`` on (resume-safe)."""
    per_epoch = n // batch_size if drop_last else math.ceil(n / batch_size)
    if per_epoch == 0:
        raise ValueError(f"batch_size {batch_size} is larger than the {n} training examples (drop_last)")
    step = start_step
    while True:
        epoch, offset = divmod(step, per_epoch)
        order = epoch_order(n, seed, epoch)
        for b in range(offset, per_epoch):
            yield step, epoch, order[b * batch_size: (b + 1) * batch_size]
            step += 1


# ----------------------------------------------------------------------------- optimiser


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float,
                   betas: tuple[float, float] = (0.9, 0.999),
                   module_lrs: dict[torch.nn.Module, float] | None = None) -> torch.optim.AdamW:
    """AdamW; matrices decay, biases / norms / 1-d parameters do not. ``module_lrs``: submodules
    of ``model`` whose parameters train at their own learning rate (two more groups each, e.g.
    train_joint.py's RQ-VAE at lr_id beside the recommender at lr)."""
    claimed = {id(p) for m in (module_lrs or {}) for p in m.parameters()}
    parts = [([p for p in model.parameters() if id(p) not in claimed], lr),
             *((list(m.parameters()), m_lr) for m, m_lr in (module_lrs or {}).items())]
    groups, params = [], []
    for part, part_lr in parts:
        part = [p for p in part if p.requires_grad]
        params += part
        extra = {} if part_lr == lr else {"lr": part_lr}
        groups += [{"params": [p for p in part if p.dim() >= 2], "weight_decay": weight_decay, **extra},
                   {"params": [p for p in part if p.dim() < 2], "weight_decay": 0.0, **extra}]
    fused = all(p.is_cuda for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None)


def warmup_cosine(optimizer, warmup_steps: int, total_steps: int, min_ratio: float = 0.0):
    """Linear warm-up to the base lr, then cosine decay to ``min_ratio`` x base at total_steps."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ----------------------------------------------------------------------------- run identity

# Bindings (by parameter name) that a resumed run may change: they steer when a run stops,
# validates, logs or reports, never what it computes. Any other difference between the
# checkpoint's config and the current one means the checkpoint belongs to another run.
RESUME_MAY_CHANGE = frozenset({
    "max_train_minutes", "stop_after_steps", "patience", "eval_every", "ckpt_every", "log_every",
    "eval_batch_size", "num_threads", "resume", "wandb_mode", "wandb_project", "run_name", "push_to_hub",
    "cache_dir", "verbose", "unconstrained_test", "cold_slots",
    # RPG's test-time decoding (exact or graph-constrained) and the graph search's settings.
    "decoding", "n_edges", "graph_beams", "propagation_steps",
    # train_rqvae: which trained weights give the codes, and the post-hoc last-level rebalancing
    # (both act after training, so a finished run may be re-assembled with them).
    "select_by", "rebalance_last_level",
    # train_joint: when its stages validate and stop (stage 1's are eval_every / max_train_minutes).
    "eval_every_epochs", "finetune_eval_every", "finetune_minutes",
})


class ResumeMismatchError(RuntimeError):
    """A checkpoint in out_dir was written by a run with another configuration or other inputs."""


def config_bindings(config: str) -> dict[str, str]:
    """``gin.config_str()`` text -> {binding: value text}; macros are keys too (``SEED``)."""
    bindings: dict[str, str] = {}
    key = None
    for line in config.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0].isspace() and key is not None:  # continuation of a long value
            bindings[key] = f"{bindings[key]} {line.strip()}".strip()
        elif " = " in line:
            key, value = line.split(" = ", 1)
            bindings[key] = value.strip().removesuffix("\\").strip()  # a trailing backslash: value below
    return bindings


def fingerprint(*arrays) -> str:
    """A short content hash of arrays / tensors / strings (dataset, item codes, ...)."""
    h = hashlib.sha256()
    for a in arrays:
        if isinstance(a, torch.Tensor):
            a = a.detach().cpu().numpy()
        if isinstance(a, str):
            a = np.frombuffer(a.encode(), dtype=np.uint8)
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def run_differences(state: dict, identity: dict[str, str] | None) -> list[str]:
    """What separates the run that wrote checkpoint ``state`` from the current one: changed gin
    bindings (except RESUME_MAY_CHANGE) and changed inputs (``identity``: name -> fingerprint)."""
    stored, current = config_bindings(state.get("config", "")), config_bindings(resolved_config())
    diffs = [f"{k}: {stored.get(k, '(not set)')} -> {current.get(k, '(not set)')}"
             for k in sorted(set(stored) | set(current))
             if stored.get(k) != current.get(k) and k.rsplit(".", 1)[-1] not in RESUME_MAY_CHANGE]
    stored_identity = state.get("identity") or {}
    for name, value in (identity or {}).items():
        if stored_identity.get(name) != value:
            diffs.append(f"{name} (input): {stored_identity.get(name, '(not recorded)')} -> {value}")
    return diffs


def check_same_run(path: str | Path, state: dict, identity: dict[str, str] | None, script: str = "train") -> None:
    """Refuse to resume from (or test) checkpoint ``path`` when it belongs to another run."""
    diffs = run_differences(state, identity)
    if diffs:
        folder = Path(path).parent
        raise ResumeMismatchError(
            f"{path} was written by a different run (stored -> current):\n  " + "\n  ".join(diffs) +
            f"\nUse another out_dir, delete {folder}, or set {script}.resume = False to start over in it. "
            f"Bindings that may change on resume: {', '.join(sorted(RESUME_MAY_CHANGE))}.")


# ----------------------------------------------------------------------------- checkpoints
#
# On disk, a checkpoint ``X.pt`` is a plain torch.save file (any torch.load reads it) with a
# checksum beside it, ``X.pt.sha256``: one JSON line {"file": "X.pt", "bytes": N, "sha256": hex}
# written (atomically) after the .pt, from the bytes as they were written. Loading checks it
# and names the file and the problem (truncated, longer than written, bytes changed). A
# resume checkpoint also keeps its predecessor, ``X.prev.pt`` (+ ``X.prev.pt.sha256``), rotated
# by renames only after the new file and its checksum are completely on disk; loading falls
# back to it, with a warning, when ``X.pt`` is damaged or missing. A checkpoint without a
# checksum file (written before checksums, or a crash between two renames) is loaded when
# torch can read it, unverified.


class CheckpointError(RuntimeError):
    """A checkpoint on disk cannot be used: truncated, bytes changed since it was written, its
    checksum file damaged, or unreadable. The message names the file(s) and the problem."""


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (disk full, quota, I/O error): nothing was replaced, the
    checkpoint that was at the path before (if any) is unchanged. ``errno`` is the cause's."""


class CheckpointFallbackWarning(UserWarning):
    """The latest checkpoint was damaged or missing; the previous one (``X.prev.pt``) was loaded."""


def checksum_path(path: str | Path) -> Path:
    """``X.pt`` -> ``X.pt.sha256``, the checksum file written beside a checkpoint."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def previous_path(path: str | Path) -> Path:
    """``last.pt`` -> ``last.prev.pt``, the checkpoint kept from the save before."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


class _HashingWriter:
    """A binary file wrapper counting and hashing what torch.save writes through it."""

    def __init__(self, f):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0
        self.error: OSError | None = None  # torch.save's zip writer reports a failed write as a RuntimeError

    def write(self, b) -> int:
        try:
            n = self.f.write(b)
        except OSError as e:
            self.error = e
            raise
        self.sha.update(b)
        self.size += memoryview(b).nbytes
        return n

    def flush(self) -> None:
        self.f.flush()


def _write_failure(path: Path, e: OSError) -> str:
    cause = {errno.ENOSPC: "disk full", getattr(errno, "EDQUOT", -1): "disk quota exceeded"}.get(e.errno, "write failed")
    kept = (f"{path} is unchanged (the previous checkpoint)" if path.exists()
            else f"there was no earlier {path.name} to keep")
    return (f"could not write checkpoint {path}: {cause} ({e.strerror or e}) in {path.parent}; "
            f"nothing was replaced: {kept}. Free space (or fix the folder) and resume.")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not possible on every platform (Windows): the renames are still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: str | Path, keep_previous: bool = False) -> Path:
    """torch.save to a temp file in the same folder, fsync, write the checksum file (to a temp
    file too), then rename both over ``path`` and ``path.sha256``. With ``keep_previous`` the
    checkpoint at ``path`` is first renamed to :func:`previous_path` (with its checksum).

    A failed write (e.g. disk full) raises :class:`CheckpointWriteError` naming the file and the
    cause, after removing the temp files: the files at ``path`` are not touched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sums = checksum_path(path)
    tmp = tmp_sum = writer = None
    try:
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
            with os.fdopen(fd, "wb") as f:
                writer = _HashingWriter(f)
                torch.save(obj, writer)
                f.flush()
                os.fsync(f.fileno())
            record = {"file": path.name, "bytes": writer.size, "sha256": writer.sha.hexdigest()}
            fd, tmp_sum = tempfile.mkstemp(prefix=f".{sums.name}.", dir=path.parent)
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise CheckpointWriteError(e.errno, _write_failure(path, e)) from e
        except RuntimeError as e:  # torch.save's zip writer turns the file's OSError into a RuntimeError
            if writer is None or writer.error is None:
                raise
            raise CheckpointWriteError(writer.error.errno, _write_failure(path, writer.error)) from writer.error
        # Only renames from here on (no new space). A reader between two of them sees a .pt with
        # its own checksum, or a .pt without one (loaded unverified), never a wrong pair that
        # would pass: the old checksum file goes first.
        if keep_previous and path.exists():
            prev = previous_path(path)
            if sums.exists():
                os.replace(sums, checksum_path(prev))
            else:
                checksum_path(prev).unlink(missing_ok=True)
            os.replace(path, prev)
        else:
            sums.unlink(missing_ok=True)
        os.replace(tmp, path)
        os.replace(tmp_sum, sums)
        _fsync_dir(path.parent)
    finally:
        for t in (tmp, tmp_sum):
            if t is not None and os.path.exists(t):
                os.unlink(t)
    return path


def verify_checkpoint(path: str | Path) -> bool:
    """Check ``path`` against its checksum file: True when it matches, False when there is no
    checksum file (unverified). Raises :class:`CheckpointError` naming the file and the problem
    (truncated, longer than written, checksum mismatch, damaged checksum file)."""
    path = Path(path)
    sums = checksum_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        text = sums.read_text()
    except FileNotFoundError:
        return False
    try:
        record = json.loads(text)
        want_size, want_sha = int(record["bytes"]), str(record["sha256"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: its checksum file {sums} is damaged ({e!r}); cannot verify the checkpoint")
    size = path.stat().st_size
    if size < want_size:
        raise CheckpointError(f"{path}: damaged checkpoint: truncated ({size:,} of the {want_size:,} bytes written)")
    if size > want_size:
        raise CheckpointError(f"{path}: damaged checkpoint: {size:,} bytes, longer than the {want_size:,} written")
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            sha.update(block)
    if sha.hexdigest() != want_sha:
        raise CheckpointError(f"{path}: damaged checkpoint: checksum mismatch (sha256 {sha.hexdigest()[:16]}... on "
                              f"disk, {want_sha[:16]}... when written): bytes changed on disk")
    return True


def read_checkpoint(path: str | Path, mmap: bool = False) -> dict:
    """``torch.load`` of a checkpoint after :func:`verify_checkpoint` (CPU tensors); a file that
    fails the check or that torch cannot read raises :class:`CheckpointError` naming it."""
    path = Path(path)
    verified = verify_checkpoint(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - any unpickling / zip failure means a damaged file
        how = "" if verified else " (no checksum file beside it)"
        raise CheckpointError(f"{path}: damaged checkpoint: cannot be read{how}: {e}") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a checkpoint (a {type(state).__name__}, not a dict)")
    return state


def read_checkpoint_or_previous(path: str | Path) -> tuple[dict, Path]:
    """The checkpoint at ``path`` or, when that one is damaged or missing, its predecessor
    :func:`previous_path` (with a :class:`CheckpointFallbackWarning` naming the problem).
    Returns (state, the file read). Both damaged: :class:`CheckpointError` naming both."""
    path = Path(path)
    prev = previous_path(path)
    if not path.exists() and not prev.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return read_checkpoint(path), path
    except (CheckpointError, FileNotFoundError) as e:
        problem = str(e) if path.exists() else f"{path} is missing"
        if not prev.exists():
            if isinstance(e, CheckpointError):
                raise CheckpointError(f"{problem}\nand there is no previous checkpoint ({prev}) to fall back to; "
                                      f"delete {path} to start over") from e
            raise
    try:
        state = read_checkpoint(prev)
    except CheckpointError as e2:
        raise CheckpointError(f"both checkpoints are damaged:\n  {problem}\n  {e2}\n"
                              f"delete them to start over") from e2
    if distributed.is_main():
        warnings.warn(f"{problem}\nfalling back to the previous checkpoint {prev} (step {state.get('step')}): "
                      "the steps after it are trained again", CheckpointFallbackWarning, stacklevel=2)
    return state, prev


def save_checkpoint(path: str | Path, *, model: torch.nn.Module, optimizer=None, scheduler=None, step: int,
                    extra: dict | None = None, identity: dict[str, str] | None = None,
                    keep_previous: bool | None = None) -> Path:
    """Everything needed to resume exactly, plus the resolved config and the fingerprints of the
    run's inputs (``identity``) that :func:`check_same_run` compares on resume. Written with
    :func:`atomic_torch_save` (checksum beside it); ``keep_previous`` (default: True unless the
    file is named ``best.pt``) keeps the checkpoint it replaces as :func:`previous_path`.

    Under torchrun a collective: every rank calls it, rank 0 alone writes, adding every rank's
    RNG state (``rng_per_rank``) so that each rank resumes its own random stream; a failed write
    raises on every rank."""
    path = Path(path)
    keep = path.name != "best.pt" if keep_previous is None else keep_previous
    per_rank = distributed.all_gather_object(rng_state()) if distributed.active() else None

    def write() -> Path:
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "step": step,
            "rng": rng_state(),
            "config": resolved_config(),
            "identity": identity or {},
            "extra": extra or {},
        }
        if per_rank is not None:
            state["rng_per_rank"] = per_rank
        return atomic_torch_save(state, path, keep_previous=keep)

    # No rank goes on (and may read it) before the file is complete.
    distributed.on_main(write)
    return path


def load_checkpoint(path: str | Path, *, model: torch.nn.Module, optimizer=None, scheduler=None,
                    restore_rng: bool = True, identity: dict[str, str] | None = None,
                    script: str | None = None, fallback: bool = True) -> dict:
    """Load a checkpoint into the given objects; returns the whole dict (step, extra, config),
    with ``loaded_from``: the file read.

    The file is checked against its checksum first (:func:`read_checkpoint`); with ``fallback``,
    a damaged or missing ``path`` falls back to its predecessor :func:`previous_path` with a
    warning (:func:`read_checkpoint_or_previous`), never to nothing. With ``script`` (the train
    function's name), then checks that the checkpoint belongs to the current run (same bindings
    but RESUME_MAY_CHANGE, same ``identity``)."""
    path = Path(path)
    if fallback:
        state, path = read_checkpoint_or_previous(path)
    else:
        state = read_checkpoint(path)
    if script is not None:
        check_same_run(path, state, identity, script)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise RuntimeError(f"{path}: checkpoint does not match the model built from the current config:\n{e}") from e
    if optimizer is not None and state.get("optimizer") is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng:
        set_rng_state(_own_rng(state, path))
    state["loaded_from"] = path
    return state


def _own_rng(state: dict, path: str | Path) -> dict:
    """The RNG state this process resumes with: its rank's under torchrun when the checkpoint
    has one per rank, else rank 0's / the single process's."""
    per_rank = state.get("rng_per_rank")
    if not distributed.active():
        return state["rng"]
    if per_rank is not None and len(per_rank) == distributed.world_size():
        return per_rank[distributed.rank()]
    if distributed.is_main():
        warnings.warn(f"{path} was written by {len(per_rank) if per_rank else 1} process(es), this run has "
                      f"{distributed.world_size()}: the weights continue exactly, but dropout masks and other "
                      "random draws will differ from those of an uninterrupted run")
    return state["rng"] if distributed.is_main() else rng_state()


# ----------------------------------------------------------------------------- logging


class NoOpLogger:
    """Stands in for W&B when it is off: same methods, does nothing."""

    def log(self, metrics: dict, step: int | None = None) -> None:
        pass

    def log_image(self, key: str, path: str | Path, step: int | None = None) -> None:
        pass

    def summary(self, metrics: dict) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbLogger(NoOpLogger):
    def __init__(self, project: str, name: str | None, config: dict, mode: str, directory: str | Path,
                 resume_id: str | None = None):
        import wandb

        Path(directory).mkdir(parents=True, exist_ok=True)
        self._wandb = wandb
        self.run = wandb.init(project=project, name=name, config=config, mode=mode, dir=str(directory),
                              id=resume_id, resume="allow" if resume_id else None)

    @property
    def run_id(self) -> str:
        return self.run.id

    def log(self, metrics: dict, step: int | None = None) -> None:
        self.run.log(metrics, step=step)

    def log_image(self, key: str, path: str | Path, step: int | None = None) -> None:
        try:
            image = self._wandb.Image(str(path))
        except Exception as e:  # noqa: BLE001 - wandb raises its own Error when Pillow is missing
            warnings.warn(f"W&B: cannot log {path} as an image ({e}); saving the file with the run instead")
            self.run.save(str(path), base_path=str(Path(path).parent), policy="now")
            return
        self.run.log({key: image}, step=step)

    def summary(self, metrics: dict) -> None:
        self.run.summary.update(metrics)

    def finish(self) -> None:
        self.run.finish()


def make_logger(wandb_mode: str, project: str, name: str | None, directory: str | Path,
                resume_id: str | None = None) -> NoOpLogger:
    """``wandb_mode``: "disabled" (no-op), "offline" (default: local files, sync later) or "online".
    Under torchrun the ranks other than 0 get the no-op logger: one W&B run per training run."""
    if wandb_mode not in ("disabled", "offline", "online"):
        raise ValueError(f"wandb_mode must be disabled, offline or online, got {wandb_mode!r}")
    if wandb_mode == "disabled" or not distributed.is_main():
        return NoOpLogger()
    return WandbLogger(project, name, {"gin": resolved_config()}, wandb_mode, directory, resume_id)


class ProgressLine:
    """Plain progress lines for logs without a terminal (CI, nohup, a cluster log), where the
    tqdm bar is off: one line at least every ``every`` seconds (checked after each step) with
    the step, examples/s since the last line, the loss, and the time left to the end or to
    the time cap, whichever comes first."""

    def __init__(self, desc: str, max_steps: int, batch_size: int, step: int = 0, every: float = 30.0,
                 cap_minutes: float | None = None, enabled: bool = True):
        self.desc, self.max_steps, self.batch_size, self.every = desc, max_steps, batch_size, every
        self.cap_seconds = None if cap_minutes is None else 60 * cap_minutes
        self.enabled = enabled
        self.last_time, self.last_step = time.time(), step

    def due(self) -> bool:
        return self.enabled and time.time() - self.last_time >= self.every

    def print(self, step: int, loss: float, elapsed: float, extra: str = "") -> None:
        """``elapsed``: training seconds so far (all runs of the out_dir, as the cap counts them)."""
        now = time.time()
        per_step = (now - self.last_time) / max(1, step - self.last_step)
        left = (self.max_steps - step) * per_step
        if self.cap_seconds is not None:
            left = min(left, max(0.0, self.cap_seconds - elapsed))
        rate = self.batch_size / max(per_step, 1e-9)
        print(f"[{self.desc}] step {step}/{self.max_steps} loss {loss:.4f} {rate:,.0f} examples/s "
              f"{elapsed / 60:.1f} min, ~{left / 60:.1f} min left{extra}", file=sys.stderr, flush=True)
        self.last_time, self.last_step = now, step


# ----------------------------------------------------------------------------- the shared loop


@dataclass
class LoopResult:
    step: int  # global steps done
    finished: bool  # False when stopped on purpose by stop_after_steps (resume later)
    best: float  # best validation value of the selection metric (-1 if never validated)
    best_step: int
    train_seconds: float  # time in training steps + validation, all runs of this out_dir (training_clock)
    # [step, seconds, value] of every validation: the training clock's seconds (what
    # max_train_minutes counts) when it ended and the selection metric (result JSONs' "curve").
    curve: list = field(default_factory=list)


@gin.configurable
def training_clock(kind: str = "wall") -> Callable[[], float]:
    """The clock that ``max_train_minutes`` caps count: "wall" (time.time) or "process" (this
    process's CPU seconds, time.process_time). On a machine shared with other jobs a wall-clock
    cap gives a run whatever the others leave it, so two runs that should get the same budget
    (a comparison) get different ones; CPU seconds do not depend on the neighbours. With
    OMP_NUM_THREADS=1 a CPU second is a second of one core."""
    clocks = {"wall": time.time, "process": time.process_time}
    if kind not in clocks:
        raise ValueError(f"training_clock.kind must be one of {sorted(clocks)}, got {kind!r}")
    return clocks[kind]


class StepOutput(NamedTuple):
    """What a ``loss_fn`` may return instead of a bare loss: the loss to minimise and scalar
    statistics of the step (e.g. GRPO's mean reward), averaged over each logging window and
    logged as ``train/<name>`` beside the loss (W&B, the bar, the progress lines)."""

    loss: "torch.Tensor | SummedLoss"
    metrics: dict[str, float | torch.Tensor]  # 0-d tensors are read only when logged


class SummedLoss(NamedTuple):
    """What a ``loss_fn`` may return instead of a mean: the loss summed over ``count`` terms
    (labels, tokens). One process minimises ``total / count``, as before. Under torchrun each
    rank's total is divided by the count summed over *all* ranks, the exact loss of the global
    batch, which averaging per-rank means is not when ranks hold different label counts. A bare
    scalar loss is taken as a mean over the batch's examples and weighted by shard size."""

    total: torch.Tensor
    count: "int | torch.Tensor"

    def mean(self) -> torch.Tensor:
        return self.total / self.count


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or inf; the checkpoints on disk are from before it."""


def train_loop(*, model: torch.nn.Module, optimizer, scheduler, num_examples: int, batch_size: int,
               loss_fn: Callable[[np.ndarray], torch.Tensor | SummedLoss | StepOutput],
               validate: Callable[[], dict], out_dir: Path,
               max_steps: int, eval_every: int, seed: int, metric: str = "ndcg@10", grad_clip: float | None = 1.0,
               patience: int | None = None, max_train_minutes: float | None = None,
               stop_after_steps: int | None = None, log_every: int = 100, resume: bool = True,
               wandb_mode: str = "disabled", wandb_project: str = "sidrec", run_name: str | None = None,
               best_payload: dict | None = None, identity: dict[str, str] | None = None,
               script: str = "train", desc: str = "train",
               before_step: Callable[[int, int], None] | None = None,
               initial_best: tuple[float, int] | None = None) -> tuple[LoopResult, NoOpLogger]:
    """Train ``model`` on batches of example indices with validation-based model selection.

    ``loss_fn(indices) -> scalar loss`` (a mean over the examples), a :class:`SummedLoss`, or a
    :class:`StepOutput` of either with step statistics to log, builds and scores one batch;
    ``validate() -> metrics`` (must contain ``metric``, higher is better). ``initial_best`` =
    (value, step): a fresh run's best starts there, e.g. the validation figure of the model it
    fine-tunes, so only a validation above it writes ``best.pt`` (none: the caller keeps its start). ``before_step(step, epoch)``, if given, runs before each batch's ``loss_fn`` with
    the global step about to be taken (also after a resume), for schedules that depend on it. Writes ``out_dir/last.pt`` (everything needed
    to resume exactly) after every validation and ``out_dir/best.pt`` (model weights, step,
    metrics, ``best_payload``, config) when the metric improves. Stops at ``max_steps``, after
    ``patience`` validations without improvement, or when the cumulative training time passes
    ``max_train_minutes`` (each followed by a final validation). Returns the loop result and the
    open logger (the caller logs test results and calls ``finish``).

    Resume: ``last.pt`` is used only if it was written by the same run, i.e. the same gin
    bindings (except :data:`RESUME_MAY_CHANGE`) and the same ``identity`` (fingerprints of the
    inputs: dataset, item codes, ...; ``script`` names the train function in the error). A run
    that had already stopped is not trained further unless a binding that may change (e.g.
    ``max_train_minutes``) now lets it go on. A NaN or inf loss raises
    :class:`NonFiniteLossError` before anything is saved from the broken weights.

    Damage: every checkpoint has its checksum beside it (``last.pt.sha256``, ``best.pt.sha256``)
    and the save before ``last.pt`` is kept as ``last.prev.pt``. A resume whose ``last.pt`` is
    damaged (truncated, bytes changed) or missing resumes from ``last.prev.pt`` with a
    :class:`CheckpointFallbackWarning` and moves the damaged file aside (``last.pt.damaged``);
    both damaged raise :class:`CheckpointError` naming both: a run never silently starts over. A
    failed save (disk full) raises :class:`CheckpointWriteError` and leaves the files as they were.
    ``SIDREC_FAULT_KILL_AT_STEP`` is a test hook (see :func:`_fault_kill_at_step`).

    Under torchrun (``modules/distributed.py``) every rank runs this loop in step: ``loss_fn``
    gets the rank's contiguous shard of each global batch, gradients are summed over ranks and
    divided by the global label count (:class:`SummedLoss`) or example count (scalar loss), so
    one step equals one single-process step on the global batch; ``validate`` must evaluate
    collectively (the ``modules.evaluation`` functions shard and gather by themselves). Step
    statistics are averaged over ranks, weighted by shard size. Rank 0 alone writes checkpoints
    (with every rank's RNG state), plots, logs and progress output; every rank resumes from
    ``last.pt``. Ranks > 0 draw from their own random streams (:func:`distributed.seed_per_rank`).
    """
    out_dir = Path(out_dir)
    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"
    step, best, best_step, bad_evals, train_seconds, run_id, saved_step = 0, -1.0, 0, 0, 0.0, None, None
    # (step, value) pairs of the logged training loss and of the validation metric, kept in
    # last.pt so that a resumed run's plot (out_dir/training_curves.png) shows the whole run.
    # "clock": [step, training-clock seconds, metric] of each validation (LoopResult.curve).
    curves: dict[str, list[tuple[int, float]]] = {"loss": [], metric: [], "clock": []}
    ddp, main = distributed.active(), distributed.is_main()
    if ddp:
        distributed.check_batches(num_examples, batch_size)
    # Every rank reads last.pt (a shared out_dir); rank 0's view decides, so that no rank can
    # take another branch than the others.
    # last.prev.pt alone: a crash between the renames of a save; it is resumed from, with a warning.
    resumed_from = None
    if distributed.broadcast_object(resume and (last_path.exists() or previous_path(last_path).exists())):
        # A damaged last.pt falls back to last.prev.pt (warned), both damaged raise: never a fresh start.
        state = load_checkpoint(last_path, model=model, optimizer=optimizer, scheduler=scheduler,
                                identity=identity, script=script)
        resumed_from = state["loaded_from"]
        step = saved_step = state["step"]
        best, best_step, bad_evals, train_seconds, run_id = (
            state["extra"][k] for k in ("best", "best_step", "bad_evals", "train_seconds", "wandb_id"))
        curves = state["extra"].get("curves", curves)
        curves.setdefault("clock", [])  # (a last.pt from before the clock curve)
        if main:
            print(f"[{desc}] resumed from {resumed_from} at step {step} (best {metric} {best:.4f})", file=sys.stderr)
    else:
        distributed.seed_per_rank(seed)
        if initial_best is not None:
            best, best_step = float(initial_best[0]), int(initial_best[1])
        if main and best_path.exists():  # a fresh run must never be tested with an earlier run's weights
            best_path.unlink()
            print(f"[{desc}] starting over in {out_dir}: removed the earlier run's best.pt", file=sys.stderr)
        if main:  # nor fall back to an earlier run's checkpoint (resume = False)
            for old in (checksum_path(best_path), last_path, checksum_path(last_path), previous_path(last_path),
                        checksum_path(previous_path(last_path))):
                old.unlink(missing_ok=True)
    if ddp:  # the same weights on every rank, whatever each one's initialisation did
        distributed.broadcast_module(model)  # (also: every rank has read the checkpoint)
    if main and resumed_from is not None and resumed_from != last_path and last_path.exists():
        # The damaged last.pt is set aside, so that the next save does not rotate it over the
        # good last.prev.pt.
        for src in (last_path, checksum_path(last_path)):
            if src.exists():
                os.replace(src, src.with_name(src.name + ".damaged"))
        print(f"[{desc}] moved the damaged {last_path} aside to {last_path.name}.damaged", file=sys.stderr)
    kill_at = _fault_kill_at_step()
    logger = make_logger(wandb_mode, wandb_project, run_name or out_dir.name, out_dir, resume_id=run_id)
    run_id = getattr(logger, "run_id", None)

    def save_last() -> None:
        nonlocal saved_step
        saved_step = step
        save_checkpoint(last_path, model=model, optimizer=optimizer, scheduler=scheduler, step=step,
                        extra={"best": best, "best_step": best_step, "bad_evals": bad_evals,
                               "train_seconds": train_seconds, "wandb_id": run_id, "curves": curves},
                        identity=identity)

    def plot() -> None:
        if not main:
            return
        path = plot_curves([(f"train loss every {log_every} steps", *_unzip(curves["loss"])),
                            (f"valid {metric}", *_unzip(curves[metric]))], out_dir / "training_curves.png")
        logger.log_image("training_curves", path, step=step)

    def out_of_time(seconds: float) -> bool:
        return max_train_minutes is not None and seconds >= 60 * max_train_minutes

    def out_of_patience() -> bool:
        return patience is not None and bad_evals >= patience

    # A resumed run that had stopped (patience, time cap) stays stopped.
    done = step > 0 and (out_of_patience() or out_of_time(train_seconds))
    stop_at = max_steps if stop_after_steps is None else min(max_steps, step + stop_after_steps)
    bar = tqdm(total=max_steps, initial=step, desc=desc, disable=None if main else True, file=sys.stderr)
    progress = ProgressLine(desc, max_steps, batch_size, step, cap_minutes=max_train_minutes,
                            enabled=bar.disable and main)
    batches = batch_indices(num_examples, batch_size, seed, start_step=step)
    # Summed on the device so that checking it costs no host sync per step (only when logging
    # or validating): a non-finite loss anywhere since the last check makes it non-finite.
    loss_check = torch.zeros(())
    clock = training_clock()  # what max_train_minutes counts
    model.train()
    t_seg = clock()

    def check_finite(epoch: int) -> None:
        if not torch.isfinite(loss_check).item():
            bar.close()
            kept = f"the last good checkpoint is {last_path} (step {saved_step})" if saved_step is not None \
                else "no checkpoint was written"
            raise NonFiniteLossError(
                f"[{desc}] the training loss became NaN or inf between steps {last_check} and {step} "
                f"(epoch {epoch}); stopped without saving; {kept}. Lower the learning rate or check the "
                f"inputs, then resume or start over.")

    last_check, shown = step, ""
    window: dict[str, list] = {}  # step statistics (floats or 0-d tensors) since the last log line
    while step < stop_at and not done:
        step, epoch, idx = next(batches)
        if before_step is not None:
            before_step(step, epoch)
        if ddp:
            loss = _distributed_backward(model, optimizer, loss_fn, idx, window)
        else:
            loss = loss_fn(idx)
            if isinstance(loss, StepOutput):
                for k, v in loss.metrics.items():
                    # Tensors stay on the device until the log line (no host sync per step).
                    window.setdefault(k, []).append(v.detach() if isinstance(v, torch.Tensor) else float(v))
                loss = loss.loss
            if isinstance(loss, SummedLoss):
                loss = loss.mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float("inf"))
        optimizer.step()
        scheduler.step()
        loss_check = loss_check.to(loss.device) + loss.detach().float()
        step += 1
        if step == kill_at:
            _fault_kill(step)
        bar.update(1)
        if step % log_every == 0:
            check_finite(epoch)
            last_check = step
            curves["loss"].append((step, loss.item()))
            stats = {k: float(np.mean([float(x) for x in v])) for k, v in window.items()}
            window = {}
            logger.log({"train/loss": loss.item(), "train/grad_norm": grad_norm.item(), "train/epoch": epoch,
                        "train/lr": scheduler.get_last_lr()[0], **{f"train/{k}": v for k, v in stats.items()}},
                       step=step)
            bar.set_postfix(loss=f"{loss.item():.3f}", epoch=epoch, **{k: f"{v:.3g}" for k, v in stats.items()})
            shown = "".join(f", {k} {v:.4g}" for k, v in stats.items())
        if progress.due():
            check_finite(epoch)
            last_check = step
            progress.print(step, loss.item(), train_seconds + clock() - t_seg, f", epoch {epoch}{shown}")
        timed_out = out_of_time(train_seconds + clock() - t_seg)
        if ddp and max_train_minutes is not None:  # one clock past the cap stops every rank
            timed_out = distributed.any_rank(timed_out)
        if step % eval_every == 0 or step == max_steps or timed_out:
            check_finite(epoch)
            last_check = step
            if ddp:  # e.g. a buffer updated in forward and not synchronised
                distributed.assert_same(model, f"[{desc}] model weights at step {step}")
            metrics = validate()
            model.train()
            logger.log({f"valid/{k}": v for k, v in metrics.items()}, step=step)
            curves[metric].append((step, float(metrics[metric])))
            curves["clock"].append([step, round(train_seconds + clock() - t_seg, 1), float(metrics[metric])])
            improved = metrics[metric] > best
            if improved:
                best, best_step, bad_evals = metrics[metric], step, 0
                # Every rank takes this branch (same metrics); rank 0 writes, a failure raises on all.
                distributed.on_main(lambda: atomic_torch_save(
                    {"model": model.state_dict(), "step": step, "valid": metrics, "config": resolved_config(),
                     "identity": identity or {}, **(best_payload or {})}, best_path))
            else:
                bad_evals += 1
            if main:
                tqdm.write(f"[{desc}] step {step} epoch {epoch}: loss {loss.item():.3f} valid {metric} "
                           f"{metrics[metric]:.4f}{' (best)' if improved else ''}", file=sys.stderr)
            done = timed_out or out_of_patience()
            train_seconds += clock() - t_seg
            t_seg = clock()
            save_last()
            plot()
    if step > last_check:
        check_finite(epoch)
    train_seconds += clock() - t_seg
    bar.close()
    finished = done or step >= max_steps
    if not finished and saved_step != step:  # (saved at this step already: keep last.prev.pt the one before)
        save_last()
    distributed.barrier()  # what rank 0 wrote (best.pt, last.pt) is complete before any rank reads it
    return LoopResult(step, finished, best, best_step, train_seconds, [list(c) for c in curves["clock"]]), logger


# ----------------------------------------------------------------------------- fault injection (tests only)
# A TEST HOOK, off unless the environment variable is set; it never changes what a run computes.
# SIDREC_FAULT_KILL_AT_STEP=N makes train_loop kill its own process (SIGKILL, as the OOM killer
# or a lost node would) right after training step N, to test that a run under
# ``torchrun --max-restarts`` resumes from its last checkpoint and ends as an uninterrupted run
# (tests/test_distributed.py). SIDREC_FAULT_KILL_RANK=r (default: every rank) restricts it to one
# rank. It fires only on torchrun's first attempt (TORCHELASTIC_RESTART_COUNT unset or 0), so
# the restarted workers run on.
FAULT_KILL_AT_STEP = "SIDREC_FAULT_KILL_AT_STEP"
FAULT_KILL_RANK = "SIDREC_FAULT_KILL_RANK"


def _fault_kill_at_step() -> int | None:
    """The step after which this process kills itself (the test hook above), or None."""
    at = os.environ.get(FAULT_KILL_AT_STEP)
    if not at:
        return None
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return None
    rank = os.environ.get(FAULT_KILL_RANK)
    if rank not in (None, "") and int(rank) != distributed.rank():
        return None
    return int(at)


def _fault_kill(step: int) -> None:
    print(f"[fault injection] {FAULT_KILL_AT_STEP}: rank {distributed.rank()} kills itself after step {step}",
          file=sys.stderr, flush=True)
    if hasattr(signal, "SIGKILL"):
        os.kill(os.getpid(), signal.SIGKILL)
    os._exit(137)


def _distributed_backward(model, optimizer, loss_fn, idx: np.ndarray, window: dict[str, list[float]]) -> torch.Tensor:
    """One training step's loss and gradients under torchrun: this rank's shard of the global
    batch ``idx`` forward and backward, then gradients summed over ranks and divided by the
    global count (labels for a :class:`SummedLoss`, examples for a mean); the loss and the step
    statistics are summed alongside (one concurrent collective). Returns the global batch's loss
    (on every rank)."""
    local = distributed.shard(idx)
    out = loss_fn(local)
    stats: dict[str, float] = {}
    if isinstance(out, StepOutput):
        out, stats = out.loss, out.metrics
    if isinstance(out, SummedLoss):
        total, count = out.total, out.count
    else:  # a mean over the shard's examples
        total, count = out * len(local), len(local)
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    keys = sorted(stats)  # the same statistics on every rank, weighted by shard size
    summed = distributed.all_reduce_gradients(
        model.parameters(), [total.detach(), count, len(local), *(float(stats[k]) * len(local) for k in keys)],
        divisor_index=1)
    for i, k in enumerate(keys):
        window.setdefault(k, []).append(float(summed[3 + i] / summed[2]))
    return (summed[0] / summed[1]).float()


def _unzip(pairs: list[tuple[int, float]]) -> tuple[list[int], list[float]]:
    return [p[0] for p in pairs], [p[1] for p in pairs]


def load_best(model: torch.nn.Module, out_dir: str | Path, identity: dict[str, str] | None = None,
              script: str = "train") -> dict:
    """Load ``out_dir/best.pt`` weights into ``model``; returns its payload.

    Raises if there is none (the run never validated to a finite metric: testing the last
    weights instead would report a model nobody selected) or if it belongs to another run."""
    path = Path(out_dir) / "best.pt"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: the run never saved a best-validation checkpoint "
                                "(no validation ran, or every validation metric was NaN)")
    state = read_checkpoint(path)  # checked against best.pt.sha256: a damaged file is named, not used
    check_same_run(path, state, identity, script)
    model.load_state_dict(state["model"])
    return state
