"""Exact resume: the checkpoint of a run's whole state (model, optimiser, scheduler, step,
every RNG state, resolved config) and the run identity that decides whether a checkpoint may
be resumed from (or tested): same gin bindings but the ones that may change, same inputs."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np
import torch

from modules import distributed
from modules.run.checkpoints import atomic_torch_save, read_checkpoint, read_checkpoint_or_previous
from modules.run.cli import resolved_config
from modules.run.precision import rng_state, set_rng_state


# ----------------------------------------------------------------------------- run identity


def resume_may_change() -> frozenset[str]:
    """The bindings a resumed run may change, :data:`modules.training.RESUME_MAY_CHANGE`. The list
    stays in modules/training.py because bench/check_docs.py reads it from that file without
    importing torch; it is imported when called because modules.training imports this module."""
    from modules.training import RESUME_MAY_CHANGE

    return RESUME_MAY_CHANGE


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
    may_change = resume_may_change()
    diffs = [f"{k}: {stored.get(k, '(not set)')} -> {current.get(k, '(not set)')}"
             for k in sorted(set(stored) | set(current))
             if stored.get(k) != current.get(k) and k.rsplit(".", 1)[-1] not in may_change]
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
            f"Bindings that may change on resume: {', '.join(sorted(resume_may_change()))}.")


# ----------------------------------------------------------------------------- resume checkpoints


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
