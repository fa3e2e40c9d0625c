"""Datasets for seqlab: generated synthetic tasks (MQAR, selective copying, in-context / associative recall,
induction heads, ListOps) and byte-level language modelling on local files, behind one `Task` contract, plus the
grain pipelines that batch them.

    task = seqlab.data.make_task("mqar", seq_len=128, num_kv_pairs=8)
    train = seqlab.data.make_iterator(task, "train", batch_size=32, seed=0)
    batch = next(train)                       # {"inputs": int32 [32, 128], "labels": int32 [32, 128]}
    state = train.get_state()                 # JSON-serialisable; train.set_state(state) resumes
    for batch in seqlab.data.eval_batches(task, batch_size=64): ...
"""

from seqlab.data.base import IGNORE_INDEX, PAD_ID, SPLITS, Task
from seqlab.data.bytes_lm import BytesLM
from seqlab.data.listops import ListOps
from seqlab.data.mqar import MQAR, mqar_accuracy
from seqlab.data.pipeline import eval_batches, make_iterator
from seqlab.data.registry import TASKS, available_tasks, get_task_class, make_task
from seqlab.data.synthetic import AssociativeRecall, InContextRecall, InductionHead, SelectiveCopy

__all__ = [
    "IGNORE_INDEX",
    "PAD_ID",
    "SPLITS",
    "TASKS",
    "AssociativeRecall",
    "BytesLM",
    "InContextRecall",
    "InductionHead",
    "ListOps",
    "MQAR",
    "SelectiveCopy",
    "Task",
    "available_tasks",
    "eval_batches",
    "get_task_class",
    "make_iterator",
    "make_task",
    "mqar_accuracy",
]
