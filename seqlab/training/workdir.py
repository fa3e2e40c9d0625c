"""A run's workdir: one writer at a time, and a config that matches the checkpoints it holds.

`WorkdirLock` is an exclusive ``flock`` on ``<workdir>/.lock``, held for the whole run; the file records the
holder's pid, host and start time so a second run names who has it. The kernel drops the lock when its process
dies, so a run killed with SIGKILL leaves no lock that blocks the next one (the file stays, unlocked).

`check_resumable(stored, new)` compares the config.json of the run already in the workdir with the new config
before anything is written: a resumed run may change only `RESUMABLE_KEYS` (how long it trains, how often it
logs, evaluates and saves, its eval batch size and its device mesh). Any other difference — model, task,
optimizer, batch size, seed — would restore checkpoints into a different run, so it is refused with the
differing keys; `clear(workdir)` (``--overwrite``) removes the old run's files to start over. A key the stored
config lacks (one added to seqlab after that run was launched) is no difference when the new config gives it its
default value: the run it describes is the same.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import shutil
import socket
from typing import Any

from seqlab.training.checkpoints import CHECKPOINT_DIR, CONFIG_FILE
from seqlab.training.metrics import METRICS_FILE, TENSORBOARD_DIR

LOCK_FILE = ".lock"
# Keys a resumed run may change; every other key must equal the stored config's.
RESUMABLE_KEYS = (
    "train.steps", "train.eval_every", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
    "train.eval_batch_size", "mesh.data", "mesh.seq",
)  # fmt: skip
# Keys whose absence from a stored config means a value other than their default: a run stored without
# data.bytes.pack trained on unpacked windows.
ABSENT_MEANS = {"data.bytes.pack": False}
# What a run writes in its workdir (removed by `clear`).
RUN_FILES = (CONFIG_FILE, METRICS_FILE, CHECKPOINT_DIR, TENSORBOARD_DIR)
_MAX_LISTED = 6


class WorkdirError(ValueError):
    """The workdir cannot hold this run (in use by another process, or holding a different run)."""


class WorkdirLock:
    """Exclusive use of a workdir by this process (a context manager; `release` is idempotent)."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, LOCK_FILE)
        self._fd: int | None = None

    def acquire(self) -> "WorkdirLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(fd)
            if error.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise WorkdirError(
                f"workdir: {os.path.dirname(self.path)!r} is in use by {_describe_holder(self.path)}; wait for that "
                f"run to finish or stop it, or use another --workdir"
            ) from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "since": datetime.datetime.now().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(holder).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _describe_holder(path: str) -> str:
    try:
        with open(path) as f:
            holder = json.load(f)
        return f"process {holder['pid']} on {holder['host']} (running since {holder['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def relevant_config(config: dict[str, Any]) -> dict[str, Any]:
    """The flat ``{"a.b": value}`` view of a config dict that decides what a run is: every key, except the data
    sections of tasks other than ``data.task`` and the ``model.mixer_args`` sections of mixers the model does not
    use (those are defaults the run never reads)."""
    pattern = config.get("model", {}).get("mixers", ())
    used = set([pattern] if isinstance(pattern, str) else pattern)
    task = config.get("data", {}).get("task")
    flat = _flatten(config)
    return {
        key: value for key, value in flat.items()
        if not (key.startswith("data.") and key.count(".") >= 2 and key.split(".")[1] != task)
        and not (key.startswith("model.mixer_args.") and key.split(".")[2] not in used)
    }  # fmt: skip


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = tuple(value) if isinstance(value, list) else value
    return flat


def config_differences(
    stored: dict[str, Any], new: dict[str, Any], defaults: dict[str, Any]
) -> dict[str, tuple[Any, Any]]:  # fmt: skip
    """``{key: (stored value, new value)}`` for every relevant key that differs and that resume may not change
    (a key missing on one side shows as None there). `defaults` is the default config (as a dict): a key missing
    from `stored` whose new value is what its absence means (its default there, or ``ABSENT_MEANS``) is no
    difference."""
    old, now = relevant_config(stored), relevant_config(new)
    absent = {**_flatten(defaults), **ABSENT_MEANS}
    return {
        key: (old.get(key), now.get(key)) for key in sorted(set(old) | set(now))
        if key not in RESUMABLE_KEYS and old.get(key) != now.get(key)
        and not (key not in old and key in absent and now[key] == absent[key])
    }  # fmt: skip


def check_resumable(workdir: str, stored: dict[str, Any], new: dict[str, Any], defaults: dict[str, Any]) -> None:
    """Raise `WorkdirError` (one line, naming the differing keys) unless a run launched with `new` may resume the
    run that `stored` (its config.json) describes (`defaults`: the default config, see `config_differences`)."""
    differences = config_differences(stored, new, defaults)
    if not differences:
        return
    listed = [f"{key}: {old!r} -> {value!r}" for key, (old, value) in list(differences.items())[:_MAX_LISTED]]
    more = len(differences) - len(listed)
    listed += [f"and {more} more"] if more else []
    raise WorkdirError(
        f"workdir: {workdir!r} holds a run with a different config ({'; '.join(listed)}); resume may change only "
        f"{', '.join(RESUMABLE_KEYS)}. Use a new --workdir, or --overwrite to delete that run and start over"
    )


def read_stored_config(workdir: str) -> dict[str, Any] | None:
    """The config.json of the run in `workdir` as a dict (None when there is none)."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def clear(workdir: str) -> list[str]:
    """Delete the files a run wrote in `workdir` (`RUN_FILES`; nothing else); returns the names removed."""
    removed = []
    for name in RUN_FILES:
        path = os.path.join(workdir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
        else:
            continue
        removed.append(name)
    return removed
