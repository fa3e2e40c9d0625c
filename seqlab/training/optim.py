"""The optimizer of a run: AdamW with a warmup-then-decay learning rate and global-norm gradient clipping.

Schedules (``optim.schedule``), after ``warmup_steps`` of linear warmup from 0 to ``learning_rate``:
  cosine        half cosine down to min_learning_rate_ratio · learning_rate at train.steps;
  linear        straight line down to the same floor;
  constant      stays at learning_rate;
  inverse_sqrt  learning_rate · sqrt(warmup_steps / step) (LRA's schedule).
``optim.warmup_steps`` is a number of steps (a whole number >= 1) or, below 1, a fraction of the run (0.1: the
first 10% of train.steps); a number of steps larger than the run (a config's 200 under ``--config.train.steps=50``)
is clamped to 10% of the run, with one warning line in the log (see `warmup_steps`).
Weight decay applies to matrices (parameters of rank >= 2: projections and embeddings), not to norms, biases and
learnt initial states.
``optim.trainable``: a regular expression over parameter paths (``backbone.blocks.0.mixer.q_proj.kernel``, searched, not
matched whole): only the parameters it finds are trained (clipping, AdamW and its state cover only them); every other
parameter's update is zero. Empty: every parameter. Initial-state tuning (`seqlab.mixers.Mixer.learn_initial_state`,
``model.learn_initial_state``) trains ``"learnt_initial_state"`` alone.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging


def learning_rate_schedule(optim: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """The learning rate as a function of the step (0-based)."""
    peak, warmup = optim.learning_rate, warmup_steps(optim, total_steps)
    floor = peak * optim.min_learning_rate_ratio
    decay_steps = max(total_steps - warmup, 1)
    if optim.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=optim.min_learning_rate_ratio)
    elif optim.schedule == "linear":
        decay = optax.linear_schedule(peak, floor, decay_steps)
    elif optim.schedule == "constant":
        decay = optax.constant_schedule(peak)
    elif optim.schedule == "inverse_sqrt":
        decay = _inverse_sqrt(peak, max(warmup, 1))
    else:
        raise ValueError(f"optim.schedule: unknown schedule {optim.schedule!r}")
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def warmup_steps(optim: ml_collections.ConfigDict, total_steps: int) -> int:
    """The steps of linear warmup that ``optim.warmup_steps`` asks for in a run of `total_steps`: a value below 1 is
    a fraction of the run (rounded), a larger one a number of steps. More steps than the run would leave no decay
    (and a run cut short still warming up): they are clamped to 10% of the run, with a warning."""
    requested = optim.warmup_steps
    if requested < 1:
        return round(requested * total_steps)
    if requested <= total_steps:
        return int(requested)
    clamped = total_steps // 10
    _warn_clamped(int(requested), total_steps, clamped)
    return clamped


@functools.cache
def _warn_clamped(requested: int, total_steps: int, clamped: int) -> None:
    """One warning line per clamp (cached: a run builds its schedule more than once)."""
    logging.warning(
        "optim.warmup_steps %d exceeds train.steps %d; warming up over %d steps (10%%) instead (a value below 1, "
        "e.g. 0.1, is a fraction of train.steps)", requested, total_steps, clamped,
    )  # fmt: skip


def _inverse_sqrt(peak: float, offset: int) -> optax.Schedule:
    """peak · sqrt(offset / (step + offset)) for step >= 0 (steps counted from the end of warmup)."""

    def schedule(step):
        return peak * jnp.sqrt(offset / (jnp.maximum(step, 0) + offset))

    return schedule


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
    """Clip by global norm (if optim.grad_clip_norm is set), then AdamW with the schedule above."""
    if optim.name != "adamw":
        raise ValueError(f"optim.name: unknown optimizer {optim.name!r}; known: adamw")
    adamw = optax.adamw(
        learning_rate_schedule(optim, total_steps), b1=optim.b1, b2=optim.b2, eps=optim.eps,
        weight_decay=optim.weight_decay, mask=_decay_mask,
    )  # fmt: skip
    tx = adamw if optim.grad_clip_norm is None else optax.chain(optax.clip_by_global_norm(optim.grad_clip_norm), adamw)
    if not optim.trainable:
        return tx
    labels = functools.partial(_trainable_labels, optim.trainable)
    return optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, labels)


def parameter_paths(params) -> list[str]:
    """The dotted path of every leaf of a parameter pytree (an ``nnx.State``), in leaf order."""
    paths = [jax.tree_util.keystr(path, simple=True, separator=".") for path, _ in
             jax.tree_util.tree_flatten_with_path(params)[0]]
    return [path.removesuffix(".value") for path in paths]


def _trainable_labels(pattern: str, params):
    """"trained" for each parameter whose path `pattern` finds, "frozen" for the rest; ValueError if none is found."""
    paths = parameter_paths(params)
    trained = [re.search(pattern, path) is not None for path in paths]
    if not any(trained):
        raise ValueError(f"optim.trainable: {pattern!r} matches no parameter path; the paths look like "
                         f"{', '.join(paths[:3])}")
    labels = iter("trained" if t else "frozen" for t in trained)
    return jax.tree.map(lambda _: next(labels), params)


def _decay_mask(params):
    decayed = iter(not path.endswith("learnt_initial_state") for path in parameter_paths(params))
    return jax.tree.map(lambda p: next(decayed) and jnp.ndim(p) >= 2, params)
