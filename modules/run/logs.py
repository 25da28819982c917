"""Where a run reports: W&B (or its no-op twin) and plain progress lines for logs without a
terminal. (Not ``logging.py``: a module named after the stdlib's invites confusion and lint.)"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

from modules import distributed
from modules.run.cli import resolved_config


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
