"""Train and evaluate a model from a config: ``python -m seqlab.train --config=configs/mqar.py:gla --workdir=DIR``.

The launcher only parses flags (absl, ml_collections ``config_flags`` with a locked config, so a mistyped
``--config.key=value`` fails); training is the library function `train_and_evaluate(config, workdir)`, which tests
and notebooks call directly.

A run: validate the config (before anything compiles) -> write config.json -> build the model, the optimizer and the
grain iterator -> resume from the latest checkpoint in the workdir if there is one -> train, logging every
``train.log_every`` steps, evaluating every ``train.eval_every`` and checkpointing every ``train.checkpoint_every``
-> final evaluation and checkpoint. SIGTERM finishes the current step, saves a checkpoint and returns. A non-finite
loss raises `NonFiniteLossError` before that state can be saved, so the last checkpoint stays the last good one.
"""

from __future__ import annotations

import ast
import contextlib
import math
import os
import signal
import sys
import threading
import time
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags

from seqlab import config as config_lib, data, host_memory, models
from seqlab.parallel.mesh import shard_sequence
from seqlab.parallel.distributed import maybe_initialize
from seqlab.parallel.mesh import SEQUENCE_AXIS, make_mesh, replicate, shard_batch, to_host
from seqlab.training import optim, steps
from seqlab.training.checkpoints import Checkpoints, write_config
from seqlab.training.metrics import MetricsLogger


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the run stopped without saving that state."""


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Train the model `config` describes, in `workdir` (resuming if it holds checkpoints).

    Returns the final metrics: step, train_loss (mean over the last log window), eval_loss, eval_accuracy.
    """
    task = config_lib.validate(config)
    os.makedirs(workdir, exist_ok=True)
    write_config(workdir, config)
    run = _Run(config, task, workdir)
    try:
        return run.train()
    finally:
        run.close()


class _Run:
    """The state of one training run between the steps of `train_and_evaluate`."""

    def __init__(self, config: ml_collections.ConfigDict, task: data.Task, workdir: str):
        self.config, self.task, self.total = config, task, config.train.steps
        model = models.build_model(config, task, nnx.Rngs(config.seed))
        self.mesh = make_mesh(config.mesh)
        if self.mesh is not None:
            shard_sequence(model, SEQUENCE_AXIS)
        self.graphdef, params, batch_stats, self.rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
        model.eval()  # evaluation: BatchNorm (PRepBN) reads its running statistics
        eval_graphdef = nnx.graphdef(model)
        tx = optim.make_optimizer(config.optim, self.total)
        schedule = optim.learning_rate_schedule(config.optim, self.total)
        self.state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
        if jax.tree.leaves(batch_stats):
            self.state["batch_stats"] = batch_stats
        if self.mesh is not None:
            self.state = replicate(self.state, self.mesh)
        self.train_iter = data.make_iterator(task, "train", batch_size=config.train.batch_size, seed=config.seed)
        self.checkpoints = Checkpoints(workdir, keep=config.train.keep_checkpoints)
        self.train_step = steps.make_train_step(
            self.graphdef, self.rest, tx, task.kind, schedule, config.seed, self.mesh, total_steps=self.total
        )
        self.eval_step = steps.make_eval_step(eval_graphdef, self.rest, task.kind, self.mesh)
        self._resume()
        self.logger = MetricsLogger(workdir, self.total, start_step=int(to_host(self.state["step"])))

    def _resume(self) -> None:
        latest = self.checkpoints.latest_step()
        if latest is None:
            return
        abstract = jax.eval_shape(lambda: self.state)
        self.state, data_state = self.checkpoints.restore(latest, abstract)
        self.train_iter.set_state(data_state)
        print(f"resumed from the checkpoint at step {latest}", flush=True)

    def train(self) -> dict[str, float]:
        train_cfg = self.config.train
        step = int(to_host(self.state["step"]))
        window: list[dict[str, float]] = []
        window_start = time.perf_counter()
        tokens_per_step = train_cfg.batch_size * self.task.seq_len
        last_train: dict[str, float] = {}
        with _sigterm_requested() as stop:
            while step < self.total:
                metrics = self._step(step)
                step += 1
                window.append(metrics)
                if step % train_cfg.log_every == 0 or step == self.total:
                    elapsed = time.perf_counter() - window_start
                    last_train = self._log_train(step, window, len(window) * tokens_per_step / elapsed)
                    window, window_start = [], time.perf_counter()
                if step % train_cfg.eval_every == 0 and step < self.total:
                    self.evaluate(step)
                if step % train_cfg.checkpoint_every == 0 or step == self.total or stop.is_set():
                    self._save(step)
                if stop.is_set():
                    logging.warning("SIGTERM: saved the checkpoint at step %d and stopped", step)
                    return {"step": step, "train_loss": last_train.get("loss", math.nan)}
        final = self.evaluate(step)
        return {"step": step, "train_loss": last_train.get("loss", math.nan),
                "eval_loss": final["loss"], "eval_accuracy": final["accuracy"]}

    def _step(self, step: int) -> dict[str, float]:
        batch = self._place(next(self.train_iter))
        new_state, metrics = self.train_step(self.state, batch)
        metrics = {k: float(v) for k, v in to_host(metrics).items()}
        if not math.isfinite(metrics["loss"]):
            raise NonFiniteLossError(
                f"the training loss became {metrics['loss']} at step {step + 1}; stopped without saving that state "
                f"(last good checkpoint: step {self.checkpoints.latest_step()})"
            )
        self.state = new_state
        return metrics

    def _log_train(self, step: int, window: list[dict[str, float]], tokens_per_s: float) -> dict[str, float]:
        mean = {k: sum(m[k] for m in window) / len(window) for k in ("loss", "accuracy", "grad_norm")}
        record = {**mean, "learning_rate": window[-1]["learning_rate"], "tokens_per_s": tokens_per_s,
                  "elapsed_s": time.perf_counter() - self.logger.start}
        return self.logger.write(step, "train", record)

    def evaluate(self, step: int) -> dict[str, float]:
        """Loss and accuracy over the whole held-out split."""
        totals: dict[str, float] = {}
        for batch in data.eval_batches(self.task, batch_size=self.config.train.eval_batch_size):
            sums = to_host(self.eval_step(model_variables(self.state), self._place(batch)))
            for key, value in sums.items():
                totals[key] = totals.get(key, 0.0) + float(value)
        return self.logger.write(step, "eval", steps.means(totals))

    def _place(self, batch: dict) -> dict:
        """A host batch as device arrays (split over the mesh when there is one)."""
        return batch if self.mesh is None else shard_batch(batch, self.mesh)

    def _save(self, step: int) -> None:
        self.checkpoints.save(step, self.state, self.train_iter.get_state())

    def close(self) -> None:
        self.checkpoints.close()
        self.logger.close()


def model_variables(state: dict) -> Any:
    """The model variables of a train state: its parameters, with its BatchNorm statistics when it has any."""
    return (state["params"], state["batch_stats"]) if "batch_stats" in state else state["params"]


@contextlib.contextmanager
def _sigterm_requested() -> Iterator[threading.Event]:
    """An event set when SIGTERM arrives (handled only on the main thread; elsewhere the event never fires)."""
    event = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield event
        return
    previous = signal.signal(signal.SIGTERM, lambda *_: event.set())
    try:
        yield event
    finally:
        signal.signal(signal.SIGTERM, previous)


def define_flags() -> None:
    """The command-line flags (defined only when run as a program, so importing this module defines nothing)."""
    config_flags.DEFINE_config_file("config", None, "Path to a config file (file.py[:variant]).", lock_config=True)
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and config.json.")
    flags.DEFINE_bool("retain_host_memory", False, "Keep freed host memory for reuse (seqlab.host_memory): faster "
                      "steps on CPU when they allocate large buffers, slightly slower compilation.")
    flags.mark_flags_as_required(["config", "workdir"])


def import_flag_modules(argv: list[str]) -> None:
    """Import the modules of a ``--config.imports=(...)`` flag before absl loads the config file, so that the mixers
    they register have their ``model.mixer_args.<name>`` keys when the other overrides are applied. A value that
    is not a tuple literal of module names is left for `config_lib.validate` to reject."""
    for i, arg in enumerate(argv):
        if arg == "--config.imports" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--config.imports="):
            value = arg.partition("=")[2]
        else:
            continue
        try:
            names = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            continue
        if isinstance(names, str):
            names = (names,)
        config_lib.import_modules(names)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if flags.FLAGS.retain_host_memory:
        host_memory.retain_freed_memory()  # before JAX runs anything
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
    maybe_initialize()
    result = train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
    print(f"step {result['step']}: test loss {result.get('eval_loss', math.nan):.4f}, "
          f"test accuracy {result.get('eval_accuracy', math.nan):.4f}", flush=True)


if __name__ == "__main__":
    define_flags()
    try:
        import_flag_modules(sys.argv)
    except ValueError as error:
        sys.exit(f"seqlab.train: {error}")
    app.run(main)
