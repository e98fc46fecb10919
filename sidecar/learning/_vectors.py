"""Text vectors and token uncertainty: the features selective learning and memory share.

Vectors are hashed character n-grams (the "hashing trick"): no vocabulary to
fit or store, the same text always gives the same vector, and a batch of a
thousand prompts is vectorized in tens of milliseconds with numpy alone. An
embedding model can stand behind the same :class:`TextVectorizer` protocol.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, Protocol

import numpy as np
import numpy.typing as npt

__all__ = [
    "HashedNgramVectorizer",
    "TextVectorizer",
    "UncertaintyMeasure",
    "check_logprobs",
    "uncertainty",
]

Matrix = npt.NDArray[np.float32]

UncertaintyMeasure = Literal["nll", "entropy"]

_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_PRIME = np.uint64(0x100000001B3)


class TextVectorizer(Protocol):
    """Maps texts to L2-normalized rows (a zero row for a text with no features)."""

    @property
    def dim(self) -> int: ...

    def vectorize(self, texts: Sequence[str]) -> Matrix: ...


def _seed(n: int) -> np.uint64:
    # a different start per n-gram size, so "ab" and "ab " hash apart
    return np.uint64((n * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF)


def _mix(h: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    # splitmix64 finalizer: spreads the low-entropy rolling hash over all bits
    h = h ^ (h >> np.uint64(30))
    h = h * _MIX1
    h = h ^ (h >> np.uint64(27))
    h = h * _MIX2
    return h ^ (h >> np.uint64(31))


class HashedNgramVectorizer:
    """Signed feature hashing of lower-cased character n-grams.

    Args:
        dim: vector size. Larger keeps distinct n-grams apart (fewer
            collisions) at the cost of memory per remembered sample.
        ngram_sizes: the n-gram lengths counted, in characters.
    """

    def __init__(self, dim: int = 1024, ngram_sizes: Sequence[int] = (3, 4)) -> None:
        if dim < 8:
            raise ValueError(f"dim: must be >= 8, got {dim}")
        if not ngram_sizes or any(n < 1 for n in ngram_sizes):
            raise ValueError(f"ngram_sizes: must be positive, got {list(ngram_sizes)}")
        self._dim = dim
        self._sizes = tuple(sorted(set(ngram_sizes)))

    @property
    def dim(self) -> int:
        return self._dim

    def vectorize(self, texts: Sequence[str]) -> Matrix:
        t = len(texts)
        dim = self._dim
        if t == 0:
            return np.zeros((0, dim), dtype=np.float32)
        # every text in one array of code points, hashed in one pass per n
        padded = [f" {text.lower()} " for text in texts]
        cps = np.frombuffer("".join(padded).encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
        lengths = np.fromiter((len(p) for p in padded), dtype=np.int64, count=t)
        ends = np.cumsum(lengths)
        owner = np.repeat(np.arange(t, dtype=np.int64), lengths)
        total = int(cps.shape[0])
        flat = np.zeros(t * dim, dtype=np.float64)
        udim = np.uint64(dim)
        for n in self._sizes:
            if total < n:
                continue
            m = total - n + 1
            h = np.full(m, _seed(n), dtype=np.uint64)
            for j in range(n):
                h = h * _PRIME + cps[j : j + m]
            h = _mix(h)
            start_owner = owner[:m]
            valid = np.arange(n, m + n, dtype=np.int64) <= ends[start_owner]
            h = h[valid]
            idx = start_owner[valid] * dim + (h % udim).astype(np.int64)
            sign = 1.0 - 2.0 * (h >> np.uint64(63)).astype(np.float64)
            flat += np.bincount(idx, weights=sign, minlength=t * dim)
        out = flat.reshape(t, dim).astype(np.float32)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        np.divide(out, norms, out=out, where=norms > 0)
        return out


def check_logprobs(values: Sequence[float], field: str = "token_logprobs") -> str | None:
    """A reason naming the first bad entry (non-finite or positive), or None."""
    if not values:
        return None
    arr = np.asarray(values, dtype=np.float64)
    bad = ~np.isfinite(arr) | (arr > 0.0)
    if not bad.any():
        return None
    i = int(np.argmax(bad))
    return f"{field}[{i}]: must be a finite log-probability <= 0, got {values[i]!r}"


def uncertainty(values: Sequence[float], measure: UncertaintyMeasure = "nll") -> float | None:
    """Normalized uncertainty of a generation in [0, 1], or None without log-probs.

    ``nll``: one minus the geometric mean token probability, that is
    ``1 - exp(-mean NLL)``; 0 when every token was certain.
    ``entropy``: mean binary entropy of each chosen token's probability (the
    chosen token against everything else), divided by ln 2 to reach [0, 1].
    Only the chosen tokens' log-probs are known, so this is a lower bound of
    the full-vocabulary entropy that ranks generations the same way.
    Values must already be checked with :func:`check_logprobs`.
    """
    n = len(values)
    if n == 0:
        return None
    if measure == "nll":
        mean = math.fsum(values) / n if n < 64 else float(np.mean(np.asarray(values)))
        return min(1.0, max(0.0, 1.0 - math.exp(mean)))
    p = np.exp(np.asarray(values, dtype=np.float64))
    p = np.clip(p, 1e-12, 1.0 - 1e-12)
    h = -(p * np.log(p) + (1.0 - p) * np.log1p(-p))
    return float(min(1.0, max(0.0, float(np.mean(h)) / math.log(2.0))))
