"""Checkpoint files on disk: atomic writes with a checksum beside each file, the previous
checkpoint kept, and reads that name a damaged file (and fall back to the previous one).
What goes into a resume checkpoint, and which run it belongs to: ``modules/run/resume.py``."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from modules import distributed


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
