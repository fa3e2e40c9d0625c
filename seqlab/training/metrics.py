"""What a run records: ``metrics.jsonl`` (one JSON object per logged step), TensorBoard event files and console
progress lines; and `load_metrics` / `metrics_table` to read the records of one or many workdirs in a notebook.

A record: {"step", "split" ("train" or "eval"), "loss", "accuracy", ...}; train records add "learning_rate",
"grad_norm", "tokens_per_s" and "elapsed_s", and "aux_loss" for a model whose mixers add auxiliary losses.
"""

from __future__ import annotations

import functools
import glob
import json
import math
import os
import time
from typing import Any, Iterable

import jax
import ml_collections
from tensorboardX import SummaryWriter

from seqlab.training.checkpoints import CONFIG_FILE

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class MetricsLogger:
    """Appends records to ``<workdir>/metrics.jsonl`` and TensorBoard, and prints a progress line per record.

    In a multi-process run only process 0 writes (every process computes the same replicated metrics); with
    record=False nothing is written at all (evaluation of a finished run).
    """

    def __init__(self, workdir: str, total_steps: int, start_step: int = 0, *, record: bool = True):
        self.path = os.path.join(workdir, METRICS_FILE)
        self.total_steps = total_steps
        self.prints = jax.process_index() == 0
        self.writes = record and self.prints
        self.tensorboard = SummaryWriter(os.path.join(workdir, TENSORBOARD_DIR)) if self.writes else None
        self.start = time.perf_counter()
        self.start_step = start_step

    def records(self) -> list[dict[str, Any]]:
        """The records already in metrics.jsonl (none if it does not exist)."""
        if not os.path.exists(self.path):
            return []
        with open(self.path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def find(self, step: int, split: str) -> dict[str, Any] | None:
        """The last record of `split` at `step` already written, if any."""
        matches = [r for r in self.records() if r["step"] == step and r["split"] == split]
        return matches[-1] if matches else None

    def discard_after(self, step: int) -> int:
        """Drop the records past `step` (written by a run that stopped before its next checkpoint, which the resumed
        run writes again); returns how many were dropped. The file is replaced atomically."""
        if not self.writes:
            return 0
        records = self.records()
        kept = [r for r in records if r["step"] <= step]
        if len(kept) == len(records):
            return 0
        partial = f"{self.path}.tmp"
        with open(partial, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        os.replace(partial, self.path)
        return len(records) - len(kept)

    def write(self, step: int, split: str, scalars: dict[str, float]) -> dict[str, Any]:
        record = {"step": step, "split": split, **{k: float(v) for k, v in scalars.items()}}
        if self.prints:
            print(self._progress(step, split, record), flush=True)
        if not self.writes:
            return record
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in scalars.items():
            self.tensorboard.add_scalar(f"{split}/{key}", float(value), step)
        self.tensorboard.flush()
        return record

    def _progress(self, step: int, split: str, record: dict[str, Any]) -> str:
        parts = [f"[{split}] step {step}/{self.total_steps}"]
        parts += [f"{k} {record[k]:.4g}" for k in ("loss", "accuracy") if k in record]
        if "tokens_per_s" in record:
            parts.append(f"{record['tokens_per_s']:,.0f} tok/s")
        done = step - self.start_step
        if split == "train" and done > 0:
            remaining = (time.perf_counter() - self.start) / done * (self.total_steps - step)
            parts.append(f"ETA {_duration(remaining)}")
        return "  ".join(parts)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def _duration(seconds: float) -> str:
    seconds = int(math.ceil(seconds))
    minutes, secs = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def load_metrics(workdirs: str | Iterable[str], *, split: str | None = None) -> list[dict[str, Any]]:
    """Records of every metrics.jsonl under the given workdirs (globs allowed; a glob's files are skipped), each
    tagged with its "workdir" and the run's config columns (`run_columns`)."""
    patterns = [workdirs] if isinstance(workdirs, str) else list(workdirs)
    dirs = sorted({d for p in patterns for d in ([g for g in glob.glob(p) if os.path.isdir(g)] or [p])})
    rows = []
    for workdir in dirs:
        path = os.path.join(workdir, METRICS_FILE)
        if not os.path.exists(path):
            raise ValueError(f"workdirs: {workdir!r} has no {METRICS_FILE}")
        with open(path) as f:
            records = [json.loads(line) for line in f if line.strip()]
        columns = run_columns(workdir)
        rows += [{"workdir": workdir, **columns, **r} for r in records if split is None or r["split"] == split]
    return rows


def run_columns(workdir: str) -> dict[str, Any]:
    """What a run was, as table columns named by their config keys: "model.mixers" (the pattern, "baseconv+gla"),
    "model.d_model", "model.num_layers", "data.task", "data.<field>" for every number of the task's section
    (seq_len, vocab_size, num_kv_pairs, num_train, ...), "optim.learning_rate" (the peak), and "params",
    "decode_state_bytes" and "recurrent_state_bytes" (`seqlab.training.summary`; absent when the config no longer
    validates). Empty when the workdir has no config.json."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return dict(_columns_of(f.read()))


@functools.lru_cache(maxsize=512)
def _columns_of(config_json: str) -> tuple[tuple[str, Any], ...]:
    """`run_columns` of one config.json text (cached: a table of many runs of one config builds its model once)."""
    from seqlab.training.summary import model_summary

    config = ml_collections.ConfigDict(json.loads(config_json))
    task = config.data.task
    columns: dict[str, Any] = {"model.mixers": "+".join(config.model.mixers), "model.d_model": config.model.d_model,
                               "model.num_layers": config.model.num_layers, "data.task": task}
    for key, value in config.data[task].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            columns[f"data.{key}"] = value
    columns["optim.learning_rate"] = config.optim.learning_rate
    try:
        summary = model_summary(config)
    except ValueError:
        return tuple(columns.items())
    columns.update(params=summary.total_params, decode_state_bytes=summary.decode_state_bytes,
                   recurrent_state_bytes=summary.recurrent_state_bytes)
    return tuple(columns.items())


def metrics_table(workdirs: str | Iterable[str], *, split: str | None = None):
    """`load_metrics` as a pandas DataFrame: one row per record, the run's config as columns (`run_columns`).
    pandas comes with the notebooks extra: ``pip install -e ".[notebooks]"``."""
    try:
        import pandas as pd
    except ImportError:
        raise ImportError('metrics_table needs pandas: pip install -e ".[notebooks]"') from None
    return pd.DataFrame(load_metrics(workdirs, split=split))
