"""The recommender record: what a trained model needs to become a :class:`GenerativeRecommender`,
written by the train scripts where the weights are.

Every ``best.pt`` of train_decoder.py, train_actionpiece.py, train_joint.py (its fine-tuning
stage) and train_grpo.py carries one (``best_payload={"recommender": record}``), and an export's
``config.json`` is its ``config`` plus the run that made it. So a recommender is rebuilt from the
checkpoint alone, with no gin config to parse and no train function's defaults to repeat::

    {"config": {"architecture": "t5", "model_config": {...}, "max_history": 20, "dataset": "p5-beauty",
                "tokenizer": {"kind": "semantic_ids", "source": "runs/beauty/rqvae", "fingerprint": "..."},
                "layout": {...}, "beam_size": 20, "batch_size": 256},
     "items": {"raw_id": [...], "title": [...]}}

``config``: ``architecture`` (:data:`ARCHITECTURES`), ``model_config`` (the model's dataclass as
a dict), ``max_history``, ``dataset`` (its name), ``tokenizer`` (:func:`tokenizer_reference`;
None for SASRec), the decoding settings the run evaluated with (t5, gpt, recgpt: ``layout``,
``beam_size``; actionpiece: ``output_vocab``, ``num_beams``, ``n_inference_ensemble``,
``eval_seed``; every one: ``batch_size``), and under a cold-start / zero-shot split
``cold_items`` (the held-out item_ids) and, for semantic IDs, ``cold_slots``. ``items``: the item
table, row = item_id (raw ids and titles).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

ARCHITECTURES = ("t5", "gpt", "recgpt", "rpg", "sasrec", "actionpiece")
EXACT = ("sasrec", "rpg")  # score every item: the top k of a full ranking
SEMANTIC_ID = ("t5", "gpt", "recgpt")  # beam search over a SemanticIdTokenizer's item trie
REPO_ROOT = Path(__file__).resolve().parents[2]
# The decoding settings each kind of model is served with (all of them also take batch_size).
DECODING = {**{a: ("layout", "beam_size") for a in SEMANTIC_ID},
            "actionpiece": ("output_vocab", "num_beams", "n_inference_ensemble", "eval_seed"),
            "rpg": (), "sasrec": ()}


class RecordMissingError(ValueError):
    """A best.pt without (a complete) recommender record: written by a train script from before
    checkpoints carried one. Its folder can still serve through an export made from it."""


def tokenizer_fingerprint(tok) -> str:
    """What identifies a tokenizer's content: a semantic-ID tokenizer's item codes (and codebook
    sizes), an ActionPiece tokenizer's vocabulary and item features. The train scripts record it
    in their runs' identity and in the record, and a rebuild checks the tokenizer it finds against it."""
    from modules.actionpiece.tokenizer import ActionPieceTokenizer
    from modules.training import fingerprint

    if isinstance(tok, ActionPieceTokenizer):
        return fingerprint(repr(tok.token2feat), np.asarray(tok.priority), tok.item_features)
    return fingerprint(tok.item_codes, str(tok.codebook_sizes))


def tokenizer_reference(source: str | Path, tok) -> dict:
    """Where a run's tokenizer is (``source``: the folder or Hub id the run loaded it from or saved
    it to, as the run named it) and what it held (:func:`tokenizer_fingerprint`; ActionPiece: also
    the vocabulary size the run cut it to)."""
    from modules.actionpiece.tokenizer import ActionPieceTokenizer

    if isinstance(tok, ActionPieceTokenizer):
        return {"kind": "actionpiece", "source": str(source), "vocab_size": int(tok.vocab_size),
                "fingerprint": tokenizer_fingerprint(tok)}
    return {"kind": "semantic_ids", "source": str(source), "fingerprint": tokenizer_fingerprint(tok)}


def recommender_record(model, architecture: str, dataset, tokenizer: dict | None, *, batch_size: int,
                       layout=None, beam_size: int | None = None, output_vocab: str | None = None,
                       num_beams: int | None = None, n_inference_ensemble: int | None = None,
                       eval_seed: int | None = None, cold_slots: int = 0) -> dict:
    """The record of ``model`` (see the module docstring), trained on ``dataset`` (a
    ``data.dataset.SeqDataset``) with the tokenizer ``tokenizer`` (:func:`tokenizer_reference`)
    and evaluated with these decoding settings; those of the architecture are required."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"recommender_record: architecture {architecture!r} not in {ARCHITECTURES}")
    settings = {"layout": layout.to_dict() if layout is not None else None, "output_vocab": output_vocab,
                **{k: None if v is None else int(v) for k, v in (
                    ("beam_size", beam_size), ("num_beams", num_beams),
                    ("n_inference_ensemble", n_inference_ensemble), ("eval_seed", eval_seed))}}
    missing = [k for k in DECODING[architecture] if settings[k] is None]
    if missing:
        raise ValueError(f"recommender_record: architecture {architecture!r} needs {', '.join(missing)}")
    if (tokenizer is None) != (architecture == "sasrec"):
        raise ValueError(f"recommender_record: architecture {architecture!r} "
                         f"{'has no' if architecture == 'sasrec' else 'needs a'} tokenizer reference")
    config = {"architecture": architecture, "model_config": model.config.to_dict(),
              "max_history": int(dataset.max_history), "dataset": dataset.name, "tokenizer": tokenizer,
              **{k: settings[k] for k in DECODING[architecture]}, "batch_size": int(batch_size)}
    cold = getattr(dataset, "cold", None)
    if cold is not None and architecture in (*SEMANTIC_ID, "sasrec"):  # ranked as the evaluation ranks them
        config["cold_items"] = np.flatnonzero(cold).tolist()
        if cold_slots and architecture in SEMANTIC_ID:
            config["cold_slots"] = int(cold_slots)
    items = dataset.items
    titles = items["title"].to_list() if "title" in items.columns else None
    return {"config": config, "items": {"raw_id": [str(r) for r in items["raw_id"].to_list()], "title": titles}}


def record_of(path: Path, state: dict) -> dict:
    """The recommender record of checkpoint ``state`` (read from ``path``, a best.pt); a
    :class:`RecordMissingError` naming the folder, what is missing and how to get it when it has none."""
    record = state.get("recommender")
    config = record.get("config") if isinstance(record, dict) else None
    if isinstance(config, dict):
        needed = ("architecture", "model_config", "max_history", "tokenizer", "batch_size",
                  *DECODING.get(config.get("architecture"), ()))
        missing = [k for k in needed if k not in config] + ([] if "items" in record else ["items"])
        if not missing and config["architecture"] in ARCHITECTURES:
            return record
        what = f"an incomplete recommender record (missing {', '.join(missing) or 'a known architecture'})"
    else:
        what = ("no recommender record (the model config, the tokenizer reference, the decoding settings and "
                "the item table a recommender is built from): it keeps only its gin config")
    from modules.training import config_bindings

    folder, bindings = path.parent, config_bindings(state.get("config") or "")
    script = next((f"{s}.py" for s in ("train_grpo", "train_joint", "train_actionpiece", "train_decoder")
                   if any(k.startswith(f"{s}.") for k in bindings)), "its train script")
    raise RecordMissingError(
        f"{folder}: {path.name} has {what}; it was written by an earlier version of {script}. To serve it, run "
        f"the run's command again with the current code and out_dir = '{folder}' (a finished run resumes, is "
        f"tested again and exports {folder / 'recommender'}, which from_pretrained('{folder}') then loads), "
        "or retrain it")


def tokenizer_location(reference: dict, run_dir: Path | None = None) -> str:
    """Where a tokenizer reference's source is now: a local folder as recorded (relative to the
    working directory), else relative to the repository, where the train scripts run, else the
    ``tokenizer/`` folder of the run's own folder ``run_dir`` (a vocabulary the run learned
    there, the folder moved since); else the source itself (a Hub id)."""
    source = reference["source"]
    for path in (Path(source), REPO_ROOT / source, *([Path(run_dir) / "tokenizer"] if run_dir else [])):
        if path.exists():
            return str(path / "tokenizer") if (path / "tokenizer").is_dir() else str(path)
    return source


def load_referenced_tokenizer(reference: dict, where: Path):
    """The tokenizer a record's ``reference`` names (:func:`tokenizer_reference`), checked to be
    the one the run used (its fingerprint); ``where``: the record's file (a best.pt)."""
    source = tokenizer_location(reference, where.parent)
    if not Path(source).exists() and (source.startswith((".", "/", "~")) or source.count("/") != 1):
        raise FileNotFoundError(f"{where}: the run's tokenizer {source!r} is not found (neither a folder here "
                                f"nor under {REPO_ROOT}, nor a Hub repo id)")
    if reference["kind"] == "actionpiece":
        from modules.actionpiece.tokenizer import ActionPieceTokenizer
        tok = ActionPieceTokenizer.from_pretrained(source, vocab_size=reference["vocab_size"])
    else:
        from modules.semantic_ids import SemanticIdTokenizer
        tok = SemanticIdTokenizer.from_pretrained(source)
    if tokenizer_fingerprint(tok) != reference["fingerprint"]:
        raise ValueError(f"{where}: the tokenizer at {source} is not the one the run used (fingerprint "
                         f"{tokenizer_fingerprint(tok)}, recorded {reference['fingerprint']}): it was retrained "
                         "or replaced since")
    return tok


def checkpoint_id(state: dict) -> str:
    """Identity of a best.pt (its step, gin config and input fingerprints): an export made from it
    records this, so a later run in the same out_dir is never served with an older export."""
    from modules.training import fingerprint

    return fingerprint(json.dumps([state.get("step"), state.get("config"), state.get("identity")], sort_keys=True,
                                  default=str))


def checkpoint_id_of(path: str | Path) -> str:
    return checkpoint_id(torch.load(path, map_location="cpu", weights_only=False, mmap=True))


def run_info(record: dict) -> dict:
    """What a model card shows of a run's result record (``out_dir/result.json`` layout)."""
    keep = ("dataset", "architecture", "train_mode", "valid", "test", "popularity", "steps", "best_step",
            "beam_size", "num_beams", "n_inference_ensemble", "protocol", "cold_slots", "command", "config")
    return {k: record[k] for k in keep if k in record}


def run_record(result: dict) -> dict:
    """A train script's result as its result.json will hold it (with the command and gin config)."""
    from modules.training import resolved_config

    return run_info({**result, "command": " ".join(["python", *sys.argv]), "config": resolved_config()})
