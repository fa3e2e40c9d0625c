"""Packed rows for every declared linear-state op and for softmax attention: a row of several documents equals
each document run alone.

The reference runs tests/reference.py's per-token loops (np_<op>, float64; jnp_<op>, float32 scan for gradients)
on every document separately, the row's initial state before its first document only, and concatenates: no
packing logic of seqlab is involved. Document lengths cover one token, odd lengths, exactly a chunk (aligned to
the chunk border), longer than a chunk, and documents crossing chunk borders; several chunk sizes and every form.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import linear_cases as lc
import reference as ref
from reference import rel_err
from seqlab import ops
from seqlab.core import documents

FWD_TOL = 1e-5
GRAD_TOL = 1e-4
IMPLS = ("chunked", "recurrent", "parallel")
# With chunk 8: [0] [1..7] [8..15] aligned to a chunk, [16..28] longer than a chunk, [29], [30..34] across 32.
LENGTHS = (1, 7, 8, 13, 1, 5)
CASES = lc.cases()


def ids(cases):
    return [c.id for c in cases]


def packed_segment_ids(lengths=LENGTHS) -> np.ndarray:
    """Row 0 packs `lengths`; row 1 is a single document (nothing restarts)."""
    row = np.repeat(np.arange(len(lengths)), lengths)
    return np.stack([row, np.full_like(row, 7)]).astype(np.int32)


def per_document(case, args, kind, lengths=LENGTHS):
    """The reference on each document of row 0 alone and on row 1 whole: (o [2, T, H, V], final states [2, ...])."""
    outputs, start = [], 0
    for i, length in enumerate(lengths):
        piece = {n: a[:1, start:start + length] for n, a in args.items() if n != "initial_state"}
        piece["initial_state"] = args["initial_state"][:1] if i == 0 else None
        o, last_state = lc.call_reference(case, kind, piece)
        outputs.append(o)
        start += length
    whole = {n: a[1:] for n, a in args.items()}
    o_whole, s_whole = lc.call_reference(case, kind, whole)
    xp = np if kind == "np" else jnp
    return xp.concatenate([xp.concatenate(outputs, 1), o_whole], 0), xp.concatenate([last_state, s_whole], 0)


@pytest.fixture
def rng(request):
    return np.random.default_rng(abs(hash(request.node.name)) % 2**32)


# (impl, chunk size): the chunk size matters to the chunked form only; the gradient test below checks the forward
# of chunked 8, recurrent and the Pallas kernels too
FORMS = [("chunked", 4), ("chunked", 16), ("parallel", 8)]


@pytest.mark.parametrize("impl, chunk_size", FORMS, ids=[f"{i}-{c}" for i, c in FORMS])
@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_packed_forward_equals_each_document_alone(case, impl, chunk_size, rng):
    args = lc.make_inputs(rng, case, T=sum(LENGTHS), K=8, V=8)
    o, state = lc.call_op(case, args, impl=impl, chunk_size=chunk_size, segment_ids=packed_segment_ids(),
                          output_final_state=True)
    o_ref, state_ref = per_document(case, args, "np")
    assert rel_err(o, o_ref) < FWD_TOL
    assert rel_err(state, state_ref) < FWD_TOL


# Gradient forms; the Pallas kernels run in interpret mode: chunk 16 puts a document start on a chunk border, chunk 32
# runs the per-key gates' off-diagonal sub-chunks (16 rows) and the delta rule's WY form over several documents.
GRADIENT_CASES = [(case, impl, chunk) for case in CASES for impl, chunk in
                  [("chunked", 8), ("recurrent", 8)] + [("pallas", 16), ("pallas", 32)] * bool(case.spec.kernel)]


@pytest.mark.parametrize("case, impl, chunk_size", GRADIENT_CASES,
                         ids=[f"{c.id}-{impl}-{chunk}" for c, impl, chunk in GRADIENT_CASES])
def test_packed_gradients_equal_each_document_alone(case, impl, chunk_size, rng):
    args = lc.make_inputs(rng, case, T=sum(LENGTHS), K=8, V=8)
    o_ref, s_ref = per_document(case, args, "np")
    Wo = rng.standard_normal(o_ref.shape).astype(np.float32)
    Ws = rng.standard_normal(s_ref.shape).astype(np.float32)
    segments = packed_segment_ids()
    o, state, grads = lc.value_and_grads(
        lambda a: lc.call_op(case, a, impl=impl, chunk_size=chunk_size, segment_ids=segments,
                             output_final_state=True), args, Wo, Ws)  # fmt: skip
    assert rel_err(o, o_ref) < FWD_TOL and rel_err(state, s_ref) < FWD_TOL
    _, _, expected = lc.value_and_grads(lambda a: per_document(case, a, "jnp"), args, Wo, Ws)
    for name in args:
        assert rel_err(grads[name], expected[name]) < GRAD_TOL, name


@pytest.mark.parametrize("case", lc.cases(lc.has_log_gate), ids=ids(lc.cases(lc.has_log_gate)))
def test_packed_extreme_gates_stay_finite_and_exact(case, rng):
    args = lc.make_inputs(rng, case, T=sum(LENGTHS), K=8, V=8, gates="extreme")
    o_ref, s_ref = per_document(case, args, "np")
    Wo = rng.standard_normal(o_ref.shape).astype(np.float32)
    Ws = rng.standard_normal(s_ref.shape).astype(np.float32)
    o, state, grads = lc.value_and_grads(
        lambda a: lc.call_op(case, a, impl="chunked", chunk_size=8, segment_ids=packed_segment_ids(),
                             output_final_state=True), args, Wo, Ws)  # fmt: skip
    assert all(np.isfinite(g).all() for g in grads.values())
    assert rel_err(o, o_ref) < FWD_TOL and rel_err(state, s_ref) < FWD_TOL


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_cu_seqlens_gives_every_documents_final_state(case, impl, rng):
    args = {n: a[:1] for n, a in lc.make_inputs(rng, case, T=sum(LENGTHS), K=8, V=8).items()}
    cu_seqlens = np.concatenate([[0], np.cumsum(LENGTHS)]).astype(np.int32)
    o, states = lc.call_op(case, args, impl=impl, chunk_size=8, cu_seqlens=cu_seqlens, output_final_state=True)
    o_seg, _ = lc.call_op(case, args, impl=impl, chunk_size=8, segment_ids=packed_segment_ids()[:1])
    assert states.shape[0] == len(LENGTHS) and np.array_equal(o, o_seg)
    for i, (start, end) in enumerate(zip(cu_seqlens[:-1], cu_seqlens[1:])):
        piece = {n: a[:, start:end] for n, a in args.items() if n != "initial_state"}
        piece["initial_state"] = args["initial_state"] if i == 0 else None
        _, expected = lc.call_reference(case, "np", piece)
        assert rel_err(states[i], expected[0]) < FWD_TOL, i


def test_cu_seqlens_document_states_have_gradients(rng):
    case = lc.case("gated_delta_rule")
    args = {n: a[:1] for n, a in lc.make_inputs(rng, case, T=sum(LENGTHS), K=8, V=8).items()}
    cu_seqlens = np.concatenate([[0], np.cumsum(LENGTHS)]).astype(np.int32)
    weights = rng.standard_normal((len(LENGTHS), 2, 8, 8)).astype(np.float32)

    def packed(a):
        return jnp.sum(lc.call_op(case, a, chunk_size=8, cu_seqlens=cu_seqlens, output_final_state=True)[1] * weights)

    def alone(a):
        total, start = 0.0, 0
        for i, length in enumerate(LENGTHS):
            piece = {n: x[:, start:start + length] for n, x in a.items() if n != "initial_state"}
            piece["initial_state"] = a["initial_state"] if i == 0 else None
            total += jnp.sum(lc.call_reference(case, "jnp", piece)[1][0] * weights[i])
            start += length
        return total

    got, expected = jax.jit(jax.grad(packed))(args), jax.jit(jax.grad(alone))(args)
    assert not np.any(got["q"]) and not np.any(expected["q"])  # the states do not read q
    for name in ("k", "v", "g", "beta", "initial_state"):
        assert rel_err(got[name], expected[name]) < GRAD_TOL, name


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_packed_bfloat16_inputs_follow_the_float32_run(case, rng):
    args = lc.make_inputs(rng, case, T=sum(LENGTHS), K=8, V=8)
    low = {n: (a.astype(jnp.bfloat16) if n in ("q", "k", "v") else a) for n, a in args.items()}
    as_run = {n: (np.asarray(a, np.float32) if n in ("q", "k", "v") else a) for n, a in low.items()}
    o, _ = lc.call_op(case, low, chunk_size=8, segment_ids=packed_segment_ids())
    o_ref, _ = per_document(case, as_run, "np")
    assert o.dtype == jnp.bfloat16 and rel_err(np.asarray(o, np.float32), o_ref) < 1e-2


def test_one_document_per_row_changes_nothing(rng):
    case = lc.case("gla")
    args = lc.make_inputs(rng, case, T=21, K=8, V=8)
    plain = lc.call_op(case, args, chunk_size=8, output_final_state=True)
    packed = lc.call_op(case, args, chunk_size=8, output_final_state=True, segment_ids=np.full((2, 21), 3, np.int32))
    for a, b in zip(plain, packed):
        assert rel_err(b, a) < 1e-6


@pytest.mark.parametrize(
    "kw, pattern",
    [
        (dict(segment_ids=np.zeros((2, 20), np.int32)), r"segment_ids must be integers of shape \(2, 21\)"),
        (dict(segment_ids=np.zeros((2, 21), np.float32)), r"segment_ids must be integers"),
        (dict(segment_ids=np.zeros((2, 21), np.int32), cu_seqlens=np.array([0, 21])), "give one of them"),
        (dict(cu_seqlens=np.array([0, 21])), "batch must be 1"),
    ],
)
def test_bad_document_arguments_are_named(kw, pattern, rng):
    case = lc.case("gla")
    args = lc.make_inputs(rng, case, T=21, K=8, V=8)
    with pytest.raises(ValueError, match=pattern):
        lc.call_op(case, args, **kw)


@pytest.mark.parametrize("offsets, pattern", [([0, 5, 5, 21], "increase"), ([1, 21], "increase"),
                                              ([0, 20], "increase"), ([[0, 21]], "1-D")])
def test_bad_cu_seqlens_are_named(offsets, pattern, rng):
    case = lc.case("gla")
    args = {n: a[:1] for n, a in lc.make_inputs(rng, case, T=21, K=8, V=8).items()}
    with pytest.raises(ValueError, match=f"cu_seqlens.*{pattern}"):
        lc.call_op(case, args, cu_seqlens=np.array(offsets, np.int32))


# ---- seqlab.core.documents against counters written here ---------------------------------------------------------


def test_starts_positions_and_offsets_match_a_counter():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 9, size=12)
    row = np.repeat(np.arange(len(lengths)), lengths)
    segment_ids = np.stack([row, row[::-1].copy()])
    expected_starts, expected_positions = np.zeros(segment_ids.shape, bool), np.zeros(segment_ids.shape, int)
    for b in range(2):
        for t in range(1, row.size):
            expected_starts[b, t] = segment_ids[b, t] != segment_ids[b, t - 1]
            expected_positions[b, t] = 0 if expected_starts[b, t] else expected_positions[b, t - 1] + 1
    assert np.array_equal(documents.document_starts(jnp.asarray(segment_ids)), expected_starts)
    assert np.array_equal(documents.positions_in_document(jnp.asarray(segment_ids)), expected_positions)
    cu_seqlens = np.concatenate([[0], np.cumsum(lengths)])
    assert np.array_equal(documents.segment_ids_from_cu_seqlens(cu_seqlens, 1, row.size), row[None])


# ---- softmax attention: every form, each document alone through the per-query loop --------------------------------

SOFTMAX_FORMS = [("chunked", 8), ("chunked", 16), ("parallel", None), ("recurrent", None), ("pallas", 16)]


def softmax_per_document(q, k, v, segment_ids, *, window=None, causal=True, kind="np"):
    """np_softmax_attn (or jnp_, for gradients) on every run of equal ids of every row, concatenated."""
    xp = np if kind == "np" else jnp
    attend = getattr(ref, f"{kind}_softmax_attn")
    rows = []
    for b in range(q.shape[0]):
        bounds = np.flatnonzero(np.diff(segment_ids[b])) + 1
        pieces = [attend(q[b:b + 1, s:e], k[b:b + 1, s:e], v[b:b + 1, s:e], causal=causal, window=window)
                  for s, e in zip([0, *bounds], [*bounds, q.shape[1]])]  # fmt: skip
        rows.append(xp.concatenate(pieces, 1))
    return xp.concatenate(rows, 0)


def softmax_inputs(rng, T=sum(LENGTHS), H=4, H_kv=2, D=8):
    normal = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    return normal(2, T, H, D), normal(2, T, H_kv, D), normal(2, T, H_kv, D)


@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("impl, block", SOFTMAX_FORMS, ids=[f"{i}-{b}" for i, b in SOFTMAX_FORMS])
def test_packed_softmax_equals_each_document_alone(impl, block, window, rng):
    q, k, v = softmax_inputs(rng)
    segment_ids = packed_segment_ids()
    o = ops.softmax_attn(q, k, v, window=window, segment_ids=segment_ids, impl=impl, block_size=block)
    assert rel_err(o, softmax_per_document(q, k, v, segment_ids, window=window)) < FWD_TOL


@pytest.mark.parametrize("impl", ["chunked", "parallel", "pallas"])
def test_packed_softmax_gradients_and_cu_seqlens(impl, rng):
    q, k, v = softmax_inputs(rng)
    segment_ids = packed_segment_ids()
    weights = rng.standard_normal((*q.shape[:3], v.shape[-1])).astype(np.float32)

    def packed(q, k, v):
        return jnp.sum(ops.softmax_attn(q, k, v, segment_ids=segment_ids, impl=impl, block_size=16) * weights)

    def alone(q, k, v):
        return jnp.sum(softmax_per_document(q, k, v, segment_ids, kind="jnp") * weights)

    got, expected = (jax.jit(jax.grad(f, (0, 1, 2)))(q, k, v) for f in (packed, alone))
    for name, a, b in zip("qkv", got, expected):
        assert rel_err(a, b) < GRAD_TOL, name
    cu_seqlens = np.concatenate([[0], np.cumsum(LENGTHS)]).astype(np.int32)
    one_row = ops.softmax_attn(q[:1], k[:1], v[:1], cu_seqlens=cu_seqlens, impl=impl, block_size=16)
    assert rel_err(one_row, softmax_per_document(q[:1], k[:1], v[:1], segment_ids[:1])) < FWD_TOL
