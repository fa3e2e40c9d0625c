"""Multi-query associative recall (MQAR), the generator of Zoology (Arora et al., 2023, "Zoology: Measuring and
Improving Recall in Efficient Language Models"; HazyResearch/zoology `zoology/data/multiquery_ar.py`), one example
at a time.

With V = vocab_size, L = seq_len, D = num_kv_pairs:

1. D distinct keys from {1, ..., V/2 - 1} and D distinct values from {V/2, ..., V - 1} (token 0 is neither).
2. Context `k1 v1 k2 v2 ... kD vD` at positions 0 ... 2D-1.
3. space = (L - 2D) // 2 and p_i ∝ a · i^(a-1) for i = 1 ... space (a = power_a). D distinct gaps g are drawn
   from {0, ..., space-1} without replacement with P(g) ∝ p_{g+1}: queries cluster near the start.
4. A query region of L - 2D + 1 zeros gets key k_j at offset 2 g_j; sequence = context + region (L + 1 tokens).
5. Labels: L + 1 copies of -100 with label[2D + 2 g_j + 1] = v_j; inputs = sequence[:-1], labels = labels[1:], so
   the target v_j sits at the input position of the repeated key k_j (exactly D scored positions).
6. `random_non_queries`: every remaining 0 in the inputs becomes a uniform token from the whole vocabulary.

The defaults are the CPU smoke setting (V=256, L=64, D=4, 10k / 1k examples); Zoology's Figure 2 uses V=8192,
(L, D) in {(64, 4), (128, 8), (256, 16), (512, 64)}, 100k train / 3k test.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np

from seqlab.data.base import IGNORE_INDEX, Task, lm_example


@dataclasses.dataclass(frozen=True)
class MQAR(Task):
    """Zoology's multi-query associative recall; example layout in the module docstring."""

    name: ClassVar[str] = "mqar"
    kind: ClassVar[str] = "lm"

    vocab_size: int = 256
    seq_len: int = 64
    num_kv_pairs: int = 4
    power_a: float = 0.01
    random_non_queries: bool = False

    def validate(self) -> None:
        super().validate()
        self._require(self.num_kv_pairs >= 1, "num_kv_pairs", "must be >= 1")
        self._require(self.seq_len >= 2 and self.seq_len % 2 == 0, "seq_len", "must be even and >= 2")
        self._require(self.vocab_size > self.seq_len, "vocab_size", f"must exceed seq_len ({self.seq_len})")
        self._require(
            4 * self.num_kv_pairs <= self.seq_len, "num_kv_pairs", f"4 x it must be <= seq_len ({self.seq_len})"
        )
        self._require(self.power_a > 0, "power_a", "must be > 0")

    def gap_probabilities(self) -> np.ndarray:
        """P(g) for g = 0 ... space-1, proportional to power_a · (g+1)^(power_a-1); shape [space]."""
        space = (self.seq_len - 2 * self.num_kv_pairs) // 2
        i = np.arange(1, space + 1, dtype=np.float64)
        p = self.power_a * i ** (self.power_a - 1)
        return p / p.sum()

    def _generate(self, rng: np.random.Generator, split: str) -> dict[str, np.ndarray]:
        v, d = self.vocab_size, self.num_kv_pairs
        keys = rng.choice(np.arange(1, v // 2), size=d, replace=False)
        values = rng.choice(np.arange(v // 2, v), size=d, replace=False)
        p = self.gap_probabilities()
        gaps = rng.choice(len(p), size=d, replace=False, p=p)
        context = np.stack([keys, values], axis=1).reshape(-1)
        queries = np.zeros(self.seq_len - 2 * d + 1, np.int64)
        queries[2 * gaps] = keys
        sequence = np.concatenate([context, queries])
        labels = np.full(self.seq_len + 1, IGNORE_INDEX, np.int64)
        labels[2 * d + 2 * gaps + 1] = values
        inputs = sequence[:-1]
        if self.random_non_queries:
            fill = rng.integers(0, v, size=inputs.shape)
            inputs = np.where(inputs == 0, fill, inputs)
        return lm_example(inputs, labels[1:])


def mqar_accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Zoology's MQAR metric: per example, the mean of (prediction == label) over scored positions, then the mean
    over examples that have any scored position.

    predictions: predicted token ids [B, L] (argmax of the logits); labels: [B, L] with IGNORE_INDEX unscored.
    """
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if predictions.shape != labels.shape or labels.ndim != 2:
        raise ValueError(
            f"predictions, labels: must both be [batch, length], got {predictions.shape} and {labels.shape}"
        )
    scored = labels != IGNORE_INDEX
    counts = scored.sum(axis=1)
    hits = ((predictions == labels) & scored).sum(axis=1)
    has_scored = counts > 0
    if not has_scored.any():
        raise ValueError("labels: no scored position (every label is IGNORE_INDEX = -100)")
    return float(np.mean(hits[has_scored] / counts[has_scored]))
