"""ListOps, the generator of Long Range Arena (Tay et al., 2021, "Long Range Arena: A Benchmark for Efficient
Transformers"; `lra_benchmarks/data/listops.py`, after Nangia & Bowman, 2018), seeded per example.

A tree is grown from depth 1: below `max_depth` a node is an operator with probability 0.25 (otherwise a digit
0-9); an operator takes 2 ... `max_args` arguments, each a subtree, and is one of MIN, MAX, MED (int of the
median) and SM (sum mod 10). The length of a tree counts its digits plus 2 per operator (the operator and its
closing bracket), which is exactly the number of tokens here: `[MAX 2 9 [MIN 4 7 ] 0 ]` has length 9. Trees are
drawn until `min_length < length < max_length` (LRA's strict bounds); the label is the tree's value (10 classes).
An example's draws come from a Python `random.Random` seeded by its (seed, split, index) numpy Generator (its scalar
draws are several times cheaper than numpy's).

Tokens: pad 0, digits 0-9 -> 1 ... 10, `[MIN` `[MAX` `[MED` `[SM` -> 11 ... 14, `]` -> 15, CLS -> 16 (appended).
Inputs are padded to `seq_len` = max_length (the longest tree, max_length - 1 tokens, plus CLS).

The defaults (lengths in (50, 200), 10k / 1k examples) run on a CPU; LRA uses max_depth 10, max_args 10,
lengths in (500, 2000), 96k train / 2k test. Unlike LRA, duplicate trees are not removed.
"""

from __future__ import annotations

import dataclasses
import random
import statistics
from collections.abc import Callable, Sequence
from typing import ClassVar

import numpy as np

from seqlab.data.base import Task, classification_example

DIGIT_OFFSET = 1
OPERATORS: dict[str, Callable[[Sequence[int]], int]] = {
    "[MIN": min,
    "[MAX": max,
    "[MED": lambda args: int(statistics.median(args)),
    "[SM": lambda args: sum(args) % 10,
}
OPERATOR_NAMES = tuple(OPERATORS)
OPERATOR_IDS = {op: 11 + i for i, op in enumerate(OPERATORS)}
CLOSE_ID = 15
CLS_ID = 16
VOCAB_SIZE = 17
OPERATOR_PROBABILITY = 0.25
MAX_TRIES = 10_000


@dataclasses.dataclass(frozen=True)
class ListOps(Task):
    """LRA ListOps as 10-way classification; generator and token ids in the module docstring."""

    name: ClassVar[str] = "listops"
    kind: ClassVar[str] = "classification"

    max_depth: int = 10
    max_args: int = 10
    min_length: int = 50
    max_length: int = 200

    @property
    def vocab_size(self) -> int:
        return VOCAB_SIZE

    @property
    def seq_len(self) -> int:
        return self.max_length

    @property
    def num_classes(self) -> int:
        return 10

    def validate(self) -> None:
        super().validate()
        self._require(self.max_depth >= 2, "max_depth", "must be >= 2 (depth 1 is the root)")
        self._require(self.max_args >= 2, "max_args", "must be >= 2")
        self._require(self.min_length >= 0, "min_length", "must be >= 0")
        self._require(
            self.max_length >= self.min_length + 2,
            "max_length",
            f"must be >= min_length + 2 ({self.min_length + 2}): lengths lie strictly between the two",
        )

    def _generate(self, rng: np.random.Generator, split: str) -> dict[str, np.ndarray]:
        draws = random.Random(int(rng.integers(2**63)))
        for _ in range(MAX_TRIES):
            tokens: list[int] = []
            try:
                value = self._grow(draws, 1, tokens)
            except _TooLong:
                continue
            if self.min_length < len(tokens) < self.max_length:
                return classification_example(np.array(tokens + [CLS_ID]), value, self.seq_len)
        raise ValueError(
            f"data.listops.min_length, data.listops.max_length: no tree with length in ({self.min_length}, "
            f"{self.max_length}) in {MAX_TRIES} draws with max_depth={self.max_depth}, max_args={self.max_args}; "
            "widen the length range or change the depth / argument limits"
        )

    def _grow(self, draws: random.Random, depth: int, tokens: list[int]) -> int:
        """Append the token ids of a random subtree rooted at `depth` to `tokens` and return its value.

        Raises _TooLong as soon as `tokens` reaches max_length: that tree would be rejected anyway, so stopping
        early leaves the distribution of accepted trees unchanged.
        """
        if len(tokens) >= self.max_length:
            raise _TooLong
        if depth >= self.max_depth or draws.random() >= OPERATOR_PROBABILITY:
            digit = draws.randrange(10)
            tokens.append(DIGIT_OFFSET + digit)
            return digit
        num_args = draws.randint(2, self.max_args)
        op = draws.choice(OPERATOR_NAMES)
        tokens.append(OPERATOR_IDS[op])
        values = [self._grow(draws, depth + 1, tokens) for _ in range(num_args)]
        tokens.append(CLOSE_ID)
        return OPERATORS[op](values)


class _TooLong(Exception):
    """A tree being grown has reached max_length tokens."""
