"""Losses, metrics and the jit-compiled train and eval steps.

Language modelling (task.kind "lm"): batch {"inputs" [B, L], "labels" [B, L]} (packed rows add "segment_ids" and
"positions" [B, L], `seqlab.core.documents.Documents`) with label -100 ignored; the loss is
the mean cross-entropy over supervised positions. Accuracy is Zoology's MQAR metric, used for every LM task: per
example, the fraction of its supervised positions where argmax(logits) == label; then the mean over examples.
Classification (task.kind "classification"): batch {"inputs" [B, L], "length" [B], "label" [B]}; cross-entropy
and accuracy of the pooled logits.

Steps return sums (loss_sum, weight, correct_sum, examples) so evaluation can aggregate exact means over batches.
On a (data, seq) mesh the sums are computed per device inside shard_map and added over the mesh. Auxiliary losses
that mixers add on the training path (`seqlab.mixers.aux_losses`: commitment terms) come back as "aux_loss", their
sum (averaged over the mesh's equal shards); the train step minimises the task's mean loss plus it and reports
both ("loss" is the task's alone, comparable with evaluation's).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P

from seqlab.core.documents import Documents
from seqlab.mixers import aux_losses
from seqlab.parallel.mesh import DATA_AXIS, batch_spec

IGNORE_LABEL = -100
Batch = dict[str, jax.Array]
Sums = dict[str, jax.Array]


def lm_sums(logits: jax.Array, labels: jax.Array, sequence_axis: str | None = None) -> Sums:
    """logits [B, L, V] float32, labels [B, L] (-100 ignored) -> loss_sum, weight, correct_sum, examples.

    With `sequence_axis`, L is this device's segment; per-example counts are summed over the axis before the
    per-example accuracy is taken, and every sum covers the whole sequence.
    """
    mask = labels != IGNORE_LABEL
    safe = jnp.where(mask, labels, 0)
    token_loss = optax.softmax_cross_entropy_with_integer_labels(logits, safe)
    correct = (jnp.argmax(logits, axis=-1) == safe) & mask
    counts = {"hits": correct.sum(axis=1), "supervised": mask.sum(axis=1),
              "loss_sum": jnp.sum(jnp.where(mask, token_loss, 0.0))}
    if sequence_axis is not None:
        counts = jax.lax.psum(counts, sequence_axis)
    per_example = counts["hits"] / jnp.maximum(counts["supervised"], 1)
    has_targets = counts["supervised"] > 0
    return {
        "loss_sum": counts["loss_sum"],
        "weight": counts["supervised"].sum().astype(jnp.float32),
        "correct_sum": jnp.sum(jnp.where(has_targets, per_example, 0.0)),
        "examples": has_targets.sum().astype(jnp.float32),
    }


def classification_sums(logits: jax.Array, labels: jax.Array) -> Sums:
    """logits [B, C] float32, labels [B] -> the same sums (weight = examples = B)."""
    count = jnp.asarray(labels.shape[0], jnp.float32)
    return {
        "loss_sum": jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, labels)),
        "weight": count,
        "correct_sum": jnp.sum(jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32),
        "examples": count,
    }


def batch_sums(model: nnx.Module, batch: Batch, kind: str, dropout_rng: jax.Array | None) -> Sums:
    """Run the model on a batch (or, inside shard_map, on this device's part of it) and reduce to sums (with
    "aux_loss" if a mixer added one, averaged over the sequence axis)."""
    sequence_axis = model.backbone.sequence_axis
    with aux_losses.collect() as added:
        if kind == "classification":
            sums = classification_sums(model(batch["inputs"], batch["length"], dropout_rng=dropout_rng),
                                       batch["label"])
        else:
            packed = {}
            if "segment_ids" in batch:
                packed["documents"] = Documents(batch["segment_ids"], batch["positions"])
            sums = lm_sums(model(batch["inputs"], dropout_rng=dropout_rng, **packed), batch["labels"], sequence_axis)
    if added:
        aux = aux_losses.total(added)
        sums["aux_loss"] = aux if sequence_axis is None else jax.lax.pmean(aux, sequence_axis)
    return sums


def mesh_sums(
    graphdef: nnx.GraphDef, rest: nnx.State, kind: str, mesh: Mesh | None
) -> Callable[[Any, Batch, jax.Array | None], Sums]:
    """(params, global batch, dropout key) -> sums over the whole batch. On a mesh, each device runs its shard of
    the batch (rows over data, time over seq) inside shard_map and the sums are added over the mesh."""

    def local(variables, batch, rng):
        if rng is not None and mesh is not None:
            rng = jax.random.fold_in(rng, jax.lax.axis_index(DATA_AXIS))
        sums = batch_sums(nnx.merge(graphdef, *_as_states(variables), rest), batch, kind, rng)
        if mesh is None:
            return sums
        aux = sums.pop("aux_loss", None)
        sums = jax.lax.psum(sums, DATA_AXIS)
        return sums if aux is None else {**sums, "aux_loss": jax.lax.pmean(aux, DATA_AXIS)}

    if mesh is None:
        return local

    def sharded(params, batch, rng):
        specs = {key: batch_spec(x) for key, x in batch.items()}
        fn = jax.shard_map(local, mesh=mesh, in_specs=(P(), specs, P()), out_specs=P())
        return fn(params, batch, rng)

    return sharded


def _as_states(variables: Any) -> tuple:
    """The model variables a step merges: the parameters, or (parameters, BatchNorm statistics)."""
    return variables if isinstance(variables, tuple) else (variables,)


def stateful_sums(
    graphdef: nnx.GraphDef, rest: nnx.State, kind: str, total_steps: int
) -> Callable[[Any, Any, Batch, jax.Array, jax.Array], tuple[Sums, nnx.State]]:
    """(params, batch_stats, batch, dropout key, step) -> (sums, updated batch_stats), for models whose BatchNorm
    statistics change in train mode (PRepBN, whose λ the model's `on_train_progress` sets from the step first). Single
    device only."""

    def fn(params, stats, batch, rng, step):
        model = nnx.merge(graphdef, params, stats, rest, copy=True)  # fresh variables of this trace, so λ can be set
        if hasattr(model, "on_train_progress"):
            model.on_train_progress(step, total_steps)
        return batch_sums(model, batch, kind, rng), nnx.state(model, nnx.BatchStat)

    return fn


def means(sums: Sums) -> dict[str, float]:
    """loss = loss_sum / weight, accuracy = correct_sum / examples."""
    return {
        "loss": float(sums["loss_sum"]) / max(float(sums["weight"]), 1.0),
        "accuracy": float(sums["correct_sum"]) / max(float(sums["examples"]), 1.0),
    }


def make_train_step(
    graphdef: nnx.GraphDef, rest: nnx.State, tx: optax.GradientTransformation, kind: str,
    schedule: optax.Schedule, seed: int, mesh: Mesh | None = None, total_steps: int | None = None,
) -> Callable[[dict[str, Any], Batch], tuple[dict[str, Any], dict[str, jax.Array]]]:
    """A jitted step: (state {"step", "params", "opt_state"[, "batch_stats"]}, batch) -> (new state, metrics).

    A state with "batch_stats" (a model with BatchNorm, i.e. PRepBN; single device) carries the running statistics
    from step to step and sets PRepBN's λ for the step from `total_steps`. Dropout noise is a pure function of
    (seed, step), so a resumed run repeats an uninterrupted one exactly.
    """
    sums_fn = mesh_sums(graphdef, rest, kind, mesh)
    stateful_fn = stateful_sums(graphdef, rest, kind, total_steps or 1)

    def loss_fn(params, state, batch, rng):
        if "batch_stats" in state:
            sums, stats = stateful_fn(params, state["batch_stats"], batch, rng, state["step"])
        else:
            sums, stats = sums_fn(params, batch, rng), None
        task_loss = sums["loss_sum"] / jnp.maximum(sums["weight"], 1.0)
        return task_loss + sums.get("aux_loss", 0.0), (task_loss, sums, stats)

    def step(state, batch):
        rng = jax.random.fold_in(jax.random.key(seed), state["step"])
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (_, (loss, sums, stats)), grads = grad_fn(state["params"], state, batch, rng)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        new_state = {"step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates),
                     "opt_state": opt_state}
        if stats is not None:
            new_state["batch_stats"] = stats
        metrics = {"loss": loss, "accuracy": sums["correct_sum"] / jnp.maximum(sums["examples"], 1.0),
                   "grad_norm": optax.tree.norm(grads), "learning_rate": schedule(state["step"])}
        if "aux_loss" in sums:
            metrics["aux_loss"] = sums["aux_loss"]
        return new_state, metrics

    return jax.jit(step, donate_argnums=0)


def make_eval_step(
    graphdef: nnx.GraphDef, rest: nnx.State, kind: str, mesh: Mesh | None = None
) -> Callable[[Any, Batch], Sums]:
    """A jitted (params or (params, batch_stats), batch) -> sums, without dropout (build `graphdef` from the model
    in eval mode: BatchNorm then uses its running statistics)."""
    sums_fn = mesh_sums(graphdef, rest, kind, mesh)
    return jax.jit(lambda params, batch: sums_fn(params, batch, None))
