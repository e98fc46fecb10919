"""A small learnable model: a softmax policy over candidate answers, in numpy.

The model reads a prompt as hashed word unigrams and bigrams and scores every
answer in its answer table with one linear layer; the answer is drawn from the
softmax. It is small enough to train in a fraction of a second on a laptop and
real enough that feedback makes it measurably better (or, trained on bad
labels, worse).

Token-level confidence: an answer is a sequence of words. The log-probability
of word ``j`` is the log of the probability mass of the answers that share the
first ``j`` words, divided by the mass of those sharing the first ``j - 1``.
The token log-probabilities of an answer therefore sum to its log-probability
under the policy, as a language model's would.

Artifacts: a version lives in a folder with ``policy.npz`` (the weights) and
``policy.json`` (the answer table, the feature settings, the lineage and the
sha256 of the weights file). A folder is written once and never changed.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import random
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import numpy as np
import numpy.typing as npt
from threadpoolctl import threadpool_limits

__all__ = [
    "Choice",
    "FitReport",
    "Policy",
    "PreferenceRow",
    "SftRow",
    "artifact_path",
    "featurize",
]

Array = npt.NDArray[np.float64]

FEATURE_DIM = 512
_WEIGHTS = "policy.npz"
_META = "policy.json"


def featurize(text: str, dim: int = FEATURE_DIM) -> Array:
    """Hashed, signed bag of word unigrams and bigrams plus a bias feature, L2-normalized.

    crc32 rather than ``hash()``: the hash must be the same in every process.
    """
    x = np.zeros(dim + 1)
    words = text.lower().split()
    grams = words + [f"{a} {b}" for a, b in itertools.pairwise(words)]
    for g in grams:
        h = zlib.crc32(g.encode())
        x[h % dim] += 1.0 if (h >> 31) & 1 else -1.0
    norm = float(np.linalg.norm(x[:dim]))
    if norm > 0:
        x[:dim] /= norm
    x[dim] = 1.0
    return x


@dataclass(frozen=True)
class Choice:
    """One answer drawn from the policy, with its confidence."""

    index: int
    answer: str
    logprob: float
    token_logprobs: list[float]


@dataclass(frozen=True)
class SftRow:
    prompt: str
    completion: str
    weight: float = 1.0


@dataclass(frozen=True)
class PreferenceRow:
    prompt: str
    chosen: str
    rejected: str
    weight: float = 1.0


@dataclass
class FitReport:
    """What a training run did, for ``candidate.json``'s metrics."""

    sft_rows: int = 0
    preference_rows: int = 0
    new_answers: int = 0
    steps: int = 0
    loss_before: float = 0.0
    loss_after: float = 0.0
    sft_logprob_before: float = 0.0
    sft_logprob_after: float = 0.0
    preference_accuracy_before: float = 0.0
    preference_accuracy_after: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {k: round(float(v), 6) for k, v in self.__dict__.items()}


@dataclass
class Policy:
    """A versioned softmax policy over an answer table."""

    version: str
    answers: list[str]
    weights: Array
    dim: int = FEATURE_DIM
    temperature: float = 1.0
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.weights.shape != (len(self.answers), self.dim + 1):
            raise ValueError(
                f"weights have shape {self.weights.shape}, expected "
                f"({len(self.answers)}, {self.dim + 1})"
            )
        self._index = {a: i for i, a in enumerate(self.answers)}
        self._tokens = [a.split() for a in self.answers]

    # -- building ---------------------------------------------------------

    @classmethod
    def pretrained(
        cls,
        version: str,
        prompts: Sequence[str],
        answer_sets: Sequence[Sequence[str]],
        *,
        steps: int = 400,
        lr: float = 5.0,
        seed: int = 0,
    ) -> Policy:
        """The starting model: knows which answers fit which prompt, not which users like.

        ``answer_sets[k]`` are the acceptable answers for ``prompts[k]``; the
        model is fit to spread its probability evenly over them.
        """
        with threadpool_limits(1):
            return cls._pretrain(version, prompts, answer_sets, steps, lr, seed)

    @classmethod
    def _pretrain(
        cls,
        version: str,
        prompts: Sequence[str],
        answer_sets: Sequence[Sequence[str]],
        steps: int,
        lr: float,
        seed: int,
    ) -> Policy:
        answers: list[str] = []
        for s in answer_sets:
            for a in s:
                if a not in answers:
                    answers.append(a)
        rng = np.random.default_rng(seed)
        w = rng.normal(0.0, 0.01, size=(len(answers), FEATURE_DIM + 1))
        policy = cls(version, answers, w)
        x = np.stack([featurize(p) for p in prompts])
        target = np.zeros((len(prompts), len(answers)))
        for k, s in enumerate(answer_sets):
            for a in s:
                target[k, policy._index[a]] = 1.0 / len(s)
        for _ in range(steps):
            p = policy._softmax(x @ policy.weights.T)
            policy.weights -= lr * (p - target).T @ x / len(prompts)
        policy.meta = {"base_version": "", "trained_on": "pretraining"}
        return policy

    # -- inference --------------------------------------------------------

    def _softmax(self, logits: Array) -> Array:
        z = logits / self.temperature
        z = z - z.max(axis=-1, keepdims=True)
        e = np.exp(z)
        out: Array = e / e.sum(axis=-1, keepdims=True)
        return out

    def probabilities(self, prompt: str) -> Array:
        return self._softmax(self.weights @ featurize(prompt, self.dim))

    def act(self, prompt: str, rng: random.Random) -> Choice:
        """Draws an answer; returns it with its log-probability and token log-probabilities."""
        p = self.probabilities(prompt)
        u = rng.random()
        k = int(np.searchsorted(np.cumsum(p), u, side="right"))
        k = min(k, len(p) - 1)
        return Choice(k, self.answers[k], math.log(max(p[k], 1e-300)), self.token_logprobs(p, k))

    def greedy(self, prompt: str) -> Choice:
        p = self.probabilities(prompt)
        k = int(np.argmax(p))
        return Choice(k, self.answers[k], math.log(max(p[k], 1e-300)), self.token_logprobs(p, k))

    def token_logprobs(self, p: Array, k: int) -> list[float]:
        """Per-word log-probabilities of answer ``k`` that sum to ``log p[k]``."""
        tokens = self._tokens[k]
        out: list[float] = []
        prev = 1.0
        for j in range(1, len(tokens) + 1):
            prefix = tokens[:j]
            mass = sum(
                float(p[i]) for i, t in enumerate(self._tokens) if t[:j] == prefix and len(t) >= j
            )
            if j == len(tokens):
                mass = float(p[k])  # answers that continue past this one do not count
            out.append(math.log(max(mass, 1e-300) / max(prev, 1e-300)))
            prev = mass
        return [round(v, 6) for v in out]

    # -- training ---------------------------------------------------------

    def index_of(self, answer: str) -> int:
        """The answer's row, adding it to the table (with a zero row) when it is new."""
        k = self._index.get(answer)
        if k is None:
            k = len(self.answers)
            self.answers.append(answer)
            self._tokens.append(answer.split())
            self._index[answer] = k
            self.weights = np.vstack([self.weights, np.zeros((1, self.dim + 1))])
        return k

    def fit(
        self,
        sft: Sequence[SftRow],
        preferences: Sequence[PreferenceRow],
        *,
        steps: int = 200,
        lr: float = 1.0,
        beta: float = 1.0,
        preference_weight: float = 1.0,
        anchor: float = 1e-3,
        unlearn: bool = False,
        negatives: Sequence[SftRow] = (),
        negative_weight: float = 0.5,
    ) -> FitReport:
        """Trains in place from SFT rows (weighted likelihood) and preference pairs (DPO).

        ``negatives`` are answers users did not want (KTO's undesirable rows):
        their probability is pushed down (unlikelihood), at ``negative_weight``
        relative to the SFT term.

        The DPO term uses the policy as it was before the call as the
        reference; ``anchor`` is an L2 pull towards those weights, which
        together with replay keeps the model from forgetting.

        ``unlearn`` swaps good and bad: SFT rows are pushed down, negatives
        up, every pair reversed. A deliberately bad model, for demos of
        rollback.
        """
        # One BLAS thread: the products are tiny and extra threads only spin.
        with threadpool_limits(1):
            return self._fit(
                sft,
                preferences,
                negatives,
                steps,
                lr,
                beta,
                preference_weight,
                negative_weight,
                anchor,
                unlearn,
            )

    def _fit(
        self,
        sft: Sequence[SftRow],
        preferences: Sequence[PreferenceRow],
        negatives: Sequence[SftRow],
        steps: int,
        lr: float,
        beta: float,
        preference_weight: float,
        negative_weight: float,
        anchor: float,
        unlearn: bool,
    ) -> FitReport:
        n0 = len(self.answers)
        report = FitReport(len(sft), len(preferences))
        # Identical rows are merged (weights summed): same objective, far fewer rows.
        up: dict[tuple[int, str], float] = {}
        down: dict[tuple[int, str], float] = {}
        for rows, into, scale in (
            (sft, down if unlearn else up, 1.0),
            (negatives, up if unlearn else down, negative_weight),
        ):
            for r in rows:
                key = (self.index_of(r.completion), r.prompt)
                into[key] = into.get(key, 0.0) + scale * max(r.weight, 0.0)
        pref_w: dict[tuple[int, int, str], float] = {}
        for pr in preferences:
            c, j = self.index_of(pr.chosen), self.index_of(pr.rejected)
            if unlearn:
                c, j = j, c
            if c != j:
                pkey = (c, j, pr.prompt)
                pref_w[pkey] = pref_w.get(pkey, 0.0) + max(pr.weight, 0.0)
        report.new_answers = len(self.answers) - n0
        n_answers = len(self.answers)
        terms = [
            _LikelihoodTerm.build(up, n_answers, self.dim, unlikely=False),
            _LikelihoodTerm.build(down, n_answers, self.dim, unlikely=True),
        ]
        sft_norm = sum(t.weights.sum() for t in terms)
        xp = np.stack([featurize(k[2], self.dim) for k in pref_w]) if pref_w else None
        wp = np.array(list(pref_w.values())) if pref_w else None
        # diff[i] is +1 at the chosen answer and -1 at the rejected one, so the
        # pair's margin is the row sum of (scores * diff).
        diff = np.zeros((len(pref_w), n_answers))
        for i, (c, j, _) in enumerate(pref_w):
            diff[i, c] = 1.0
            diff[i, j] = -1.0
        base = self.weights.copy()
        ref_margin = ((xp @ base.T) * diff).sum(axis=1) if xp is not None else None

        def loss_and_grad(w: Array) -> tuple[float, Array]:
            grad = anchor * (w - base)
            loss = 0.5 * anchor * float(((w - base) ** 2).sum())
            for term in terms:
                if len(term.weights) and sft_norm > 0:
                    t_loss, t_grad = term.loss_and_grad(w, self._softmax, float(sft_norm))
                    loss += t_loss
                    grad += t_grad
            if xp is not None and wp is not None and ref_margin is not None and wp.sum() > 0:
                margin = ((xp @ w.T) * diff).sum(axis=1)
                z = beta * (margin - ref_margin)
                norm = float(wp.sum())
                loss += preference_weight * float((wp * np.logaddexp(0, -z)).sum()) / norm
                # d/dmargin of -log sigmoid(z) = -beta * sigmoid(-z)
                g = -beta * preference_weight * wp / norm / (1 + np.exp(z))
                grad += (diff * g[:, None]).T @ xp
            return loss, grad

        report.loss_before = loss_and_grad(self.weights)[0]
        report.sft_logprob_before, report.preference_accuracy_before = self._diagnose(
            terms[0], xp, wp, diff
        )
        # Adam: the gradients of rare answers are tiny next to those of common ones.
        m = np.zeros_like(self.weights)
        v = np.zeros_like(self.weights)
        b1, b2, eps = 0.9, 0.999, 1e-8
        for t in range(1, steps + 1):
            _, g = loss_and_grad(self.weights)
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            self.weights -= lr * 0.01 * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
        report.steps = steps
        report.loss_after = loss_and_grad(self.weights)[0]
        report.sft_logprob_after, report.preference_accuracy_after = self._diagnose(
            terms[0], xp, wp, diff
        )
        return report

    def _diagnose(
        self, liked: _LikelihoodTerm, xp: Array | None, wp: Array | None, diff: Array
    ) -> tuple[float, float]:
        """Weighted mean log-likelihood of the liked rows, weighted accuracy on the pairs."""
        lp = 0.0
        if len(liked.weights) and liked.weights.sum() > 0:
            py = (self._softmax(liked.x @ self.weights.T) * liked.onehot).sum(axis=1)
            lp = float((liked.weights * np.log(np.clip(py, 1e-12, 1))).sum() / liked.weights.sum())
        acc = 0.0
        if xp is not None and wp is not None and wp.sum() > 0:
            margin = ((xp @ self.weights.T) * diff).sum(axis=1)
            acc = float((wp * (margin > 0)).sum() / wp.sum())
        return lp, acc

    def copy(self, version: str) -> Policy:
        return Policy(
            version,
            list(self.answers),
            self.weights.copy(),
            self.dim,
            self.temperature,
            {"base_version": self.version},
        )

    # -- artifacts --------------------------------------------------------

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Writes ``policy.npz`` and ``policy.json`` into a new folder; returns it.

        Raises FileExistsError when the folder already holds a model: a
        version is never overwritten.
        """
        out = Path(folder)
        if (out / _META).exists():
            raise FileExistsError(f"{out} already holds model {self.version!r}")
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / (_WEIGHTS + ".tmp")
        with open(tmp, "wb") as fh:
            np.savez(fh, weights=self.weights)
        digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
        os.replace(tmp, out / _WEIGHTS)
        meta = {
            "format": "atlas-demo-policy/1",
            "version": self.version,
            "answers": self.answers,
            "feature_dim": self.dim,
            "temperature": self.temperature,
            "weights_sha256": digest,
            **self.meta,
        }
        tmp_meta = out / (_META + ".tmp")
        tmp_meta.write_text(json.dumps(meta, indent=1, sort_keys=True))
        os.replace(tmp_meta, out / _META)
        return out

    @classmethod
    def load(cls, location: str | os.PathLike[str]) -> Policy:
        """Reads a model folder (a path or a ``file://`` URI).

        Raises:
            FileNotFoundError: nothing there.
            ValueError: the weights do not match their recorded sha256, or
                the files are not a policy.
        """
        folder = artifact_path(location)
        try:
            meta = json.loads((folder / _META).read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{folder / _META}: not JSON: {exc}") from exc
        raw = (folder / _WEIGHTS).read_bytes()
        if hashlib.sha256(raw).hexdigest() != meta.get("weights_sha256"):
            raise ValueError(f"{folder / _WEIGHTS}: sha256 does not match {_META}")
        with np.load(folder / _WEIGHTS) as data:
            weights = np.asarray(data["weights"], dtype=np.float64)
        known = {"format", "version", "answers", "feature_dim", "temperature", "weights_sha256"}
        return cls(
            str(meta["version"]),
            list(meta["answers"]),
            weights,
            int(meta["feature_dim"]),
            float(meta.get("temperature", 1.0)),
            {k: v for k, v in meta.items() if k not in known},
        )


def artifact_path(location: str | os.PathLike[str]) -> Path:
    """A model folder from a path or a ``file://`` URI."""
    text = os.fspath(location)
    if text.startswith("file:"):
        return Path(unquote(urlparse(text).path))
    return Path(text)


@dataclass
class _LikelihoodTerm:
    """Weighted rows whose answer should become likely (or, ``unlikely``, not)."""

    x: Array
    onehot: Array
    weights: Array
    unlikely: bool

    @classmethod
    def build(
        cls, rows: dict[tuple[int, str], float], n_answers: int, dim: int, *, unlikely: bool
    ) -> _LikelihoodTerm:
        x = np.stack([featurize(k[1], dim) for k in rows]) if rows else np.zeros((0, dim + 1))
        onehot = np.zeros((len(rows), n_answers))
        for i, (k, _) in enumerate(rows):
            onehot[i, k] = 1.0
        return cls(x, onehot, np.array(list(rows.values()), dtype=np.float64), unlikely)

    def loss_and_grad(
        self, w: Array, softmax: Callable[[Array], Array], norm: float
    ) -> tuple[float, Array]:
        p = softmax(self.x @ w.T)
        py = (p * self.onehot).sum(axis=1)
        ws = self.weights
        if self.unlikely:
            # d/dz of -log(1 - p_y) = p_y / (1 - p_y) * (onehot - p)
            loss = float(-(ws * np.log(np.clip(1 - py, 1e-12, 1))).sum()) / norm
            coef = (ws * py / np.clip(1 - py, 1e-12, 1))[:, None]
            return loss, (coef * (self.onehot - p)).T @ self.x / norm
        loss = float(-(ws * np.log(np.clip(py, 1e-12, 1))).sum()) / norm
        return loss, ((p - self.onehot) * ws[:, None]).T @ self.x / norm
