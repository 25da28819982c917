"""A :class:`GenerativeRecommender` as a folder (``save_pretrained`` / ``from_pretrained`` /
``push_to_hub``), the model card in it, and the export a train run ends with::

    config.json          format_version + the recommender record's config (architecture, model config,
                         tokenizer reference, decoding settings; modules/recommender/record.py) + the
                         run it came from (``run``) and the best.pt it was made from (``checkpoint``)
    model.safetensors    the weights (best-validation checkpoint)
    items.json           {"raw_id": [...], "title": [...]}, row = item_id
    tokenizer/           SemanticIdTokenizer (t5, gpt, recgpt, rpg) or ActionPieceTokenizer (actionpiece)
    README.md            model card: dataset, split, tokenizer, metrics, command, gin config

Format version 1 throughout: the ``tokenizer`` reference in config.json (where the run's
tokenizer came from, and its fingerprint) was added later as an optional field. Loading uses the
folder's own ``tokenizer/``, never the reference, so folders written before it load as they are,
and earlier code reads the newer ones (it keeps the extra field in ``config``).
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

from modules.recommender.core import SLOT_TOP_K, GenerativeRecommender, build_model
from modules.recommender.record import ARCHITECTURES, SEMANTIC_ID, checkpoint_id_of, run_record

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
ITEMS_FILE = "items.json"
TOKENIZER_DIR = "tokenizer"
CARD_FILE = "README.md"
RUN_EXPORT = "recommender"  # the folder train scripts write into their out_dir


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_folder(rec: GenerativeRecommender, save_directory: Path) -> None:
    """``rec`` as the folder above (``GenerativeRecommender._save_pretrained``)."""
    from safetensors.torch import save_model

    save_directory = Path(save_directory)
    save_directory.mkdir(parents=True, exist_ok=True)
    tmp = save_directory / f".{WEIGHTS_FILE}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        save_model(rec.model, str(tmp))  # handles the tied input/output embeddings
        os.replace(tmp, save_directory / WEIGHTS_FILE)
    finally:
        tmp.unlink(missing_ok=True)
    _atomic_write_text(save_directory / ITEMS_FILE, json.dumps({"raw_id": rec.raw_ids, "title": rec.titles}))
    if rec.tokenizer is not None:
        rec.tokenizer.save_pretrained(save_directory / TOKENIZER_DIR)
    _atomic_write_text(save_directory / CARD_FILE, model_card(rec))
    # Written last: the mixin writes its own config.json only when this one is missing.
    _atomic_write_text(save_directory / CONFIG_FILE,
                       json.dumps({"format_version": FORMAT_VERSION, **rec.config}, indent=1, default=float))


def load_folder(cls, folder: Path) -> GenerativeRecommender:
    """The recommender (of class ``cls``) saved in ``folder``."""
    from safetensors.torch import load_model

    config_path = folder / CONFIG_FILE
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path}:{e.lineno}: malformed JSON ({e.msg})") from None
    for key in ("architecture", "model_config", "max_history"):
        if key not in config:
            raise ValueError(f"{config_path}: field {key!r} missing (not a sidrec recommender folder?)")
    if config.pop("format_version", FORMAT_VERSION) > FORMAT_VERSION:
        raise ValueError(f"{config_path}: format_version is newer than this code reads ({FORMAT_VERSION})")
    arch = config["architecture"]
    if arch not in ARCHITECTURES:
        raise ValueError(f"{config_path}: field 'architecture' = {arch!r} not in {ARCHITECTURES}")
    model = build_model(arch, config["model_config"])
    try:
        load_model(model, str(folder / WEIGHTS_FILE), strict=True)
    except (RuntimeError, KeyError) as e:
        raise ValueError(f"{folder / WEIGHTS_FILE}: weights do not fit the model_config of {config_path}: {e}") \
            from None
    items = json.loads((folder / ITEMS_FILE).read_text(encoding="utf-8"))
    tokenizer = None
    if arch in SEMANTIC_ID:
        from modules.semantic_ids import SemanticIdTokenizer
        tokenizer = SemanticIdTokenizer.from_pretrained(str(folder / TOKENIZER_DIR))
    elif arch == "actionpiece":
        from modules.actionpiece.tokenizer import ActionPieceTokenizer
        tokenizer = ActionPieceTokenizer.from_pretrained(folder / TOKENIZER_DIR)
    return cls(model, config, tokenizer, items["raw_id"], items.get("title"))


def model_card(rec: GenerativeRecommender) -> str:
    """The README.md of ``rec``'s folder (and Hub repo)."""
    run = rec.config.get("run") or {}
    name = {"t5": "TIGER (T5 encoder-decoder over semantic IDs)", "gpt": "GPT decoder over semantic IDs",
            "recgpt": "RecGPT (block-causal decoder over semantic IDs + item text)",
            "rpg": "RPG (long semantic IDs predicted in parallel, exact ranking)",
            "sasrec": "SASRec (item IDs)", "actionpiece": "ActionPiece (T5)"}[rec.architecture]
    if rec.architecture in SEMANTIC_ID:
        tok = (f"semantic IDs, codebook sizes {list(rec.layout.codebook_sizes)}, "
               f"{rec.layout.num_user_buckets} hashed user tokens, beam {rec.config['beam_size']}")
    elif rec.architecture == "actionpiece":
        tok = (f"ActionPiece vocabulary of {rec.tokenizer.vocab_size:,} tokens, {rec.tokenizer.n_categories} "
               f"features per item; {rec.config['num_beams']} beams x {rec.config['n_inference_ensemble']} "
               "SPR segmentations, fused")
    else:
        tok = "none (one embedding per item id), exact top-k over all items"
    lines = [f"---\nlibrary_name: sidrec\ntags:\n- recommendation\n- {rec.architecture}\n---\n",
             f"# {name}\n",
             f"- dataset: `{run.get('dataset', '?')}` ({rec.num_items:,} items); split: leave-one-out (test = "
             "each user's last item, validation = the one before, training = the rest), full ranking",
             f"- tokenizer: {tok}",
             f"- histories: the last {rec.max_history} items"]
    if rec.cold is not None:
        how = (f"{rec.cold_slots} of the top {SLOT_TOP_K} reserved for them" if rec.cold_slots else
               "ranks only the items it trained on" if rec.architecture == "sasrec" else "no reserved slots")
        lines.append(f"- cold split: {int(rec.cold.sum()):,} items held out of training ({how})")
    if run.get("best_step") is not None:
        lines.append(f"- best-validation checkpoint: step {run['best_step']} of {run.get('steps', '?')}")
    metrics = [(split, run[split]) for split in ("test", "valid", "popularity") if isinstance(run.get(split), dict)]
    if metrics:
        keys = list(metrics[0][1])
        lines += ["\n## Metrics of the run\n", "| split | " + " | ".join(keys) + " |",
                  "|---" * (len(keys) + 1) + "|"]
        lines += [f"| {split} | " + " | ".join(f"{m.get(key, float('nan')):.4f}" for key in keys) + " |"
                  for split, m in metrics]
    lines += ["\n## Use it\n", "```python", "from modules.recommender import GenerativeRecommender\n",
              "rec = GenerativeRecommender.from_pretrained('<this repo id or folder>')",
              f"print(rec.recommend([{json.dumps(rec.raw_ids[:3])}], k=10))", "```\n",
              "or `python recommend.py <this repo id or folder> --history ID ID ...` (sidrec repository).\n"]
    if run.get("command"):
        lines += ["## How it was made\n", "```", run["command"], "```\n"]
    if run.get("config"):
        lines += ["Gin config:\n", "```", run["config"].rstrip(), "```\n"]
    return "\n".join(lines)


def export_run(out_dir: str | Path, record: dict, model, tokenizer, result: dict, push_to_hub: str | None = None,
               checkpoint: str | Path | None = None) -> Path:
    """The end of a train run: the recommender of its ``record`` (the one its best.pt carries),
    ``model`` at its best weights and ``tokenizer``, with the run's ``result`` for the model card,
    saved as ``out_dir/recommender`` (what ``from_pretrained(out_dir)`` loads) and, with
    ``push_to_hub``, the same files pushed to that Hub repo. ``checkpoint``: the best.pt it belongs
    to (default ``out_dir/best.pt``)."""
    rec = GenerativeRecommender.from_record(record, model, tokenizer, run=run_record(result),
                                            checkpoint_id=checkpoint_id_of(checkpoint or Path(out_dir) / "best.pt"))
    folder = Path(out_dir) / RUN_EXPORT
    rec.save_pretrained(folder)
    if push_to_hub:
        rec.push_to_hub(push_to_hub, commit_message="sidrec recommender")
    return folder
