"""Sampling parameters (validated before any work starts) and the numpy reference sampler.

The reference sampler is the meaning of the backends' on-device samplers: penalties over the counts
of tokens seen so far, then temperature, top-k, top-p, min-p, then a draw. Temperature 0 is greedy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, asdict

import numpy as np

from .errors import NumericalError, SamplingError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0       # 0 = greedy
    top_k: int = 0                 # 0 = off
    top_p: float = 1.0             # 1 = off
    min_p: float = 0.0             # 0 = off
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None

    def __post_init__(self):
        def bad(name, why):
            raise SamplingError(f"invalid sampling parameter {name}={getattr(self, name)!r}: {why}")
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                     "frequency_penalty"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                bad(name, "must be a finite number")
        if self.temperature < 0:
            bad("temperature", "must be >= 0 (0 means greedy)")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            bad("top_k", "must be an integer >= 0 (0 means off)")
        if not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if not 0 <= self.min_p < 1:
            bad("min_p", "must be in [0, 1)")
        if self.repetition_penalty <= 0:
            bad("repetition_penalty", "must be > 0 (1 means off)")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)
                                      or not 0 <= self.seed < 2**64):
            bad("seed", "must be an integer in [0, 2**64)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def to_dict(self) -> dict:
        return asdict(self)


def apply_penalties(logits: np.ndarray, counts: np.ndarray, p: SamplingParams) -> np.ndarray:
    """Penalties over the tokens seen so far (counts[v] = occurrences of token v)."""
    if p.repetition_penalty == 1 and p.presence_penalty == 0 and p.frequency_penalty == 0:
        return logits
    out = logits.astype(np.float32, copy=True)
    seen = counts > 0
    if p.repetition_penalty != 1:
        s = out[seen]
        out[seen] = np.where(s > 0, s / p.repetition_penalty, s * p.repetition_penalty)
    out -= seen * np.float32(p.presence_penalty) + counts.astype(np.float32) * np.float32(p.frequency_penalty)
    return out


def sample(logits: np.ndarray, p: SamplingParams, rng: np.random.Generator,
           counts: np.ndarray | None = None) -> tuple[int, float]:
    """Pick the next token from one row of logits.

    Returns (token, logprob): the log-probability of the token under the distribution it was drawn
    from (greedy: the softmax of the penalized logits)."""
    logits = np.asarray(logits, dtype=np.float32)
    if not np.all(np.isfinite(logits)):
        raise NumericalError("NaN or Inf in logits: refusing to sample garbage")
    if counts is not None:
        logits = apply_penalties(logits, counts, p)
    if p.greedy:
        tok = int(np.argmax(logits))
        m = logits.max()
        return tok, float(logits[tok] - m - np.log(np.exp(logits - m).sum()))
    z = logits / np.float32(p.temperature)
    order = np.argsort(-z, kind="stable")
    if p.top_k:
        order = order[:p.top_k]
    zs = z[order]
    probs = np.exp(zs - zs[0])
    probs /= probs.sum()
    keep = len(order)
    if p.top_p < 1:
        keep = min(keep, int(np.searchsorted(np.cumsum(probs), p.top_p) + 1))
    if p.min_p > 0:
        keep = min(keep, max(1, int(np.sum(probs >= p.min_p * probs[0]))))
    probs = probs[:keep] / probs[:keep].sum()
    i = int(rng.choice(keep, p=probs))
    return int(order[i]), float(np.log(probs[i]))
