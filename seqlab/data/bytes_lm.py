"""Byte-level language modelling over local text files (no tokenizer, nothing downloaded).

The corpus is the files matching the glob `files` (recursive `**` allowed), read in sorted path order and
concatenated; the empty string means the running Python's standard-library sources (the *.py files directly
under `os.path.dirname(os.__file__)`, about 5 MB). The last `eval_fraction` of the concatenated bytes is the eval
split and the rest the train split. Example i of a split is the window of `seq_len + 1` bytes at an offset drawn
from (seed, split, i): inputs are its first `seq_len` bytes and labels the last `seq_len` (the next byte at every
position). The corpus is read once, on the first example, and kept by the task object, so building a task (for
config validation) only lists the files.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import os
from typing import ClassVar

import numpy as np

from seqlab.data.base import Task, lm_example


@dataclasses.dataclass(frozen=True)
class BytesLM(Task):
    """Next-byte prediction on windows of local files; vocabulary = the 256 byte values."""

    name: ClassVar[str] = "bytes"
    kind: ClassVar[str] = "lm"
    byte_level: ClassVar[bool] = True

    files: str = ""
    seq_len: int = 256
    eval_fraction: float = 0.1

    @property
    def vocab_size(self) -> int:
        return 256

    def paths(self) -> list[str]:
        """The corpus files, sorted: the matches of `files` (the stdlib *.py files if empty); ValueError if none."""
        pattern = self.files or os.path.join(os.path.dirname(os.__file__), "*.py")
        paths = sorted(path for path in glob.glob(pattern, recursive=True) if os.path.isfile(path))
        self._require(bool(paths), "files", "must match at least one file (empty = the stdlib sources)")
        return paths

    def validate(self) -> None:
        super().validate()
        self._require(self.seq_len >= 1, "seq_len", "must be >= 1")
        self._require(0 < self.eval_fraction < 1, "eval_fraction", "must lie in (0, 1)")
        self.paths()

    @functools.cached_property
    def _corpus(self) -> np.ndarray:
        """All corpus bytes, concatenated; uint8 [N]."""
        chunks = []
        for path in self.paths():
            with open(path, "rb") as f:
                chunks.append(f.read())
        return np.frombuffer(b"".join(chunks), np.uint8)

    def _split_bytes(self, split: str) -> np.ndarray:
        """The bytes of `split`: the head (train) or the last eval_fraction (eval) of the corpus; uint8 [n]."""
        cut = int(len(self._corpus) * (1 - self.eval_fraction))
        return self._corpus[:cut] if split == "train" else self._corpus[cut:]

    def _generate(self, rng: np.random.Generator, split: str) -> dict[str, np.ndarray]:
        stream = self._split_bytes(split)
        self._require(
            len(stream) > self.seq_len,
            "files",
            f"the {split} split holds {len(stream)} bytes, fewer than seq_len + 1 ({self.seq_len + 1})",
        )
        offset = rng.integers(0, len(stream) - self.seq_len)
        window = stream[offset : offset + self.seq_len + 1]
        return lm_example(window[:-1], window[1:])
