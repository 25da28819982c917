"""The shared training loop: batches, validation-based model selection, stopping rules,
exact resume from ``last.pt``, and data parallelism under torchrun.

Exact resume: batch order is a pure function of (seed, epoch), and the checkpoint holds the
model, optimiser, scheduler, step and every RNG state, so a run restarted from a checkpoint
takes the same batches and draws the same dropout masks as one that never stopped.

Under torchrun the same loop runs data-parallel (``modules/distributed.py``; see
:func:`train_loop`): a single process never touches a process group and runs as before.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import gin
import numpy as np
import torch
from tqdm import tqdm

from modules import distributed
from modules.plots import plot_curves
from modules.run.batching import batch_indices
from modules.run.checkpoints import atomic_torch_save, checksum_path, previous_path
from modules.run.cli import resolved_config
from modules.run.faults import _fault_kill, _fault_kill_at_step
from modules.run.logs import NoOpLogger, ProgressLine, make_logger
from modules.run.resume import load_checkpoint, save_checkpoint
from modules.run.steps import StepOutput, SummedLoss, _distributed_backward


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
        # The training clock's seconds so far, the largest over ranks (one clock past the cap
        # stops every rank; a budget-sized schedule gives every rank the same learning rate).
        spent = train_seconds + clock() - t_seg
        if ddp and max_train_minutes is not None:
            spent = distributed.max_over_ranks(spent)
        if max_train_minutes is not None and hasattr(scheduler, "budget_fraction"):
            scheduler.budget_fraction = spent / (60 * max_train_minutes)
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
        timed_out = out_of_time(spent)
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


def _unzip(pairs: list[tuple[int, float]]) -> tuple[list[int], list[float]]:
    return [p[0] for p in pairs], [p[1] for p in pairs]
