"""ActionPiece (Hou et al., ICML 2025): context-aware tokenization of action sequences.

See ``shared/design/actionpiece.md`` for the algorithm; ``vocab`` (fast construction),
``reference`` (slow exact yardstick), ``segment`` (SPR, deterministic, decoding, fusion),
``tokenizer`` (files, Hub), ``features`` (PCA + OPQ codes + hash bucket), ``recommender``
(the T5 recommender's token layout, item decoding and evaluation; imported from there, not
re-exported here, so that importing the tokenizer does not load torch and the data code).
"""

from modules.actionpiece.tokenizer import ActionPieceTokenizer
from modules.actionpiece.vocab import MergeResult, learn_merges

__all__ = ["ActionPieceTokenizer", "MergeResult", "learn_merges"]
