"""pallas_kernels.flash_attention in interpret mode (CPU): outputs and gradients against the XLA chunked path
(``seqlab.ops.softmax_attn(impl="chunked")``) for causal / bidirectional masks, and against a dense masked softmax
whose mask is built pair by pair from each mask's definition (``test_masks.reference_mask``, no code shared with
the kernels) for the block-diagonal, strided, block-sparse and per-head masks (every other mask kind and
composition: tests/test_masks.py); the visit tables; lowering for GPU (Triton) and TPU
(Mosaic); argument errors.

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
from reference import dense_reference, nonempty_tiles, reference_mask, rel_err
from seqlab import ops
from seqlab.core.masks import SpanSummaries

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
# lowering
# ---------------------------------------------------------------------------------------------------------------

LOWERING_MASK = fa.PerHead((  # every element mask, over 6 heads in 2 groups of 3 (not a power of two)
    fa.Causal(window=8), fa.Strided(8), fa.BlockDiagonal(16, causal=False), fa.Bidirectional(), fa.Bidirectional(5),
    fa.BlockSparse(((True, False, False), (True, True, False), (False, True, True)), 16, causal=True),
))


def mosaic_bodies(text: str) -> list[bytes]:
    """The serialised Mosaic modules of the TPU custom calls in lowered StableHLO text."""
    return [base64.b64decode(b) for b in re.findall(r'\\22body\\22: \\22([A-Za-z0-9+/=]+)\\22', text)]


@pytest.mark.parametrize("backend,dtype", [("gpu", jnp.float32), ("tpu", jnp.bfloat16)], ids=["gpu", "tpu"])
def test_lowers_for_gpu_and_tpu(backend, dtype):
    """Forward and gradient lower through Triton (GPU) and Mosaic (TPU); on TPU every kernel keeps its visit
    tables in SMEM."""
    q, k, v = (jnp.zeros((1, 40, heads, dim), dtype) for heads, dim in ((6, 16), (2, 16), (2, 24)))

    def forward(q, k, v):
        return fa.flash_attention(q, k, v, mask=LOWERING_MASK, blocks=fa.FlashBlocks(16, 16, 16, 16), backend=backend)

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
