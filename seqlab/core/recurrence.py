"""The chunked recurrence engine shared by every linear-state family.

A family is one function, ``chunk_terms``, that describes a chunk of C tokens as an affine map of its incoming
state ``S_in`` ([K, V] per head, float32):

    o     = o_local + q_read @ S_in            outputs of the chunk           [C, V]
    S_out = P(S_in) + s_local                   state leaving the chunk        [K, V]
    P(S)  = exp(log_decay) * S - leftᵀ (right @ S)   (diagonal plus low rank)

From that single description this module builds every form (see ``seqlab.core`` for the contract):
``recurrent`` (C = 1, scanned token by token), ``chunked`` (all chunks' terms in parallel, then a scan over chunk
states), ``parallel`` (one chunk of length T) and ``segment_summary`` (a whole segment's (transition, state), which
combines associatively — the object sequence parallelism exchanges).

Packed documents: every form takes ``starts`` ([B, T] bool, True at the first token of each document but the
row's first, which ``initial_state`` precedes). The engine gives each chunk the input ``chunk_math.DOCUMENT`` (the
document index of each token within its chunk), the family masks its pairs by it, and ``_restart`` does the rest
for every family: tokens of a document that starts inside a chunk read no incoming state, and a chunk in which a
document starts has the zero transition (log decay -inf, no low-rank part), so the state scan, the summaries and
their sequence-parallel combine all stop at the boundary. The final state is then the last document's.
"""

from __future__ import annotations

import functools
from typing import Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp

from seqlab.core import chunk_math

Array = jax.Array


class Transition(NamedTuple):
    """State transition P = diag(exp(log_decay)) - leftᵀ right of a chunk.

    log_decay: [..., K] or [..., 1] (a scalar decay broadcast over K), float32, <= 0.
    left, right: [..., R, K] or None; the low-rank part (R = chunk length for delta-rule families).
    """

    log_decay: Array
    left: Array | None = None
    right: Array | None = None

    def apply(self, state: Array) -> Array:
        """P(S) for S: [..., K, V]."""
        out = jnp.exp(self.log_decay)[..., :, None] * state
        if self.left is not None:
            out = out - jnp.einsum("...rk,...rv->...kv", self.left, jnp.einsum("...rk,...kv->...rv", self.right, state))
        return out

    def dense(self, key_dim: int) -> Array:
        """P as a matrix [..., K, K] (P(S) = P @ S)."""
        eye = jnp.eye(key_dim, dtype=jnp.float32)
        out = jnp.exp(self.log_decay)[..., :, None] * eye
        if self.left is not None:
            out = out - jnp.einsum("...rk,...rj->...kj", self.left, self.right)
        return out


class ChunkTerms(NamedTuple):
    """A chunk as an affine map of its incoming state (shapes per chunk; leading batch axes allowed).

    o_local: [..., C, V]  outputs when the incoming state is zero.
    q_read: [..., C, K]   o = o_local + q_read @ S_in.
    transition: Transition  S_out = transition.apply(S_in) + s_local.
    s_local: [..., K, V]  outgoing state when the incoming state is zero.
    """

    o_local: Array
    q_read: Array
    transition: Transition
    s_local: Array


ChunkTermsFn = Callable[[Mapping[str, Array]], ChunkTerms]


class Summary(NamedTuple):
    """What a segment of tokens does to the state: S_out = matrix @ S_in + state.

    matrix: [..., K, K] or None with log_decay given (diagonal transitions stay in log space).
    log_decay: [..., K] or [..., 1]; ignored when matrix is given.
    state: [..., K, V] float32.
    """

    log_decay: Array | None
    matrix: Array | None
    state: Array

    def apply(self, state_in: Array) -> Array:
        if self.matrix is not None:
            return self.matrix @ state_in + self.state
        return jnp.exp(self.log_decay)[..., :, None] * state_in + self.state


def combine_summaries(first: Summary, second: Summary) -> Summary:
    """Associative combine: the summary of ``first`` followed by ``second``."""
    state = second.apply(first.state)
    if first.matrix is None and second.matrix is None:
        return Summary(first.log_decay + second.log_decay, None, state)
    key_dim = first.state.shape[-2]
    return Summary(None, _summary_matrix(second, key_dim) @ _summary_matrix(first, key_dim), state)


def _summary_matrix(summary: Summary, key_dim: int) -> Array:
    if summary.matrix is not None:
        return summary.matrix
    return jnp.exp(summary.log_decay)[..., :, None] * jnp.eye(key_dim, dtype=jnp.float32)


# Chunk layout: the chunk index leads, [N, B, H, C, ...], so the scan over chunk states needs no transposes.
_CHUNK_ORDER = (1, 0, 3, 2)  # [B, N, C, H] <-> [N, B, H, C]; the permutation is its own inverse


def _to_chunks(x: Array, num_chunks: int, chunk: int) -> Array:
    """[B, T, H, ...] -> [N, B, H, C, ...], zero-padding T up to N * C.

    Zero padding is the identity for every family (no decay, no write, beta = 0), so padded tokens change nothing.
    """
    pad = num_chunks * chunk - x.shape[1]
    if pad:
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape(x.shape[0], num_chunks, chunk, *x.shape[2:])
    return jnp.transpose(x, _CHUNK_ORDER + tuple(range(4, x.ndim)))


def _from_chunks(o: Array, length: int) -> Array:
    """[N, B, H, C, V] -> [B, T, H, V]."""
    n, b, h, c, v = o.shape
    return jnp.transpose(o, _CHUNK_ORDER + (4,)).reshape(b, n * c, h, v)[:, :length]


def _restart(terms: ChunkTerms, document: Array | None) -> ChunkTerms:
    """The terms of chunks that hold document starts (document [..., C], ``chunk_math.DOCUMENT``; None: none):
    rows after a start read no incoming state, and a chunk with a start passes none through (zero transition)."""
    if document is None:
        return terms
    q_read = jnp.where((document == 0)[..., None], terms.q_read, 0.0)
    reset = document[..., -1:] > 0  # [..., 1]: a document starts in this chunk
    transition = terms.transition
    log_decay = jnp.where(reset, -jnp.inf, transition.log_decay)
    left = None if transition.left is None else jnp.where(reset[..., None], 0.0, transition.left)
    return terms._replace(q_read=q_read, transition=Transition(log_decay, left, transition.right))


def propagate_states(terms: ChunkTerms, initial_state: Array) -> tuple[Array, Array]:
    """Scan the chunk transitions: incoming state of every chunk [N, B, H, K, V] and the final state [B, H, K, V]."""

    def step(state, chunk):
        transition, s_local = chunk
        return transition.apply(state) + s_local, state

    final, incoming = jax.lax.scan(step, initial_state, (terms.transition, terms.s_local))
    return incoming, final


def read_out(terms: ChunkTerms, incoming: Array) -> Array:
    """o = o_local + q_read @ S_in for every chunk: [N, B, H, C, V]."""
    return terms.o_local + jnp.einsum("...ck,...kv->...cv", terms.q_read, incoming)


class DiagonalGate(NamedTuple):
    """Declares a family *diagonal-gated*: S_t = diag(exp(a_t)) S_{t-1} + k_t v_tᵀ, o_t = S_tᵀ q_t, where a_t is the
    input ``name`` ([B, T, H]: one gate per head, or [B, T, H, K]: one per key dim; None: no decay) and enters the
    chunk terms only through exp(G_t - G_s), G the running sum of a (linear attention, simple_gla, GLA).

    Then o_t = Σ_{s<=t} Σ_d q_td k_sd exp(G_td - G_sd) v_s (+ the initial state's term), so G_t appears with a plus
    sign wherever q_t does and a minus sign wherever k_t does, and the gate's gradient follows from the others':
        ∂L/∂G_t = q_t ⊙ ∂L/∂q_t - k_t ⊙ ∂L/∂k_t  (summed over K for a per-head gate),  plus S_T ⊙ ∂L/∂S_T at t = T,
        ∂L/∂a_s = Σ_{t>=s} ∂L/∂G_t.
    The chunked form uses this in its backward pass (``jax.custom_vjp``) instead of differentiating the chunk math
    through the gate. q and k are the engine inputs named "q" and "k", read as they are: a family that maps them
    (a feature map inside ``chunk_terms``) is not diagonal-gated in this sense and must not declare it.
    """

    name: str | None = None


def chunked(
    chunk_terms: ChunkTermsFn,
    inputs: Mapping[str, Array],
    initial_state: Array,
    chunk_size: int,
    gate: DiagonalGate | None = None,
    starts: Array | None = None,
):
    """Chunked form: every chunk's terms at once (masked matmuls), then a scan over chunk states.

    inputs: per-token arrays [B, T, H, ...]; initial_state [B, H, K, V] float32; starts: [B, T] bool document
    starts or None (see the module docstring). With ``gate`` (a diagonal-gated family) the backward pass is the
    engine's own (see ``DiagonalGate``); otherwise JAX differentiates the forward.
    Returns o [B, T, H, V] float32 and the final state [B, H, K, V] (of each row's last document).
    """
    chunks, length = _split_chunks(inputs, chunk_size, starts)
    if gate is None:
        o, final = _chunked_forward(chunk_terms, chunks, initial_state)
    else:
        per_key = gate.name is not None and chunks[gate.name].ndim == chunks["q"].ndim
        o, final = _diagonal_chunked(chunk_terms, gate.name, per_key, chunks, initial_state)
    return _from_chunks(o, length), final


def _chunked_forward(chunk_terms: ChunkTermsFn, chunks: Mapping[str, Array], initial_state: Array):
    """Chunk layout in ([N, B, H, C, ...]) and out: o [N, B, H, C, V] and the final state."""
    terms = _restart(chunk_terms(chunks), chunks.get(chunk_math.DOCUMENT))
    incoming, final = propagate_states(terms, initial_state)
    return read_out(terms, incoming), final


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _diagonal_chunked(
    chunk_terms: ChunkTermsFn, gate_name: str | None, per_key: bool, chunks: Mapping[str, Array], initial_state: Array
):
    """``_chunked_forward`` of a diagonal-gated family; ``per_key``: the gate is [N, B, H, C, K], not [N, B, H, C]."""
    return _chunked_forward(chunk_terms, chunks, initial_state)


def _diagonal_forward(
    chunk_terms: ChunkTermsFn, gate_name: str | None, per_key: bool, chunks: Mapping[str, Array], initial_state: Array
):
    """The forward pass, linearising the chunk terms in every input but the gate and the document index (held
    constant)."""
    constant = {name: x for name, x in chunks.items() if name in (gate_name, chunk_math.DOCUMENT)}
    others = {name: x for name, x in chunks.items() if name not in constant}
    terms, terms_vjp = jax.vjp(lambda xs: chunk_terms({**xs, **constant}), others)
    document = chunks.get(chunk_math.DOCUMENT)
    terms = _restart(terms, document)
    incoming, final = propagate_states(terms, initial_state)
    residuals = (terms_vjp, terms.q_read, terms.transition.log_decay, incoming, final, others["q"], others["k"],
                 document)  # fmt: skip
    return (read_out(terms, incoming), final), residuals


def _diagonal_backward(chunk_terms: ChunkTermsFn, gate_name: str | None, per_key: bool, residuals, cotangents):
    """Read-out and state scan by hand, the chunk terms by their VJP, the gate by ``DiagonalGate``'s identity."""
    del chunk_terms
    terms_vjp, q_read, log_decay, incoming, final, q, k, document = residuals
    d_o, d_final = cotangents
    d_q_read = jnp.einsum("...cv,...kv->...ck", d_o, incoming)
    if document is not None:  # _restart zeroed these rows of q_read
        d_q_read = jnp.where((document == 0)[..., None], d_q_read, 0.0)
    d_read_state = jnp.einsum("...ck,...cv->...kv", q_read, d_o)
    d_s_local, d_initial = _reverse_state_scan(d_read_state, log_decay, d_final)
    (grads,) = terms_vjp(ChunkTerms(d_o, d_q_read, Transition(jnp.zeros_like(log_decay)), d_s_local))
    if gate_name is not None:
        d_gate = _gate_gradient(q, k, grads["q"], grads["k"], final, d_final, per_key, document)
        grads = {**grads, gate_name: d_gate}
    if document is not None:
        grads = {**grads, chunk_math.DOCUMENT: jnp.zeros_like(document)}
    return grads, d_initial


_diagonal_chunked.defvjp(_diagonal_forward, _diagonal_backward)


def _reverse_state_scan(d_read_state: Array, log_decay: Array, d_final: Array) -> tuple[Array, Array]:
    """Cotangents of every chunk's outgoing state [N, B, H, K, V] (= of its s_local) and of the initial state.

    d_read_state [N, B, H, K, V]: q_readᵀ d_o per chunk; log_decay [N, B, H, K or 1]. Chunk n maps
    S_in -> exp(log_decay_n) S_in + s_local_n, so ∂S_in,n = d_read_state_n + exp(log_decay_n) ∂S_out,n, with
    ∂S_out,n = ∂S_in,n+1 and ∂S_out,N-1 = d_final.
    """

    def step(d_outgoing, chunk):
        d_read, decay = chunk
        return d_read + jnp.exp(decay)[..., :, None] * d_outgoing, d_outgoing

    d_initial, d_outgoing = jax.lax.scan(step, d_final, (d_read_state, log_decay), reverse=True)
    return d_outgoing, d_initial


def _gate_gradient(
    q: Array, k: Array, dq: Array, dk: Array, final: Array, d_final: Array, per_key: bool, document: Array | None
) -> Array:  # fmt: skip
    """∂L/∂a in chunk layout, [N, B, H, C, K] (per_key) or [N, B, H, C], from ``DiagonalGate``'s identity (with
    documents, the reverse sums stop at document starts; see ``document_reverse_sum``)."""
    d_running = q * dq - k * dk  # [N, B, H, C, K]
    d_last = jnp.sum(final * d_final, axis=-1)  # [B, H, K]: S_T ⊙ ∂L/∂S_T
    if not per_key:
        d_running, d_last = jnp.sum(d_running, -1, keepdims=True), jnp.sum(d_last, -1, keepdims=True)
    d_running = d_running.at[-1, :, :, -1].add(d_last)
    if document is not None:
        d_gate = document_reverse_sum(d_running, document)
    else:
        within = chunk_math.chunk_reverse_cumsum(d_running, axis=-2)
        first = within[..., 0, :]  # [N, B, H, K or 1]: each chunk's total
        later = jnp.cumsum(first[::-1], axis=0)[::-1] - first  # the totals of the chunks after each chunk
        d_gate = within + later[..., None, :]
    return d_gate if per_key else d_gate[..., 0]


def document_reverse_sum(d_running: Array, document: Array) -> Array:
    """Σ over the later tokens of the same document of d_running [N, B, H, C, F] (document [N, B, 1, C]).

    The gate of a token enters only differences within its document, so every document's terms sum to zero (to
    its initial- and final-state terms); summing within documents keeps the other documents' rounding out.
    Within a chunk: a masked triangular product. Across chunks: the carry into the last document of chunk n is
    the first-document total of chunk n + 1, plus that chunk's carry when no document starts in it.
    """
    same = document[..., :, None] == document[..., None, :]  # [N, B, 1, C, C] (i, j)
    mask = (same & ~chunk_math.causal_mask(document.shape[-1], strict=True)).astype(jnp.float32)  # j >= i
    within = jnp.einsum("...ij,...jf->...if", mask, d_running, precision=jax.lax.Precision.HIGHEST)
    first = jnp.sum(jnp.where((document == 0)[..., None], d_running, 0.0), axis=-2)  # [N, B, H, F]
    passes = (document[..., -1:] == 0).astype(jnp.float32)  # [N, B, 1, 1]: no document starts in the chunk

    def step(carry, chunk):
        total, open_ = chunk
        return total + open_ * carry, carry

    _, later = jax.lax.scan(step, jnp.zeros_like(first[0]), (first, passes), reverse=True)
    in_last = (document == document[..., -1:])[..., None]  # [N, B, 1, C, 1]
    return within + jnp.where(in_last, later[..., None, :], 0.0)


def parallel(
    chunk_terms: ChunkTermsFn, inputs: Mapping[str, Array], initial_state: Array, starts: Array | None = None
):  # fmt: skip
    """Parallel form: the whole sequence as one chunk (quadratic, materialised)."""
    length = next(iter(inputs.values())).shape[1]
    return chunked(chunk_terms, inputs, initial_state, chunk_size=length, starts=starts)


def recurrent(
    chunk_terms: ChunkTermsFn, inputs: Mapping[str, Array], initial_state: Array, starts: Array | None = None
):  # fmt: skip
    """Recurrent form: token by token (chunks of one token), constant memory in T. The decode path. starts:
    [B, T] bool document starts or None (a start reads and keeps no state from before it)."""

    def step(state, token):
        chunk = {name: x[:, :, None] for name, x in token.items()}
        terms = _restart(chunk_terms(chunk), chunk.get(chunk_math.DOCUMENT))
        o = terms.o_local[:, :, 0] + jnp.einsum("bhk,bhkv->bhv", terms.q_read[:, :, 0], state)
        return terms.transition.apply(state) + terms.s_local, o

    if starts is not None:  # a chunk of one token: its document index is its start flag
        inputs = {**inputs, chunk_math.DOCUMENT: starts.astype(jnp.float32)[:, :, None]}
    xs = {name: jnp.moveaxis(x, 1, 0) for name, x in inputs.items()}
    final, o = jax.lax.scan(step, initial_state, xs)
    return jnp.moveaxis(o, 0, 1), final


def states_after(
    chunk_terms: ChunkTermsFn, inputs: Mapping[str, Array], initial_state: Array, chunk_size: int,
    starts: Array | None, positions: Array,
) -> Array:  # fmt: skip
    """The state right after each token of ``positions`` [D] (int; the same positions in every row), [D, B, H, K,
    V] float32: with document starts, the final states of the documents that end there.

    The state after token t is the outgoing state of t's chunk with the tokens after t zeroed (zero tokens are the
    identity), so this gathers D chunks, recomputes their terms and applies them to their incoming states: the
    cost of D more chunks and of the chunked form's terms once more; differentiated by JAX.
    """
    chunks, _ = _split_chunks(inputs, chunk_size, starts)
    terms = _restart(chunk_terms(chunks), chunks.get(chunk_math.DOCUMENT))
    incoming, _ = propagate_states(terms, initial_state)
    chunk = next(iter(chunks.values())).shape[3]
    index, offset = positions // chunk, positions % chunk
    kept = jnp.arange(chunk)[None, :] <= offset[:, None]  # [D, C]

    def truncated(name: str, x: Array) -> Array:  # [D, B, H, C, ...]: the chunk of each position, cut after it
        x = x[index]
        keep = kept.reshape(kept.shape[0], 1, 1, chunk, *([1] * (x.ndim - 4)))
        if name == chunk_math.DOCUMENT:  # the cut tokens stay in the position's document
            return jnp.where(keep, x, jnp.take_along_axis(x, offset[:, None, None, None], axis=-1))
        return jnp.where(keep, x, 0.0)

    picked = {name: truncated(name, x) for name, x in chunks.items()}
    cut = _restart(chunk_terms(picked), picked.get(chunk_math.DOCUMENT))
    return cut.transition.apply(incoming[index]) + cut.s_local


def segment_summary(
    chunk_terms: ChunkTermsFn, inputs: Mapping[str, Array], chunk_size: int, starts: Array | None = None
) -> Summary:  # fmt: skip
    """The summary (transition, state from a zero start) of a whole segment [B, T, H, ...].

    Its size does not depend on T; summaries of consecutive segments combine with ``combine_summaries``. A
    segment holding a document start (``starts``) has the zero transition: the combine stops there.
    """
    chunks, _ = _split_chunks(inputs, chunk_size, starts)
    return summarize(_restart(chunk_terms(chunks), chunks.get(chunk_math.DOCUMENT)))


def summarize(terms: ChunkTerms) -> Summary:
    """The summary of a run of chunks [N, B, H, ...]: its end state from a zero start and its whole transition
    (diagonal transitions as a summed log decay; diagonal-plus-low-rank ones as a dense product, chunk by chunk)."""
    _, state = propagate_states(terms, jnp.zeros_like(terms.s_local[0]))
    transition = terms.transition
    if transition.left is None:
        return Summary(jnp.sum(transition.log_decay, axis=0), None, state)
    key_dim = state.shape[-2]

    def compose(matrix, chunk_transition):
        return chunk_transition.dense(key_dim) @ matrix, None

    first = jax.tree.map(lambda a: a[0], transition).dense(key_dim)
    matrix, _ = jax.lax.scan(compose, first, jax.tree.map(lambda a: a[1:], transition))
    return Summary(None, matrix, state)


def sequence_parallel(
    chunk_terms: ChunkTermsFn, inputs: Mapping[str, Array], initial_state: Array, chunk_size: int, axis_name: str,
    starts: Array | None = None,
):  # fmt: skip
    """Chunked form over a sequence split into contiguous segments along the mesh axis ``axis_name`` (LASP-2).

    Call inside ``shard_map``: ``inputs`` hold this device's segment [B, T_local, H, ...] and ``initial_state``
    [B, H, K, V] the state before the whole sequence (the same on every device). Each device computes its chunk
    terms once and its segment's summary from a zero state; one all-gather shares the summaries (their size does
    not depend on T); each device folds the summaries of the devices before it into its incoming state, then runs
    the cheap state scan from there and reads out. Returns this segment's o [B, T_local, H, V] float32 and the
    final state of the whole sequence (replicated). starts: this segment's document starts [B, T_local] (a
    document crossing the device border has no start at the segment's first token; ``document_starts``).
    """
    chunks, length = _split_chunks(inputs, chunk_size, starts)
    terms = _restart(chunk_terms(chunks), chunks.get(chunk_math.DOCUMENT))
    gathered = jax.lax.all_gather(summarize(terms), axis_name)
    index = jax.lax.axis_index(axis_name)
    incoming_state, final = _fold_gathered(gathered, initial_state, index)
    incoming, _ = propagate_states(terms, incoming_state)
    # Every device folded the same summaries into `final`; one psum marks it replicated (XLA drops it when the
    # final state is not used). The all-gather's transpose in the backward pass is a reduce-scatter of the
    # summaries' cotangents: LASP-2's backward communication.
    final = jax.lax.psum(jnp.where(index == 0, final, 0.0), axis_name)
    return _from_chunks(read_out(terms, incoming), length), final


def _fold_gathered(gathered: Summary, initial_state: Array, index: Array) -> tuple[Array, Array]:
    """Apply the gathered summaries [P, ...] in device order: (state entering device `index`, state after all)."""
    state = incoming = initial_state
    num_devices = gathered.state.shape[0]
    for j in range(num_devices):
        state = jax.tree.map(lambda a: a[j], gathered).apply(state)
        incoming = jnp.where(j == index - 1, state, incoming)
    return incoming, state


def _split_chunks(
    inputs: Mapping[str, Array], chunk_size: int, starts: Array | None = None
) -> tuple[dict[str, Array], int]:  # fmt: skip
    """Per-token inputs [B, T, H, ...] in chunk layout [N, B, H, C, ...] (T zero-padded to chunks), and T. With
    document ``starts`` [B, T], also ``chunk_math.DOCUMENT`` [N, B, 1, C]: the starts counted within each chunk
    (padded tokens start nothing, so they join the last document, which they leave unchanged)."""
    length = next(iter(inputs.values())).shape[1]
    chunk = min(chunk_size, length)
    num_chunks = -(-length // chunk)
    chunks = {name: _to_chunks(x, num_chunks, chunk) for name, x in inputs.items()}
    if starts is not None:
        flags = _to_chunks(starts[:, :, None], num_chunks, chunk)  # [N, B, 1, C]
        chunks[chunk_math.DOCUMENT] = chunk_math.document_index(flags)
    return chunks, length


FORMS = ("chunked", "recurrent", "parallel")


def run(
    chunk_terms: ChunkTermsFn,
    inputs: Mapping[str, Array],
    initial_state: Array,
    impl: str,
    chunk_size: int,
    sequence_axis: str | None = None,
    gate: DiagonalGate | None = None,
    starts: Array | None = None,
):
    """Dispatch to a form by name (see ``FORMS``); with ``sequence_axis`` the sequence is split along that mesh
    axis and the chunked or parallel form runs as ``sequence_parallel`` (inside ``shard_map``). ``gate`` declares a
    diagonal-gated family, whose single-device chunked form then uses the engine's backward (``DiagonalGate``).
    ``starts``: [B, T] bool document starts of packed rows, or None (see the module docstring)."""
    if impl not in FORMS:
        raise ValueError(f"impl must be one of {FORMS}, got {impl!r}")
    if sequence_axis is not None:
        if impl == "recurrent":
            raise ValueError("impl: a sequence split over devices runs the 'chunked' or 'parallel' form, not 'recurrent'")
        local_chunk = chunk_size if impl == "chunked" else next(iter(inputs.values())).shape[1]
        return sequence_parallel(chunk_terms, inputs, initial_state, local_chunk, sequence_axis, starts)
    if impl == "chunked":
        return chunked(chunk_terms, inputs, initial_state, chunk_size, gate, starts)
    if impl == "recurrent":
        return recurrent(chunk_terms, inputs, initial_state, starts)
    return parallel(chunk_terms, inputs, initial_state, starts)
