"""Argument checking and dispatch shared by the linear-state ops (errors name the offending argument)."""

from __future__ import annotations

from typing import Mapping, Protocol

import jax
import jax.numpy as jnp

from pallas_kernels import _common as pallas_common
from pallas_kernels import linear_attention as pallas_linear
from seqlab.core import recurrence

Array = jax.Array

IMPLS = ("auto", *recurrence.FORMS, "pallas")
ACCELERATORS = ("gpu", "tpu")


class KernelFn(Protocol):
    """A family's Pallas path: (q, k, v [B, T, H, ...] as given, gates by name, scale, initial state [B, H, K, V]
    float32, chunk size) -> (o [B, T, H, V] float32, final state [B, H, K, V] float32)."""

    def __call__(self, q: Array, k: Array, v: Array, gates: Mapping[str, Array], *, scale: float, initial_state: Array,
                 chunk_size: int) -> tuple[Array, Array]: ...


def resolve_impl(impl: str, *, has_kernel: bool, sequence_axis: str | None, length: int) -> str:
    """The form to run: "auto" is "pallas" on a GPU or TPU when the op has a kernel, runs on one device and gets
    more than one token, else "chunked" (a single token, a decode step, is one recurrent step in that form); an
    explicit impl is checked and kept (impl="pallas" on CPU runs the kernels in interpret mode)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        accelerated = pallas_common.resolve_backend(None) in ACCELERATORS
        use_kernel = has_kernel and accelerated and sequence_axis is None and length > 1
        return "pallas" if use_kernel else "chunked"
    if impl == "pallas" and not has_kernel:
        raise ValueError("impl='pallas': this op has no Pallas kernel; use 'auto', 'chunked', 'recurrent' or 'parallel'")
    if impl == "pallas" and sequence_axis is not None:
        raise ValueError("impl='pallas' runs on one device; with sequence_axis use 'chunked' or 'parallel'")
    return impl


def diagonal_kernel(gate_name: str | None) -> KernelFn:
    """The Pallas path of a diagonal-gated family whose gate is the input ``gate_name`` (None: no decay): the
    ``DiagonalGate`` contract is exactly the recurrence ``pallas_kernels.linear_attention`` computes."""

    def kernel(q, k, v, gates, *, scale, initial_state, chunk_size):
        blocks = pallas_linear.LinearAttentionBlocks(chunk=chunk_size, chunk_bwd=chunk_size)
        gate = None if gate_name is None else gates[gate_name]
        return pallas_linear.linear_attention(q, k, v, gate, scale=scale, initial_state=initial_state, blocks=blocks)

    return kernel


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
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if impl == "pallas" and not pallas_common.is_block_size(chunk_size):
        raise ValueError(f"chunk_size must be a power of two >= {pallas_common.MIN_FEATURE} with impl='pallas', got {chunk_size}")


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
    kernel: KernelFn | None = None,
) -> tuple[Array, Array | None]:
    """Check the common arguments, scale q, run the requested form (split over the mesh axis ``sequence_axis``
    when it is given; see ``recurrence.sequence_parallel``). ``gate`` declares a diagonal-gated family
    (``recurrence.DiagonalGate``), which also gives it the diagonal-gate Pallas kernels (``diagonal_kernel``);
    ``kernel`` is another family's Pallas path, if it has one (``resolve_impl``).

    Returns o [B, T, H, V] in float32 (callers cast to the value dtype) and the final state or None.
    """
    check_qkv(q, k, v)
    check_form(impl, chunk_size)
    if kernel is None and gate is not None:
        kernel = diagonal_kernel(gate.name)
    impl = resolve_impl(impl, has_kernel=kernel is not None, sequence_axis=sequence_axis, length=q.shape[1])
    batch, _, heads, key_dim = q.shape
    state = initial_state_or_zeros(initial_state, (batch, heads, key_dim, v.shape[-1]))
    scale = key_dim**-0.5 if scale is None else scale
    if impl == "pallas":
        o, final = kernel(q, k, v, gates, scale=scale, initial_state=state, chunk_size=chunk_size)
        return o, (final if output_final_state else None)
    inputs = {"q": q.astype(jnp.float32) * scale, "k": k.astype(jnp.float32), "v": v.astype(jnp.float32)}
    inputs.update({name: g.astype(jnp.float32) for name, g in gates.items()})
    o, final = recurrence.run(chunk_terms, inputs, state, impl, chunk_size, sequence_axis, gate)
    return o, (final if output_final_state else None)
