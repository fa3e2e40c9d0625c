"""Byte-level language modelling over local text files (no tokenizer, nothing downloaded).

The corpus is the files matching the glob `files` (recursive `**` allowed), read in sorted path order and
concatenated; the empty string means the running Python's standard-library sources (the *.py files directly
under `os.path.dirname(os.__file__)`, about 5 MB). The last `eval_fraction` of the concatenated bytes is the eval
split and the rest the train split. Example i of a split is the window of `seq_len + 1` bytes at an offset drawn
from (seed, split, i): inputs are its first `seq_len` bytes and labels the last `seq_len` (the next byte at every
position).

With `pack` (the default), the documents are the files instead: each file's bytes within the split, cut into
pieces of at most seq_len + 1 bytes that overlap by one (so every byte after a file's first is a label exactly
once), packed first-fit into rows by the pipelines (`seqlab.data.pipeline`) with segment ids and positions; no
label crosses a file boundary. An epoch of the train split is every piece of its files (`num_train` counts the
windows of pack=False only); the eval split is its first `num_eval` pieces in corpus order.

The corpus is read once, on the first example, and kept by the task object, so building a task (for
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
    pack: bool = True

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

    def packs_documents(self) -> bool:
        return self.pack

    def num_documents(self, split: str) -> int:
        return len(self._pieces(split))

    def document(self, split: str, index: int) -> dict[str, np.ndarray]:
        pieces = self._pieces(split)
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < len(pieces):
            raise ValueError(f"index: must be an integer in [0, {len(pieces)}) for split {split!r}, got {index!r}")
        start, stop = pieces[index]
        piece = self._corpus[start:stop]
        return lm_example(piece[:-1], piece[1:])

    def _pieces(self, split: str) -> np.ndarray:
        """The packed documents of `split`: [P, 2] int64 (start, stop) byte offsets into the corpus (module
        docstring); ValueError if the split has none."""
        pieces = self._piece_table[split]
        if split == "eval":
            pieces = pieces[: self.num_eval]
        self._require(len(pieces) > 0, "files", f"the {split} split holds no file of 2 bytes or more to pack")
        return pieces

    @functools.cached_property
    def _piece_table(self) -> dict[str, np.ndarray]:
        """Every split's pieces: each file's bytes within the split, cut every seq_len bytes into windows of at
        most seq_len + 1 bytes (2 at least)."""
        sizes = [os.path.getsize(path) for path in self.paths()]
        ends = np.cumsum(sizes)
        cut = int(ends[-1] * (1 - self.eval_fraction))
        table = {}
        for split, (low, high) in {"train": (0, cut), "eval": (cut, int(ends[-1]))}.items():
            bounds = np.clip(np.stack([ends - np.asarray(sizes), ends], axis=1), low, high)
            table[split] = np.asarray([(start, min(start + self.seq_len + 1, stop))
                                       for first, stop in bounds for start in range(first, stop - 1, self.seq_len)],
                                      np.int64).reshape(-1, 2)  # fmt: skip
        return table

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
