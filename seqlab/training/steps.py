"""Losses, metrics and the jit-compiled train and eval steps.

Language modelling (task.kind "lm"): batch {"inputs" [B, L], "labels" [B, L]} with label -100 ignored; the loss is
the mean cross-entropy over supervised positions. Accuracy is Zoology's MQAR metric, used for every LM task: per
example, the fraction of its supervised positions where argmax(logits) == label; then the mean over examples.
Classification (task.kind "classification"): batch {"inputs" [B, L], "length" [B], "label" [B]}; cross-entropy
and accuracy of the pooled logits.

Steps return sums (loss_sum, weight, correct_sum, examples) so evaluation can aggregate exact means over batches.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

IGNORE_LABEL = -100
Batch = dict[str, jax.Array]
Sums = dict[str, jax.Array]


def lm_sums(logits: jax.Array, labels: jax.Array) -> Sums:
    """logits [B, L, V] float32, labels [B, L] (-100 ignored) -> loss_sum, weight, correct_sum, examples."""
    mask = labels != IGNORE_LABEL
    safe = jnp.where(mask, labels, 0)
    token_loss = optax.softmax_cross_entropy_with_integer_labels(logits, safe)
    correct = (jnp.argmax(logits, axis=-1) == safe) & mask
    supervised = mask.sum(axis=1)
    per_example = correct.sum(axis=1) / jnp.maximum(supervised, 1)
    has_targets = supervised > 0
    return {
        "loss_sum": jnp.sum(jnp.where(mask, token_loss, 0.0)),
        "weight": mask.sum().astype(jnp.float32),
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
    """Run the model on a batch and reduce to sums."""
    if kind == "classification":
        logits = model(batch["inputs"], batch["length"], dropout_rng=dropout_rng)
        return classification_sums(logits, batch["label"])
    return lm_sums(model(batch["inputs"], dropout_rng=dropout_rng), batch["labels"])


def means(sums: Sums) -> dict[str, float]:
    """loss = loss_sum / weight, accuracy = correct_sum / examples."""
    return {
        "loss": float(sums["loss_sum"]) / max(float(sums["weight"]), 1.0),
        "accuracy": float(sums["correct_sum"]) / max(float(sums["examples"]), 1.0),
    }


def make_train_step(
    graphdef: nnx.GraphDef, rest: nnx.State, tx: optax.GradientTransformation, kind: str,
    schedule: optax.Schedule, seed: int,
) -> Callable[[dict[str, Any], Batch], tuple[dict[str, Any], dict[str, jax.Array]]]:
    """A jitted step: (state {"step", "params", "opt_state"}, batch) -> (new state, metrics).

    Dropout noise is a pure function of (seed, step), so a resumed run repeats an uninterrupted one exactly.
    """

    def loss_fn(params, batch, rng):
        sums = batch_sums(nnx.merge(graphdef, params, rest), batch, kind, rng)
        return sums["loss_sum"] / jnp.maximum(sums["weight"], 1.0), sums

    def step(state, batch):
        rng = jax.random.fold_in(jax.random.key(seed), state["step"])
        (loss, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], batch, rng)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        new_state = {"step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates),
                     "opt_state": opt_state}
        metrics = {"loss": loss, "accuracy": sums["correct_sum"] / jnp.maximum(sums["examples"], 1.0),
                   "grad_norm": optax.tree.norm(grads), "learning_rate": schedule(state["step"])}
        return new_state, metrics

    return jax.jit(step, donate_argnums=0)


def make_eval_step(graphdef: nnx.GraphDef, rest: nnx.State, kind: str) -> Callable[[Any, Batch], Sums]:
    """A jitted (params, batch) -> sums, without dropout."""

    def step(params, batch):
        return batch_sums(nnx.merge(graphdef, params, rest), batch, kind, None)

    return jax.jit(step)
