"""The task registry: task classes by name, and `make_task`, which builds and validates a task from options."""

from __future__ import annotations

import dataclasses
from typing import Any

from seqlab.data.base import Task
from seqlab.data.bytes_lm import BytesLM
from seqlab.data.images import Digits, Shapes
from seqlab.data.listops import ListOps
from seqlab.data.mqar import MQAR
from seqlab.data.synthetic import (
    AssociativeRecall, Compression, FuzzyRecall, InContextRecall, InductionHead, Memorization, SelectiveCopy,
)

TASKS: dict[str, type[Task]] = {
    cls.name: cls
    for cls in (MQAR, SelectiveCopy, InContextRecall, FuzzyRecall, Memorization, Compression, AssociativeRecall,
                InductionHead, ListOps, BytesLM, Digits, Shapes)
}


def available_tasks() -> list[str]:
    """Registered task names, sorted."""
    return sorted(TASKS)


def get_task_class(name: str) -> type[Task]:
    """The task class registered under `name`."""
    if name not in TASKS:
        raise ValueError(f"data.task: unknown task {name!r}; known tasks: {', '.join(available_tasks())}")
    return TASKS[name]


def make_task(name: str, **options: Any) -> Task:
    """Build task `name` with `options` (its dataclass fields) and validate it."""
    cls = get_task_class(name)
    allowed = [field.name for field in dataclasses.fields(cls)]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        names = ", ".join(f"data.{name}.{option}" for option in unknown)
        raise ValueError(f"{names}: unknown option of task {name!r}; allowed options: {', '.join(allowed)}")
    task = cls(**options)
    task.validate()
    return task
