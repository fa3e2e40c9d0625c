"""The mask algebra (seqlab.core.masks) through every softmax form: ``ops.softmax_attn`` with impl="chunked" (the
XLA blockwise form: contiguous-span rows and gathered rows), "parallel" (dense) and "pallas" (the flash kernels,
interpreted on CPU), forward and gradients in q, k, v, against a dense masked softmax whose mask is built here pair
by pair in Python loops from each mask's definition (``reference_visible``, no code shared with seqlab); tile maps
and visit lists against the same pairs; score_mod (a relative-position bias table, per-head temperatures, a softcap)
against the dense reference, gradients into the closed-over bias table and temperatures included; a query that sees
no key; argument errors; lowering of the new kernel inputs for GPU and TPU.

Shapes: B = 2, odd T (37, 70), block sizes 16 and 32, GQA (4 query heads over 2 or 1 key/value heads).
Tolerances (relative error ||a - b|| / ||b|| over the whole tensor): 1e-5 for float32 outputs and gradients (both
sides float32 with full-precision matmuls, summing at most 70 keys in different orders; measured <= 2e-6); bf16
inputs 1e-2 against the float32 reference on the same bf16-rounded inputs (the kernels round probabilities and
dS to bf16 before their matmuls, u = 2^-9 ~ 2e-3 each, and the outputs and gradients themselves).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _common
from pallas_kernels import flash_attention as fa
from reference import dense_reference, has_document, nonempty_tiles, reference_mask, rel_err
from reference import segment_ids as reference_segment_ids
from seqlab import ops
from seqlab.core import masks as M
from seqlab.ops.softmax_attn import _splits_heads

TOL = 1e-5
BF16_TOL = 1e-2
HIGHEST = jax.lax.Precision.HIGHEST
B, D, V = 2, 16, 8
IMPLS = ("chunked", "parallel", "pallas", "recurrent")  # recurrent: a scan of decode steps


def make_inputs(seed: int, T: int, H: int, H_kv: int, q_scale: float = 1.0):
    """q [B, T, H, D], k, v [B, T, H_kv, D or V] and the output weights W [B, T, H, V], float32."""
    rng = np.random.default_rng(seed)
    n = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    return q_scale * n(B, T, H, D), n(B, T, H_kv, D), n(B, T, H_kv, V), n(B, T, H, V)


def value_and_grads(attention, args, W):
    """attention(*args) and the gradients of sum(o * W) in every argument, from one jitted function."""

    def loss(*args):
        o = attention(*args)
        return jnp.sum(o.astype(jnp.float32) * W), o

    argnums = tuple(range(len(args)))
    (_, o), grads = jax.jit(jax.value_and_grad(loss, argnums=argnums, has_aux=True))(*args)
    return np.asarray(o.astype(jnp.float32)), [np.asarray(g.astype(jnp.float32)) for g in grads]


def assert_close(got, want, tol=TOL):
    (o, grads), (o_ref, grads_ref) = got, want
    names = ["o", *(f"d{i}" for i in range(len(grads)))]
    errors = {n: rel_err(a, b) for n, a, b in zip(names, [o, *grads], [o_ref, *grads_ref])}
    assert all(e <= tol for e in errors.values()), f"relative errors above {tol}: {errors}"


# ---------------------------------------------------------------------------------------------------------------
# forward and gradients, every mask kind, every form
# ---------------------------------------------------------------------------------------------------------------

BLIND_LAYOUT = (  # 16-token tiles over T = 70; query tile 1 sees nothing, no query sees key tile 4
    (True, False, False, False, False),
    (False, False, False, False, False),
    (True, True, True, False, False),
    (False, True, False, True, False),
    (True, False, False, True, False),
)
SPARSE_3 = ((True, False, False), (False, False, False), (True, False, True))  # | BlockDiagonal: flags 0 and 1

# (id, mask, T, H, H_kv, block): every kind, each form's paths (XLA: span rows, gathered rows, per-head and
# per-batch predicates; Pallas: BlockSparse flags, segment ids)
CASES = [
    ("per-head-span", M.PerHead((M.Causal(window=7), M.Bidirectional(window=9), M.BlockDiagonal(12, causal=False),
                                 M.Terraced(8))), 37, 4, 2, 16),
    ("strided", M.Strided(5), 70, 4, 1, 16),
    ("block-sparse-blind", M.BlockSparse(BLIND_LAYOUT, 16, causal=True), 70, 4, 2, 16),
    ("document-causal", M.Causal() & M.Document(), 70, 4, 2, 32),
    ("or-strided-window", M.Strided(33, causal=False) | M.Causal(window=4), 70, 4, 2, 16),
    ("and-window-strided", M.Causal(window=20) & M.Strided(3), 70, 4, 1, 32),
    ("or-block-sparse-diagonal", M.BlockSparse(SPARSE_3, 16) | M.BlockDiagonal(8), 37, 4, 2, 16),
    ("per-head-gather", M.PerHead((M.Causal(4), M.Strided(3), M.Terraced(6), M.Document())), 37, 4, 2, 32),
    ("s2-heads", M.s2_heads(4, block=8, local_blocks=2, stride=3, dense_heads=1), 70, 4, 2, 16),
    ("natten-2d-dilated", M.Neighborhood(kernel=(3, 5), dilation=(2, 1), stride=(1, 2), grid=(7, 10)), 70, 4, 1, 16),
    ("natten-3d-causal", M.Neighborhood(kernel=3, causal=(True, False, True), grid=(3, 4, 4)) & M.Document(), 37, 4,
     2, 16),
    ("halo-causal", M.Halo(block=8, halo=3, causal=True), 37, 4, 2, 16),
    ("lagged-per-head", M.PerHead((M.Lagged(1), M.Causal(), M.Lagged(5), M.Causal())), 37, 4, 2, 16),
    ("per-head-split", M.PerHead((M.BlockDiagonal(16), M.VerticalStride(16, 1, 3, 0), M.VerticalStride(16, 1, 3, 1),
                                  M.Causal(window=3))) & M.Document(), 70, 4, 2, 16),  # one call per head mask
    ("halo-2d", M.Halo(block=(4, 3), halo=(1, 2), grid=(7, 10)), 70, 4, 2, 32),
    ("circular-2d", M.CircularWindow(radius=2.5, grid=(7, 10)), 70, 4, 1, 16),
    ("span-summaries", M.SpanSummaries(4, 29), 37, 4, 2, 16),  # Combiner: 29 tokens, 8 summary slots
]
CASE_IDS = [c[0] for c in CASES]


def attention_op(mask, T, impl, block, segment_ids=None, **kwargs):
    ids = reference_segment_ids(T) if segment_ids is None and has_document(mask) else segment_ids
    return lambda q, k, v: ops.softmax_attn(q, k, v, mask=mask, segment_ids=ids, impl=impl, block_size=block,
                                            **kwargs)


@functools.lru_cache(maxsize=None)
def reference_result(case_id: str):
    _, mask, T, H, H_kv, _ = CASES[CASE_IDS.index(case_id)]
    q, k, v, W = make_inputs(T + H_kv, T, H, H_kv)
    return value_and_grads(dense_reference(reference_mask(mask, T, H)), (q, k, v), W)


# the recurrent form (a scan of decode steps through masks.head_pairwise) on a few cases: per-head, documents, grids
RECURRENT_CASES = ("per-head-gather", "document-causal", "s2-heads", "natten-3d-causal", "halo-2d", "span-summaries")
FORM_CASES = [(case, impl) for case in CASES for impl in IMPLS if impl != "recurrent" or case[0] in RECURRENT_CASES]


@pytest.mark.parametrize("case, impl", FORM_CASES, ids=[f"{c[0]}-{i}" for c, i in FORM_CASES])
def test_forward_and_gradients_match_reference(case, impl):
    """Every mask kind against the pair-by-pair reference; a query that sees no key outputs 0 and every gradient
    is finite (the blind query tile of block-sparse-blind)."""
    case_id, mask, T, H, H_kv, block = case
    q, k, v, W = make_inputs(T + H_kv, T, H, H_kv)
    got = value_and_grads(attention_op(mask, T, impl, block), (q, k, v), W)
    assert all(np.isfinite(g).all() for g in got[1])
    blind = np.broadcast_to(~reference_mask(mask, T, H).any(-1), (B, H, T))
    assert not got[0][blind.transpose(0, 2, 1)].any()
    assert_close(got, reference_result(case_id))


@pytest.mark.parametrize("impl", ["chunked", "pallas"])
def test_bf16_matches_float32_reference(impl):
    """bf16 inputs give bf16 outputs within BF16_TOL of the float32 reference on the rounded inputs (the parallel
    form computes in float32 like the chunked one)."""
    mask, T, H = M.Strided(33, causal=False) | M.Causal(window=8), 70, 4
    q, k, v, W = make_inputs(3, T, H, 2)
    bf16 = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)]
    op = attention_op(mask, T, impl, 16)
    assert jax.eval_shape(op, *bf16).dtype == jnp.bfloat16
    want = value_and_grads(dense_reference(reference_mask(mask, T, H)), [x.astype(jnp.float32) for x in bf16],
                           W)
    assert_close(value_and_grads(op, bf16, W), want, BF16_TOL)


# ---------------------------------------------------------------------------------------------------------------
# tile maps and visit lists
# ---------------------------------------------------------------------------------------------------------------

# (mask, exact): exact maps mark exactly the tiles holding a visible pair; the others (an And, a Document term,
# whose segment ids are not static) may mark more but never fewer.
TILE_MASKS = [
    (M.Causal(), True), (M.Causal(window=20), True), (M.Bidirectional(), True), (M.Bidirectional(window=9), True),
    (M.BlockDiagonal(16), True), (M.BlockDiagonal(24, causal=False), True), (M.Strided(33), True),
    (M.Strided(7, causal=False), True), (M.BlockSparse(BLIND_LAYOUT, 16, causal=True), True),
    (M.BlockSparse(BLIND_LAYOUT, 16), True), (M.Terraced(8), True), (M.Terraced(20), True),
    (M.Strided(6, causal=False) | M.Causal(window=4), True), (M.BlockSparse(BLIND_LAYOUT, 16) | M.Strided(9), True),
    (M.PerHead((M.Causal(4), M.Strided(13), M.BlockDiagonal(30), M.Terraced(5))), True),
    (M.Causal(window=20) & M.Strided(3), False), (M.BlockDiagonal(20) & M.Strided(7, causal=False), False),
    (M.Document(), False), (M.Causal() & M.Document(), False), (M.Terraced(8) | M.Document(), False),
    (M.Lagged(1), True), (M.Lagged(17), True), (M.VerticalStride(8, 2, 3, 1), True), (M.VerticalStride(12, 1, 2, 0, causal=False), True),
    (M.s2_heads(3, 10, 2, 4), True), (M.Neighborhood(kernel=5, dilation=3, grid=(70,)), True),
    (M.Neighborhood(kernel=(3, 3), dilation=(1, 2), causal=(True, False), grid=(7, 10)), True),
    (M.Neighborhood(kernel=4, stride=3, causal=True), True), (M.Halo(block=8, halo=3, causal=True), True),
    (M.Halo(block=(4, 3), halo=(1, 2), grid=(7, 10)), True), (M.CircularWindow(radius=2.5, grid=(7, 10)), True),
    (M.Neighborhood(kernel=(3, 3), grid=(7, 10)) & M.Document(), False),
    (M.SpanSummaries(9, 63), True), (M.SpanSummaries(9, 63, causal=False), True), (M.SpanSummaries(1, 35), True),
]


@pytest.mark.parametrize("mask,exact", TILE_MASKS, ids=[str(m) for m, _ in TILE_MASKS])
def test_tile_maps_and_visit_lists(mask, exact):
    """A tile is visited iff it holds a visible pair (for every batch element's segment ids, and every head of a
    PerHead mask), or at least then for inexact maps; visit lists are the map's rows (columns by key) in order, and
    is_span says whether they are one run."""
    H = len(mask.masks) if isinstance(mask, M.PerHead) else 1
    T, padded = 70, 96
    for block_q, block_k in ((16, 16), (16, 32), (32, 16)):
        tiles = [nonempty_tiles(vis, block_q, block_k, padded) for vis in reference_mask(mask, T, H).reshape(-1, T, T)]
        needed = np.any(tiles, axis=0)[: -(-T // block_q), : -(-T // block_k)]
        tile_map = mask.tile_map(T, block_q, block_k)
        assert tile_map.shape == needed.shape and tile_map.dtype == bool
        if exact:
            np.testing.assert_array_equal(tile_map, needed)
        else:
            assert not (needed & ~tile_map).any()
        rows = M.visit_lists(mask, T, block_q, block_k)
        assert rows == tuple(tuple(np.flatnonzero(r)) for r in tile_map)
        assert M.visit_lists(mask, T, block_q, block_k, by_key=True) == tuple(tuple(np.flatnonzero(c))
                                                                              for c in tile_map.T)
        for visits in rows:
            assert M.is_span(visits) == (visits == tuple(range(visits[0], visits[-1] + 1)) if visits else True)


GRID_MASKS = [(m, e) for m, e in TILE_MASKS if any(isinstance(x, M._GridMask) for x in M.leaves(m))]


@pytest.mark.parametrize("mask,exact", GRID_MASKS, ids=[str(m) for m, _ in GRID_MASKS])
def test_long_grid_tile_maps_never_miss_a_visible_pair(mask, exact, monkeypatch):
    """Above DENSE_TILE_MAP_LIMIT tokens a grid mask maps tiles from each query's key box: a superset."""
    monkeypatch.setattr(M, "DENSE_TILE_MAP_LIMIT", 0)
    T, padded = 70, 96
    needed = np.any([nonempty_tiles(vis, 16, 16, padded) for vis in reference_mask(mask, T, 1).reshape(-1, T, T)],
                    axis=0)[:5, :5]
    assert not (needed & ~mask.tile_map(T, 16, 16)).any()


def test_span_and_gathered_rows():
    """Causal-like masks give one contiguous span per query tile (the fast path), strided ones do not."""
    assert all(M.is_span(v) for v in M.visit_lists(M.Causal(window=40), 300, 16, 16))
    assert all(M.is_span(v) for v in M.visit_lists(M.BlockDiagonal(48), 300, 16, 16))
    assert not all(M.is_span(v) for v in M.visit_lists(M.Strided(48), 300, 16, 16))
    assert not M.is_span((0, 2)) and M.is_span(()) and M.is_span((3,))


# ---------------------------------------------------------------------------------------------------------------
# score_mod
# ---------------------------------------------------------------------------------------------------------------

SCORE_T, SCORE_H = 37, 4


def bias_mod(table):
    """A relative-position bias per head from table [H, 2T - 1]."""
    return lambda s, q_idx, k_idx, head: s + table[head, q_idx - k_idx + SCORE_T - 1]


def temperature_mod(temperatures):
    """Scores divided by a temperature per head, temperatures [H]."""
    return lambda s, q_idx, k_idx, head: s / temperatures[head]


def softcap_mod(_):
    return lambda s, q_idx, k_idx, head: 5.0 * jnp.tanh(s / 5.0)


SCORE_MODS = {"bias": (bias_mod, (SCORE_H, 2 * SCORE_T - 1)), "temperature": (temperature_mod, (SCORE_H,)),
              "softcap": (softcap_mod, (1,))}


SPAN, GATHER = M.Causal(window=20), M.Strided(33, causal=False) | M.Causal(window=4)  # the two kinds of rows


SCORE_CASES = {"bias": GATHER, "temperature": SPAN, "softcap": GATHER}


def score_problem(name: str):
    """The inputs (q scaled by 4, so that the softcap bends the scores), the score_mod's parameter and W."""
    q, k, v, W = make_inputs(5, SCORE_T, SCORE_H, 2, q_scale=4.0)
    param = (0.5 + np.random.default_rng(1).uniform(size=SCORE_MODS[name][1])).astype(np.float32)
    return (q, k, v, param), W


@functools.lru_cache(maxsize=None)
def score_reference(name: str):
    make_mod, visible = SCORE_MODS[name][0], reference_mask(SCORE_CASES[name], SCORE_T, SCORE_H)

    def reference(q, k, v, param):
        return dense_reference(visible, score_mod=make_mod(param))(q, k, v)

    return value_and_grads(reference, *score_problem(name))


@pytest.mark.parametrize("impl", ["chunked", "parallel", "recurrent"])
@pytest.mark.parametrize("name", list(SCORE_CASES))
def test_score_mod_matches_reference(name, impl):
    """Forward and gradients in q, k, v and in the array the score_mod closes over (bias table, temperatures)."""
    make_mod, mask = SCORE_MODS[name][0], SCORE_CASES[name]

    def op(q, k, v, param):
        return ops.softmax_attn(q, k, v, mask=mask, score_mod=make_mod(param), impl=impl, block_size=16)

    got, want = value_and_grads(op, *score_problem(name)), score_reference(name)
    if name == "softcap":  # the parameter is unused: its gradient is 0 on both sides
        got, want = (got[0], got[1][:3]), (want[0], want[1][:3])
    assert_close(got, want)


def test_score_mod_is_not_supported_by_the_kernels():
    q, k, v, _ = make_inputs(0, 20, 4, 2)
    with pytest.raises(ValueError, match="score_mod"):
        ops.softmax_attn(q, k, v, impl="pallas", score_mod=softcap_mod(None))


# ---------------------------------------------------------------------------------------------------------------
# the algebra and its errors
# ---------------------------------------------------------------------------------------------------------------


def test_operators_build_flat_hashable_compositions():
    a, b, c = M.Causal(4), M.Strided(3), M.Document()
    assert a & b & c == M.And(a, b, c) and a | b | c == M.Or(a, b, c)
    assert (a & b) | c == M.Or(M.And(a, b), c)
    assert len({a & b, M.And(a, b)}) == 1 and a & b != a | b
    assert M.PerHead((a, b)) & c == M.PerHead((a & c, b & c))
    assert c | M.PerHead((a, b)) == M.PerHead((c | a, c | b))
    assert M.PerHead((a, b)) & M.PerHead((b, a)) == M.PerHead((a & b, b & a))


@pytest.mark.parametrize("make,match", [
    (lambda: M.Terraced(0), "Terraced.window"),
    (lambda: M.SpanSummaries(0, 8), "SpanSummaries.span"),
    (lambda: M.SpanSummaries(4, 29).check(36), r"SpanSummaries: .* takes length 37 .*, got 36"),
    (lambda: M.And(), "And.masks"),
    (lambda: M.Or(M.Causal(), M.PerHead((M.Causal(),))), "Or.masks"),
    (lambda: M.PerHead((M.Causal(),)) & M.PerHead((M.Causal(), M.Strided(2))), "PerHead.masks"),
    (lambda: M.resolve("causal"), "mask"),
    (lambda: M.resolve(M.Causal(), causal=False), "mask"),
    (lambda: M.resolve(M.Causal(), window=4), "mask"),
])
def test_bad_masks(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("kwargs,match", [
    (dict(mask=M.Causal() & M.Document()), "segment_ids"),  # missing
    (dict(mask=M.Document(), segment_ids=np.zeros((B, 21), np.int32)), "segment_ids"),  # shape
    (dict(mask=M.Document(), segment_ids=np.zeros((B, 20), np.float32)), "segment_ids"),  # dtype
    (dict(mask=M.Strided(3), causal=False), "mask"),
    (dict(mask=M.PerHead((M.Causal(),) * 3)), "PerHead.masks"),
])
@pytest.mark.parametrize("impl", ["chunked", "pallas"])
def test_bad_arguments(kwargs, match, impl):
    q, k, v, _ = make_inputs(0, 20, 4, 2)
    with pytest.raises(ValueError, match=match):
        ops.softmax_attn(q, k, v, **{"impl": impl, **kwargs})


# ---------------------------------------------------------------------------------------------------------------
# lowering of the kernels' new inputs: BlockSparse flags in the visit tables, segment ids
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend,dtype", [("gpu", jnp.float32), ("tpu", jnp.bfloat16)], ids=["gpu", "tpu"])
def test_composed_and_document_masks_lower_for_gpu_and_tpu(backend, dtype):
    mask = M.PerHead(((M.BlockSparse(SPARSE_3, 16, causal=True) | M.Causal(window=5)) & M.Document(),
                      M.Strided(3) & M.Document()))
    q, k, v = (jnp.zeros((1, 40, heads, dim), dtype) for heads, dim in ((2, 16), (1, 16), (1, 24)))
    ids = jnp.zeros((1, 40), jnp.int32)

    def forward(q, k, v):
        return fa.flash_attention(q, k, v, mask=mask, segment_ids=ids, blocks=fa.FlashBlocks(16, 16, 16, 16),
                                  backend=backend)

    gradient = jax.grad(lambda q, k, v: jnp.sum(forward(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2))
    marker = "__gpu$xla.gpu.triton" if backend == "gpu" else "tpu_custom_call"
    for fn, kernels in ((forward, 1), (gradient, 3)):
        assert _common.lowered_text(fn, backend, q, k, v).count(marker) >= kernels


def all_spans(mask, T: int, block: int) -> bool:
    return all(M.is_span(visits) for visits in M.visit_lists(mask, T, block, block))


def test_cases_exercise_every_path():
    """Contiguous-span rows and gathered rows of the blockwise form, and blind queries, all occur above."""
    spans = {case_id: all_spans(mask, T, block) for case_id, mask, T, _, _, block in CASES}
    assert spans["per-head-span"] and spans["strided"] and spans["document-causal"]
    assert not (spans["block-sparse-blind"] or spans["or-strided-window"] or spans["or-block-sparse-diagonal"])
    assert all_spans(SPAN, SCORE_T, 16) and not all_spans(GATHER, SCORE_T, 16)
    assert not all_spans(M.Strided(33, causal=False) | M.Causal(window=8), 70, 16)  # the bf16 test's mask
    assert (~reference_mask(CASES[2][1], 70, 4).any(-1)).sum() == 4 * 16
    splits = {case_id: _splits_heads(mask, H, T, block) for case_id, mask, T, H, _, block in CASES}
    assert splits["per-head-split"] and not splits["per-head-span"]  # one call per head mask, or one for all


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mask", [M.s2_heads(4, 4, 2, 3), M.Neighborhood(kernel=(3, 3), causal=True, grid=(6, 6))],
                         ids=str)
def test_in_document_masks_each_document_as_if_alone(mask, impl):
    """InDocument(mask) with the documents' start positions as segment ids: a packed row's outputs and gradients
    equal each document's own (block, stripe and grid alignments restart at every document)."""
    lengths, H = (13, 1, 20, 3), 4
    T = sum(lengths)
    starts = np.repeat(np.cumsum((0,) + lengths[:-1]), lengths).astype(np.int32)
    q, k, v, W = make_inputs(7, T, H, 2)
    packed = attention_op(M.in_document(mask), T, impl, 16, segment_ids=np.stack([starts] * B))
    got = value_and_grads(packed, (q, k, v), W)

    def alone(q, k, v):
        bounds = np.cumsum((0,) + lengths)
        return jnp.concatenate([ops.softmax_attn(q[:, a:b], k[:, a:b], v[:, a:b], mask=mask, impl="parallel")
                                for a, b in zip(bounds[:-1], bounds[1:])], axis=1)

    assert_close(got, value_and_grads(alone, (q, k, v), W))
