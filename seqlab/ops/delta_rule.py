"""DeltaNet and Gated DeltaNet — "Parallelizing Linear Transformers with the Delta Rule over Sequence Length" and
"Gated Delta Networks: Improving Mamba2 with Delta Rule".

    S_t = exp(g_t) (I - β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ,   o_t = S_tᵀ (scale · q_t)   (g = 0: DeltaNet)

Chunk form (WY/UT), γ = within-chunk cumsum of g, Γ_ij = exp(γ_i - γ_j) (j <= i), M causal:
    A = StrictTril(diag(β)(Γ ⊙ K Kᵀ));  W = (I + A)⁻¹ diag(β)(K ⊙ e^γ);  U = (I + A)⁻¹ diag(β) V
    o = (Q Kᵀ ⊙ Γ ⊙ M) U + [Q ⊙ e^γ - (Q Kᵀ ⊙ Γ ⊙ M) W] S_in
    S_out = e^{γ_C} S_in - (K ⊙ e^{γ_C - γ})ᵀ W S_in + (K ⊙ e^{γ_C - γ})ᵀ U
so the transition is diagonal plus rank C: left = K ⊙ e^{γ_C - γ}, right = W.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from pallas_kernels import delta_rule as pallas_delta
from seqlab.core import chunk_math
from seqlab.core.recurrence import ChunkTerms, Transition
from seqlab.ops import _common

Array = jax.Array


BASE_BLOCK = 4
TINY_BLOCK = 8  # blocks up to this size multiply as broadcast products (``_tiny_matmul``)


@jax.custom_vjp
def _invert_unit_lower(system: Array) -> Array:
    """X = L⁻¹ for unit lower-triangular L [..., n, n] (its diagonal must be 1; its upper part is not read).

    Forward by ``_invert_by_doubling``; backward in closed form, dX = -X dL X so ∂L = -Xᵀ ∂X Xᵀ on the strictly
    lower part, instead of differentiating every level of the doubling.
    """
    return _invert_by_doubling(system)


def _invert_unit_lower_fwd(system: Array) -> tuple[Array, Array]:
    inverse = _invert_by_doubling(system)
    return inverse, inverse


def _invert_unit_lower_bwd(inverse: Array, d_inverse: Array) -> tuple[Array]:
    transposed = jnp.swapaxes(inverse, -1, -2)
    strictly_lower = chunk_math.causal_mask(inverse.shape[-1], strict=True)
    return (jnp.where(strictly_lower, -(transposed @ d_inverse @ transposed), 0.0),)


_invert_unit_lower.defvjp(_invert_unit_lower_fwd, _invert_unit_lower_bwd)


def _invert_by_doubling(system: Array) -> Array:
    """Inverse of a unit lower-triangular matrix [..., n, n], by blocked doubling with batched matmuls only.

    Diagonal blocks of 4 are inverted in closed form: with A strictly lower (A⁴ = 0),
    (I + A)⁻¹ = I - A + A² - A³ = (I - A)(I + A²). Then neighbouring inverses merge, all pairs of a level at once:
    [[L11, 0], [L21, L22]]⁻¹ = [[X11, 0], [-X22 L21 X11, X22]] (sizes 4 -> 8 -> ... -> n, n padded with identity
    to 4·2^k). No step is a triangular solve (XLA's CPU triangular_solve can deadlock when two run concurrently)
    and there is no sequential loop over rows.
    """
    n = system.shape[-1]
    size = BASE_BLOCK
    while size < n:
        size *= 2
    if size != n:
        system = jnp.pad(system, [(0, 0)] * (system.ndim - 2) + [(0, size - n), (0, size - n)])
        system = system + jnp.diag(jnp.arange(size) >= n).astype(system.dtype)
    eye = jnp.eye(BASE_BLOCK, dtype=system.dtype)
    strict = _diagonal_blocks(system, BASE_BLOCK) - eye
    inverse = _tiny_matmul(eye - strict, eye + _tiny_matmul(strict, strict))  # [..., size / 4, 4, 4]
    block = BASE_BLOCK
    while block < size:
        pairs = _diagonal_blocks(system, 2 * block)  # [..., m, 2b, 2b]
        upper, lower = inverse[..., 0::2, :, :], inverse[..., 1::2, :, :]
        matmul = _tiny_matmul if block <= TINY_BLOCK else jnp.matmul
        corner = -matmul(matmul(lower, pairs[..., block:, :block]), upper)
        top = jnp.concatenate([upper, jnp.zeros_like(upper)], axis=-1)
        inverse = jnp.concatenate([top, jnp.concatenate([corner, lower], axis=-1)], axis=-2)
        block *= 2
    return inverse[..., 0, :n, :n]


def _tiny_matmul(a: Array, b: Array) -> Array:
    """a @ b for batches of blocks up to ``TINY_BLOCK``, as broadcast products: XLA:CPU runs a batched dot of 4x4
    tiles at a tiny fraction of its matmul rate (26-40 ms for the 16k blocks of T = 8k, H = 8)."""
    return jnp.sum(a[..., :, :, None] * b[..., None, :, :], axis=-2)


def _diagonal_blocks(matrix: Array, block: int) -> Array:
    """The diagonal blocks [..., n / block, block, block] of a square matrix [..., n, n]."""
    starts = range(0, matrix.shape[-1], block)
    return jnp.stack([matrix[..., i : i + block, i : i + block] for i in starts], axis=-3)


def delta_chunk_terms(x: Mapping[str, Array]) -> ChunkTerms:
    """Chunk terms for q, k [..., C, K], v [..., C, V], beta [..., C] and an optional log decay g [..., C]; packed
    documents through ``chunk_math.DOCUMENT`` (the pair masks stop at document starts, so the WY system is block
    diagonal by document and each document's W and U are its own)."""
    q, k, v, beta = x["q"], x["k"], x["v"], x["beta"]
    length = q.shape[-2]
    pairs = chunk_math.visible_pairs(x, length)
    if "g" in x:
        gamma = chunk_math.chunk_cumsum(x["g"])
        decay = chunk_math.decay_matrix(gamma, pairs)
    else:
        gamma = jnp.zeros(q.shape[:-1], jnp.float32)
        decay = pairs.astype(jnp.float32)
    gamma_last = gamma[..., -1:]
    kk = jnp.einsum("...ik,...jk->...ij", k, k) * decay
    lower = jnp.where(chunk_math.visible_pairs(x, length, strict=True), beta[..., :, None] * kk, 0.0)
    system = lower + jnp.eye(length, dtype=jnp.float32)
    inverse = _invert_unit_lower(system)
    w = inverse @ (beta[..., None] * k * jnp.exp(gamma)[..., None])
    u = inverse @ (beta[..., None] * v)
    attn = jnp.einsum("...ik,...jk->...ij", q, k) * decay
    q_read = q * jnp.exp(gamma)[..., None] - attn @ w
    k_write = chunk_math.last_document_rows(x, k * jnp.exp(gamma_last - gamma)[..., None])
    return ChunkTerms(attn @ u, q_read, Transition(gamma_last, k_write, w), jnp.einsum("...ck,...cv->...kv", k_write, u))


def _pallas_kernel(q, k, v, gates, *, scale, initial_state, chunk_size, starts=None):
    """The Pallas path (``_common.KernelFn``): ``pallas_kernels.delta_rule`` at ``chunk_size`` both ways."""
    blocks = pallas_delta.DeltaRuleBlocks(chunk=chunk_size, chunk_bwd=chunk_size)
    return pallas_delta.delta_rule(
        q, k, v, gates["beta"], g=gates.get("g"), scale=scale, initial_state=initial_state, starts=starts,
        blocks=blocks,
    )


@_common.linear_op(gates={"beta": _common.Gate("head", "unit")}, normalized_keys=True, kernel="delta_rule")
def delta_rule(
    q: Array,
    k: Array,
    v: Array,
    beta: Array,
    *,
    scale: float | None = None,
    initial_state: Array | None = None,
    output_final_state: bool = False,
    impl: str = "auto",
    chunk_size: int = 64,
    sequence_axis: str | None = None,
    segment_ids: Array | None = None,
    cu_seqlens: Array | None = None,
) -> tuple[Array, Array | None]:
    """Delta-rule linear attention (DeltaNet). k is used as given (the mixers L2-normalise it).

    q, k: [B, T, H, K]; v: [B, T, H, V]; beta: [B, T, H]; initial_state: [B, H, K, V].
    Returns o [B, T, H, V] (dtype of v) and the final state [B, H, K, V] float32 if ``output_final_state``.
    segment_ids [B, T] or cu_seqlens [D + 1]: packed documents (``seqlab.core.documents``); each starts from a zero
    state (the row's first from initial_state) and the final state is each row's last document's ([D, H, K, V],
    one per document, with cu_seqlens).
    """
    _common.check_qkv(q, k, v)
    _common.check_gate("beta", beta, q.shape[:3])
    o, state = _common.run_linear_op(
        delta_chunk_terms, q, k, v, {"beta": beta}, scale=scale, initial_state=initial_state,
        output_final_state=output_final_state, impl=impl, chunk_size=chunk_size, sequence_axis=sequence_axis,
        segment_ids=segment_ids, cu_seqlens=cu_seqlens,
        kernel=_pallas_kernel,
    )
    return o.astype(v.dtype), state


@_common.linear_op(
    gates={"g": _common.Gate("head", "log"), "beta": _common.Gate("head", "unit")},
    normalized_keys=True,
    kernel="delta_rule",
)
def gated_delta_rule(
    q: Array,
    k: Array,
    v: Array,
    g: Array,
    beta: Array,
    *,
    scale: float | None = None,
    initial_state: Array | None = None,
    output_final_state: bool = False,
    impl: str = "auto",
    chunk_size: int = 64,
    sequence_axis: str | None = None,
    segment_ids: Array | None = None,
    cu_seqlens: Array | None = None,
) -> tuple[Array, Array | None]:
    """Gated delta rule (Gated DeltaNet); as ``delta_rule`` plus g: [B, T, H] log decay (<= 0)."""
    _common.check_qkv(q, k, v)
    _common.check_gate("g", g, q.shape[:3])
    _common.check_gate("beta", beta, q.shape[:3])
    o, state = _common.run_linear_op(
        delta_chunk_terms, q, k, v, {"g": g, "beta": beta}, scale=scale, initial_state=initial_state,
        output_final_state=output_final_state, impl=impl, chunk_size=chunk_size, sequence_axis=sequence_axis,
        segment_ids=segment_ids, cu_seqlens=cu_seqlens,
        kernel=_pallas_kernel,
    )
    return o.astype(v.dtype), state
