"""The optimizer of a run: AdamW with a warmup-then-decay learning rate and global-norm gradient clipping.

Schedules (``optim.schedule``), after ``warmup_steps`` of linear warmup from 0 to ``learning_rate``:
  cosine        half cosine down to min_learning_rate_ratio · learning_rate at train.steps;
  linear        straight line down to the same floor;
  constant      stays at learning_rate;
  inverse_sqrt  learning_rate · sqrt(warmup_steps / step) (LRA's schedule).
``optim.warmup_steps`` is a number of steps (a whole number >= 1) or, below 1, a fraction of the run (0.1: the
first 10% of train.steps); a number of steps larger than the run (a config's 200 under ``--config.train.steps=50``)
is clamped to 10% of the run, with one warning line in the log (see `warmup_steps`).
Weight decay applies to matrices (parameters of rank >= 2: projections and embeddings), not to norms and biases.
"""

from __future__ import annotations

import functools

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
    if optim.grad_clip_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(optim.grad_clip_norm), adamw)


def _decay_mask(params):
    return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)
