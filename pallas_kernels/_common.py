"""What every kernel in this package shares: the backend a kernel is built for, one ``pallas_call`` wrapper, the
[B, T, H, D] <-> [B, H, T, D] layout change with padding, and float32-accumulating matmuls on kernel values.

Backends: "gpu" lowers through Pallas's Triton backend (``pltriton.CompilerParams``); "tpu" through Mosaic
(every grid axis "parallel": the kernels loop over time inside the body); "cpu" runs the same kernel body with
``interpret=True``. ``backend=None`` means ``jax.default_backend()``.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

Array = jax.Array

BACKENDS = ("cpu", "gpu", "tpu")
MIN_FEATURE = 16  # Triton's dot needs every operand dimension >= 16 (and a power of two)


def resolve_backend(backend: str | None) -> str:
    """"cpu", "gpu" or "tpu"; None picks ``jax.default_backend()`` (cuda and rocm count as "gpu")."""
    if backend is None:
        backend = jax.default_backend()
        backend = "gpu" if backend in ("cuda", "rocm") else backend
    if backend not in BACKENDS:
        raise ValueError(f"backend must be None or one of {BACKENDS}, got {backend!r}")
    return backend


def pallas_call(
    kernel: Callable[..., None],
    *,
    backend: str,
    grid: tuple[int, ...],
    in_specs: Sequence[Any],
    out_specs: Any,
    out_shape: Any,
    num_warps: int = 4,
    num_stages: int = 2,
    name: str | None = None,
) -> Callable[..., Any]:
    """``pl.pallas_call`` for ``backend`` (see the module docstring); num_warps and num_stages apply to "gpu"."""
    params: Any = None
    if backend == "gpu":
        params = pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    elif backend == "tpu":
        params = pltpu.CompilerParams(dimension_semantics=("parallel",) * len(grid))
    return pl.pallas_call(
        kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        compiler_params=params, interpret=backend == "cpu", name=name,
    )


def is_block_size(value: object) -> bool:
    """A kernel block size: an int that is a power of two and at least ``MIN_FEATURE``."""
    is_int = isinstance(value, int) and not isinstance(value, bool)
    return is_int and value >= MIN_FEATURE and value & (value - 1) == 0


def check_blocks(blocks: Any, sizes: tuple[str, ...]) -> None:
    """ValueError naming the field of a frozen block-size dataclass unless every field in ``sizes`` is a block size
    (``is_block_size``) and num_warps, num_stages are positive ints."""
    owner = type(blocks).__name__
    for name in sizes:
        if not is_block_size(getattr(blocks, name)):
            raise ValueError(f"{owner}.{name} must be a power of two >= {MIN_FEATURE}, got {getattr(blocks, name)!r}")
    for name in ("num_warps", "num_stages"):
        value = getattr(blocks, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{owner}.{name} must be a positive int, got {value!r}")


def padded_feature(dim: int) -> int:
    """Feature sizes inside kernels: a power of two, at least ``MIN_FEATURE``."""
    return max(MIN_FEATURE, pl.next_power_of_2(dim))


def padded_length(length: int, block: int) -> int:
    return pl.cdiv(length, block) * block


def to_kernel_layout(x: Array, length: int, feature: int | None = None) -> Array:
    """[B, T, H, D] -> [B, H, length, feature] (or [B, T, H] -> [B, H, length]), zero-padded; feature None: D."""
    x = jnp.swapaxes(x, 1, 2)
    pads = [(0, 0), (0, 0), (0, length - x.shape[2])]
    if x.ndim == 4:
        pads.append((0, (feature or x.shape[3]) - x.shape[3]))
    return jnp.pad(x, pads) if any(p for _, p in pads) else x


def from_kernel_layout(x: Array, length: int, feature: int | None = None) -> Array:
    """[B, H, T', D'] -> [B, length, H, feature] (or [B, H, T'] -> [B, length, H]): the inverse of
    ``to_kernel_layout``."""
    x = x[:, :, :length] if x.ndim == 3 else x[:, :, :length, :feature]
    return jnp.swapaxes(x, 1, 2)


def scan_whole(*block: int) -> pl.BlockSpec:
    """On a state scan's grid (B, H, column block j): all of (b, h)'s trailing block (e.g. a whole sequence
    [T, K]), the same for every column block."""
    return pl.BlockSpec((None, None, *block), lambda b, h, j: (b, h) + (0,) * len(block))


def scan_columns(*block: int) -> pl.BlockSpec:
    """On a state scan's grid (B, H, column block j): (b, h)'s column block j of the trailing block (its last axis
    is the state's value axis, ``block[-1]`` wide)."""
    return pl.BlockSpec((None, None, *block), lambda b, h, j: (b, h) + (0,) * (len(block) - 1) + (j,))


def _common_dtype(a: Array, b: Array) -> tuple[Array, Array]:
    dtype = jnp.promote_types(a.dtype, b.dtype)
    return a.astype(dtype), b.astype(dtype)


def matmul(a: Array, b: Array) -> Array:
    """a [M, K] @ b [K, N], accumulated in float32 (mixed operands are promoted to their common dtype)."""
    return jax.lax.dot_general(*_common_dtype(a, b), (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def matmul_nt(a: Array, b: Array) -> Array:
    """a [M, K] @ bᵀ (b [N, K]), accumulated in float32."""
    return jax.lax.dot_general(*_common_dtype(a, b), (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def matmul_tn(a: Array, b: Array) -> Array:
    """aᵀ (a [K, M]) @ b [K, N], accumulated in float32."""
    return jax.lax.dot_general(*_common_dtype(a, b), (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def causal_mask(rows: int, cols: int, row_offset: int | Array = 0, col_offset: int | Array = 0, strict: bool = False) -> Array:
    """[rows, cols] bool, True where column position <= row position (< with ``strict``); positions are
    index + offset."""
    row = jax.lax.broadcasted_iota(jnp.int32, (rows, cols), 0) + row_offset
    col = jax.lax.broadcasted_iota(jnp.int32, (rows, cols), 1) + col_offset
    return col < row if strict else col <= row


def masked_exp(diff: Array, mask: Array) -> Array:
    """exp(diff) where ``mask``, else 0 — masking first, so only the kept (non-positive) differences are
    exponentiated."""
    return jnp.exp(jnp.where(mask, diff, -jnp.inf))


def lowered_text(fn: Callable[..., Any], backend: str, *args: Any) -> str:
    """The StableHLO text of ``fn(*args)`` lowered for ``backend`` ("gpu": CUDA, "tpu") from any machine, kernels
    included (Triton IR or Mosaic, serialised in their custom calls). Used to check that kernels lower without the
    hardware."""
    from jax import export

    platform = {"gpu": "cuda", "tpu": "tpu"}[backend]
    unchecked = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    exported = export.export(jax.jit(fn), platforms=[platform], disabled_checks=unchecked)(*args)
    return exported.mlir_module()
