"""The `Task` contract every seqlab dataset implements, and the helpers tasks share.

A task is a frozen dataclass whose fields are its options (all with defaults, typed int / float / bool / str, so
the config system can expose them as `config.data.<task>.<field>`). Every example is a pure function of
`(seed, split, index)`: `example` seeds a fresh `numpy.random.Generator` from those three numbers, so any example
can be regenerated on demand, in any order, in any process, without storing a dataset.

Example layouts (L = `seq_len`):

- kind "lm": `{"inputs": int32 [L], "labels": int32 [L]}`; `labels[t]` is the target for the model's output at
  position t, and `IGNORE_INDEX` (-100) marks positions that are not scored.
- kind "classification": `{"inputs": int32 [L], "length": int32 [], "label": int32 []}`; the sequence fills
  `inputs[:length]` (its last real token is a CLS token the task appends) and `PAD_ID` (0) fills the rest.

Packed documents (an "lm" task whose `packs_documents()` is True, as bytes by default): the task also has
`num_documents(split)` documents, `document(split, i)` = `{"inputs": int32 [n], "labels": int32 [n]}` with
1 <= n <= L and no label outside the document; the pipelines pack them first-fit into rows of L and add
`"segment_ids"` (1, 2, ... per row; 0 = padding, labels IGNORE_INDEX) and `"positions"` (within each document).

An "lm" task's `lm_head` says where the logits at position t come from: "per_position" (the default; the model's
output at t, `models.DecoderLM`) or "from_last" (the output at the LAST position only, decoded for target index t by
`models.LastStateDecoder`: MAD's compression task, where the mixers must squeeze the sequence into one state).
"""

from __future__ import annotations

import abc
import dataclasses
import typing
from typing import Any, ClassVar

import numpy as np

IGNORE_INDEX = -100
PAD_ID = 0
SPLITS = ("train", "eval")
_SPLIT_IDS = {split: i for i, split in enumerate(SPLITS)}
_FIELD_TYPES = (int, float, bool, str)


@dataclasses.dataclass(frozen=True)
class Task(abc.ABC):
    """A generated (or file-backed) dataset with a train and an eval split.

    A subclass sets `name` and `kind` (and `byte_level` when its tokens are the 256 byte values of text, so
    `seqlab.sample` can decode what a model of it generates, and `lm_head` when its logits are decoded from the last
    position, module docstring), adds its options as fields, provides `vocab_size` and `seq_len` (as options
    or as properties), extends `validate`, and implements `_generate` (or `_example_at`, to read stored examples
    by index).
    """

    name: ClassVar[str]
    kind: ClassVar[str]
    byte_level: ClassVar[bool] = False
    lm_head: ClassVar[str] = "per_position"

    seed: int = 0
    num_train: int = 10_000
    num_eval: int = 1_000

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Model vocabulary, including pad / CLS / special tokens."""

    @property
    @abc.abstractmethod
    def seq_len(self) -> int:
        """Model input length L; every example is padded to it."""

    @property
    def num_classes(self) -> int | None:
        """Number of classes of a classification task; None for language-modelling tasks."""
        return None

    def validate(self) -> None:
        """Raise ValueError naming the offending option (`data.<task>.<field>: ...`)."""
        self._check_field_types()
        self._require(self.seed >= 0, "seed", "must be >= 0")
        self._require(self.num_train >= 1, "num_train", "must be >= 1")
        self._require(self.num_eval >= 1, "num_eval", "must be >= 1")

    def num_examples(self, split: str) -> int:
        """Number of examples in `split` ("train" or "eval")."""
        return self.num_eval if _split_id(split) else self.num_train

    def packs_documents(self) -> bool:
        """Whether the pipelines pack this task's documents into rows (module docstring) instead of batching its
        examples."""
        return False

    def num_documents(self, split: str) -> int:
        """The number of documents of `split` (tasks that pack documents)."""
        raise NotImplementedError(f"data.{self.name}: this task has no documents to pack")

    def document(self, split: str, index: int) -> dict[str, np.ndarray]:
        """Document `index` of `split`: inputs [n], labels [n] (1 <= n <= seq_len); tasks that pack documents."""
        raise NotImplementedError(f"data.{self.name}: this task has no documents to pack")

    def example(self, split: str, index: int) -> dict[str, np.ndarray]:
        """Example `index` of `split`, a pure function of (seed, split, index); layouts in the module docstring."""
        return self._example_at(self._example_rng(split, index), split, int(index))

    def _example_rng(self, split: str, index: int) -> np.random.Generator:
        """The generator of example `index` of `split`, seeded from (seed, split, index); ValueError for an index
        outside the split."""
        count = self.num_examples(split)
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < count:
            raise ValueError(f"index: must be an integer in [0, {count}) for split {split!r}, got {index!r}")
        return np.random.default_rng([self.seed, _split_id(split), int(index)])

    def _example_at(self, rng: np.random.Generator, split: str, index: int) -> dict[str, np.ndarray]:
        """Example `index` of `split`, drawn with `rng`: `_generate(rng, split)`; a task that reads stored examples
        by index (digits) overrides this instead of `_generate`."""
        return self._generate(rng, split)

    def _generate(self, rng: np.random.Generator, split: str) -> dict[str, np.ndarray]:
        """One example drawn with `rng` (seeded from (seed, split, index)); `split` for file-backed tasks."""
        raise NotImplementedError(f"{type(self).__name__} implements neither _generate nor _example_at")

    def _require(self, ok: bool, field: str, requirement: str) -> None:
        """Raise `ValueError("data.<task>.<field>: <requirement>, got <value>")` unless `ok`."""
        if not ok:
            raise ValueError(f"data.{self.name}.{field}: {requirement}, got {getattr(self, field)!r}")

    def _check_field_types(self) -> None:
        """Every option has its annotated type (int / float / bool / str)."""
        hints = typing.get_type_hints(type(self))
        for field in dataclasses.fields(self):
            expected = hints[field.name]
            ok = _has_type(getattr(self, field.name), expected)
            self._require(ok, field.name, f"must be of type {expected.__name__}")


def _has_type(value: Any, expected: type) -> bool:
    """isinstance, except that a bool is not an int or float, and an int is an acceptable float."""
    if expected not in _FIELD_TYPES:
        raise TypeError(f"option types must be one of {[t.__name__ for t in _FIELD_TYPES]}, got {expected!r}")
    if isinstance(value, bool):
        return expected is bool
    if expected is float:
        return isinstance(value, (int, float))
    return isinstance(value, expected)


def _split_id(split: str) -> int:
    if split not in _SPLIT_IDS:
        raise ValueError(f"split: must be one of {list(SPLITS)}, got {split!r}")
    return _SPLIT_IDS[split]


def lm_example(inputs: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """A language-modelling example from inputs [L] and labels [L] (IGNORE_INDEX = not scored)."""
    return {"inputs": np.asarray(inputs, np.int32), "labels": np.asarray(labels, np.int32)}


def classification_example(tokens: np.ndarray, label: int, seq_len: int) -> dict[str, np.ndarray]:
    """A classification example: tokens [n] (n <= seq_len, ending in the task's CLS token) padded with PAD_ID."""
    inputs = np.full(seq_len, PAD_ID, np.int32)
    inputs[: len(tokens)] = tokens
    return {"inputs": inputs, "length": np.int32(len(tokens)), "label": np.int32(label)}
