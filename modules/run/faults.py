"""Fault injection for tests: a training process that kills itself after a given step."""

from __future__ import annotations

import os
import signal
import sys

from modules import distributed

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
