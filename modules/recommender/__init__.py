"""Use a trained recommender: :class:`GenerativeRecommender` wraps a TIGER (T5) / GPT / RecGPT,
RPG, ActionPiece or SASRec model with its tokenizer and item table, and turns histories of raw
item ids into top-k raw item ids with scores and titles.

    from modules.recommender import GenerativeRecommender
    rec = GenerativeRecommender.from_pretrained("runs/beauty/tiger")   # a run, a saved folder or a Hub id
    rec.recommend([["B004756YJA", "B004ZT0SSG"]], k=10)

One job per file:

- ``core.py``: the class and its ranking paths (trie-constrained beam search, cold-start slots,
  exact top-k, ActionPiece's fused SPR beams);
- ``record.py``: the recommender record every train script's best.pt carries (model config,
  tokenizer reference, decoding settings, item table), from which a recommender is built with
  nothing else to read;
- ``folder.py``: the saved folder (``save_pretrained`` / ``from_pretrained`` / ``push_to_hub``,
  the last from huggingface_hub's ``ModelHubMixin``), its model card, and the ``recommender/``
  export a train run ends with;
- ``runs.py``: what ``from_pretrained`` does with a path or Hub id: a folder, a train run's
  out_dir (its export, or a rebuild from its best.pt's record), a staged train_joint.py run.

Recommendations are computed as the evaluation computes them (modules/evaluation.py,
modules/actionpiece/recommender.py), so ``recommend`` on a test user's history returns the
evaluator's ranking: trie-constrained beam search (score: the beam's log-probability), SPR
ensembles fused by ``fuse_beams`` (score: the fusion score; feature tuples that are no item are
dropped, i.e. the lenient ranking), or SASRec's / RPG's exact top-k (score: the model's logit).
Under a cold-start / zero-shot split (``load_dataset.cold_items`` / ``holdout_domain``) the
record holds the held-out items (``cold_items``) and, for semantic IDs, ``cold_slots``: SASRec
ranks only the items it trained on (``modules.evaluation.RestrictedScores``), and with
``cold_slots`` = m a second constrained search over the held-out items fills m of the top 10
(``modules.beam_search.merge_reserved``), as train_decoder.py's test does.
"""

from modules.recommender.core import (
    SLOT_TOP_K, GenerativeRecommender, Recommendation, UnknownItemError, build_model, split_tries,
)
from modules.recommender.folder import (
    CARD_FILE, CONFIG_FILE, FORMAT_VERSION, ITEMS_FILE, RUN_EXPORT, TOKENIZER_DIR, WEIGHTS_FILE, export_run,
)
from modules.recommender.record import (
    ARCHITECTURES, EXACT, SEMANTIC_ID, RecordMissingError, checkpoint_id, load_referenced_tokenizer, record_of,
    recommender_record, run_info, run_record, tokenizer_fingerprint, tokenizer_location, tokenizer_reference,
)
from modules.recommender.runs import STAGED_RUNS, StaleExportError

__all__ = [
    "ARCHITECTURES", "CARD_FILE", "CONFIG_FILE", "EXACT", "FORMAT_VERSION", "ITEMS_FILE", "RUN_EXPORT", "SEMANTIC_ID",
    "SLOT_TOP_K", "STAGED_RUNS", "TOKENIZER_DIR", "WEIGHTS_FILE", "GenerativeRecommender", "Recommendation",
    "RecordMissingError", "StaleExportError", "UnknownItemError", "build_model", "checkpoint_id", "export_run",
    "load_referenced_tokenizer", "record_of", "recommender_record", "run_info", "run_record", "split_tries",
    "tokenizer_fingerprint", "tokenizer_location", "tokenizer_reference",
]
