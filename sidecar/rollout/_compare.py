"""Comparators: how much a candidate's answer agrees with the stable model's.

A comparator maps two answers to a similarity in [0, 1]. Three come built in
(normalized exact match, token Jaccard, character n-gram cosine); a judge (an
embedding model, an LLM grader) plugs in through the same two-method
interface. They are a few lines each on the standard library, so no text
similarity package is pulled into the daemon for them.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from typing import Protocol

__all__ = [
    "COMPARATORS",
    "CharNgramCosine",
    "Comparator",
    "NormalizedExact",
    "TokenJaccard",
    "comparator_by_name",
    "normalize",
]

_WS = re.compile(r"\s+")
_TOKEN = re.compile(r"\w+", re.UNICODE)


def normalize(text: str) -> str:
    """NFKC, case-folded, whitespace collapsed, outer punctuation and space stripped."""
    t = unicodedata.normalize("NFKC", text).casefold()
    return _WS.sub(" ", t).strip(" \t\n.,;:!?\"'")


class Comparator(Protocol):
    """Similarity of two answers to the same prompt, in [0, 1]; 1 is the same answer."""

    name: str

    def similarity(self, stable: str, candidate: str) -> float: ...


class NormalizedExact:
    """Equal word sequences after normalization (case, width, spacing, punctuation)."""

    name = "exact"

    def similarity(self, stable: str, candidate: str) -> float:
        a = _TOKEN.findall(normalize(stable))
        return 1.0 if a == _TOKEN.findall(normalize(candidate)) else 0.0


class TokenJaccard:
    name = "token_jaccard"

    def similarity(self, stable: str, candidate: str) -> float:
        a = set(_TOKEN.findall(normalize(stable)))
        b = set(_TOKEN.findall(normalize(candidate)))
        if not a and not b:
            return 1.0
        return len(a & b) / len(a | b)


class CharNgramCosine:
    name = "char_ngram_cosine"

    def __init__(self, n: int = 3) -> None:
        if n < 1:
            raise ValueError("n must be >= 1")
        self.n = n

    def _grams(self, text: str) -> Counter[str]:
        t = f" {normalize(text)} "
        if len(t) < self.n:
            return Counter([t])
        return Counter(t[i : i + self.n] for i in range(len(t) - self.n + 1))

    def similarity(self, stable: str, candidate: str) -> float:
        a, b = self._grams(stable), self._grams(candidate)
        dot = sum(v * b.get(k, 0) for k, v in a.items())
        na = math.sqrt(sum(v * v for v in a.values()))
        nb = math.sqrt(sum(v * v for v in b.values()))
        if na == 0 or nb == 0:
            return 1.0 if na == nb else 0.0
        return min(1.0, dot / (na * nb))


COMPARATORS: dict[str, type[NormalizedExact] | type[TokenJaccard] | type[CharNgramCosine]] = {
    "exact": NormalizedExact,
    "token_jaccard": TokenJaccard,
    "char_ngram_cosine": CharNgramCosine,
}


def comparator_by_name(name: str) -> Comparator:
    try:
        return COMPARATORS[name]()
    except KeyError:
        raise ValueError(f"unknown comparator {name!r}; one of {sorted(COMPARATORS)}") from None
