"""grain input pipelines over a task: a resumable, shuffled, repeated training iterator and one ordered pass over
the eval split. Batches are dicts of numpy arrays with a leading batch axis [B, ...] (a task example's keys).

A task that packs documents (`Task.packs_documents`) is read document by document instead: shuffled documents
are packed first-fit (grain's FirstFitPackIterDataset, `batch_size` bins) into rows of seq_len, adding
"segment_ids" [B, L] (1, 2, ... within a row; 0 = padding) and "positions" [B, L] (within each document);
padding has inputs PAD_ID and labels IGNORE_INDEX. Documents of consecutive epochs may share a row.
"""

from __future__ import annotations

from collections.abc import Iterator

import grain
import numpy as np

from seqlab.data.base import IGNORE_INDEX, PAD_ID, Task

# Examples are generated in Python (GIL-bound), so a couple of threads and a short buffer are enough to overlap
# generation with a jitted training step; grain's defaults (16 threads, 500 batches ahead) would front-load work.
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)


class _SplitSource:
    """One split of a task as a grain random-access source: element i is `task.example(split, i)`, or
    `task.document(split, i)` for a task that packs documents."""

    def __init__(self, task: Task, split: str):
        self._task, self._split = task, split
        self._packed = task.packs_documents()
        self._length = task.num_documents(split) if self._packed else task.num_examples(split)

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if self._packed:
            return self._task.document(self._split, index)
        return self._task.example(self._split, index)

    def __repr__(self) -> str:
        return f"_SplitSource({self._task!r}, split={self._split!r})"


def make_iterator(
    task: Task,
    split: str,
    *,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    repeat: bool = True,
    drop_remainder: bool = True,
) -> grain.DatasetIterator:
    """Batches of `split`: source -> shuffle (a new order every epoch) -> repeat (forever) -> batch.

    `seed` (0 <= seed < 2**32) only orders the examples; their content comes from the task's own seed. The
    iterator's `get_state()` is a JSON-serialisable dict; `set_state(state)` on a fresh iterator built with the same
    arguments resumes exactly where it was taken. Batches: dicts of numpy arrays [batch_size, ...].
    """
    source = _SplitSource(task, split)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: must be a positive integer, got {batch_size!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ValueError(f"seed: must be an integer in [0, 2**32), got {seed!r}")
    if drop_remainder and not repeat and batch_size > len(source):
        raise ValueError(
            f"batch_size: {batch_size} exceeds the {len(source)} examples of split {split!r}, so every batch would "
            "be dropped; use a smaller batch_size, repeat=True or drop_remainder=False"
        )
    dataset = grain.MapDataset.source(source)
    if shuffle:
        dataset = dataset.shuffle(seed=_shuffle_seed(seed))
    if repeat:
        dataset = dataset.repeat()
    dataset = dataset.to_iter_dataset(_READ_OPTIONS)
    if task.packs_documents():
        dataset = _packed(dataset, task.seq_len, bins=batch_size, seed=seed, shuffle=shuffle)
    return iter(dataset.batch(batch_size, drop_remainder=drop_remainder))


def _packed(documents: grain.IterDataset, seq_len: int, *, bins: int, seed: int, shuffle: bool) -> grain.IterDataset:
    """Documents {"inputs", "labels"} [n] packed first-fit into rows {"inputs", "labels", "segment_ids",
    "positions"} [seq_len]."""
    lengths = {"inputs": seq_len, "labels": seq_len}
    rows = grain.experimental.FirstFitPackIterDataset(
        documents, length_struct=lengths, num_packing_bins=bins, seed=_shuffle_seed(seed), shuffle_bins=shuffle,
        padding_struct={"inputs": PAD_ID, "labels": IGNORE_INDEX},
    )  # fmt: skip
    return rows.map(_packed_row)


def _packed_row(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """grain's packed features -> inputs, labels, segment_ids, positions [L] int32."""
    fields = {"inputs": row["inputs"], "labels": row["labels"], "segment_ids": row["inputs_segment_ids"],
              "positions": row["inputs_positions"]}  # fmt: skip
    return {key: np.asarray(value, np.int32) for key, value in fields.items()}


def _shuffle_seed(seed: int) -> int:
    """A well-mixed uint32 from `seed`: grain shuffles epoch e with seed + e, so nearby seeds must not be used raw
    (seed s would replay seed s + 1's order one epoch later)."""
    return int(np.random.SeedSequence(seed).generate_state(1)[0])


def eval_batches(task: Task, *, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """The whole eval split once, in order, in batches of batch_size [batch_size, ...]; the last may be smaller."""
    return make_iterator(task, "eval", batch_size=batch_size, seed=0, shuffle=False, repeat=False, drop_remainder=False)
