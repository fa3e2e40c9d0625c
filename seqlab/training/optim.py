"""The optimizer of a run: AdamW with a warmup-then-decay learning rate and global-norm gradient clipping.

Schedules (``optim.schedule``), after ``warmup_steps`` of linear warmup from 0 to ``learning_rate``:
  cosine        half cosine down to min_learning_rate_ratio · learning_rate at train.steps;
  linear        straight line down to the same floor;
  constant      stays at learning_rate;
  inverse_sqrt  learning_rate · sqrt(warmup_steps / step) (LRA's schedule).
Weight decay applies to matrices (parameters of rank >= 2: projections and embeddings), not to norms and biases.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax


def learning_rate_schedule(optim: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """The learning rate as a function of the step (0-based)."""
    peak, warmup = optim.learning_rate, optim.warmup_steps
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
