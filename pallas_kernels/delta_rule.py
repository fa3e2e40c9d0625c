"""Chunked delta rule and gated delta rule (WY/UT form) in Pallas, forward and backward under ``jax.custom_vjp``.

    S_t = exp(g_t) (I - β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ,   o_t = S_tᵀ (scale · q_t)   (g = 0: DeltaNet)

"Parallelizing Linear Transformers with the Delta Rule over Sequence Length" (DeltaNet) and "Gated Delta Networks:
Improving Mamba2 with Delta Rule" (Gated DeltaNet). Per head and chunk of C tokens, with γ the within-chunk cumsum
of g, Γ_ij = exp(γ_i - γ_j) (j <= i, masked before the exponential), M causal and S_n the chunk's incoming state:

    A = StrictTril(diag(β)(Γ ⊙ K Kᵀ)),  T = (I + A)⁻¹ (forward substitution over rows)
    W = T diag(β)(K ⊙ e^γ),  U = T diag(β) V,  ν = U - W S_n
    o = (Q ⊙ e^γ) S_n + (Q Kᵀ ⊙ Γ ⊙ M) ν,   S_{n+1} = e^{γ_C} S_n + (K ⊙ e^{γ_C - γ})ᵀ ν

Forward: ``_wy_kernel`` (W, U; grid B, H, N), ``_state_kernel`` (a loop over chunks per (B, H, block of state
columns): each chunk's incoming state and the final state), ``_output_kernel`` (grid B, H, N). Backward, at the backward chunk size: W, U
and the states are recomputed, ``_state_grad_kernel`` runs the cotangent of the state backwards over chunks
(dν = (QKᵀ⊙Γ⊙M)ᵀ dO + (K⊙e^{γ_C-γ}) dS_{n+1}; dS_n = (Q⊙e^γ)ᵀ dO + e^{γ_C} dS_{n+1} - Wᵀ dν), and
``_chunk_grad_kernel`` takes every input's gradient per chunk in parallel (through T by dA = -Tᵀ dT Tᵀ).

Packed documents (``starts`` [B, T]): each token carries its document index within its chunk (0 = the document
the incoming state belongs to); Γ is masked to pairs of one document (so A, T, W and U are block-diagonal by
document), only document-0 rows read S_n (e^γ masked), only the last document writes S_{n+1} (e^{γ_C - γ} masked)
and S_n passes on only through a chunk without a start (e^{γ_C} masked). Every gradient is taken through these
masked factors, so it is exact too.

Kernel layout: q, k [B, H, T', K'], v [B, H, T', V'] (K', V' = ``padded_feature``; T' a multiple of the chunk, padded
with zeros: β = 0 and g = 0 are the identity); β and γ [B, H, N, 1, C] (the 1 keeps TPU's last-two-dims rule); states [B, H, N·K', V'] (chunk n's state in
rows n·K' to (n+1)·K'). Everything is float32 inside except matmul operands that arrive as bf16.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from pallas_kernels import _common
from pallas_kernels._common import scan_columns as columns
from pallas_kernels._common import scan_whole as whole
from seqlab.core import chunk_math
from pallas_kernels._common import causal_mask, masked_exp, matmul, matmul_nt, matmul_tn

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class DeltaRuleBlocks:
    """Chunk sizes of the forward (``chunk``) and backward (``chunk_bwd``) passes; the state columns one
    state-scan program carries (``value_block``, capped at V: the columns of the state evolve independently, since
    ν = U − W S and its cotangent act column by column); Triton launch parameters."""

    chunk: int = 64
    chunk_bwd: int = 64
    value_block: int = 64
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        _common.check_blocks(self, ("chunk", "chunk_bwd", "value_block"))


@dataclasses.dataclass(frozen=True)
class _Config:
    """The static arguments of the custom VJP."""

    scale: float
    blocks: DeltaRuleBlocks
    backend: str


def delta_rule(
    q: Array,
    k: Array,
    v: Array,
    beta: Array,
    *,
    g: Array | None = None,
    scale: float,
    initial_state: Array | None = None,
    starts: Array | None = None,
    blocks: DeltaRuleBlocks = DeltaRuleBlocks(),
    backend: str | None = None,
) -> tuple[Array, Array]:
    """q, k [B, T, H, K]; v [B, T, H, V]; beta [B, T, H]; g [B, T, H] log decay <= 0 or None (DeltaNet);
    initial_state [B, H, K, V] float32 or None (zeros), before each row's first document; starts [B, T] bool,
    packed documents' starts (each from a zero state; the final state is the last document's) or None. scale
    multiplies q. Returns o [B, T, H, V] float32 and the final state [B, H, K, V] float32."""
    if not isinstance(blocks, DeltaRuleBlocks):
        raise ValueError(f"blocks must be a DeltaRuleBlocks, got {blocks!r}")
    config = _Config(float(scale), blocks, _common.resolve_backend(backend))
    batch, _, heads, key_dim = q.shape
    if g is None:
        g = jnp.zeros(beta.shape, jnp.float32)
    if initial_state is None:
        initial_state = jnp.zeros((batch, heads, key_dim, v.shape[-1]), jnp.float32)
    return _delta_rule(q, k, v, beta, g, initial_state.astype(jnp.float32), starts, config)


# ----------------------------------------------------------------------------------------------------------------
# chunk math on kernel values (one chunk of C tokens)
# ----------------------------------------------------------------------------------------------------------------


def _is_last(size: int) -> Array:
    """[C] bool, True at the chunk's last token."""
    return jax.lax.broadcasted_iota(jnp.int32, (size,), 0) == size - 1


def _last(x: Array) -> Array:
    """The last entry of a vector [C], as a scalar (a masked sum: no value slicing)."""
    return jnp.sum(jnp.where(_is_last(x.shape[0]), x, 0.0))


def _row(matrix: Array, index: Array | int) -> Array:
    """Row ``index`` of a matrix [C, D] as a vector [D]."""
    rows = jax.lax.broadcasted_iota(jnp.int32, matrix.shape, 0)
    return jnp.sum(jnp.where(rows == index, matrix, 0.0), axis=0)


def _invert_unit_lower(strict_lower: Array) -> Array:
    """T = (I + A)⁻¹ [C, C] for strictly lower A, by forward substitution over rows: T_i = e_i - Σ_{j<i} A_ij T_j.

    Rows i and below of T are still identity rows when row i is computed, and A_ij = 0 there, so each row is one
    product of A's row with all of T."""
    size = strict_lower.shape[0]
    rows = jax.lax.broadcasted_iota(jnp.int32, (size, size), 0)
    identity = (rows == jax.lax.broadcasted_iota(jnp.int32, (size, size), 1)).astype(jnp.float32)

    def substitute(i: Array, inverse: Array) -> Array:
        combination = jnp.sum(_row(strict_lower, i)[:, None] * inverse, axis=0)
        return jnp.where(rows == i, identity - combination[None, :], inverse)

    return jax.lax.fori_loop(1, size, substitute, identity)


@dataclasses.dataclass(frozen=True)
class _Decays:
    """A chunk's decay factors from γ [C]: Γ ⊙ M [C, C] (diagonal included) and Γ strictly lower [C, C] (``causal``,
    ``strict``), e^{γ_C - γ} [C] (``write``: a key's decay to the chunk's end), e^γ [C] (``read``: from the incoming
    state) and e^{γ_C} [] (``carry``: the incoming state through the chunk); with documents, masked (module
    docstring)."""

    causal: Array
    strict: Array
    write: Array
    read: Array
    carry: Array


def _decays(gamma: Array, doc: Array | None) -> _Decays:
    """The decay factors of a chunk with gate sums γ [C] and document indices doc [C] (None: one document)."""
    size = gamma.shape[0]
    diff = gamma[:, None] - gamma[None, :]
    causal, strict = causal_mask(size, size), causal_mask(size, size, strict=True)
    write, read, carry = jnp.exp(_last(gamma) - gamma), jnp.exp(gamma), jnp.exp(_last(gamma))
    if doc is not None:
        same = doc[:, None] == doc[None, :]
        causal, strict = causal & same, strict & same
        last = _last(doc)
        write, read = jnp.where(doc == last, write, 0.0), jnp.where(doc == 0, read, 0.0)
        carry = jnp.where(last == 0, carry, 0.0)
    return _Decays(masked_exp(diff, causal), masked_exp(diff, strict), write, read, carry)


@dataclasses.dataclass(frozen=True)
class _WY:
    """A chunk's WY terms: the masked Gram matrix Γ ⊙ K Kᵀ (strictly lower) [C, C], T [C, C], W = T k_in [C, K] with
    k_in = diag(β)(K ⊙ e^γ), U = T v_in [C, V] with v_in = diag(β) V."""

    gram: Array
    inverse: Array
    k_in: Array
    v_in: Array
    w: Array
    u: Array


def _wy_terms(k: Array, v: Array, beta: Array, decays: _Decays) -> _WY:
    """W = T diag(β)(K ⊙ e^γ), U = T diag(β) V for k [C, K], v [C, V], beta [C]."""
    gram = matmul_nt(k, k) * decays.strict
    inverse = _invert_unit_lower(beta[:, None] * gram)
    k_in = (beta * decays.read)[:, None] * k.astype(jnp.float32)
    v_in = beta[:, None] * v.astype(jnp.float32)
    return _WY(gram, inverse, k_in, v_in, matmul(inverse, k_in), matmul(inverse, v_in))


def _chunk_read(q: Array, k: Array, scale: float, decays: _Decays) -> tuple[Array, Array]:
    """Q ⊙ e^γ [C, K] and the scores Q Kᵀ ⊙ Γ ⊙ M [C, C], q scaled."""
    q_read = scale * q.astype(jnp.float32) * decays.read[:, None]
    scores = scale * matmul_nt(q, k) * decays.causal
    return q_read, scores


# ----------------------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------------------


def _doc(doc_ref, documents: bool, n: Array | None = None) -> Array | None:
    """The document indices [C] of this chunk (chunk n of a whole-sequence ref), or None without documents."""
    if not documents:
        return None
    return doc_ref[...] if n is None else doc_ref[n, 0, :]


def _wy_kernel(k_ref, v_ref, beta_ref, gamma_ref, doc_ref, w_ref, u_ref, *, documents: bool) -> None:
    decays = _decays(gamma_ref[...], _doc(doc_ref, documents))
    wy = _wy_terms(k_ref[...], v_ref[...], beta_ref[...], decays)
    w_ref[...] = wy.w
    u_ref[...] = wy.u


def _state_kernel(
    k_ref, w_ref, u_ref, gamma_ref, doc_ref, initial_ref, states_ref, final_ref, *, chunk: int, chunks: int,
    documents: bool,
) -> None:
    """Each chunk's incoming state into ``states_ref`` [N·K, V], the final state into ``final_ref`` [K, V]."""
    key_dim = initial_ref.shape[0]

    def step(n: Array, state: Array) -> Array:
        tokens = pl.ds(n * chunk, chunk)
        states_ref[pl.ds(n * key_dim, key_dim), :] = state
        decays = _decays(gamma_ref[n, 0, :], _doc(doc_ref, documents, n))
        nu = u_ref[tokens, :] - matmul(w_ref[tokens, :], state)
        k_write = k_ref[tokens, :].astype(jnp.float32) * decays.write[:, None]
        return decays.carry * state + matmul_tn(k_write, nu)

    final_ref[...] = jax.lax.fori_loop(0, chunks, step, initial_ref[...])


def _output_kernel(q_ref, k_ref, w_ref, u_ref, gamma_ref, doc_ref, state_ref, o_ref, *, scale: float,
                   documents: bool) -> None:
    decays = _decays(gamma_ref[...], _doc(doc_ref, documents))
    q_read, scores = _chunk_read(q_ref[...], k_ref[...], scale, decays)
    state = state_ref[...]
    nu = u_ref[...] - matmul(w_ref[...], state)
    o_ref[...] = matmul(q_read, state) + matmul(scores, nu)


def _state_grad_kernel(
    q_ref, k_ref, w_ref, do_ref, gamma_ref, doc_ref, d_final_ref, d_states_ref, d_initial_ref, *, scale: float,
    chunk: int, chunks: int, documents: bool,
) -> None:
    """Backwards over chunks: each chunk's outgoing-state cotangent dS_{n+1} into ``d_states_ref`` [N·K, V], dS_0 into
    ``d_initial_ref``."""
    key_dim = d_final_ref.shape[0]

    def step(i: Array, d_state: Array) -> Array:
        n = chunks - 1 - i
        tokens = pl.ds(n * chunk, chunk)
        d_states_ref[pl.ds(n * key_dim, key_dim), :] = d_state
        decays = _decays(gamma_ref[n, 0, :], _doc(doc_ref, documents, n))
        k = k_ref[tokens, :]
        q_read, scores = _chunk_read(q_ref[tokens, :], k, scale, decays)
        d_out = do_ref[tokens, :].astype(jnp.float32)
        d_nu = matmul_tn(scores, d_out) + matmul(k.astype(jnp.float32) * decays.write[:, None], d_state)
        return matmul_tn(q_read, d_out) + decays.carry * d_state - matmul_tn(w_ref[tokens, :], d_nu)

    d_initial_ref[...] = jax.lax.fori_loop(0, chunks, step, d_final_ref[...])


def _gate_grad(weighted: Array) -> Array:
    """Σ_j E_ij - Σ_j E_ji for E = (cotangent ⊙ value) of a matrix whose entries carry exp(γ_i - γ_j)."""
    return jnp.sum(weighted, axis=1) - jnp.sum(weighted, axis=0)


@dataclasses.dataclass(frozen=True)
class _WYGrads:
    """The gradients that flow through W and U (and T = (I + A)⁻¹): dk [C, K], dv [C, V], d beta, d gamma [C]."""

    dk: Array
    dv: Array
    d_beta: Array
    d_gamma: Array


def _wy_grads(wy: _WY, k: Array, v: Array, beta: Array, d_w: Array, d_u: Array, decays: _Decays) -> _WYGrads:
    """Back through W = T k_in, U = T v_in and T = (I + A)⁻¹ (dA = -Tᵀ dT Tᵀ on the strictly lower part), with
    A = diag(β) gram, gram = Γ ⊙ K Kᵀ (strictly lower), k_in = diag(β)(K ⊙ e^γ), v_in = diag(β) V; k, v float32."""
    d_inverse = matmul_nt(d_w, wy.k_in) + matmul_nt(d_u, wy.v_in)
    d_k_in = matmul_tn(wy.inverse, d_w)
    d_v_in = matmul_tn(wy.inverse, d_u)
    strict = causal_mask(*decays.strict.shape, strict=True)
    d_system = jnp.where(strict, -matmul_nt(matmul_tn(wy.inverse, d_inverse), wy.inverse), 0.0)
    d_gram = beta[:, None] * d_system
    d_kk = d_gram * decays.strict
    return _WYGrads(
        dk=matmul(d_kk, k) + matmul_tn(d_kk, k) + d_k_in * (beta * decays.read)[:, None],
        dv=beta[:, None] * d_v_in,
        d_beta=(
            jnp.sum(d_system * wy.gram, axis=1)
            + jnp.sum(d_k_in * k, axis=1) * decays.read
            + jnp.sum(d_v_in * v, axis=1)
        ),
        d_gamma=_gate_grad(d_gram * wy.gram) + jnp.sum(d_k_in * wy.k_in, axis=1),
    )


def _chunk_grad_kernel(
    q_ref, k_ref, v_ref, beta_ref, gamma_ref, doc_ref, state_ref, d_next_ref, do_ref,
    dq_ref, dk_ref, dv_ref, d_beta_ref, dg_ref, *, scale: float, documents: bool,
) -> None:
    """Gradients of one chunk's q, k, v, β and g (the reverse within-chunk cumsum of γ's gradient)."""
    q, k, v, beta = q_ref[...], k_ref[...], v_ref[...], beta_ref[...]
    state, d_next, d_out = state_ref[...], d_next_ref[...], do_ref[...].astype(jnp.float32)
    k32 = k.astype(jnp.float32)
    decays = _decays(gamma_ref[...], _doc(doc_ref, documents))
    wy = _wy_terms(k, v, beta, decays)
    q_read, scores = _chunk_read(q, k, scale, decays)
    k_write = k32 * decays.write[:, None]
    nu = wy.u - matmul(wy.w, state)
    d_nu = matmul_tn(scores, d_out) + matmul(k_write, d_next)

    d_q_read = matmul_nt(d_out, state)
    d_scores = matmul_nt(d_out, nu)
    d_k_write = matmul_nt(nu, d_next)
    through_wy = _wy_grads(wy, k32, v.astype(jnp.float32), beta, -matmul_nt(d_nu, state), d_nu, decays)
    d_qk = d_scores * decays.causal * scale

    dq = scale * (d_q_read * decays.read[:, None]) + matmul(d_qk, k32)
    dk = matmul_tn(d_qk, q.astype(jnp.float32)) + through_wy.dk + d_k_write * decays.write[:, None]
    d_write = jnp.sum(d_k_write * k_write, axis=1)
    d_gamma = _gate_grad(d_scores * scores) + through_wy.d_gamma + jnp.sum(d_q_read * q_read, axis=1) - d_write
    d_gamma_last = jnp.sum(d_write) + decays.carry * jnp.sum(state * d_next)
    dq_ref[...] = dq
    dk_ref[...] = dk
    dv_ref[...] = through_wy.dv
    d_beta_ref[...] = through_wy.d_beta
    dg_ref[...] = _reverse_cumsum(d_gamma + jnp.where(_is_last(d_gamma.shape[0]), d_gamma_last, 0.0))


def _reverse_cumsum(x: Array) -> Array:
    """Σ_{j >= i} x_j for a vector [C] (a masked sum: g_i enters γ_j for every j >= i)."""
    size = x.shape[0]
    later = jax.lax.broadcasted_iota(jnp.int32, (size, size), 1) >= jax.lax.broadcasted_iota(jnp.int32, (size, size), 0)
    return jnp.sum(jnp.where(later, x[None, :], 0.0), axis=1)


# ----------------------------------------------------------------------------------------------------------------
# pallas_call wrappers (kernel layout) and the custom VJP
# ----------------------------------------------------------------------------------------------------------------


def _tile(rows: int, cols: int) -> pl.BlockSpec:
    """Rows n·rows to (n+1)·rows of a [B, H, ·, cols] array at grid point (b, h, n)."""
    return pl.BlockSpec((None, None, rows, cols), lambda b, h, n: (b, h, n, 0))


def _chunk_gate(chunk: int) -> pl.BlockSpec:
    """Chunk n [C] of a gate [B, H, N, 1, C] at grid point (b, h, n)."""
    return pl.BlockSpec((None, None, None, None, chunk), lambda b, h, n: (b, h, n, 0, 0))


def _scan_grid(batch: int, heads: int, value_dim: int, config: "_Config") -> tuple[tuple[int, int, int], int]:
    """The state scans' grid (B, H, V' / value block) and the value block."""
    value_block = min(config.blocks.value_block, value_dim)
    return (batch, heads, value_dim // value_block), value_block


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Inputs in kernel layout for one chunk size: q, k [B, H, T', K'], v [B, H, T', V'], beta, gamma and the
    document indices doc [B, H, N, 1, C] (zeros and ``documents`` False for unpacked rows)."""

    q: Array
    k: Array
    v: Array
    beta: Array
    gamma: Array
    doc: Array
    documents: bool

    @property
    def chunk(self) -> int:
        return self.beta.shape[-1]

    @property
    def chunks(self) -> int:
        return self.beta.shape[-3]


def _to_layout(q: Array, k: Array, v: Array, beta: Array, g: Array, starts: Array | None, chunk: int) -> _Layout:
    length = _common.padded_length(q.shape[1], chunk)
    key_dim, value_dim = _common.padded_feature(k.shape[-1]), _common.padded_feature(v.shape[-1])
    batch, _, heads = beta.shape
    gates = (batch, heads, length // chunk, 1, chunk)
    beta = _common.to_kernel_layout(beta.astype(jnp.float32), length).reshape(gates)
    gamma = chunk_math.chunk_cumsum(_common.to_kernel_layout(g.astype(jnp.float32), length).reshape(gates))
    if starts is None:
        doc = jnp.zeros(gates, jnp.float32)
    else:
        flags = jnp.broadcast_to(starts[:, :, None], (batch, starts.shape[1], heads))
        doc = chunk_math.document_index(_common.to_kernel_layout(flags, length).reshape(gates))
    return _Layout(
        _common.to_kernel_layout(q, length, key_dim), _common.to_kernel_layout(k, length, key_dim),
        _common.to_kernel_layout(v, length, value_dim), beta, gamma, doc, starts is not None,
    )


def _call(kernel, config: _Config, grid: tuple[int, ...], in_specs, out_specs, out_shape, name: str):
    blocks = config.blocks
    return _common.pallas_call(
        kernel, backend=config.backend, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        num_warps=blocks.num_warps, num_stages=blocks.num_stages, name=name,
    )


def _wy(x: _Layout, config: _Config) -> tuple[Array, Array]:
    """W [B, H, T', K'] and U [B, H, T', V'] (float32)."""
    batch, heads, length, key_dim = x.k.shape
    value_dim, chunk = x.v.shape[-1], x.chunk
    shapes = [jax.ShapeDtypeStruct((batch, heads, length, d), jnp.float32) for d in (key_dim, value_dim)]
    return _call(
        functools.partial(_wy_kernel, documents=x.documents), config, (batch, heads, x.chunks),
        [_tile(chunk, key_dim), _tile(chunk, value_dim), _chunk_gate(chunk), _chunk_gate(chunk), _chunk_gate(chunk)],
        [_tile(chunk, key_dim), _tile(chunk, value_dim)], shapes, "delta_rule_wy",
    )(x.k, x.v, x.beta, x.gamma, x.doc)


def _states(x: _Layout, w: Array, u: Array, initial_state: Array, config: _Config) -> tuple[Array, Array]:
    """Each chunk's incoming state [B, H, N·K', V'] and the final state [B, H, K', V'] (float32)."""
    batch, heads, length, key_dim = x.k.shape
    value_dim, chunks = x.v.shape[-1], x.chunks
    grid, value_block = _scan_grid(batch, heads, value_dim, config)
    kernel = functools.partial(_state_kernel, chunk=x.chunk, chunks=chunks, documents=x.documents)
    return _call(
        kernel, config, grid,
        [whole(length, key_dim), whole(length, key_dim), columns(length, value_block), whole(chunks, 1, x.chunk),
         whole(chunks, 1, x.chunk), columns(key_dim, value_block)],
        [columns(chunks * key_dim, value_block), columns(key_dim, value_block)],
        [jax.ShapeDtypeStruct((batch, heads, chunks * key_dim, value_dim), jnp.float32),
         jax.ShapeDtypeStruct((batch, heads, key_dim, value_dim), jnp.float32)],
        "delta_rule_states",
    )(x.k, w, u, x.gamma, x.doc, initial_state)


def _outputs(x: _Layout, w: Array, u: Array, states: Array, config: _Config) -> Array:
    """o [B, H, T', V'] float32."""
    batch, heads, length, key_dim = x.k.shape
    value_dim, chunk = x.v.shape[-1], x.chunk
    kernel = functools.partial(_output_kernel, scale=config.scale, documents=x.documents)
    return _call(
        kernel, config, (batch, heads, x.chunks),
        [_tile(chunk, key_dim), _tile(chunk, key_dim), _tile(chunk, key_dim), _tile(chunk, value_dim),
         _chunk_gate(chunk), _chunk_gate(chunk), _tile(key_dim, value_dim)],
        _tile(chunk, value_dim), jax.ShapeDtypeStruct((batch, heads, length, value_dim), jnp.float32),
        "delta_rule_output",
    )(x.q, x.k, w, u, x.gamma, x.doc, states)


def _state_grads(x: _Layout, w: Array, d_out: Array, d_final: Array, config: _Config) -> tuple[Array, Array]:
    """Each chunk's outgoing-state cotangent [B, H, N·K', V'] and the initial state's [B, H, K', V']."""
    batch, heads, length, key_dim = x.k.shape
    value_dim, chunks = x.v.shape[-1], x.chunks
    grid, value_block = _scan_grid(batch, heads, value_dim, config)
    kernel = functools.partial(_state_grad_kernel, scale=config.scale, chunk=x.chunk, chunks=chunks,
                               documents=x.documents)  # fmt: skip
    return _call(
        kernel, config, grid,
        [whole(length, key_dim), whole(length, key_dim), whole(length, key_dim), columns(length, value_block),
         whole(chunks, 1, x.chunk), whole(chunks, 1, x.chunk), columns(key_dim, value_block)],
        [columns(chunks * key_dim, value_block), columns(key_dim, value_block)],
        [jax.ShapeDtypeStruct((batch, heads, chunks * key_dim, value_dim), jnp.float32),
         jax.ShapeDtypeStruct((batch, heads, key_dim, value_dim), jnp.float32)],
        "delta_rule_state_grads",
    )(x.q, x.k, w, d_out, x.gamma, x.doc, d_final)


def _chunk_grads(x: _Layout, states: Array, d_states: Array, d_out: Array, config: _Config) -> tuple[Array, ...]:
    """dq, dk [B, H, T', K'], dv [B, H, T', V'], d beta and dg [B, H, N, 1, C] (float32)."""
    batch, heads, length, key_dim = x.k.shape
    value_dim, chunk = x.v.shape[-1], x.chunk
    kernel = functools.partial(_chunk_grad_kernel, scale=config.scale, documents=x.documents)
    features = [jax.ShapeDtypeStruct((batch, heads, length, d), jnp.float32) for d in (key_dim, key_dim, value_dim)]
    gates = [jax.ShapeDtypeStruct(x.beta.shape, jnp.float32)] * 2
    return _call(
        kernel, config, (batch, heads, x.chunks),
        [_tile(chunk, key_dim), _tile(chunk, key_dim), _tile(chunk, value_dim), _chunk_gate(chunk),
         _chunk_gate(chunk), _chunk_gate(chunk), _tile(key_dim, value_dim), _tile(key_dim, value_dim),
         _tile(chunk, value_dim)],
        [_tile(chunk, key_dim), _tile(chunk, key_dim), _tile(chunk, value_dim), _chunk_gate(chunk),
         _chunk_gate(chunk)],
        features + gates, "delta_rule_chunk_grads",
    )(x.q, x.k, x.v, x.beta, x.gamma, x.doc, states, d_states, d_out)


def _pad_state(state: Array, key_dim: int, value_dim: int) -> Array:
    """[B, H, K, V] -> [B, H, K', V'] with zeros."""
    return jnp.pad(state, [(0, 0), (0, 0), (0, key_dim - state.shape[2]), (0, value_dim - state.shape[3])])


def _forward(q, k, v, beta, g, initial_state, starts, config: _Config) -> tuple[Array, Array]:
    x = _to_layout(q, k, v, beta, g, starts, config.blocks.chunk)
    key_dim, value_dim = x.k.shape[-1], x.v.shape[-1]
    w, u = _wy(x, config)
    states, final = _states(x, w, u, _pad_state(initial_state, key_dim, value_dim), config)
    o = _outputs(x, w, u, states, config)
    length, (state_keys, state_values) = q.shape[1], initial_state.shape[2:]
    return _common.from_kernel_layout(o, length, v.shape[-1]), final[:, :, :state_keys, :state_values]


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _delta_rule(q, k, v, beta, g, initial_state, starts, config: _Config) -> tuple[Array, Array]:
    return _forward(q, k, v, beta, g, initial_state, starts, config)


def _delta_rule_fwd(q, k, v, beta, g, initial_state, starts, config: _Config):
    return _forward(q, k, v, beta, g, initial_state, starts, config), (q, k, v, beta, g, initial_state, starts)


def _delta_rule_bwd(config: _Config, residuals, cotangents):
    """Recompute W, U and the states at the backward chunk size, run the state cotangent back, then every chunk's
    gradients in parallel."""
    q, k, v, beta, g, initial_state, starts = residuals
    d_out, d_final = cotangents
    x = _to_layout(q, k, v, beta, g, starts, config.blocks.chunk_bwd)
    batch, heads, length, key_dim = x.k.shape
    value_dim = x.v.shape[-1]
    w, u = _wy(x, config)
    states, _ = _states(x, w, u, _pad_state(initial_state, key_dim, value_dim), config)
    d_out = _common.to_kernel_layout(d_out.astype(jnp.float32), length, value_dim)
    d_states, d_initial = _state_grads(x, w, d_out, _pad_state(d_final, key_dim, value_dim), config)
    dq, dk, dv, d_beta, dg = _chunk_grads(x, states, d_states, d_out, config)
    tokens = q.shape[1]

    def gate(d_gate: Array) -> Array:  # [B, H, N, 1, C] -> [B, T, H]
        return _common.from_kernel_layout(d_gate.reshape(batch, heads, length), tokens)

    return (
        _common.from_kernel_layout(dq, tokens, q.shape[-1]).astype(q.dtype),
        _common.from_kernel_layout(dk, tokens, k.shape[-1]).astype(k.dtype),
        _common.from_kernel_layout(dv, tokens, v.shape[-1]).astype(v.dtype),
        gate(d_beta).astype(beta.dtype),
        gate(dg).astype(g.dtype),
        d_initial[:, :, : initial_state.shape[2], : initial_state.shape[3]],
        None if starts is None else np.zeros(starts.shape, jax.dtypes.float0),
    )


_delta_rule.defvjp(_delta_rule_fwd, _delta_rule_bwd)
