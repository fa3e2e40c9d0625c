"""Checkpoints of a run, in ``<workdir>/checkpoints`` (orbax CheckpointManager).

Each checkpoint holds two items: ``state`` (step, parameters, optimizer state) and ``data`` (the training
iterator's state, JSON), so a resumed run continues from exactly the batch it stopped before. Orbax writes each
checkpoint to a temporary directory and renames it when complete, so an interrupted or failed save never leaves a
readable-but-corrupt checkpoint; the trainer saves only states whose losses were all finite.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.json"


class Checkpoints:
    """Save and restore (train state, data iterator state) pairs under ``<workdir>/checkpoints``."""

    def __init__(self, workdir: str, *, keep: int):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(
            os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR), options=options, item_names=("state", "data")
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: dict[str, Any], data_state: Any) -> None:
        """Write checkpoint `step` (blocking; replaces nothing if it already exists)."""
        if step in self.manager.all_steps():
            return
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state))
        self.manager.save(step, args=args)
        self.manager.wait_until_finished()

    def restore(self, step: int, abstract_state: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        """(train state shaped like `abstract_state`, data iterator state) of checkpoint `step`."""
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
        restored = self.manager.restore(step, args=args)
        return restored["state"], restored["data"]

    def close(self) -> None:
        self.manager.close()


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
    """(model with the latest checkpoint's parameters, in eval mode, the run's config, its data Task) of the run in
    `workdir`."""
    from seqlab import config as config_lib, models
    from seqlab.training import optim

    config = read_config(workdir)
    task = config_lib.validate(config)
    checkpoints = Checkpoints(workdir, keep=config.train.keep_checkpoints)
    step = checkpoints.latest_step()
    if step is None:
        raise ValueError(f"workdir: {workdir!r} has no checkpoint to restore")
    model = models.build_model(config, task, nnx.Rngs(config.seed))
    model.eval()
    graphdef, params, batch_stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    tx = optim.make_optimizer(config.optim, config.train.steps)

    def train_state(params, batch_stats):
        state = {"step": jax.numpy.zeros((), jax.numpy.int32), "params": params, "opt_state": tx.init(params)}
        return {**state, "batch_stats": batch_stats} if jax.tree.leaves(batch_stats) else state

    state, _ = checkpoints.restore(step, jax.eval_shape(train_state, params, batch_stats))
    checkpoints.close()
    return nnx.merge(graphdef, state["params"], state.get("batch_stats", batch_stats), rest), config, task
