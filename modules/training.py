"""What every train script shares, imported from here; each job lives in ``modules/run/``:

- ``cli.py``: the gin command line (:func:`parse_gin_cli`), the resolved config, the result
  line and ``result.json`` (:func:`print_result`).
- ``precision.py``: seeding and every RNG state, the device, the training precision
  (:func:`autocast_dtype`, measured on the machine when "auto" on a CPU).
- ``batching.py``: resume-safe batches, length chunks, the optimiser and the lr schedule.
- ``checkpoints.py``: checkpoint files on disk (atomic writes, checksums, the previous
  checkpoint kept, damaged files named).
- ``resume.py``: what a resume checkpoint holds (:func:`save_checkpoint`,
  :func:`load_checkpoint`, :func:`load_best`) and the run identity that must match to resume.
- ``logs.py``: the W&B logger, its no-op twin and the plain progress lines.
- ``steps.py``: what a ``loss_fn`` returns (:class:`StepOutput`, :class:`SummedLoss`) and a
  step's gradients under torchrun.
- ``faults.py``: the fault-injection test hook (``SIDREC_FAULT_KILL_AT_STEP``).
- ``loop.py``: :func:`train_loop`, its result and :func:`training_clock` (gin-configurable as
  ``training_clock.kind``, registered once, by ``modules.run.loop``).

A test that replaces a function a module calls patches it in that module (e.g.
``modules.run.loop.make_logger``): the names here are references to the same objects.
"""

from __future__ import annotations

from modules.run.batching import batch_indices, epoch_order, length_chunks, make_optimizer, warmup_cosine
from modules.run.checkpoints import (
    CheckpointError, CheckpointFallbackWarning, CheckpointWriteError, atomic_torch_save, checksum_path,
    previous_path, read_checkpoint, read_checkpoint_or_previous, verify_checkpoint,
)
from modules.run.cli import parse_gin_cli, print_result, resolved_config
from modules.run.faults import FAULT_KILL_AT_STEP, FAULT_KILL_RANK
from modules.run.logs import NoOpLogger, ProgressLine, WandbLogger, make_logger
from modules.run.loop import LoopResult, NonFiniteLossError, train_loop, training_clock
# _cpu_name: the CPU model as the precision cache keys it, also recorded by
# modules/reporting.py and bench/bench_rpg.py.
from modules.run.precision import (
    _cpu_name, autocast_dtype, pick_device, rng_state, seed_everything, set_rng_state,
)
from modules.run.resume import (
    ResumeMismatchError, check_same_run, config_bindings, fingerprint, load_best, load_checkpoint,
    run_differences, save_checkpoint,
)
from modules.run.steps import StepOutput, SummedLoss

# Bindings (by parameter name) that a resumed run may change: they steer when a run stops,
# validates, logs or reports, never what it computes. Any other difference between the
# checkpoint's config and the current one means the checkpoint belongs to another run.
# Defined here, not in modules/run/resume.py (which reads it when called): bench/check_docs.py
# reads this literal from modules/training.py without importing torch.
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

__all__ = [
    "RESUME_MAY_CHANGE",
    # cli
    "parse_gin_cli", "print_result", "resolved_config",
    # precision
    "autocast_dtype", "pick_device", "rng_state", "seed_everything", "set_rng_state",
    # batching
    "batch_indices", "epoch_order", "length_chunks", "make_optimizer", "warmup_cosine",
    # checkpoints
    "CheckpointError", "CheckpointFallbackWarning", "CheckpointWriteError", "atomic_torch_save", "checksum_path",
    "previous_path", "read_checkpoint", "read_checkpoint_or_previous", "verify_checkpoint",
    # resume
    "ResumeMismatchError", "check_same_run", "config_bindings", "fingerprint", "load_best", "load_checkpoint",
    "run_differences", "save_checkpoint",
    # logs
    "NoOpLogger", "ProgressLine", "WandbLogger", "make_logger",
    # steps, faults, loop
    "StepOutput", "SummedLoss", "FAULT_KILL_AT_STEP", "FAULT_KILL_RANK",
    "LoopResult", "NonFiniteLossError", "train_loop", "training_clock",
]
