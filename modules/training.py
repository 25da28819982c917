"""What every train script shares: gin CLI, seeding, batches, optimiser + schedule,
atomic checkpoints with the resolved config inside, and a W&B logger with a no-op twin.

Exact resume: batch order is a pure function of (seed, epoch), and the checkpoint holds the
model, optimiser, scheduler, step and every RNG state, so a run restarted from a checkpoint
takes the same batches and draws the same dropout masks as one that never stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import gin
import numpy as np
import torch
from tqdm import tqdm

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


def print_result(result: dict) -> None:
    """The last stdout line of every script: one JSON object."""
    sys.stdout.flush()
    print(json.dumps(result, default=float), flush=True)


# ----------------------------------------------------------------------------- seeding / device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: oneDNN then runs bf16 matmuls natively instead of emulating them."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu internals, hence getattr
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The torch.autocast dtype for ``precision``: "fp32" (None: no autocast), "bf16", or
    "auto" = bf16 on CUDA and on CPUs with native bf16 (measured with bench/bench_decoder.py
    on 2 AVX512-BF16 cores: training 77 -> 136 examples/s, beam 20 155 -> 224 users/s),
    fp32 elsewhere (emulated bf16 is slower than fp32)."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision must be 'auto', 'bf16' or 'fp32', got {precision!r}")
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16()) else "fp32"
    return torch.bfloat16 if precision == "bf16" else None


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
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
                   betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.AdamW:
    """AdamW; matrices decay, biases / norms / 1-d parameters do not."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = all(p.is_cuda for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None)


def warmup_cosine(optimizer, warmup_steps: int, total_steps: int, min_ratio: float = 0.0):
    """Linear warm-up to the base lr, then cosine decay to ``min_ratio`` x base at total_steps."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ----------------------------------------------------------------------------- checkpoints


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """torch.save to a temp file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def save_checkpoint(path: str | Path, *, model: torch.nn.Module, optimizer=None, scheduler=None, step: int,
                    extra: dict | None = None) -> Path:
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "step": step,
        "rng": rng_state(),
        "config": resolved_config(),
        "extra": extra or {},
    }
    return atomic_torch_save(state, path)


def load_checkpoint(path: str | Path, *, model: torch.nn.Module, optimizer=None, scheduler=None,
                    restore_rng: bool = True) -> dict:
    """Load a checkpoint into the given objects; returns the whole dict (step, extra, config)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a damaged file
        raise RuntimeError(f"{path}: cannot read checkpoint ({e}); delete it to start over") from e
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise RuntimeError(f"{path}: checkpoint does not match the model built from the current config:\n{e}") from e
    if optimizer is not None and state.get("optimizer") is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng:
        set_rng_state(state["rng"])
    return state


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
    """``wandb_mode``: "disabled" (no-op), "offline" (default: local files, sync later) or "online"."""
    if wandb_mode not in ("disabled", "offline", "online"):
        raise ValueError(f"wandb_mode must be disabled, offline or online, got {wandb_mode!r}")
    if wandb_mode == "disabled":
        return NoOpLogger()
    return WandbLogger(project, name, {"gin": resolved_config()}, wandb_mode, directory, resume_id)


# ----------------------------------------------------------------------------- the shared loop


@dataclass
class LoopResult:
    step: int  # global steps done
    finished: bool  # False when stopped on purpose by stop_after_steps (resume later)
    best: float  # best validation value of the selection metric (-1 if never validated)
    best_step: int
    train_seconds: float  # wall time spent in training steps + validation, all runs of this out_dir


def train_loop(*, model: torch.nn.Module, optimizer, scheduler, num_examples: int, batch_size: int,
               loss_fn: Callable[[np.ndarray], torch.Tensor], validate: Callable[[], dict], out_dir: Path,
               max_steps: int, eval_every: int, seed: int, metric: str = "ndcg@10", grad_clip: float | None = 1.0,
               patience: int | None = None, max_train_minutes: float | None = None,
               stop_after_steps: int | None = None, log_every: int = 100, resume: bool = True,
               wandb_mode: str = "disabled", wandb_project: str = "sidrec", run_name: str | None = None,
               best_payload: dict | None = None, desc: str = "train") -> tuple[LoopResult, NoOpLogger]:
    """Train ``model`` on batches of example indices with validation-based model selection.

    ``loss_fn(indices) -> scalar loss`` builds and scores one batch; ``validate() -> metrics``
    (must contain ``metric``, higher is better). Writes ``out_dir/last.pt`` (everything needed
    to resume exactly) after every validation and ``out_dir/best.pt`` (model weights, step,
    metrics, ``best_payload``, config) when the metric improves. Stops at ``max_steps``, after
    ``patience`` validations without improvement, or when the cumulative training time passes
    ``max_train_minutes`` (each followed by a final validation). Returns the loop result and the
    open logger (the caller logs test results and calls ``finish``).
    """
    out_dir = Path(out_dir)
    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"
    step, best, best_step, bad_evals, train_seconds, run_id = 0, -1.0, 0, 0, 0.0, None
    if resume and last_path.exists():
        state = load_checkpoint(last_path, model=model, optimizer=optimizer, scheduler=scheduler)
        step = state["step"]
        best, best_step, bad_evals, train_seconds, run_id = (
            state["extra"][k] for k in ("best", "best_step", "bad_evals", "train_seconds", "wandb_id"))
        print(f"[{desc}] resumed from {last_path} at step {step} (best {metric} {best:.4f})", file=sys.stderr)
    logger = make_logger(wandb_mode, wandb_project, run_name or out_dir.name, out_dir, resume_id=run_id)
    run_id = getattr(logger, "run_id", None)

    def save_last() -> None:
        save_checkpoint(last_path, model=model, optimizer=optimizer, scheduler=scheduler, step=step,
                        extra={"best": best, "best_step": best_step, "bad_evals": bad_evals,
                               "train_seconds": train_seconds, "wandb_id": run_id})

    stop_at = max_steps if stop_after_steps is None else min(max_steps, step + stop_after_steps)
    bar = tqdm(total=max_steps, initial=step, desc=desc, disable=None, file=sys.stderr)
    batches = batch_indices(num_examples, batch_size, seed, start_step=step)
    model.train()
    t_seg, done = time.time(), False
    while step < stop_at and not done:
        step, epoch, idx = next(batches)
        loss = loss_fn(idx)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float("inf"))
        optimizer.step()
        scheduler.step()
        step += 1
        bar.update(1)
        if step % log_every == 0:
            logger.log({"train/loss": loss.item(), "train/grad_norm": grad_norm.item(), "train/epoch": epoch,
                        "train/lr": scheduler.get_last_lr()[0]}, step=step)
            bar.set_postfix(loss=f"{loss.item():.3f}", epoch=epoch)
            if bar.disable:  # no TTY (a log file, CI): a plain line instead of the bar
                elapsed = train_seconds + time.time() - t_seg
                print(f"[{desc}] step {step}/{max_steps} epoch {epoch} loss {loss.item():.3f} "
                      f"({elapsed / 60:.1f} min)", file=sys.stderr, flush=True)
        out_of_time = max_train_minutes is not None and train_seconds + time.time() - t_seg >= 60 * max_train_minutes
        if step % eval_every == 0 or step == max_steps or out_of_time:
            metrics = validate()
            model.train()
            logger.log({f"valid/{k}": v for k, v in metrics.items()}, step=step)
            improved = metrics[metric] > best
            if improved:
                best, best_step, bad_evals = metrics[metric], step, 0
                atomic_torch_save({"model": model.state_dict(), "step": step, "valid": metrics,
                                   "config": resolved_config(), **(best_payload or {})}, best_path)
            else:
                bad_evals += 1
            tqdm.write(f"[{desc}] step {step} epoch {epoch}: loss {loss.item():.3f} valid {metric} "
                       f"{metrics[metric]:.4f}{' (best)' if improved else ''}", file=sys.stderr)
            done = out_of_time or (patience is not None and bad_evals >= patience)
            train_seconds += time.time() - t_seg
            t_seg = time.time()
            save_last()
    train_seconds += time.time() - t_seg
    bar.close()
    finished = done or step >= max_steps
    if not finished:
        save_last()
    return LoopResult(step, finished, best, best_step, train_seconds), logger


def load_best(model: torch.nn.Module, out_dir: str | Path) -> dict | None:
    """Load ``out_dir/best.pt`` weights into ``model``; returns its payload (None if absent)."""
    path = Path(out_dir) / "best.pt"
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    return state
