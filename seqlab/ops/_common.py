"""Argument checking and dispatch shared by the linear-state ops (errors name the offending argument)."""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from seqlab.core import recurrence

Array = jax.Array


def check_qkv(q: Array, k: Array, v: Array) -> None:
    """q, k: [B, T, H, K]; v: [B, T, H, V]."""
    if q.ndim != 4:
        raise ValueError(f"q must be [batch, time, heads, key_dim], got shape {q.shape}")
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q {q.shape}, got {k.shape}")
    if v.ndim != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [batch, time, heads, value_dim] with (batch, time, heads) = {q.shape[:3]}, got {v.shape}")


def check_gate(name: str, gate: Array, expected: tuple[int, ...]) -> None:
    if gate.shape != expected:
        raise ValueError(f"{name} must have shape {expected}, got {gate.shape}")


def check_form(impl: str, chunk_size: int) -> None:
    if impl not in recurrence.FORMS:
        raise ValueError(f"impl must be one of {recurrence.FORMS}, got {impl!r}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


def initial_state_or_zeros(initial_state: Array | None, shape: tuple[int, ...]) -> Array:
    if initial_state is None:
        return jnp.zeros(shape, jnp.float32)
    if initial_state.shape != shape:
        raise ValueError(f"initial_state must have shape {shape} [batch, heads, key_dim, value_dim], got {initial_state.shape}")
    return initial_state.astype(jnp.float32)


def run_linear_op(
    chunk_terms: recurrence.ChunkTermsFn,
    q: Array,
    k: Array,
    v: Array,
    gates: Mapping[str, Array],
    *,
    scale: float | None,
    initial_state: Array | None,
    output_final_state: bool,
    impl: str,
    chunk_size: int,
    sequence_axis: str | None = None,
    gate: recurrence.DiagonalGate | None = None,
) -> tuple[Array, Array | None]:
    """Check the common arguments, scale q, run the requested form (split over the mesh axis ``sequence_axis``
    when it is given; see ``recurrence.sequence_parallel``). ``gate`` declares a diagonal-gated family
    (``recurrence.DiagonalGate``).

    Returns o [B, T, H, V] in float32 (callers cast to the value dtype) and the final state or None.
    """
    check_qkv(q, k, v)
    check_form(impl, chunk_size)
    batch, _, heads, key_dim = q.shape
    state = initial_state_or_zeros(initial_state, (batch, heads, key_dim, v.shape[-1]))
    scale = key_dim**-0.5 if scale is None else scale
    inputs = {"q": q.astype(jnp.float32) * scale, "k": k.astype(jnp.float32), "v": v.astype(jnp.float32)}
    inputs.update({name: g.astype(jnp.float32) for name, g in gates.items()})
    o, final = recurrence.run(chunk_terms, inputs, state, impl, chunk_size, sequence_axis, gate)
    return o, (final if output_final_state else None)
