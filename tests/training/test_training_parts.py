"""Pieces of a run checked on their own: learning-rate schedules against their formulas, the weight-decay mask,
loss and accuracy sums against plain numpy loops, pooling, the model's layer pattern, and mixers' auxiliary losses
(collected, and descended by the train step)."""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from seqlab import config as config_lib, data, models
from seqlab.config import base_config
from seqlab.mixers import aux_losses
from seqlab.models import layer_mixers
from seqlab.models.classifier import pool
from seqlab.training import optim, steps

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def optim_config(**overrides) -> ml_collections.ConfigDict:
    config = base_config().optim
    config.update({"learning_rate": 2.0, "warmup_steps": 10, "min_learning_rate_ratio": 0.1, **overrides})
    return config


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant", "inverse_sqrt"])
def test_schedules_follow_their_formulas(schedule):
    total, peak, warmup, floor = 110, 2.0, 10, 0.2
    lr = optim.learning_rate_schedule(optim_config(schedule=schedule), total)
    for step in (0, 5):
        assert float(lr(step)) == pytest.approx(peak * step / warmup)
    for step in (10, 35, 60, 110):
        s = (step - warmup) / (total - warmup)
        expected = {
            "cosine": floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * s)),
            "linear": peak + (floor - peak) * s,
            "constant": peak,
            "inverse_sqrt": peak * math.sqrt(warmup / step),
        }[schedule]
        assert float(lr(step)) == pytest.approx(expected, rel=1e-5)


def test_weight_decay_skips_vectors_and_learnt_initial_states():
    config = optim_config(schedule="constant", warmup_steps=0, weight_decay=0.5, grad_clip_norm=None)
    tx = optim.make_optimizer(config, 10)
    params = {"kernel": jnp.ones((2, 3)), "bias": jnp.ones((3,)),
              "mixer": {"learnt_initial_state": jnp.ones((2, 3, 4))}}
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    np.testing.assert_allclose(updates["kernel"], -2.0 * 0.5 * np.ones((2, 3)), rtol=1e-6)
    np.testing.assert_allclose(updates["bias"], 0.0)
    np.testing.assert_allclose(updates["mixer"]["learnt_initial_state"], 0.0)


def test_gradients_are_clipped_by_global_norm():
    """Two steps with a huge then a small gradient: the run equals clip-then-AdamW, and differs without the clip."""

    def run(tx):
        params = {"w": jnp.zeros((4,))}
        state = tx.init(params)
        out = []
        for g in (jnp.full((4,), 300.0), jnp.array([0.1, -0.2, 0.3, 0.0])):
            updates, state = tx.update({"w": g}, state, params)
            out.append(np.asarray(updates["w"]))
        return np.stack(out)

    config = optim_config(schedule="constant", warmup_steps=0, weight_decay=0.0, grad_clip_norm=1.0)
    expected = run(optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(2.0, b1=0.9, b2=0.98, eps=1e-8,
                                                                             weight_decay=0.0)))
    np.testing.assert_allclose(run(optim.make_optimizer(config, 10)), expected, rtol=1e-6)
    config.grad_clip_norm = None
    assert not np.allclose(run(optim.make_optimizer(config, 10)), expected, rtol=1e-3)


def test_lm_sums_match_a_numpy_loop():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 7, 5)).astype(np.float32)
    labels = rng.integers(0, 5, size=(3, 7))
    labels[rng.random((3, 7)) < 0.5] = -100
    labels[2] = -100  # an example with nothing supervised does not count
    sums = {k: float(v) for k, v in steps.lm_sums(jnp.asarray(logits), jnp.asarray(labels)).items()}
    losses, per_example = [], []
    for b in range(3):
        hits = []
        for t in range(7):
            if labels[b, t] == -100:
                continue
            z = logits[b, t].astype(np.float64)
            losses.append(np.log(np.sum(np.exp(z - z.max()))) + z.max() - z[labels[b, t]])
            hits.append(float(np.argmax(z) == labels[b, t]))
        if hits:
            per_example.append(np.mean(hits))
    means = steps.means(sums)
    assert means["loss"] == pytest.approx(np.mean(losses), rel=1e-5)
    assert means["accuracy"] == pytest.approx(np.mean(per_example))
    assert sums["examples"] == 2


def test_pooling_reads_only_real_tokens():
    h = jnp.arange(2 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 3)
    lengths = jnp.array([2, 4])
    np.testing.assert_allclose(pool(h, lengths, "mean"), [np.mean(h[0, :2], 0), np.mean(h[1], 0)])
    np.testing.assert_allclose(pool(h, lengths, "cls"), [h[0, 1], h[1, 3]])


def test_layer_pattern_repeats():
    assert layer_mixers(("baseconv", "based"), 5) == ["baseconv", "based", "baseconv", "based", "baseconv"]
    with pytest.raises(ValueError, match="model.mixers"):
        layer_mixers((), 2)


def test_training_accuracy_is_the_mqar_metric():
    from seqlab import data

    task = data.make_task("mqar", num_train=64)
    batch = next(data.make_iterator(task, "train", batch_size=16, seed=0))
    logits = np.random.default_rng(1).normal(size=(16, task.seq_len, task.vocab_size)).astype(np.float32)
    logits[np.arange(16)[:, None], np.arange(task.seq_len)[None], np.maximum(batch["labels"], 0)] += 2.2
    sums = steps.lm_sums(jnp.asarray(logits), jnp.asarray(batch["labels"]))
    expected = data.mqar_accuracy(np.argmax(logits, -1), batch["labels"])
    assert 0.0 < expected < 1.0
    assert steps.means(sums)["accuracy"] == pytest.approx(expected)


def test_aux_losses_are_summed_by_name_in_the_innermost_block_and_must_be_scalars():
    aux_losses.add("ignored", jnp.ones(()))  # no block open: nothing happens
    with aux_losses.collect() as outer:
        aux_losses.add("a", jnp.asarray(1.0))
        with aux_losses.collect() as inner:
            aux_losses.add("a", jnp.asarray(2.0))
            aux_losses.add("a", jnp.asarray(3.0))
        aux_losses.add("b", jnp.asarray(0.5, jnp.bfloat16))
        with pytest.raises(ValueError, match=r"^aux loss 'b': the value must be a scalar, got shape \(2,\)"):
            aux_losses.add("b", jnp.ones(2))
    assert {k: float(v) for k, v in inner.items()} == {"a": 5.0}
    assert {k: float(v) for k, v in outer.items()} == {"a": 1.0, "b": 0.5} and outer["b"].dtype == jnp.float32
    assert float(aux_losses.total(outer)) == 1.5 and float(aux_losses.total({})) == 0.0


def test_the_train_step_descends_the_task_loss_plus_the_mixers_aux_losses():
    """One SGD step (lr 1) moves the parameters by the gradient of mean cross-entropy + aux_loss, computed here from
    the model's sums; the metrics report the task loss and aux_loss apart."""
    config = config_lib.load_config(os.path.join(ROOT, "configs/mqar.py:softmax,tiny"))
    config.model.mixers = ("baseconv", "routing")
    config.model.mixer_args.routing.update(use_running_average=False, commitment=0.5, window=8)
    task = config_lib.validate(config)
    model = models.build_model(config, task, nnx.Rngs(0))
    graphdef, params, stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    batch = next(data.make_iterator(task, "train", batch_size=4, seed=0))
    sums_fn = steps.stateful_sums(graphdef, rest, task.kind, total_steps=10)

    def objective(p, with_aux: bool):
        sums, _ = sums_fn(p, stats, batch, None, jnp.asarray(0))
        task_loss = sums["loss_sum"] / sums["weight"]
        return task_loss + sums["aux_loss"] if with_aux else task_loss, (task_loss, sums["aux_loss"])

    grad = jax.jit(jax.grad(objective, has_aux=True), static_argnums=1)
    (want, (task_loss, aux)), (without_aux, _) = grad(params, True), grad(params, False)
    before = jax.tree.map(np.asarray, params)
    tx = optax.sgd(1.0)
    step = steps.make_train_step(graphdef, rest, tx, task.kind, optax.constant_schedule(1.0), seed=0, total_steps=10)
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params), "batch_stats": stats}
    new_state, metrics = step(state, batch)
    moved = jax.tree.map(lambda a, b: a - np.asarray(b), before, new_state["params"])
    assert float(aux) > 0 and optax.tree.norm(jax.tree.map(jnp.subtract, want, without_aux)) > 1e-6
    assert all(np.allclose(a, b, atol=1e-6) for a, b in zip(jax.tree.leaves(moved), jax.tree.leaves(want)))
    assert float(metrics["loss"]) == pytest.approx(float(task_loss), rel=1e-6)
    assert float(metrics["aux_loss"]) == pytest.approx(float(aux), rel=1e-6)
