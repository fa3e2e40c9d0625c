"""Checkpoints of a run, in ``<workdir>/checkpoints`` (orbax CheckpointManager).

Each checkpoint holds two items: ``state`` (step, parameters, optimizer state) and ``data`` (the training
iterator's state, JSON), so a resumed run continues from exactly the batch it stopped before. Orbax writes each
checkpoint to a temporary directory (``<step>.orbax-checkpoint-tmp``) and renames it to ``<step>`` when complete, and
saves are synchronous, so orbax deletes the checkpoints past ``keep`` only once the new one is complete; the
trainer saves only states whose losses were all finite.

Faults end in one line, not in orbax's tracebacks:

* `Checkpoints.restore_latest` tries the checkpoints newest first. One that fails to restore (unreadable or
  garbled files, or a tree unlike the expected one) is moved aside, never deleted, to ``<step>.corrupt`` (then
  ``<step>.corrupt.1``, ...), which orbax no longer counts as a checkpoint, with a one-line warning on stderr (in
  place of orbax's error output for it), and the next older one is tried; `CheckpointError` when none restores. An
  out-of-memory error is raised as it is: the checkpoint may be sound.
* `Checkpoints.save` on a full disk removes the partial checkpoint, leaves the earlier ones as they were and raises
  `CheckpointSaveError`: ``checkpoint at step N: no space left on device writing <path> (needs about X MB; Y MB
  free)``. Orbax's own error logs and its background writers' reports of that failure are dropped; other errors
  propagate unchanged, with them.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import itertools
import json
import logging as std_logging
import os
import re
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.json"
CORRUPT_SUFFIX = ".corrupt"
_TMP_SUFFIX = ocp.path.atomicity_types.TMP_DIR_SUFFIX  # orbax 0.12: "<step>.orbax-checkpoint-tmp"
_ORBAX_SOURCE = os.path.dirname(ocp.__file__)
_DISK_FULL = re.compile(r"no space left on device|ENOSPC|\berrno\W{0,3}28\b|os_error_code\W{0,3}28\b", re.IGNORECASE)
_REASON_CHARS = 200
_ORBAX_JOIN_S = 60.0  # how long a failed save waits for orbax's writers of its other items
_barrier_ids = itertools.count()


class CheckpointError(RuntimeError):
    """No checkpoint of the run restores, or one could not be written (the message is one line)."""


class CheckpointSaveError(CheckpointError):
    """A checkpoint could not be written for lack of disk space; the earlier checkpoints are intact."""


class Checkpoints:
    """Save and restore (train state, data iterator state) pairs under ``<workdir>/checkpoints``."""

    def __init__(self, workdir: str, *, keep: int):
        self.directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
        # Synchronous saves: orbax deletes the steps past max_to_keep only after the new checkpoint is written and
        # renamed into place, so a save that fails deletes nothing.
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: dict[str, Any], data_state: Any) -> None:
        """Write checkpoint `step` (blocking; replaces nothing if it already exists).

        Raises CheckpointSaveError (one line, no chained traceback) when the disk is full, after removing the
        partial checkpoint; the earlier checkpoints stay as they were. Other errors propagate unchanged.
        """
        if step in self.manager.all_steps():
            return
        path = os.path.join(self.directory, str(step))
        existed = os.path.exists(path)
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state))
        try:
            with _orbax_noise_held(drop_when=_is_disk_full):
                self.manager.save(step, args=args)
                self.manager.wait_until_finished()
        except Exception as error:
            if not _is_disk_full(error):
                raise
            self._discard_partial(step, remove_step_dir=not existed)
            needed, free = _tree_nbytes(state), shutil.disk_usage(self.directory).free
            raise CheckpointSaveError(
                f"checkpoint at step {step}: no space left on device writing {path} "
                f"(needs about {_megabytes(needed)} MB; {_megabytes(free)} MB free)"
            ) from None

    def _discard_partial(self, step: int, *, remove_step_dir: bool) -> None:
        """Remove what a failed save of `step` left: orbax's ``<step>.orbax-checkpoint-tmp`` directory, and
        ``<step>`` if the save created it."""
        if jax.process_index() != 0:
            return
        for name in os.listdir(self.directory):
            if name.startswith(f"{step}{_TMP_SUFFIX}") or (remove_step_dir and name == str(step)):
                shutil.rmtree(os.path.join(self.directory, name))

    def restore(self, step: int, abstract_state: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        """(train state shaped like `abstract_state`, data iterator state) of checkpoint `step`."""
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
        restored = self.manager.restore(step, args=args)
        return restored["state"], restored["data"]

    def restore_latest(self, abstract_state: dict[str, Any]) -> tuple[int, dict[str, Any], Any] | None:
        """(step, train state shaped like `abstract_state`, data iterator state) of the newest checkpoint that
        restores; None when there is no checkpoint.

        Each newer one that fails to restore is moved aside to ``<step>.corrupt`` with a one-line warning. Raises
        CheckpointError when none restores.
        """
        moved: list[str] = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                with _orbax_noise_held(drop_when=lambda error: True):
                    state, data_state = self.restore(step, abstract_state)
                    _check_like(state, abstract_state)
            except Exception as error:
                if _is_out_of_memory(error):
                    raise  # the checkpoint may be fine: this process could not hold it
                moved.append(f"step {step} -> {self._move_aside(step, error)}")
                continue
            return step, state, data_state
        if moved:
            raise CheckpointError(
                f"no checkpoint in {self.directory} restores; each was moved aside (see the warnings above): "
                + ", ".join(moved)
            )
        return None

    def _move_aside(self, step: int, error: Exception) -> str:
        """Rename checkpoint `step` (which failed with `error`) to a free ``<step>.corrupt*`` name, warn, and
        return the new path."""
        barrier = f"seqlab_checkpoint_move_aside_{step}_{next(_barrier_ids)}"
        ocp.multihost.sync_global_processes(f"{barrier}_start")
        source = os.path.join(self.directory, str(step))
        target = _free_path(source + CORRUPT_SUFFIX)
        if jax.process_index() == 0:
            os.rename(source, target)
        ocp.multihost.sync_global_processes(f"{barrier}_done")
        self.manager.reload()
        _warn(f"skipped the checkpoint at step {step}, which does not restore ({_reason(error)}); moved it to {target}")
        return target

    def close(self) -> None:
        self.manager.close()


@contextlib.contextmanager
def _orbax_noise_held(*, drop_when: Callable[[Exception], bool]) -> Iterator[None]:
    """Hold back orbax's ERROR logs and the unraisable-exception reports of its background work (e.g. "Event loop is
    closed") while the block runs. When the block raises, first wait for the threads orbax started in it (a failed
    save returns while its other items are still being written), then drop what was held if `drop_when(error)` (the
    caller reports the error in one line), or pass it on as it came."""
    absl_logger = logging.get_absl_logger()
    threads_before = set(threading.enumerate())
    records: list[std_logging.LogRecord] = []
    reports: list[Any] = []

    def hold(record: std_logging.LogRecord) -> bool:
        if record.levelno >= std_logging.ERROR and record.pathname.startswith(_ORBAX_SOURCE):
            records.append(record)
            return False
        return True

    previous_hook = sys.unraisablehook
    absl_logger.addFilter(hold)
    sys.unraisablehook = reports.append
    try:
        yield
    except Exception as error:
        _join_orbax_threads(threads_before)
        gc.collect()  # finalizes the coroutines orbax abandoned, whose reports come then
        if drop_when(error):
            records.clear()
            reports.clear()
        raise
    finally:
        absl_logger.removeFilter(hold)
        sys.unraisablehook = previous_hook
        for record in records:
            absl_logger.handle(record)
        for report in reports:
            previous_hook(report)


def _join_orbax_threads(threads_before: set[threading.Thread]) -> None:
    """Wait, up to _ORBAX_JOIN_S in all, for the threads of orbax's classes not among `threads_before` to end,
    including those that the joined ones start (orbax's metadata writer starts after the array writers)."""
    deadline = time.monotonic() + _ORBAX_JOIN_S
    while time.monotonic() < deadline:
        running = [thread for thread in threading.enumerate() if thread not in threads_before and thread.is_alive()
                   and type(thread).__module__.startswith("orbax.")]
        if not running:
            return
        for thread in running:
            thread.join(max(0.0, deadline - time.monotonic()))


def _exception_chain(error: BaseException) -> Iterator[BaseException]:
    """`error` and every exception it was raised from, in its context, or grouped in it."""
    seen: set[int] = set()
    pending = [error]
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        pending += [linked for linked in (current.__cause__, current.__context__) if linked is not None]
        pending += getattr(current, "exceptions", ())


def _is_disk_full(error: BaseException) -> bool:
    """Whether `error`, or one in its chain, is ENOSPC (as an OSError, or in the text orbax/tensorstore wrap it in)."""
    return any(
        (isinstance(e, OSError) and e.errno == errno.ENOSPC) or _DISK_FULL.search(str(e))
        for e in _exception_chain(error)
    )


def _is_out_of_memory(error: BaseException) -> bool:
    """Whether `error`, or one in its chain, is a host or device allocation failure (not a fault of the files)."""
    return any(
        isinstance(e, MemoryError) or ("RESOURCE_EXHAUSTED" in str(e) and "memory" in str(e).lower())
        for e in _exception_chain(error)
    )


def _tree_nbytes(tree: Any) -> int:
    return sum(leaf.nbytes if hasattr(leaf, "nbytes") else np.asarray(leaf).nbytes for leaf in jax.tree.leaves(tree))


def _megabytes(nbytes: int) -> str:
    return f"{nbytes / 1e6:,.2f}"


def _check_like(restored: Any, abstract: Any) -> None:
    """Raise ValueError unless `restored` has `abstract`'s tree structure and each leaf its shape and dtype."""
    if jax.tree.structure(restored) != jax.tree.structure(abstract):
        raise ValueError("the restored tree's structure differs from the train state's")
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(restored), jax.tree.leaves(abstract)):
        if (tuple(got.shape), np.dtype(got.dtype)) != (tuple(want.shape), np.dtype(want.dtype)):
            raise ValueError(
                f"{jax.tree_util.keystr(path)} restored as {np.dtype(got.dtype).name}{list(got.shape)}, "
                f"the train state holds {np.dtype(want.dtype).name}{list(want.shape)}"
            )


def _free_path(path: str) -> str:
    """`path`, or the first of ``path.1``, ``path.2``, ... that does not exist."""
    if not os.path.exists(path):
        return path
    return next(f"{path}.{n}" for n in itertools.count(1) if not os.path.exists(f"{path}.{n}"))


def _reason(error: Exception) -> str:
    """``Type: first line of the message``, at most _REASON_CHARS characters."""
    lines = str(error).strip().splitlines()
    reason = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    return reason if len(reason) <= _REASON_CHARS else reason[: _REASON_CHARS - 3] + "..."


def _warn(message: str) -> None:
    if jax.process_index() == 0:
        print(f"warning: {message}", file=sys.stderr, flush=True)


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    """``<workdir>/config.json``: the run's full config (written by process 0)."""
    if jax.process_index() != 0:
        return
    with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
        f.write(config.to_json_best_effort(indent=2))


def read_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a run in `workdir` was launched with (from config.json)."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        raise ValueError(f"workdir: {workdir!r} holds no {CONFIG_FILE}; is it a seqlab run directory?")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def restore_model(workdir: str):
    """(model with the newest restorable checkpoint's parameters, in eval mode, the run's config, its data Task) of
    the run in `workdir` (a checkpoint that fails to restore is moved aside, as in `Checkpoints.restore_latest`)."""
    from seqlab import config as config_lib, models
    from seqlab.training import optim

    config = read_config(workdir)
    task = config_lib.validate(config)
    model = models.build_model(config, task, nnx.Rngs(config.seed))
    model.eval()
    graphdef, params, batch_stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    tx = optim.make_optimizer(config.optim, config.train.steps)

    def train_state(params, batch_stats):
        state = {"step": jax.numpy.zeros((), jax.numpy.int32), "params": params, "opt_state": tx.init(params)}
        return {**state, "batch_stats": batch_stats} if jax.tree.leaves(batch_stats) else state

    checkpoints = Checkpoints(workdir, keep=config.train.keep_checkpoints)
    try:
        restored = checkpoints.restore_latest(jax.eval_shape(train_state, params, batch_stats))
    finally:
        checkpoints.close()
    if restored is None:
        raise ValueError(f"workdir: {workdir!r} has no checkpoint to restore")
    _, state, _ = restored
    return nnx.merge(graphdef, state["params"], state.get("batch_stats", batch_stats), rest), config, task


def params_from_run(workdir: str, params: nnx.State) -> tuple[nnx.State, list[str]]:
    """`params` (a model's ``nnx.Param`` state) with every parameter that the run in `workdir` also has replaced by
    that run's, from its newest restorable checkpoint (fine-tuning from it; its optimizer state is not used) ->
    (the parameters, the paths that kept their own initialisation: parameters the run lacks, such as learnt initial
    states). ValueError naming the path if the run has a parameter this model lacks, or one of another shape."""
    source_model, _, _ = restore_model(workdir)
    source = dict(nnx.to_flat_state(nnx.state(source_model, nnx.Param)))
    target = dict(nnx.to_flat_state(params))
    extra = sorted(".".join(map(str, path)) for path in set(source) - set(target))
    if extra:
        raise ValueError(f"train.init_from: the run in {workdir!r} has parameters this model lacks: "
                         f"{', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''}")
    for path, variable in target.items():
        if path in source and source[path].shape != variable.shape:
            raise ValueError(f"train.init_from: {'.'.join(map(str, path))} is {tuple(source[path].shape)} in the run "
                             f"in {workdir!r}, {tuple(variable.shape)} in this model")
    merged = nnx.from_flat_state([(path, source.get(path, variable)) for path, variable in target.items()])
    return merged, sorted(".".join(map(str, path)) for path in set(target) - set(source))
