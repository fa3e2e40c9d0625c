"""Chunked linear attention with a diagonal gate, in Pallas — linear attention, scalar decay and vector gates
("Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention"; "Retentive Network: A Successor to
Transformer for Large Language Models"; "Gated Linear Attention Transformers with Hardware-Efficient Training").

    S_t = diag(exp a_t) S_{t-1} + k_t v_tᵀ,   o_t = S_tᵀ (scale · q_t),   a_t <= 0: none, one per head, or one per key.

Per chunk of C tokens with b the within-chunk cumsum of a (float32) and S_n the chunk's incoming state:
    o = (Q ⊙ e^b) S_n + P V,   P_ij = Σ_d q_id k_jd exp(b_id - b_jd) (j <= i),
    S_{n+1} = e^{b_C} ⊙ S_n + (K ⊙ e^{b_C - b})ᵀ V.
Kernels: ``_state_kernel`` scans the chunks of one (batch, head, block of state columns) and stores every incoming
state; ``_output_kernel``
reads out each chunk in parallel. For a per-key gate P is built from sub-chunks of ``sub_chunk`` rows as in GLA:
a pair of sub-chunks (I, J < I) is one matmul of (q ⊙ e^{b - b_r}) and (k ⊙ e^{b_r - b}), b_r the gate sum at the
row before sub-chunk I, so both exponents are <= 0; a diagonal pair is an explicit [c, c, K] product with
mask-then-exp. A scalar gate needs no sub-chunks: P = (Q Kᵀ) ⊙ exp(b_i - b_j) masked.

Packed documents (``starts`` [B, T]): each token carries its document index within its chunk (``doc``, 0 = the
document the incoming state belongs to). Pairs of different documents are masked out of P; only document-0 rows
read the incoming state; a chunk in which a document starts passes no state on, and only its last document's keys
write the outgoing one. The gate sums b need no restart: within a document their differences are the same.

Backward (``jax.custom_vjp``): the states are recomputed with the backward chunk size; ``_state_gradient_kernel``
scans the chunks in reverse for each chunk's outgoing-state cotangent; ``_gradient_kernel`` gives dq, dk, dv per
chunk; the gate's gradient follows from the diagonal-gate identity ∂L/∂G_t = q_t ⊙ ∂q_t - k_t ⊙ ∂k_t (plus
S_T ⊙ ∂S_T at the end), summed backwards over the sequence (``seqlab.core.recurrence.DiagonalGate``).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from pallas_kernels import _common
from seqlab.core import chunk_math, recurrence
from pallas_kernels._common import masked_exp, matmul, matmul_nt, matmul_tn

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class LinearAttentionBlocks:
    """Chunk and sub-chunk sizes of the forward and backward kernels (powers of two >= 16, sub-chunk <= chunk;
    the sub-chunk matters only for per-key gates), the state columns one state-scan program carries
    (``value_block``, capped at V), and the GPU launch parameters."""

    chunk: int = 64
    sub_chunk: int = 16
    chunk_bwd: int = 64
    sub_chunk_bwd: int = 16
    value_block: int = 64
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        _common.check_blocks(self, ("chunk", "sub_chunk", "chunk_bwd", "sub_chunk_bwd", "value_block"))
        if self.sub_chunk > self.chunk or self.sub_chunk_bwd > self.chunk_bwd:
            raise ValueError(f"LinearAttentionBlocks: a sub-chunk must not exceed its chunk, got {self}")

    def forward(self) -> tuple[int, int]:
        return self.chunk, self.sub_chunk

    def backward(self) -> tuple[int, int]:
        return self.chunk_bwd, self.sub_chunk_bwd


class _Chunk:
    """One chunk's kernel views: q, k [C, K], v, do [C, V] refs, the within-chunk gate cumsum b [C, G] (G = K or
    1) and the document index doc [C, 1] (``documents``: packed rows); sub-chunk rows load straight from the refs
    (no slicing of kernel values). ``dtype`` is the inputs' dtype, in which matmul operands are fed (bf16 inputs:
    bf16 products, float32 accumulation)."""

    def __init__(self, refs: dict, scale: float, sub: int, documents: bool):
        self.refs, self.scale, self.sub, self.documents = refs, scale, sub, documents
        self.dtype = refs["k"].dtype

    def same_document(self, query: int, key: int) -> Array | None:
        """[c, c] bool: pairs (i in sub-chunk query, j in sub-chunk key) of one document; None without documents."""
        if not self.documents:
            return None
        return self.rows("doc", query) == self.rows("doc", key).reshape(1, self.sub)

    def rows(self, name: str, index: int) -> Array:
        x = self.refs[name][pl.ds(index * self.sub, self.sub), :]
        return (x.astype(jnp.float32) * self.scale).astype(x.dtype) if name == "q" else x

    def reference(self, index: int) -> Array:
        """The gate sum at the row before sub-chunk ``index`` [1, G]."""
        return self.refs["b"][pl.ds(index * self.sub - 1, 1), :]


def _diagonal_scores(q: Array, k: Array, b: Array, same: Array | None = None) -> tuple[Array, Array]:
    """Scores P [c, c] of a diagonal sub-chunk pair and the masked decay: [c, c, K] (per-key b) or [c, c]; same
    [c, c]: the pairs of one document (None: all)."""
    rows = q.shape[0]
    mask = _common.causal_mask(rows, rows)
    if same is not None:
        mask = mask & same
    if b.shape[-1] == 1:
        decay = masked_exp(b - b.reshape(1, rows), mask)
        return matmul_nt(q, k) * decay, decay
    decay = masked_exp(b[:, None, :] - b[None, :, :], mask[:, :, None])
    return jnp.sum(q.astype(jnp.float32)[:, None, :] * k.astype(jnp.float32)[None, :, :] * decay, axis=-1), decay


def _referenced(chunk: _Chunk, query: int, key: int) -> tuple[Array, Array, Array, Array]:
    """For sub-chunks query > key: q ⊙ e^{b - b_r}, k ⊙ e^{b_r - b} (both exponents <= 0) and the two factors."""
    ref = chunk.reference(query)
    q_factor = jnp.exp(chunk.rows("b", query) - ref)
    k_factor = jnp.exp(ref - chunk.rows("b", key))
    q_hat, k_hat = chunk.rows("q", query) * q_factor, chunk.rows("k", key) * k_factor
    return q_hat.astype(chunk.dtype), k_hat.astype(chunk.dtype), q_factor, k_factor


def _masked(x: Array, mask: Array | None) -> Array:
    """x where mask (broadcast), else 0; x itself for mask None."""
    return x if mask is None else jnp.where(mask, x, 0.0)


def _intra_output(chunk: _Chunk, query: int) -> Array:
    """P V for the rows of sub-chunk ``query`` [c, V]."""
    v = chunk.refs["v"]
    q, k, b = (chunk.rows(name, query) for name in ("q", "k", "b"))
    scores, _ = _diagonal_scores(q, k, b, chunk.same_document(query, query))
    out = matmul(scores.astype(v.dtype), chunk.rows("v", query))
    for key in range(query):
        q_hat, k_hat, _, _ = _referenced(chunk, query, key)
        scores = _masked(matmul_nt(q_hat, k_hat), chunk.same_document(query, key))
        out += matmul(scores.astype(v.dtype), chunk.rows("v", key))
    return out


def _gate_rows(b: Array, last: Array) -> tuple[Array, Array]:
    """e^b and e^{b_C - b} for a chunk's gate sums b [C, G] and last row [1, G]."""
    return jnp.exp(b), jnp.exp(last - b)


def _decayed(state: Array, last: Array) -> Array:
    """e^{b_C} ⊙ S: the state [K, Vb] decayed by a chunk's total log gate [1, G] (G = K: row by row; G = 1)."""
    return jnp.exp(last).reshape(-1, 1) * state


def _carried(doc_ref, n: int, chunk: int, documents: bool) -> tuple[Array | None, Array | None]:
    """Chunk n's rows in its last document [C, 1] and whether its incoming state passes through it [1, 1] (no
    document starts in it); (None, None) without documents."""
    if not documents:
        return None, None
    doc = doc_ref[pl.ds(n * chunk, chunk), :]
    last = doc_ref[pl.ds(n * chunk + chunk - 1, 1), :]
    return doc == last, last == 0


def _state_kernel(k_ref, v_ref, b_ref, doc_ref, initial_ref, states_ref, final_ref, *, chunk: int, documents: bool):
    """One (batch, head, column block): k [T, K], v [T, Vb], b [T, G], doc [T, 1] -> incoming state of every chunk
    [N, K, Vb] and the final state [K, Vb]."""
    def step(n, state):
        rows = pl.ds(n * chunk, chunk)
        last = b_ref[pl.ds(n * chunk + chunk - 1, 1), :]
        _, k_decay = _gate_rows(b_ref[rows, :], last)
        in_last, passes = _carried(doc_ref, n, chunk, documents)
        states_ref[n] = state
        k_write = _masked(k_ref[rows, :].astype(jnp.float32) * k_decay, in_last).astype(v_ref.dtype)
        return _masked(_decayed(state, last), passes) + matmul_tn(k_write, v_ref[rows, :])

    final_ref[...] = jax.lax.fori_loop(0, k_ref.shape[0] // chunk, step, initial_ref[...])


def _output_kernel(q_ref, k_ref, v_ref, b_ref, doc_ref, state_ref, o_ref, *, scale: float, sub: int, documents: bool):
    """One chunk: q, k [C, K], v [C, V], b [C, G], doc [C, 1], incoming state [K, V] -> o [C, V] float32."""
    chunk = _Chunk({"q": q_ref, "k": k_ref, "v": v_ref, "b": b_ref, "doc": doc_ref}, scale, sub, documents)
    for query in range(q_ref.shape[0] // sub):
        rows = pl.ds(query * sub, sub)
        reads = chunk.rows("doc", query) == 0 if documents else None  # rows of the incoming state's document
        q_read = _masked(chunk.rows("q", query) * jnp.exp(b_ref[rows, :]), reads).astype(chunk.dtype)
        o_ref[rows, :] = matmul(q_read, state_ref[...].astype(chunk.dtype)) + _intra_output(chunk, query)


def _state_gradient_kernel(q_ref, do_ref, b_ref, doc_ref, d_final_ref, d_states_ref, d_initial_ref, *, chunk: int,
                           scale: float, documents: bool):
    """One (batch, head, column block), chunks in reverse: q [T, K], do [T, Vb], b [T, G], doc [T, 1] -> cotangent
    of every chunk's outgoing state [N, K, Vb] and of the initial state [K, Vb]. ∂S_in,n = (Q ⊙ e^b)ᵀ dO (rows of
    document 0) + e^{b_C} ∂S_out,n (when the state passes the chunk) and ∂S_out,n = ∂S_in,n+1."""
    num_chunks = q_ref.shape[0] // chunk

    def step(i, d_state):
        n = num_chunks - 1 - i
        rows = pl.ds(n * chunk, chunk)
        last = b_ref[pl.ds(n * chunk + chunk - 1, 1), :]
        q_decay, _ = _gate_rows(b_ref[rows, :], last)
        reads = doc_ref[rows, :] == 0 if documents else None
        _, passes = _carried(doc_ref, n, chunk, documents)
        d_states_ref[n] = d_state
        q_read = _masked(q_ref[rows, :].astype(jnp.float32) * scale * q_decay, reads).astype(do_ref.dtype)
        return _masked(_decayed(d_state, last), passes) + matmul_tn(q_read, do_ref[rows, :])

    d_initial_ref[...] = jax.lax.fori_loop(0, num_chunks, step, d_final_ref[...])


def _gradient_kernel(q_ref, k_ref, v_ref, b_ref, doc_ref, do_ref, state_ref, d_state_ref, dq_ref, dk_ref, dv_ref, *,
                     scale: float, sub: int, documents: bool):
    """One chunk: ∂q (of the scaled q), ∂k [C, K] and ∂v [C, V] in float32, from the incoming state [K, V] and the
    outgoing state's cotangent [K, V]."""
    refs = {"q": q_ref, "k": k_ref, "v": v_ref, "b": b_ref, "do": do_ref, "doc": doc_ref}
    chunk = _Chunk(refs, scale, sub, documents)
    length = q_ref.shape[0]
    last = b_ref[pl.ds(length - 1, 1), :]
    q_decay, k_decay = _gate_rows(b_ref[...], last)
    if documents:  # only document 0 reads the incoming state, only the last document writes the outgoing one
        in_last, _ = _carried(doc_ref, 0, length, documents)
        q_decay, k_decay = _masked(q_decay, doc_ref[...] == 0), _masked(k_decay, in_last)
    state, d_state = state_ref[...].astype(chunk.dtype), d_state_ref[...].astype(chunk.dtype)
    dq_ref[...] = matmul_nt(do_ref[...], state) * q_decay
    dk_ref[...] = matmul_nt(v_ref[...], d_state) * k_decay
    dv_ref[...] = matmul((k_ref[...].astype(jnp.float32) * k_decay).astype(chunk.dtype), d_state)
    for query in range(length // sub):
        _add_intra_gradients(chunk, query, dq_ref, dk_ref, dv_ref)


def _add_intra_gradients(chunk: _Chunk, query: int, dq_ref, dk_ref, dv_ref) -> None:
    """Adds the P V term's gradients for the rows of sub-chunk ``query`` and every key sub-chunk before it."""
    sub = chunk.sub
    dtype = chunk.dtype
    q, k, b, do = (chunk.rows(name, query) for name in ("q", "k", "b", "do"))
    own = pl.ds(query * sub, sub)
    scores, decay = _diagonal_scores(q, k, b, chunk.same_document(query, query))
    d_scores = matmul_nt(do, chunk.rows("v", query))
    if decay.ndim == 2:
        weighted = (d_scores * decay).astype(dtype)
        dq = matmul(weighted, k)
        dk_ref[own, :] += matmul_tn(weighted, q)
    else:
        weighted = d_scores[:, :, None] * decay
        dq = jnp.sum(weighted * k.astype(jnp.float32)[None, :, :], axis=1)
        dk_ref[own, :] += jnp.sum(weighted * q.astype(jnp.float32)[:, None, :], axis=0)
    dv_ref[own, :] += matmul_tn(scores.astype(dtype), do)
    for key in range(query):
        rows = pl.ds(key * sub, sub)
        q_hat, k_hat, q_factor, k_factor = _referenced(chunk, query, key)
        same = chunk.same_document(query, key)
        d_scores = _masked(matmul_nt(do, chunk.rows("v", key)), same).astype(dtype)
        dq += matmul(d_scores, k_hat) * q_factor
        dk_ref[rows, :] += matmul_tn(d_scores, q_hat) * k_factor
        dv_ref[rows, :] += matmul_tn(_masked(matmul_nt(q_hat, k_hat), same).astype(dtype), do)
    dq_ref[own, :] += dq


def _specs(chunk: int, key_dim: int, value_dim: int, gate_dim: int):
    """BlockSpecs of a per-chunk kernel on the grid (B, H, N)."""
    rows = lambda width: pl.BlockSpec((None, None, chunk, width), lambda b, h, n: (b, h, n, 0))  # noqa: E731
    state = pl.BlockSpec((None, None, None, key_dim, value_dim), lambda b, h, n: (b, h, n, 0, 0))
    return rows(key_dim), rows(value_dim), rows(gate_dim), state


def chunk_gate_sums(gate: Array, chunk: int) -> Array:
    """Within-chunk cumulative sums [B, H, T, G] of log gates [B, H, T, G] (T a multiple of ``chunk``), float32."""
    b, h, length, width = gate.shape
    chunks = gate.reshape(b, h, length // chunk, chunk, width)
    return chunk_math.chunk_cumsum(chunks, axis=-2).reshape(gate.shape)


def chunk_documents(starts: Array | None, shape: tuple[int, ...], chunk: int) -> Array:
    """Each token's document index within its chunk [B, H, T, 1] float32 (0 = the document the chunk's incoming
    state belongs to) from document starts [B, H, T] bool (T a multiple of ``chunk``); zeros for None."""
    batch, heads, length = shape[:3]
    if starts is None:
        return jnp.zeros((batch, heads, length, 1), jnp.float32)
    flags = starts.reshape(batch, heads, length // chunk, chunk)
    return chunk_math.document_index(flags).reshape(batch, heads, length, 1)


def _state_scan(kernel, sequences: tuple[Array, ...], state: Array, chunk: int, blocks: LinearAttentionBlocks,
                backend: str, name: str) -> tuple[Array, Array]:
    """Runs a state scan kernel over (k or q, v or do, b, doc) [B, H, T, ...] from ``state`` [B, H, K, V]:
    per-chunk states [B, H, N, K, V] and the last state [B, H, K, V], float32. Grid (B, H, V / value_block): each
    program carries the state columns [K, value_block] of one (batch, head) over the whole sequence (the columns
    of a diagonal-gated state evolve independently)."""
    first, columns, b, doc = sequences
    batch, heads, length, key_dim = first.shape
    value_dim = columns.shape[-1]
    value_block = min(blocks.value_block, value_dim)
    state_spec = _common.scan_columns(key_dim, value_block)
    return _common.pallas_call(
        kernel, backend=backend, grid=(batch, heads, value_dim // value_block),
        in_specs=[_common.scan_whole(length, key_dim), _common.scan_columns(length, value_block),
                  _common.scan_whole(length, b.shape[-1]), _common.scan_whole(length, 1), state_spec],
        out_specs=[_common.scan_columns(length // chunk, key_dim, value_block), state_spec],
        out_shape=[jax.ShapeDtypeStruct((batch, heads, length // chunk, key_dim, value_dim), jnp.float32),
                   jax.ShapeDtypeStruct(state.shape, jnp.float32)],
        num_warps=blocks.num_warps, num_stages=blocks.num_stages, name=name,
    )(first, columns, b, doc, state)


def _states(k: Array, v: Array, b: Array, doc: Array, initial: Array, chunk: int, backend: str,
            blocks: LinearAttentionBlocks, documents: bool):
    kernel = functools.partial(_state_kernel, chunk=chunk, documents=documents)
    return _state_scan(kernel, (k, v, b, doc), initial, chunk, blocks, backend, "linear_attention_states")


def _forward(q, k, v, gate, initial, starts, scale: float, blocks: LinearAttentionBlocks, backend: str):
    chunk, sub = blocks.forward()
    documents = starts is not None
    b, doc = chunk_gate_sums(gate, chunk), chunk_documents(starts, q.shape, chunk)
    states, final = _states(k, v, b, doc, initial, chunk, backend, blocks, documents)
    batch, heads, length, key_dim = q.shape
    value_dim = v.shape[-1]
    rows_k, rows_v, rows_g, state = _specs(chunk, key_dim, value_dim, gate.shape[-1])
    rows_doc = _specs(chunk, 1, 1, 1)[0]
    kernel = functools.partial(_output_kernel, scale=scale, sub=sub if gate.shape[-1] > 1 else chunk,
                               documents=documents)  # fmt: skip
    o = _common.pallas_call(
        kernel, backend=backend, grid=(batch, heads, length // chunk),
        in_specs=[rows_k, rows_k, rows_v, rows_g, rows_doc, state], out_specs=rows_v,
        out_shape=jax.ShapeDtypeStruct((batch, heads, length, value_dim), jnp.float32),
        num_warps=blocks.num_warps, num_stages=blocks.num_stages, name="linear_attention_output",
    )(q, k, v, b, doc, states)
    return o, final


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _linear_attention(q, k, v, gate, initial, starts, scale: float, blocks: LinearAttentionBlocks, backend: str):
    """Kernel layout: q, k [B, H, T, K]; v [B, H, T, V]; gate [B, H, T, G] raw log gates; initial [B, H, K, V];
    starts [B, H, T] bool document starts or None; T a multiple of both chunk sizes. Returns o [B, H, T, V]
    float32 and the final state [B, H, K, V]."""
    return _forward(q, k, v, gate, initial, starts, scale, blocks, backend)


def _linear_attention_fwd(q, k, v, gate, initial, starts, scale, blocks, backend):
    o, final = _forward(q, k, v, gate, initial, starts, scale, blocks, backend)
    return (o, final), (q, k, v, gate, initial, starts, final)


def _linear_attention_bwd(scale, blocks, backend, residuals, cotangents):
    q, k, v, gate, initial, starts, final = residuals
    d_o, d_final = cotangents
    d_o = d_o.astype(v.dtype)  # matmul operands in the inputs' dtype
    chunk, sub = blocks.backward()
    documents = starts is not None
    b, doc = chunk_gate_sums(gate, chunk), chunk_documents(starts, q.shape, chunk)
    states, _ = _states(k, v, b, doc, initial, chunk, backend, blocks, documents)
    d_states, d_initial = _state_gradients(q, b, doc, d_o, d_final, chunk, scale, backend, blocks, documents)
    batch, heads, length, key_dim = q.shape
    value_dim = v.shape[-1]
    rows_k, rows_v, rows_g, state = _specs(chunk, key_dim, value_dim, gate.shape[-1])
    rows_doc = _specs(chunk, 1, 1, 1)[0]
    kernel = functools.partial(_gradient_kernel, scale=scale, sub=sub if gate.shape[-1] > 1 else chunk,
                               documents=documents)  # fmt: skip
    dq, dk, dv = _common.pallas_call(
        kernel, backend=backend, grid=(batch, heads, length // chunk),
        in_specs=[rows_k, rows_k, rows_v, rows_g, rows_doc, rows_v, state, state],
        out_specs=[rows_k, rows_k, rows_v],
        out_shape=[jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct(k.shape, jnp.float32),
                   jax.ShapeDtypeStruct(v.shape, jnp.float32)],
        num_warps=blocks.num_warps, num_stages=blocks.num_stages, name="linear_attention_gradients",
    )(q, k, v, b, doc, d_o, states, d_states)
    d_gate = _gate_gradient(q.astype(jnp.float32) * scale, k.astype(jnp.float32), dq, dk, final, d_final,
                            gate.shape[-1], doc if documents else None, chunk)  # fmt: skip
    d_starts = None if starts is None else np.zeros(starts.shape, jax.dtypes.float0)
    return (dq * scale).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), d_gate, d_initial, d_starts


def _state_gradients(q, b, doc, d_o, d_final, chunk: int, scale: float, backend: str, blocks: LinearAttentionBlocks,
                     documents: bool):
    kernel = functools.partial(_state_gradient_kernel, chunk=chunk, scale=scale, documents=documents)
    return _state_scan(kernel, (q, d_o, b, doc), d_final, chunk, blocks, backend, "linear_attention_state_gradients")


def _gate_gradient(q: Array, k: Array, dq: Array, dk: Array, final: Array, d_final: Array, gate_dim: int,
                   doc: Array | None, chunk: int) -> Array:
    """∂L/∂a [B, H, T, G] from the diagonal-gate identity: q, k, dq, dk [B, H, T, K] (q scaled, dq its cotangent);
    with documents (doc [B, H, T, 1], ``chunk_documents``) the reverse sums stop at document starts."""
    d_running = q * dq - k * dk
    d_last = jnp.sum(final * d_final, axis=-1)  # [B, H, K]
    if gate_dim == 1:
        d_running, d_last = jnp.sum(d_running, -1, keepdims=True), jnp.sum(d_last, -1, keepdims=True)
    d_running = d_running.at[:, :, -1].add(d_last)
    if doc is None:
        return jax.lax.cumsum(d_running, axis=2, reverse=True)
    batch, heads, length, width = d_running.shape
    chunks = jnp.moveaxis(d_running.reshape(batch, heads, length // chunk, chunk, width), 2, 0)  # [N, B, H, C, G]
    document = jnp.moveaxis(doc[:, :1, :, 0].reshape(batch, 1, length // chunk, chunk), 2, 0)  # [N, B, 1, C]
    d_gate = recurrence.document_reverse_sum(chunks, document)
    return jnp.moveaxis(d_gate, 0, 2).reshape(d_running.shape)


_linear_attention.defvjp(_linear_attention_fwd, _linear_attention_bwd)


def linear_attention(
    q: Array,
    k: Array,
    v: Array,
    log_gate: Array | None = None,
    *,
    scale: float,
    initial_state: Array | None = None,
    starts: Array | None = None,
    blocks: LinearAttentionBlocks = LinearAttentionBlocks(),
    backend: str | None = None,
) -> tuple[Array, Array]:
    """Diagonal-gated chunked linear attention with Pallas kernels.

    q, k: [B, T, H, K]; v: [B, T, H, V]; log_gate: None (linear attention), [B, T, H] (scalar decay, simple_gla) or
    [B, T, H, K] (GLA), natural-log gates <= 0; scale multiplies q; initial_state: [B, H, K, V] or None (zeros),
    the state before each row's first document. starts: [B, T] bool, packed documents' starts
    (``seqlab.core.documents.document_starts``: each starts from a zero state), or None; the final state is then
    the last document's.
    backend: "gpu", "tpu", "cpu" (interpret mode) or None (the default backend).
    Returns o [B, T, H, V] float32 and the final state [B, H, K, V] float32.
    """
    if not isinstance(blocks, LinearAttentionBlocks):
        raise ValueError(f"blocks must be a LinearAttentionBlocks, got {type(blocks).__name__}")
    backend = _common.resolve_backend(backend)
    batch, length, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    kp, vp = _common.padded_feature(key_dim), _common.padded_feature(value_dim)
    padded = _common.padded_length(length, max(blocks.chunk, blocks.chunk_bwd))
    if log_gate is None:
        log_gate = jnp.zeros((batch, length, heads, 1), jnp.float32)
    elif log_gate.ndim == 3:
        log_gate = log_gate[..., None]
    gate = _common.to_kernel_layout(log_gate.astype(jnp.float32), padded, kp if log_gate.shape[-1] > 1 else 1)
    initial = jnp.zeros((batch, heads, key_dim, value_dim), jnp.float32) if initial_state is None else initial_state
    initial = jnp.pad(initial.astype(jnp.float32), [(0, 0), (0, 0), (0, kp - key_dim), (0, vp - value_dim)])
    if starts is not None:
        starts = _common.to_kernel_layout(jnp.broadcast_to(starts[:, :, None], (batch, length, heads)), padded)
    o, final = _linear_attention(
        _common.to_kernel_layout(q, padded, kp), _common.to_kernel_layout(k, padded, kp),
        _common.to_kernel_layout(v, padded, vp), gate, initial, starts, float(scale), blocks, backend,
    )
    return _common.from_kernel_layout(o, length, value_dim), final[:, :, :key_dim, :value_dim]
