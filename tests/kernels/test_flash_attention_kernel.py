"""pallas_kernels.flash_attention in interpret mode (CPU): outputs and gradients against the XLA chunked path
(``seqlab.ops.softmax_attn(impl="chunked")``) for causal / bidirectional masks, and against a dense masked softmax
whose mask is built pair by pair from each mask's definition (``test_masks.reference_mask``, no code shared with
the kernels) for the block-diagonal, strided, block-sparse and per-head masks (every other mask kind and
composition: tests/test_masks.py); a runtime ``BlockIndex`` (random selections with repeats, unused entries and
tiles above the diagonal, different per batch row) against a dense reference built pair by pair and against the
chunked path; the static and runtime visit tables; lowering for GPU (Triton) and TPU (Mosaic); argument errors.

Tolerances (relative error ||a - b|| / ||b|| over the whole tensor): 1e-5 for float32 outputs and gradients (both
sides are float32 with full-precision matmuls, summing at most 80 keys in different orders); bf16 see BF16_TOL.
"""

from __future__ import annotations

import base64
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels import _common
from pallas_kernels import flash_attention as fa
from reference import attention_inputs as make_inputs
from reference import attention_value_and_grads as value_and_grads
from reference import dense_reference, nonempty_tiles, reference_mask, rel_err, selection_mask
from seqlab import ops
from seqlab.core.masks import BlockIndex, SpanSummaries

TOL = 1e-5


def flash(mask, blocks, scale=None):
    return lambda q, k, v: fa.flash_attention(q, k, v, mask=mask, scale=scale, blocks=blocks, backend="cpu")


def assert_close(got, want, tol=TOL):
    (o, grads), (o_ref, grads_ref) = got, want
    errors = {name: rel_err(a, b) for name, a, b in zip(("o", "dq", "dk", "dv"), [o, *grads], [o_ref, *grads_ref])}
    assert all(e <= tol for e in errors.values()), f"relative errors above {tol}: {errors}"


# ---------------------------------------------------------------------------------------------------------------
# against the XLA chunked path
# ---------------------------------------------------------------------------------------------------------------

# (mask, softmax_attn mask arguments, T, H, H_kv, blocks, scale)
XLA_CASES = [
    (fa.Causal(), dict(causal=True), 37, 4, 2, fa.FlashBlocks(16, 32, 32, 16), None),
    (fa.Causal(window=7), dict(causal=True, window=7), 70, 4, 1, fa.FlashBlocks(32, 16, 16, 32), None),
    (fa.Bidirectional(), dict(causal=False), 70, 4, 4, fa.FlashBlocks(16, 16, 32, 32), 0.3),
    (fa.Bidirectional(window=9), dict(causal=False, window=9), 37, 4, 2, fa.FlashBlocks(32, 32, 16, 16), None),
]


@pytest.mark.parametrize("mask,xla_mask,T,H,H_kv,blocks,scale", XLA_CASES,
                         ids=[f"{c[0]}-T{c[2]}-kv{c[4]}" for c in XLA_CASES])
def test_matches_xla_chunked_path(mask, xla_mask, T, H, H_kv, blocks, scale):
    q, k, v, W = make_inputs(T, T=T, H=H, H_kv=H_kv)
    got = value_and_grads(flash(mask, blocks, scale), q, k, v, W)

    def chunked(q, k, v):
        return ops.softmax_attn(q, k, v, scale=scale, impl="chunked", block_size=16, **xla_mask)

    assert_close(got, value_and_grads(chunked, q, k, v, W))


# ---------------------------------------------------------------------------------------------------------------
# against the dense reference
# ---------------------------------------------------------------------------------------------------------------

# (mask, T, H, H_kv, blocks)
DENSE_CASES = [
    (fa.BlockDiagonal(16), 37, 4, 2, fa.FlashBlocks(16, 32, 32, 16)),
    (fa.Strided(5), 37, 4, 1, fa.FlashBlocks(16, 16, 32, 32)),
    (fa.PerHead((fa.Causal(window=8), fa.Strided(8), fa.BlockDiagonal(12, causal=False), fa.Bidirectional())),
     70, 4, 2, fa.FlashBlocks(16, 32, 32, 16)),
    (fa.PerHead((fa.BlockDiagonal(20), fa.Strided(4, causal=False))), 70, 2, 1, fa.FlashBlocks(32, 32, 16, 16)),
    (SpanSummaries(4, 29), 37, 4, 2, fa.FlashBlocks(16, 16, 16, 16)),  # Combiner: 29 tokens, then 8 summaries
]


@pytest.mark.parametrize("mask,T,H,H_kv,blocks", DENSE_CASES, ids=[f"{c[0]}-T{c[1]}-kv{c[3]}" for c in DENSE_CASES])
def test_matches_dense_reference(mask, T, H, H_kv, blocks):
    q, k, v, W = make_inputs(T + H, T=T, H=H, H_kv=H_kv, D=32, V=8)
    got = value_and_grads(flash(mask, blocks), q, k, v, W)
    assert_close(got, value_and_grads(dense_reference(reference_mask(mask, T, H)), q, k, v, W))


SPARSE_LAYOUT = (
    (True, False, False, False, False),
    (False, False, False, False, False),  # query tile 1 sees nothing
    (True, True, True, False, False),  # the diagonal tile is cut by causality
    (False, True, False, True, False),
    (True, False, False, True, False),  # no query sees key tile 4
)


def test_block_sparse_matches_dense_reference_and_never_reads_unvisited_tiles():
    """A causal BlockSparse layout of 16-token tiles (the kernel tiles, given as 32 and 16, are clamped to 16),
    whose last key tile no query sees and whose second query tile sees nothing: NaN keys and values in the dead
    key tile reach no output or gradient (a kernel that visited the tile would multiply them by 0 and produce
    NaN); the blind queries output 0; everything equals the dense reference."""
    T, block = 70, 16
    mask = fa.BlockSparse(SPARSE_LAYOUT, block, causal=True)
    q, k, v, W = make_inputs(7, T=T, H=4, H_kv=2)
    dead = slice(4 * block, T)
    k_nan, v_nan = k.copy(), v.copy()
    k_nan[:, dead], v_nan[:, dead] = np.nan, np.nan
    o, grads = value_and_grads(flash(mask, fa.FlashBlocks(32, 16, 16, 32)), q, k_nan, v_nan, W)
    assert np.isfinite(o).all() and all(np.isfinite(g).all() for g in grads)
    assert not o[:, block : 2 * block].any()
    assert not grads[1][:, dead].any() and not grads[2][:, dead].any()
    assert_close((o, grads), value_and_grads(dense_reference(reference_mask(mask, T, 4)), q, k, v, W))


# bf16 inputs against the float32 dense reference on the same (bf16-rounded) inputs. The bf16 path rounds the
# probabilities before the PV matmul, dS before the dQ / dK matmuls and the output and gradients themselves, each a
# relative error up to u = 2^-9 ~ 2e-3 (T = 70 keys, errors averaging out); 1e-2 (~5u) bounds them.
BF16_TOL = 1e-2


def test_bf16_matches_float32():
    mask, T, H = fa.Causal(window=40), 70, 4
    q, k, v, W = make_inputs(3, T=T, H=H, H_kv=2, D=32, V=16)
    bf16 = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)]
    attention = flash(mask, fa.FlashBlocks(32, 16, 16, 32))
    assert jax.eval_shape(attention, *bf16).dtype == jnp.bfloat16
    float32 = [x.astype(jnp.float32) for x in bf16]
    assert_close(value_and_grads(attention, *bf16, W),
                 value_and_grads(dense_reference(reference_mask(mask, T, H)), *float32, W), BF16_TOL)


# ---------------------------------------------------------------------------------------------------------------
# property test over shapes and masks
# ---------------------------------------------------------------------------------------------------------------


def element_masks(T: int):
    window = st.one_of(st.none(), st.integers(1, T))
    return st.one_of(
        st.builds(fa.Causal, window), st.builds(fa.Bidirectional, window),
        st.builds(fa.BlockDiagonal, st.integers(1, T), st.booleans()),
        st.builds(fa.Strided, st.integers(1, 12), st.booleans()),
    )


@st.composite
def problems(draw):
    T = draw(st.integers(17, 80))
    H, H_kv = draw(st.sampled_from([(2, 1), (2, 2), (4, 2), (4, 1)]))
    mask = draw(st.one_of(element_masks(T), st.lists(element_masks(T), min_size=H, max_size=H).map(
        lambda masks: fa.PerHead(tuple(masks)))))
    sizes = [draw(st.sampled_from([16, 32])) for _ in range(4)]
    shape = dict(T=T, H=H, H_kv=H_kv, D=draw(st.sampled_from([8, 16, 32])), V=draw(st.sampled_from([8, 24])))
    return mask, fa.FlashBlocks(*sizes), shape, draw(st.integers(0, 2**16))


@settings(max_examples=5, deadline=None, derandomize=True)
@given(problems())
def test_property_forward_matches_dense_reference(problem):
    """Forward only (the gradients are covered above; each example compiles its kernels afresh)."""
    mask, blocks, shape, seed = problem
    q, k, v, _ = make_inputs(seed, B=1, **shape)
    o = jax.jit(flash(mask, blocks))(q, k, v)
    assert rel_err(o, dense_reference(reference_mask(mask, shape["T"], shape["H"]))(q, k, v)) <= TOL


# ---------------------------------------------------------------------------------------------------------------
# visit tables: only non-empty tiles
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask", [
    fa.Causal(), fa.Causal(window=20), fa.Bidirectional(window=9), fa.BlockDiagonal(16), fa.BlockDiagonal(24, False),
    fa.Strided(33), fa.Strided(7, causal=False),
    fa.BlockSparse(tuple(tuple((i * 5 + j * 3) % 4 == 0 for j in range(5)) for i in range(5)), 16, causal=True),
], ids=str)
@pytest.mark.parametrize("block_q,block_k", [(16, 32), (32, 16)])
def test_visit_tables_list_exactly_the_nonempty_tiles(mask, block_q, block_k):
    """Forward (query tile -> key tiles) and transposed (key tile -> query tiles) tables of T = 70 padded to 96:
    the count of each tile is its number of non-empty partner tiles, the listed tiles are those in order, and
    tiles in the padding have none."""
    T, padded = 70, 96
    expected = nonempty_tiles(reference_mask(mask, T, 1)[0, 0], block_q, block_k, padded)
    for by_key, tiles in ((False, expected), (True, expected.T)):
        blocks = (block_k, block_q) if by_key else (block_q, block_k)
        table = fa._visit_table((mask,), T, padded, *blocks, by_key=by_key)
        counts = table.counts[: tiles.shape[0]]
        np.testing.assert_array_equal(counts, tiles.sum(1))
        for row, listed in enumerate(table.tiles[: tiles.shape[0] * table.width].reshape(-1, table.width)):
            np.testing.assert_array_equal(listed[: counts[row]], np.flatnonzero(tiles[row]))


# ---------------------------------------------------------------------------------------------------------------
# runtime block index
# ---------------------------------------------------------------------------------------------------------------


def random_tiles(seed: int, T: int, block: int, S: int, H_kv: int = 2) -> np.ndarray:
    """[2, H_kv, nq, S] int32 from [-1, nq + 1): unused entries (-1, nq, nq + 1), tiles on both sides of the
    diagonal, the last entry of a row repeating its first, different per batch row; row (0, 0, 1) selects only
    tiles after itself (under a causal mask its queries see nothing)."""
    n = -(-T // block)
    tiles = np.random.default_rng(seed).integers(-1, n + 1, (2, H_kv, n, S)).astype(np.int32)
    tiles[..., -1] = tiles[..., 0]
    tiles[0, 0, 1] = np.minimum(np.arange(S) + 2, n)
    return tiles


def selected_pairs(tiles: np.ndarray, T: int, H: int, block: int, causal: bool) -> np.ndarray:
    """[B, H, T, T] bool: key s is visible to query t iff the static mask shows it (s <= t when causal) and the
    block index selects it (reference.selection_mask)."""
    static = np.tril(np.ones((T, T), bool)) if causal else np.ones((T, T), bool)
    return selection_mask(tiles, T, H, block) & static


def flash_selected(mask, index: BlockIndex):
    return lambda q, k, v: fa.flash_attention(q, k, v, mask=mask, block_index=index, backend="cpu")


# (mask, T, block, S): T = 80 fills five 16-token tiles; 100 leaves a partial last tile
SELECTED_CASES = [
    (fa.Causal(), 80, 16, 3),
    (fa.Causal(), 100, 32, 2),
    (fa.Bidirectional(), 100, 16, 4),
    (fa.Bidirectional(), 80, 16, 1),
]


@pytest.mark.parametrize("mask,T,block,S", SELECTED_CASES, ids=[f"{c[0]}-T{c[1]}-b{c[2]}-S{c[3]}" for c in
                                                                 SELECTED_CASES])
def test_block_index_matches_pairwise_reference_and_chunked_path(mask, T, block, S):
    """Forward, dq, dk, dv against the dense reference of the pairs and against impl="chunked" with the same
    index; under the causal mask the queries of row (0, 0, 1) see nothing: output 0, no gradient."""
    q, k, v, W = make_inputs(T + S, T=T, H=4, H_kv=2)
    tiles = random_tiles(T * S + block, T, block, S)
    index = BlockIndex.of(jnp.asarray(tiles), block, -(-T // block))
    got = value_and_grads(flash_selected(mask, index), q, k, v, W)
    visible = selected_pairs(tiles, T, 4, block, isinstance(mask, fa.Causal))
    assert_close(got, value_and_grads(dense_reference(visible), q, k, v, W))

    def chunked(q, k, v):
        return ops.softmax_attn(q, k, v, mask=mask, impl="chunked", block_index=index)

    assert_close(got, value_and_grads(chunked, q, k, v, W))
    if isinstance(mask, fa.Causal):
        blind = (0, slice(block, 2 * block), slice(0, 2))  # batch row 0, query tile 1, the query heads of kv head 0
        assert not visible[0, :2, block : 2 * block].any()
        assert not got[0][blind].any() and not got[1][0][blind].any()


def test_block_index_bf16_matches_float32():
    T, block, S = 80, 16, 3
    q, k, v, W = make_inputs(5, T=T, H=4, H_kv=2, D=32, V=16)
    tiles = random_tiles(6, T, block, S)
    index = BlockIndex.of(jnp.asarray(tiles), block, T // block)
    bf16 = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)]
    float32 = [x.astype(jnp.float32) for x in bf16]
    reference = dense_reference(selected_pairs(tiles, T, 4, block, causal=True))
    assert_close(value_and_grads(flash_selected(fa.Causal(), index), *bf16, W),
                 value_and_grads(reference, *float32, W), BF16_TOL)


@pytest.mark.parametrize("mask", [fa.Causal(), fa.Bidirectional()], ids=str)
def test_runtime_tables_list_the_selected_tiles_the_mask_keeps(mask):
    """Per (batch row, kv head) row: each query tile lists its selected tiles that the tile map keeps (for the
    causal mask none after the diagonal), ascending and once; the by-key table lists, per key tile, the query tiles
    that list it."""
    T, block, S, n = 100, 16, 4, 7
    tiles = random_tiles(8, T, block, S)
    q, kv = jnp.zeros((2, T, 4, 16)), jnp.zeros((2, T, 2, 16))
    index = BlockIndex.of(jnp.asarray(tiles), block, n)
    plan = fa._make_plan(q, kv, kv, mask, None, fa.FlashBlocks(), "cpu", index)
    by_query, by_key = (fa._selected_table(plan, index.tiles, by_key) for by_key in (False, True))
    causal = isinstance(mask, fa.Causal)
    for b in range(2):
        for h in range(2):
            want = [sorted({int(j) for j in tiles[b, h, i] if 0 <= j < n and (j <= i or not causal)})
                    for i in range(n)]
            want_by_key = [[i for i in range(n) if j in want[i]] for j in range(n)]
            for table, rows in ((by_query, want), (by_key, want_by_key)):
                for i, listed in enumerate(rows):
                    entry = plan.table_row(b, h * plan.group) * n + i
                    assert int(table.counts[entry]) == len(listed)
                    np.testing.assert_array_equal(table.tiles[entry * table.width :][: len(listed)], listed)


# ---------------------------------------------------------------------------------------------------------------
# lowering
# ---------------------------------------------------------------------------------------------------------------

LOWERING_MASK = fa.PerHead((  # every element mask, over 6 heads in 2 groups of 3 (not a power of two)
    fa.Causal(window=8), fa.Strided(8), fa.BlockDiagonal(16, causal=False), fa.Bidirectional(), fa.Bidirectional(5),
    fa.BlockSparse(((True, False, False), (True, True, False), (False, True, True)), 16, causal=True),
))


def mosaic_bodies(text: str) -> list[bytes]:
    """The serialised Mosaic modules of the TPU custom calls in lowered StableHLO text."""
    return [base64.b64decode(b) for b in re.findall(r'\\22body\\22: \\22([A-Za-z0-9+/=]+)\\22', text)]


@pytest.mark.parametrize("selected", [False, True], ids=["static", "block-index"])
@pytest.mark.parametrize("backend,dtype", [("gpu", jnp.float32), ("tpu", jnp.bfloat16)], ids=["gpu", "tpu"])
def test_lowers_for_gpu_and_tpu(backend, dtype, selected):
    """Forward and gradient lower through Triton (GPU) and Mosaic (TPU), with static or runtime (BlockIndex)
    visit tables; on TPU every kernel keeps its visit tables in SMEM."""
    q, k, v = (jnp.zeros((1, 40, heads, dim), dtype) for heads, dim in ((6, 16), (2, 16), (2, 24)))
    index = BlockIndex.of(jnp.asarray(random_tiles(0, 40, 16, 2)[:1]), 16, 3) if selected else None

    def forward(q, k, v):
        return fa.flash_attention(q, k, v, mask=LOWERING_MASK, blocks=fa.FlashBlocks(16, 16, 16, 16), backend=backend,
                                  block_index=index)

    gradient = jax.grad(lambda q, k, v: jnp.sum(forward(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2))
    for fn, kernels in ((forward, 1), (gradient, 3)):
        text = _common.lowered_text(fn, backend, q, k, v)
        if backend == "gpu":
            assert text.count("__gpu$xla.gpu.triton") >= kernels
        else:
            bodies = mosaic_bodies(text)
            assert len(bodies) == kernels
            assert all(b"#tpu.memory_space<smem>" in body for body in bodies)


# ---------------------------------------------------------------------------------------------------------------
# argument errors
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make,match", [
    (lambda: fa.Causal(window=0), "window"),
    (lambda: fa.Bidirectional(window=-3), "window"),
    (lambda: fa.BlockDiagonal(0), "size"),
    (lambda: fa.Strided(-1), "stride"),
    (lambda: fa.BlockSparse(((True,),), 0), "block"),
    (lambda: fa.BlockSparse(((True, False), (True,)), 16), "layout"),
    (lambda: fa.PerHead(()), "masks"),
    (lambda: fa.PerHead((fa.PerHead((fa.Causal(),)),)), "masks"),
    (lambda: fa.FlashBlocks(block_q=24), "block_q"),
    (lambda: fa.FlashBlocks(block_k_bwd=8), "block_k_bwd"),
    (lambda: fa.FlashBlocks(num_warps=0), "num_warps"),
])
def test_bad_masks_and_blocks(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_masks_are_hashable():
    layout = [[True, False], [True, True]]
    assert hash(fa.BlockSparse(layout, 16)) == hash(fa.BlockSparse(tuple(map(tuple, layout)), 16))
    assert len({fa.PerHead((fa.Causal(4), fa.Strided(4))), fa.PerHead([fa.Causal(4), fa.Strided(4)])}) == 1


@pytest.mark.parametrize("shapes,kwargs,match", [
    (((1, 20, 4), (1, 20, 2, 16), (1, 20, 2, 8)), {}, "q must"),
    (((1, 20, 4, 16), (1, 21, 2, 16), (1, 20, 2, 8)), {}, "k must"),
    (((1, 20, 4, 16), (1, 20, 2, 8), (1, 20, 2, 8)), {}, "k must"),
    (((1, 20, 4, 16), (1, 20, 2, 16), (1, 20, 1, 8)), {}, "v must"),
    (((1, 20, 4, 16), (1, 20, 3, 16), (1, 20, 3, 8)), {}, "kv heads"),
    (((1, 20, 4, 16), (1, 20, 2, 16), (1, 20, 2, 8)), {"mask": "causal"}, "mask"),
    (((1, 20, 4, 16), (1, 20, 2, 16), (1, 20, 2, 8)), {"mask": fa.PerHead((fa.Causal(),) * 3)}, "PerHead.masks"),
    (((1, 20, 4, 16), (1, 20, 2, 16), (1, 20, 2, 8)), {"mask": fa.BlockSparse(((True,),), 16)}, "layout"),
    (((1, 20, 4, 16), (1, 20, 2, 16), (1, 20, 2, 8)), {"mask": fa.BlockSparse(((True,) * 3,) * 3, 8)}, "mask"),
    (((1, 20, 4, 16), (1, 20, 2, 16), (1, 20, 2, 8)), {"backend": "metal"}, "backend"),
    (((1, 20, 4, 16), (1, 20, 2, 16), (1, 20, 2, 8)), {"scale": "big"}, "scale"),
    (((1, 20, 4, 16), (1, 20, 2, 16), (1, 20, 2, 8)), {"blocks": (16, 16)}, "blocks"),
])
def test_bad_arguments(shapes, kwargs, match):
    q, k, v = (jnp.zeros(s) for s in shapes)
    kwargs = {"mask": fa.Causal(), **kwargs}
    with pytest.raises(ValueError, match=match):
        fa.flash_attention(q, k, v, **kwargs)


def zero_index(block: int, rows: int, kv_heads: int = 2) -> BlockIndex:
    return BlockIndex.of(jnp.zeros((1, kv_heads, rows, 2), jnp.int32), block, rows)


@pytest.mark.parametrize("kwargs,match", [
    ({"block_index": zero_index(8, 3)}, "block_index: block must be a power of two >= 16"),
    ({"block_index": zero_index(24, 1)}, "block_index: block must be a power of two >= 16"),
    ({"block_index": zero_index(16, 3, kv_heads=1)}, r"block_index: tiles must be \[1, 2, 2, S\]"),
    ({"block_index": zero_index(32, 1), "mask": fa.BlockSparse(((True, False), (True, True)), 16)},
     "block_index: block 32 straddles"),
    ({"block_index": np.zeros((1, 2, 2, 2), np.int32)}, "block_index must be a seqlab.core.masks.BlockIndex"),
    ({"block_index": zero_index(16, 2), "score_mod": lambda s, *_: s}, "score_mod"),
])
def test_bad_block_index(kwargs, match):
    q, k, v = jnp.zeros((1, 20, 4, 16)), jnp.zeros((1, 20, 2, 16)), jnp.zeros((1, 20, 2, 8))
    with pytest.raises(ValueError, match=match):
        fa.flash_attention(q, k, v, **{"mask": fa.Causal(), "backend": "cpu", **kwargs})


@pytest.mark.parametrize("causal, window", [(True, None), (False, 24)])
def test_softmax_attn_dispatch(causal, window):
    """ops.softmax_attn(impl="pallas") runs the kernels and equals impl="chunked", forward and backward; impl="auto"
    (the default) runs the XLA chunked path on this CPU."""
    q, k, v, W = make_inputs(11, T=40)

    def op(impl):
        return lambda q, k, v: ops.softmax_attn(q, k, v, causal=causal, window=window, impl=impl, block_size=16)

    assert_close(value_and_grads(op("pallas"), q, k, v, W), value_and_grads(op("chunked"), q, k, v, W))
    assert "pallas_call" in str(jax.make_jaxpr(op("pallas"))(q, k, v))
    assert "pallas_call" not in str(jax.make_jaxpr(op("auto"))(q, k, v))
    with pytest.raises(ValueError, match="block_size must be None or a power of two"):
        ops.softmax_attn(q, k, v, impl="pallas", block_size=24)
