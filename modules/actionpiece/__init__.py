"""ActionPiece (Hou et al., ICML 2025): context-aware tokenization of action sequences.

See ``shared/design/actionpiece.md`` for the algorithm; ``vocab`` (fast construction),
``reference`` (slow exact yardstick), ``segment`` (SPR, deterministic, decoding, fusion),
``tokenizer`` (files, Hub), ``features`` (PCA + OPQ codes + hash bucket).
"""

from modules.actionpiece.tokenizer import ActionPieceTokenizer
from modules.actionpiece.vocab import MergeResult, learn_merges

__all__ = ["ActionPieceTokenizer", "MergeResult", "learn_merges"]
