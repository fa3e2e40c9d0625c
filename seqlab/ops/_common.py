"""Argument checking, dispatch and declarations shared by the linear-state ops (errors name the offending argument).

A linear-state op declares itself with ``@linear_op(...)``: which of its arguments are gates (shape and range),
whether it expects L2-normalised keys, its flag variants and its Pallas kernel. ``linear_ops()`` lists the declared
ops; the tests generate inputs and find references from these declarations, so a new op is covered by the op,
kernel and sequence-parallel tests with no table to edit.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
from typing import Any, Callable, Mapping, Protocol, TypeVar

import jax
import jax.numpy as jnp

from pallas_kernels import _common as pallas_common
from pallas_kernels import linear_attention as pallas_linear
from seqlab.core import documents, recurrence

Array = jax.Array

IMPLS = ("auto", *recurrence.FORMS, "pallas")
ACCELERATORS = ("gpu", "tpu")
GATE_SHAPES = ("head", "key")
GATE_RANGES = ("log", "unit")
QKV = ("q", "k", "v")

OpFn = TypeVar("OpFn", bound=Callable[..., Any])


@dataclasses.dataclass(frozen=True)
class Gate:
    """A gate argument of a linear op.

    shape: "head" ([B, T, H], one value per head and token) or "key" ([B, T, H, K], one per key dim).
    range: "log" (a natural-log decay, <= 0) or "unit" (a weight in (0, 1), such as the delta rule's beta).
    """

    shape: str
    range: str

    def __post_init__(self):
        if self.shape not in GATE_SHAPES:
            raise ValueError(f"Gate.shape must be one of {GATE_SHAPES}, got {self.shape!r}")
        if self.range not in GATE_RANGES:
            raise ValueError(f"Gate.range must be one of {GATE_RANGES}, got {self.range!r}")


@dataclasses.dataclass(frozen=True)
class Variant:
    """A setting of an op's keyword flags that changes what it computes (linear_attn's ``normalize=True``).

    kwargs: the flags; state_columns: value columns the state has beyond V (normalize: the key sum z);
    positive_features: q and k must be positive (a normaliser divides by q · z).
    """

    kwargs: Mapping[str, Any]
    state_columns: int = 0
    positive_features: bool = False


DEFAULT_VARIANT = Variant({})


@dataclasses.dataclass(frozen=True, eq=False)  # one spec per declared op: compared and hashed by identity
class LinearOpSpec:
    """A declared linear-state op: ``fn(*inputs, *, scale, initial_state, output_final_state, impl, chunk_size,
    sequence_axis, **variant.kwargs) -> (o [B, T, H, V], final state [B, H, K, V + state_columns] or None)``.

    inputs: its positional array arguments in order (q, v, optionally k, and the gates), from its signature;
    gates: shape and range of each gate argument; normalized_keys: k is expected L2-normalised (the delta rules);
    kernel: the ``pallas_kernels`` module behind ``impl="pallas"``, or None; variants: "" (no flags) and the
    named flag settings.
    """

    name: str
    fn: Callable[..., tuple[Array, Array | None]]
    inputs: tuple[str, ...]
    gates: Mapping[str, Gate]
    normalized_keys: bool
    kernel: str | None
    variants: Mapping[str, Variant]


_LINEAR_OPS: dict[str, LinearOpSpec] = {}


def linear_op(
    *,
    gates: Mapping[str, Gate] | None = None,
    normalized_keys: bool = False,
    kernel: str | None = None,
    variants: Mapping[str, Variant] | None = None,
) -> Callable[[OpFn], OpFn]:
    """Declare the decorated function a linear-state op (see ``LinearOpSpec``) and register it under its name;
    the function is returned unchanged. Its positional parameters without defaults are its array inputs: q, v,
    optionally k, and exactly the ``gates``."""

    def register(fn: OpFn) -> OpFn:
        spec = LinearOpSpec(fn.__name__, fn, _array_inputs(fn), dict(gates or {}), normalized_keys,
                            _checked_kernel(kernel), {"": DEFAULT_VARIANT, **(variants or {})})
        _check_inputs(spec)
        previous = _LINEAR_OPS.get(spec.name)
        if previous is not None and previous.fn.__module__ != fn.__module__:
            raise ValueError(f"linear_op: {spec.name!r} is already declared in {previous.fn.__module__}")
        _LINEAR_OPS[spec.name] = spec
        return fn

    return register


def linear_ops() -> tuple[LinearOpSpec, ...]:
    """The declared linear-state ops, by name (every op module is imported by ``seqlab.ops``)."""
    return tuple(_LINEAR_OPS[name] for name in sorted(_LINEAR_OPS))


def _array_inputs(fn: Callable[..., Any]) -> tuple[str, ...]:
    params = inspect.signature(fn).parameters.values()
    return tuple(p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD and p.default is p.empty)


def _checked_kernel(kernel: str | None) -> str | None:
    if kernel is not None and importlib.util.find_spec(f"pallas_kernels.{kernel}") is None:
        raise ValueError(f"linear_op: kernel must name a pallas_kernels module, got {kernel!r}")
    return kernel


def _check_inputs(spec: LinearOpSpec) -> None:
    if "q" not in spec.inputs or "v" not in spec.inputs:
        raise ValueError(f"linear_op: {spec.name} must take q and v positionally, got {spec.inputs}")
    undeclared = [name for name in spec.inputs if name not in QKV and name not in spec.gates]
    missing = [name for name in spec.gates if name not in spec.inputs]
    if undeclared or missing:
        raise ValueError(f"linear_op: gates of {spec.name} must be its inputs other than q, k, v: "
                         f"undeclared {undeclared}, not an input {missing}")


class KernelFn(Protocol):
    """A family's Pallas path: (q, k, v [B, T, H, ...] as given, gates by name, scale, initial state [B, H, K, V]
    float32, chunk size, packed documents' starts [B, T] bool or None) -> (o [B, T, H, V] float32, final state
    [B, H, K, V] float32)."""

    def __call__(self, q: Array, k: Array, v: Array, gates: Mapping[str, Array], *, scale: float, initial_state: Array,
                 chunk_size: int, starts: Array | None = None) -> tuple[Array, Array]: ...


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

    def kernel(q, k, v, gates, *, scale, initial_state, chunk_size, starts=None):
        blocks = pallas_linear.LinearAttentionBlocks(chunk=chunk_size, chunk_bwd=chunk_size)
        gate = None if gate_name is None else gates[gate_name]
        return pallas_linear.linear_attention(q, k, v, gate, scale=scale, initial_state=initial_state, starts=starts,
                                              blocks=blocks)  # fmt: skip

    return kernel


def check_qkv(q: Array, k: Array, v: Array) -> None:
    """q, k: [B, T, H, K]; v: [B, T, H, V]."""
    check_qv(q, v)
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q {q.shape}, got {k.shape}")


def check_qv(q: Array, v: Array) -> None:
    """q: [B, T, H, K]; v: [B, T, H, V]."""
    if q.ndim != 4:
        raise ValueError(f"q must be [batch, time, heads, key_dim], got shape {q.shape}")
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
    segment_ids: Array | None = None,
    cu_seqlens: Array | None = None,
) -> tuple[Array, Array | None]:
    """Check the common arguments, scale q, run the requested form (split over the mesh axis ``sequence_axis``
    when it is given; see ``recurrence.sequence_parallel``). ``gate`` declares a diagonal-gated family
    (``recurrence.DiagonalGate``), which also gives it the diagonal-gate Pallas kernels (``diagonal_kernel``);
    ``kernel`` is another family's Pallas path, if it has one (``resolve_impl``). ``segment_ids`` / ``cu_seqlens``:
    packed documents (``packed_documents``), in every form and kernel.

    Returns o [B, T, H, V] in float32 (callers cast to the value dtype) and the final state or None.
    """
    check_qkv(q, k, v)
    check_form(impl, chunk_size)
    if kernel is None and gate is not None:
        kernel = diagonal_kernel(gate.name)
    starts = packed_documents(q.shape, segment_ids, cu_seqlens, sequence_axis)
    impl = resolve_impl(impl, has_kernel=kernel is not None, sequence_axis=sequence_axis, length=q.shape[1])
    batch, _, heads, key_dim = q.shape
    state = initial_state_or_zeros(initial_state, (batch, heads, key_dim, v.shape[-1]))
    scale = key_dim**-0.5 if scale is None else scale
    inputs = {"q": q.astype(jnp.float32) * scale, "k": k.astype(jnp.float32), "v": v.astype(jnp.float32)}
    inputs.update({name: g.astype(jnp.float32) for name, g in gates.items()})
    if impl == "pallas":
        o, final = kernel(q, k, v, gates, scale=scale, initial_state=state, chunk_size=chunk_size, starts=starts)
    else:
        o, final = recurrence.run(chunk_terms, inputs, state, impl, chunk_size, sequence_axis, gate, starts)
    if output_final_state and cu_seqlens is not None:
        final = document_final_states(chunk_terms, inputs, state, chunk_size, starts, cu_seqlens)
    return o, (final if output_final_state else None)


def packed_documents(
    shape: tuple[int, ...], segment_ids: Array | None, cu_seqlens: Array | None, sequence_axis: str | None
) -> Array | None:  # fmt: skip
    """The document starts [B, T] of packed rows (``seqlab.core.documents``) for q of `shape` [B, T, H, K], or
    None for unpacked rows. ``segment_ids`` [B, T] int or ``cu_seqlens`` [D + 1] (one row, B = 1), not both;
    under ``sequence_axis`` only segment_ids (this device's part of them)."""
    if segment_ids is not None and cu_seqlens is not None:
        raise ValueError("segment_ids and cu_seqlens: give one of them (cu_seqlens describes a single packed row)")
    batch, length = shape[:2]
    if cu_seqlens is not None:
        if sequence_axis is not None:
            raise ValueError("cu_seqlens: a sequence split over devices takes segment_ids (each device's part)")
        segment_ids = documents.segment_ids_from_cu_seqlens(cu_seqlens, batch, length)
    if segment_ids is None:
        return None
    return documents.document_starts(documents.check_segment_ids(segment_ids, batch, length), sequence_axis)


def document_final_states(
    chunk_terms: recurrence.ChunkTermsFn, inputs: Mapping[str, Array], state: Array, chunk_size: int,
    starts: Array, cu_seqlens: Array,
) -> Array:  # fmt: skip
    """The final state of each document of one packed row, [D, H, K, V] float32 (as flash-linear-attention
    returns them for cu_seqlens)."""
    ends = jnp.asarray(cu_seqlens, jnp.int32)[1:] - 1
    chunk = min(chunk_size, inputs["q"].shape[1])
    return recurrence.states_after(chunk_terms, inputs, state, chunk, starts, ends)[:, 0]


def with_ones(v: Array) -> Array:
    """[..., V] -> [..., V + 1] float32: the ones column that turns the numerator into the denominator."""
    v = v.astype(jnp.float32)
    return jnp.concatenate([v, jnp.ones((*v.shape[:-1], 1), jnp.float32)], axis=-1)
