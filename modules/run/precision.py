"""Seeding, the state of every random stream, the device, and the training precision (with
the on-machine bf16/fp32 measurement it may rest on)."""

from __future__ import annotations

import json
import os
import platform
import random
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from data.sources.base import default_cache_dir
from modules import distributed


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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
