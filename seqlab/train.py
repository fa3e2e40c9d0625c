"""Train and evaluate a model from a config: ``python -m seqlab.train --config=configs/mqar.py:gla --workdir=DIR``.

The launcher only parses flags (absl, ml_collections ``config_flags`` with a locked config, so a mistyped
``--config.key=value`` fails in one line); training is the library function `train_and_evaluate(config, workdir)`,
which tests and notebooks call directly. ``--list`` lists what can run (`seqlab.catalog`), ``--dry_run`` prints the
resolved config and the model's size and stops, ``--eval_only`` evaluates the workdir's latest checkpoint.

A run: validate the config (before anything compiles) -> lock the workdir (one writer, `training.workdir`) ->
refuse a workdir holding a different run (``--overwrite`` starts over) -> write config.json -> build the model,
the optimizer and the grain iterator -> resume from the newest checkpoint that restores (a corrupt one is moved
aside) -> train, logging every ``train.log_every`` steps, evaluating every ``train.eval_every`` and checkpointing
every ``train.checkpoint_every`` -> final evaluation and checkpoint. Records past the resumed step (written by a run
killed before its next checkpoint) are dropped first, so a resumed or repeated run never duplicates a row. SIGTERM
finishes the current step, saves a checkpoint and returns. A non-finite loss raises `NonFiniteLossError` before that
state can be saved, so the last checkpoint stays the last good one.

By default the launcher keeps freed host memory in the process (`seqlab.host_memory`; ``--noretain_host_memory``
turns it off) and caches compiled programs in ``$SEQLAB_COMPILATION_CACHE_DIR`` (default
``~/.cache/seqlab/jax``; ``--compilation_cache_dir=`` turns it off), so a second launch skips XLA compilation.
"""

from __future__ import annotations

import ast
import contextlib
import json
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

from seqlab import catalog, config as config_lib, data, host_memory, models
from seqlab.parallel.distributed import maybe_initialize
from seqlab.parallel.mesh import SEQUENCE_AXIS, make_mesh, replicate, shard_batch, shard_sequence, to_host
from seqlab.training import optim, steps, summary, workdir as workdir_lib
from seqlab.training.checkpoints import CheckpointError, Checkpoints, params_from_run, read_config, write_config
from seqlab.training.metrics import MetricsLogger
from seqlab.training.progress import RunProgress


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the run stopped without saving that state."""


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, overwrite: bool = False
) -> dict[str, float]:
    """Train the model `config` describes, in `workdir` (resuming if it holds this run's checkpoints).

    `overwrite` deletes another run found in `workdir` first; without it a workdir whose config.json differs from
    `config` beyond what resume may change raises `workdir.WorkdirError` before anything is written.
    Returns the final metrics: step, train_loss (mean over the last log window), eval_loss, eval_accuracy; a run
    stopped by SIGTERM returns step, train_loss and stopped=True.
    """
    task = config_lib.validate(config)
    os.makedirs(workdir, exist_ok=True)
    writer = jax.process_index() == 0
    with workdir_lib.WorkdirLock(workdir) if writer else contextlib.nullcontext():
        if writer:
            _prepare_workdir(workdir, config, overwrite)
        write_config(workdir, config)
        run = _Run(config, task, workdir)
        try:
            return run.train()
        finally:
            run.close()


def _prepare_workdir(workdir: str, config: ml_collections.ConfigDict, overwrite: bool) -> None:
    """Clear the workdir (`overwrite`) or check that the run it holds is this one."""
    stored = workdir_lib.read_stored_config(workdir)
    if stored is None:
        return
    if overwrite:
        removed = workdir_lib.clear(workdir)
        print(f"--overwrite: removed {', '.join(removed)} from {workdir}", flush=True)
    else:
        new = json.loads(config.to_json_best_effort())
        workdir_lib.check_resumable(workdir, stored, new, config_lib.default_dict())


def evaluate_workdir(workdir: str) -> dict[str, float]:
    """Loss and accuracy of the latest checkpoint of the run in `workdir` on its held-out split (writes nothing)."""
    config = read_config(workdir)
    run = _Run(config, config_lib.validate(config), workdir, record=False)
    try:
        if run.start_step == 0:
            raise CheckpointError(f"workdir: {workdir!r} has no checkpoint to evaluate")
        return {"step": run.start_step, **run.evaluate(run.start_step)}
    finally:
        run.close()


def describe(config: ml_collections.ConfigDict) -> str:
    """The resolved config (the keys that decide the run) and the model's size, as ``--dry_run`` prints them."""
    task = config_lib.validate(config)
    resolved = workdir_lib.relevant_config(json.loads(config.to_json_best_effort()))
    lines = ["Resolved config:"] + [f"  {key} = {value!r}" for key, value in resolved.items()]
    lines += ["", f"Model ({task.name}, {task.seq_len} tokens per sequence):"]
    lines += ["  " + line for line in summary.model_summary(config, task).lines()]
    return "\n".join(lines)


class _Run:
    """The state of one training run between the steps of `train_and_evaluate`.

    record=False (evaluation only) restores the latest checkpoint and writes nothing to the workdir.
    """

    def __init__(self, config: ml_collections.ConfigDict, task: data.Task, workdir: str, *, record: bool = True):
        self.config, self.task, self.workdir, self.total = config, task, workdir, config.train.steps
        self.writes = record and jax.process_index() == 0
        self.progress = RunProgress(self.total, enabled=self.writes).start()
        self.progress.phase("building the model")
        self.summary = summary.model_summary(config, task)
        model = models.build_model(config, task, nnx.Rngs(config.seed))
        self.mesh = make_mesh(config.mesh)
        if self.mesh is not None:
            shard_sequence(model, SEQUENCE_AXIS)
        self.graphdef, params, batch_stats, self.rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
        if config.train.init_from:
            params = self._params_from(config.train.init_from, params)
        model.eval()  # evaluation: BatchNorm (PRepBN) reads its running statistics
        eval_graphdef = nnx.graphdef(model)
        tx = optim.make_optimizer(config.optim, self.total)
        schedule = optim.learning_rate_schedule(config.optim, self.total)
        self.state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
        if jax.tree.leaves(batch_stats):
            self.state["batch_stats"] = batch_stats
        if self.mesh is not None:
            self.state = replicate(self.state, self.mesh)
        self.progress.phase("preparing the data")
        self.train_iter = data.make_iterator(task, "train", batch_size=config.train.batch_size, seed=config.seed)
        self.checkpoints = Checkpoints(workdir, keep=config.train.keep_checkpoints)
        self.train_step = steps.make_train_step(
            self.graphdef, self.rest, tx, task.kind, schedule, config.seed, self.mesh, total_steps=self.total
        )
        self.eval_step = steps.make_eval_step(eval_graphdef, self.rest, task.kind, self.mesh)
        self.start_step = self._resume()
        self.logger = MetricsLogger(workdir, self.total, start_step=self.start_step, record=self.writes)
        self.logger.discard_after(self.start_step)

    def _params_from(self, workdir: str, params: nnx.State) -> nnx.State:
        """The parameters of the run in `workdir` (train.init_from) where this model has them (a resumed run then
        restores its own)."""
        self.progress.phase(f"initialising from the run in {workdir}")
        params, kept = params_from_run(workdir, params)
        if self.writes and kept:
            print(f"train.init_from: {len(kept)} parameters keep their initialisation ({', '.join(kept[:3])}"
                  f"{' ...' if len(kept) > 3 else ''})", flush=True)
        return params

    def _resume(self) -> int:
        """Restore the newest checkpoint that restores; the step it holds (0 without one)."""
        self.progress.phase("restoring the latest checkpoint")
        restored = self.checkpoints.restore_latest(jax.eval_shape(lambda: self.state))
        if restored is None:
            return 0
        step, self.state, data_state = restored
        self.train_iter.set_state(data_state)
        return step

    def _announce(self) -> None:
        """The run's start: where it writes, the model per layer, and where training begins."""
        if not self.writes:
            return
        start = f"resumed from the checkpoint at step {self.start_step}" if self.start_step else "starting at step 0"
        lines = [f"workdir: {os.path.abspath(self.workdir)}", *self.summary.lines(),
                 f"{start}; training to step {self.total}"]
        print("\n".join(lines), flush=True)

    def train(self) -> dict[str, float]:
        self._announce()
        train_cfg = self.config.train
        step = self.start_step
        window: list[dict[str, float]] = []
        tokens_per_step = train_cfg.batch_size * self.task.seq_len
        last_train = self.logger.find(step, "train") or {}
        with _sigterm_requested() as stop:
            while step < self.total:
                batch = self._place(next(self.train_iter))
                if step == self.start_step:
                    self._compile_train_step(batch)
                self.progress.phase("training")
                started = time.perf_counter()
                metrics = self._step(step, batch)
                window.append({**metrics, "seconds": time.perf_counter() - started})
                step += 1
                self.progress.advance_to(step)
                if step % train_cfg.log_every == 0 or step == self.total:
                    last_train = self._log_train(step, window, tokens_per_step)
                    window = []
                if step % train_cfg.eval_every == 0 and step < self.total:
                    self.evaluate(step)
                if step % train_cfg.checkpoint_every == 0 or step == self.total or stop.is_set():
                    self._save(step)
                if stop.is_set():
                    logging.warning("SIGTERM: saved the checkpoint at step %d and stopped", step)
                    return {"step": step, "train_loss": last_train.get("loss", math.nan), "stopped": True}
        final = self.logger.find(step, "eval") or self.evaluate(step)
        return {"step": step, "train_loss": last_train.get("loss", math.nan),
                "eval_loss": final["loss"], "eval_accuracy": final["accuracy"]}

    def _compile_train_step(self, batch: dict) -> None:
        """Compile the train step for the first batch ahead of running it, so the compile is a phase of its own (a
        step that is not a jitted function, e.g. a wrapper around one, compiles on its first call instead)."""
        self.progress.phase("compiling the train step")
        if hasattr(self.train_step, "lower"):
            self.train_step = self.train_step.lower(self.state, batch).compile()

    def _step(self, step: int, batch: dict) -> dict[str, float]:
        new_state, metrics = self.train_step(self.state, batch)
        metrics = {k: float(v) for k, v in to_host(metrics).items()}
        loss = metrics["loss"] + metrics.get("aux_loss", 0.0)
        if not math.isfinite(loss):
            raise NonFiniteLossError(
                f"the training loss became {loss} at step {step + 1}; stopped without saving that state "
                f"(last good checkpoint: step {self.checkpoints.latest_step()})"
            )
        self.state = new_state
        return metrics

    def _log_train(self, step: int, window: list[dict[str, float]], tokens_per_step: int) -> dict[str, float]:
        """Write the mean metrics of the steps since the last log; throughput counts the steps' own time (data and
        compute), not evaluations or checkpoints between them."""
        keys = ("loss", "accuracy", "grad_norm") + (("aux_loss",) if "aux_loss" in window[-1] else ())
        mean = {k: sum(m[k] for m in window) / len(window) for k in keys}
        seconds = sum(m["seconds"] for m in window)
        record = {**mean, "learning_rate": window[-1]["learning_rate"],
                  "tokens_per_s": len(window) * tokens_per_step / seconds,
                  "elapsed_s": time.perf_counter() - self.logger.start}
        return self.logger.write(step, "train", record)

    def evaluate(self, step: int) -> dict[str, float]:
        """Loss and accuracy over the whole held-out split."""
        self.progress.phase("evaluating")
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
        self.progress.phase(f"saving the checkpoint at step {step}")
        self.checkpoints.save(step, self.state, self.train_iter.get_state())

    def close(self) -> None:
        self.progress.stop()
        self.checkpoints.close()
        if hasattr(self, "logger"):
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
    flags.DEFINE_bool("overwrite", False, "Delete another run found in --workdir and start over.")
    flags.DEFINE_bool("list", False, "List the mixers, tasks and config files, and exit.")
    flags.DEFINE_bool("dry_run", False, "Print the resolved config, the parameters per layer and the decode-state "
                      "bytes, and exit without training (needs only --config).")
    flags.DEFINE_bool("eval_only", False, "Evaluate the latest checkpoint of --workdir (with its config.json) and "
                      "exit; writes nothing.")
    flags.DEFINE_bool("retain_host_memory", True, "Keep freed host memory for reuse (seqlab.host_memory): faster "
                      "steps on CPU when they allocate large buffers.")
    flags.DEFINE_string("compilation_cache_dir", default_compilation_cache_dir(), "Persistent cache of compiled "
                        "programs (empty: off). Default: $SEQLAB_COMPILATION_CACHE_DIR, $JAX_COMPILATION_CACHE_DIR "
                        "or ~/.cache/seqlab/jax.")


def default_compilation_cache_dir() -> str:
    """$SEQLAB_COMPILATION_CACHE_DIR, else JAX's own $JAX_COMPILATION_CACHE_DIR, else <user cache dir>/seqlab/jax
    (a variable set to the empty string turns the cache off)."""
    for variable in ("SEQLAB_COMPILATION_CACHE_DIR", "JAX_COMPILATION_CACHE_DIR"):
        if variable in os.environ:
            return os.environ[variable]
    user_cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(user_cache, "seqlab", "jax")


def use_compilation_cache(directory: str) -> None:
    """Cache compiled programs under `directory` (empty: leave caching off); every program is cached, even quick
    ones, unless $JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS sets a threshold."""
    if not directory:
        return
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(directory))
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def config_overrides(argv: list[str]) -> list[tuple[str, str]]:
    """(key, value text) of every ``--config.<key>=<value>`` (or ``--config.<key> <value>``) flag in `argv`."""
    found = []
    for i, arg in enumerate(argv):
        if not arg.startswith("--config."):
            continue
        key, sep, text = arg[len("--config."):].partition("=")
        if sep:
            found.append((key, text))
        elif i + 1 < len(argv):
            found.append((key, argv[i + 1]))
    return found


def import_flag_modules(argv: list[str]) -> None:
    """Import the modules of a ``--config.imports=(...)`` flag before absl loads the config file, so that the mixers
    they register have their ``model.mixer_args.<name>`` keys when the other overrides are applied. A value that
    is not a tuple literal of module names is left for `config_lib.validate` to reject."""
    for key, text in config_overrides(argv):
        if key != "imports":
            continue
        try:
            names = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            continue
        config_lib.import_modules((names,) if isinstance(names, str) else names)


def check_overrides(argv: list[str], config: ml_collections.ConfigDict | None) -> None:
    """Refuse, naming the full key, a ``--config.<key>`` override whose key does not exist (with the close matches
    in its section), and a bare value for a tuple key (``--config.model.mixers=gla``, which ml_collections would
    turn into a one-element tuple): a tuple is given as a Python literal, ``--config.model.mixers="('gla',)"``."""
    if config is None:
        return
    for key, text in config_overrides(argv):
        section, names = config, key.split(".")
        for depth, name in enumerate(names):
            if not isinstance(section, ml_collections.ConfigDict) or name not in section:
                choices = section.keys() if isinstance(section, ml_collections.ConfigDict) else ()
                prefix = ".".join(names[:depth])
                hint = config_lib.did_you_mean(name, choices, f"{prefix}." if prefix else "")
                raise ValueError(f"--config.{key}: config key '{'.'.join(names[: depth + 1])}' does not exist{hint}")
            section = section[name]
        if isinstance(section, tuple) and not isinstance(_literal(text), (tuple, list)):
            raise ValueError(f"--config.{key}={text}: {key} takes a tuple, given as a Python literal, e.g. "
                             f"--config.{key}=\"{(_literal(text),)!r}\"")


def _literal(text: str) -> Any:
    """The Python literal `text` spells, else `text` itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a flag error (a mistyped ``--config.key``, a bad literal, an unknown variant) as
    one short message and exit status 2 instead of absl's usage dump or ml_collections' traceback (which raises
    AttributeError / KeyError / TypeError for overrides it cannot apply)."""
    config = _config_of(argv)
    try:
        check_overrides(argv, config)
    except ValueError as error:
        sys.stderr.write(f"seqlab.train: {error}\n")
        sys.exit(2)
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as error:
        sys.stderr.write(f"seqlab.train: {config_lib.explain_override_error(str(error), config)}\n")
        sys.exit(2)


def _config_of(argv: list[str]) -> ml_collections.ConfigDict | None:
    """The config that ``--config=`` names in `argv`, without its overrides (None if it does not load)."""
    for i, arg in enumerate(argv):
        spec = arg.partition("=")[2] if arg.startswith("--config=") else None
        if arg == "--config" and i + 1 < len(argv):
            spec = argv[i + 1]
        if spec is not None:
            try:
                return config_lib.load_config(spec)
            except Exception:  # noqa: BLE001 -- the flag error being explained is the one to report
                return None
    return None


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    if f.list:
        print(catalog.listing())
        return
    if f.retain_host_memory:
        host_memory.retain_freed_memory()  # before JAX runs anything
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
    use_compilation_cache(f.compilation_cache_dir)
    try:
        _launch(f)
    except (workdir_lib.WorkdirError, CheckpointError, NonFiniteLossError) as error:
        sys.exit(f"seqlab.train: {error}")


def _launch(f: flags.FlagValues) -> None:
    """What the flags ask for: evaluate a workdir, describe a config, or train."""
    if f.eval_only:
        if not f.workdir or f.config is not None:
            raise app.UsageError("--eval_only takes --workdir (its config.json says the run) and no --config")
        result = evaluate_workdir(f.workdir)
        print(f"step {result['step']}: test loss {result['loss']:.4f}, test accuracy {result['accuracy']:.4f}")
        return
    if f.config is None or not (f.workdir or f.dry_run):
        raise app.UsageError("--config is required, and --workdir unless --dry_run (or use --list / --eval_only)")
    try:
        config_lib.validate(f.config)
    except ValueError as error:
        sys.exit(f"seqlab.train: {error}")
    if f.dry_run:
        print(describe(f.config))
        return
    maybe_initialize()
    result = train_and_evaluate(f.config, f.workdir, overwrite=f.overwrite)
    if result.get("stopped"):
        print(f"stopped by SIGTERM after step {result['step']} of {f.config.train.steps}; saved the checkpoint at "
              f"step {result['step']} in {f.workdir}; rerun the same command to resume", flush=True)
    else:
        print(f"step {result['step']}: test loss {result['eval_loss']:.4f}, "
              f"test accuracy {result['eval_accuracy']:.4f}", flush=True)


if __name__ == "__main__":
    define_flags()
    try:
        import_flag_modules(sys.argv)
    except ValueError as error:
        sys.exit(f"seqlab.train: {error}")
    app.run(main, flags_parser=parse_flags)
