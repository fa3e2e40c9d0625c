"""Grouped-query head layouts: key/value projection columns repeated for the query heads that read them."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def repeat_kv_columns(weight: jax.Array, head_dim: int, groups: int) -> jax.Array:
    """[..., H_kv·d] -> [..., H_kv·groups·d]: each key/value head's d columns repeated for the `groups` query heads
    that read it (GQA head h reads key/value head h // groups); for kernels [D, H_kv·d] and biases [H_kv·d]."""
    heads = weight.reshape(*weight.shape[:-1], -1, head_dim)
    return jnp.repeat(heads, groups, axis=-2).reshape(*weight.shape[:-1], -1)
