"""Optional numba JIT.

numba (PyPI ``numba``) earns its place here: ActionPiece vocabulary construction and SPR
segmentation are pointer-chasing loops over linked lists, hash tables and heaps that numpy
cannot vectorise; compiled, the Beauty 40k vocabulary takes minutes instead of the official
code's hour, and SPR runs at >10x the official speed. Without numba the same functions run
as plain Python (correct, slow: fine for the small corpora of the tests).
"""

from __future__ import annotations

try:  # pragma: no cover - depends on the environment
    import numba

    HAVE_NUMBA = True

    def njit(fn):
        # cache=True: compile once per machine (~10-20 s), not once per process.
        return numba.njit(cache=True, nogil=True)(fn)

except ImportError:  # pragma: no cover
    HAVE_NUMBA = False

    def njit(fn):
        return fn
