"""Correctness tests for seqlab.ops.softmax_attn and seqlab.ops.softmax_decode_step.

Ground truth: tests/reference.py -- a per-query float64 loop for values and a
dense masked float32 softmax for gradients (no code shared with seqlab).

Tolerances (relative error ||a - b|| / ||b|| over the whole tensor):
forward 1e-5 for float32 inputs, gradients 1e-4 (float32 vs float32 with
different summation orders).
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference as ref
from reference import rel_err
from seqlab import ops
from seqlab.core import masks, online_softmax
from seqlab.ops.softmax_attn import DEFAULT_BLOCK_SIZE, MIN_WINDOW_BLOCK_SIZE, default_block_size

FWD_TOL = 1e-5
GRAD_TOL = 1e-4
IMPLS = ("chunked", "parallel", "recurrent")


def make_qkv(rng, *, B=2, T=50, H=4, H_kv=2, K=16, V=24, q_scale=1.0):
    n = lambda *s: rng.standard_normal(s).astype(np.float32)
    q = (q_scale * n(B, T, H, K)).astype(np.float32)
    return q, n(B, T, H_kv, K), n(B, T, H_kv, V)


@functools.lru_cache(maxsize=None)
def dense_ref_grads(causal, window, scale):
    """Jitted grads of <W, o> for the dense reference; cached per mask/scale so
    equal shapes reuse the compilation."""

    def loss(q, k, v, W):
        o = ref.jnp_softmax_attn(q, k, v, scale=scale, causal=causal, window=window)
        return jnp.sum(o * W)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def op_value_and_grads(q, k, v, W, **kw):
    def loss(q, k, v):
        o = ops.softmax_attn(q, k, v, **kw)
        return jnp.sum(o.astype(jnp.float32) * W), o

    (_, o), g = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return np.asarray(o), [np.asarray(x) for x in g]


# ---------------------------------------------------------------------------
# the references themselves
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("causal,window", [(True, None), (True, 5), (False, None), (False, 3)])
def test_reference_dense_matches_loop_and_finite_differences(causal, window, rng):
    q, k, v = make_qkv(rng, B=1, T=12, H=4, H_kv=2, K=4, V=3)
    o_np = ref.np_softmax_attn(q, k, v, causal=causal, window=window)
    o_j = ref.jnp_softmax_attn(q, k, v, causal=causal, window=window)
    assert rel_err(o_j, o_np) <= FWD_TOL

    # a query that sees exactly one key returns that key's value
    if causal:
        np.testing.assert_allclose(o_np[:, 0, 0], v[:, 0, 0], rtol=1e-12)

    W = rng.standard_normal(o_np.shape).astype(np.float32)
    g = dense_ref_grads(causal, window, None)(q, k, v, W)
    d = [rng.standard_normal(x.shape) for x in (q, k, v)]

    def L(eps):
        qq, kk, vv = (x.astype(np.float64) + eps * dx for x, dx in zip((q, k, v), d))
        return np.sum(ref.np_softmax_attn(qq, kk, vv, causal=causal, window=window) * W)

    h = 1e-5
    fd = (L(h) - L(-h)) / (2 * h)
    an = sum(np.sum(np.asarray(gx, np.float64) * dx) for gx, dx in zip(g, d))
    assert abs(fd - an) <= 1e-4 * abs(fd), (fd, an)


# ---------------------------------------------------------------------------
# forward + gradients
# ---------------------------------------------------------------------------

# (T, H, H_kv, causal, window, block_size, scale); K=16, V=24 throughout.
CONFIGS = (
    (50, 4, 4, True, None, 16, None),  # MHA, causal
    (100, 4, 2, True, 7, 32, None),  # GQA 2, sliding window
    (100, 4, 1, True, 64, 16, 0.3),  # MQA, window 64 spans several blocks
    (50, 4, 2, True, 1, 32, None),  # window 1: each query sees only itself
    (50, 2, 2, True, 1000, 64, None),  # window > T == plain causal; T < block
    (100, 4, 1, False, None, 32, None),  # non-causal, MQA
    (50, 4, 2, False, 7, 16, None),  # non-causal window: |t - s| < 7
    (100, 2, 2, False, 64, 64, 0.3),
    (50, 2, 1, False, 1, 16, None),
    (100, 4, 2, True, None, None, None),  # default block size
)


def config_id(c):
    T, H, H_kv, causal, window, bs, scale = c
    return f"T{T}-H{H}kv{H_kv}-{'causal' if causal else 'full'}-w{window}-bs{bs}-s{scale}"


def grad_err(a, b, g_v):
    """rel_err, except where the true gradient is identically zero (window=1:
    every query sees only its own key, so the softmax weight is constant 1 and
    dL/dq = dL/dk = 0); then ||a|| is measured against the scale of dL/dv."""
    if not np.any(b):
        return float(np.linalg.norm(a.ravel()) / np.linalg.norm(g_v.ravel()))
    return rel_err(a, b)


# The recurrent impl with causal=False is checked forward in test_recurrent_non_causal.
MATRIX = [(impl, c) for impl in IMPLS for c in CONFIGS if impl != "recurrent" or c[3]]


@pytest.mark.parametrize("impl,config", MATRIX, ids=[f"{i}-{config_id(c)}" for i, c in MATRIX])
def test_forward_and_grads(impl, config, rng):
    check_forward_and_grads(impl, config, rng)


@pytest.mark.parametrize("config", [c for c in CONFIGS if not c[3]][:2], ids=config_id)
def test_recurrent_non_causal(config, rng):
    """The recurrent form is a scan of decode steps, each query against every key its mask shows: a non-causal
    mask's queries see the later keys too, and the result is the dense reference's."""
    T, H, H_kv, causal, window, block_size, scale = config
    q, k, v = make_qkv(rng, B=2, T=T, H=H, H_kv=H_kv, K=16, V=24)
    o = ops.softmax_attn(q, k, v, causal=False, window=window, impl="recurrent")
    assert rel_err(o, ref.np_softmax_attn(q, k, v, causal=False, window=window)) <= FWD_TOL


def check_forward_and_grads(impl, config, rng):
    T, H, H_kv, causal, window, block_size, scale = config
    q, k, v = make_qkv(rng, B=2, T=T, H=H, H_kv=H_kv, K=16, V=24)
    W = rng.standard_normal((2, T, H, 24)).astype(np.float32)
    kw = dict(scale=scale, causal=causal, window=window, impl=impl)
    if impl == "chunked" and block_size is not None:
        kw["block_size"] = block_size
    o, g = op_value_and_grads(q, k, v, W, **kw)

    assert o.shape == (2, T, H, 24)
    o_ref = ref.np_softmax_attn(q, k, v, scale=scale, causal=causal, window=window)
    e = rel_err(o, o_ref)
    assert e <= FWD_TOL, f"output rel err {e:.3g}"

    g_ref = [np.asarray(x) for x in dense_ref_grads(causal, window, scale)(q, k, v, W)]
    errs = {n: grad_err(a, b, g_ref[2]) for n, a, b in zip("qkv", g, g_ref)}
    bad = {n: x for n, x in errs.items() if not x <= GRAD_TOL}
    assert not bad, f"gradient rel errs above {GRAD_TOL}: {bad} (all: {errs})"


def test_defaults(rng):
    """scale = K**-0.5, causal=True, window=None, impl='chunked', default block size."""
    q, k, v = make_qkv(rng, B=1, T=100, H=4, H_kv=2, K=16, V=24)
    o = jax.jit(ops.softmax_attn)(q, k, v)
    assert not isinstance(o, tuple)
    assert rel_err(o, ref.np_softmax_attn(q, k, v)) <= FWD_TOL


# More blocks than MAX_ROW_CLASSES distinct row widths: widths are rounded up into classes and rows read
# front-padded key windows.
MANY_BLOCKS = (
    (300, 2, 1, True, None, 16, None),  # 19 causal rows of widths 1..19 in 8 classes
    (300, 2, 2, True, 40, 8, None),  # sliding window over 38 blocks
    (300, 4, 2, False, 40, 16, None),  # non-causal window: spans clipped at both ends
    (300, 2, 1, False, None, 32, 0.3),  # non-causal: every row reads every block
)


@pytest.mark.parametrize("config", MANY_BLOCKS, ids=config_id)
def test_chunked_many_blocks(config, rng):
    check_forward_and_grads("chunked", config, rng)


def test_chunked_second_order_gradient_matches_parallel(rng):
    """The chunked form's flash-attention VJP is itself differentiable (grad of a function of the gradient)."""
    q, k, v = make_qkv(rng, B=1, T=40, H=4, H_kv=2, K=8, V=8)

    def grad_norm(impl, **kw):
        loss = lambda q, k, v: jnp.sum(jnp.sin(ops.softmax_attn(q, k, v, impl=impl, window=24, **kw)))  # noqa: E731
        return jax.jit(jax.grad(lambda *a: sum(jnp.sum(g * g) for g in jax.grad(loss, argnums=(0, 1, 2))(*a)),
                                argnums=(0, 1, 2)))(q, k, v)

    for got, want in zip(grad_norm("chunked", block_size=16), grad_norm("parallel")):
        assert rel_err(got, want) <= GRAD_TOL


def _visible_pairs(T, causal, window):
    t, s = np.arange(T)[:, None], np.arange(T)[None]
    ok = s <= t if causal else np.ones((T, T), bool)
    if window is not None:
        ok &= (t - s < window) if causal else (np.abs(t - s) < window)
    return ok


PLANS = [(300, 16, True, None), (300, 8, True, 40), (300, 16, False, 40), (300, 32, False, None),
         (100, 32, True, None), (100, 16, True, 7), (50, 16, False, 7), (64, 64, True, None)]


@pytest.mark.parametrize("T,block,causal,window", PLANS)
def test_block_plan_reads_every_visible_key_and_skips_empty_blocks(T, block, causal, window):
    """Each query block's key window covers every block holding a key visible to it, and its last block is
    non-empty; with no more distinct widths than classes, rows read exactly their non-empty blocks, and with
    rounding (19 causal rows in 8 classes) at most 10% more than that."""
    mask = masks.Causal(window) if causal else masks.Bidirectional(window)
    plan = online_softmax.BlockPlan(T, block, mask, group=1)
    visible = _visible_pairs(T, causal, window)
    n = -(-T // block)
    assert len(plan.classes) <= online_softmax.MAX_ROW_CLASSES
    assert sorted(r for c in plan.classes for r in c.rows) == list(range(n))
    needed_total = read_total = 0
    widths = set()
    for row_class in plan.classes:
        for row, last in zip(row_class.rows, row_class.last_keys):
            tile = visible[row * block : (row + 1) * block]
            needed = {kb for kb in range(n) if tile[:, kb * block : (kb + 1) * block].any()}
            read = set(range(last + 1 - row_class.width, last + 1))
            assert needed <= read and last in needed, (row, sorted(needed), sorted(read))
            assert last + 1 - row_class.width >= -plan.front_pad
            needed_total, read_total = needed_total + len(needed), read_total + len(read)
            widths.add(len(needed))
    if len(widths) <= online_softmax.MAX_ROW_CLASSES:
        assert read_total == needed_total
    else:
        assert read_total <= 1.1 * needed_total


def test_default_block_size():
    assert default_block_size(None) == DEFAULT_BLOCK_SIZE
    assert default_block_size(100) == 128
    assert default_block_size(3) == MIN_WINDOW_BLOCK_SIZE
    assert default_block_size(10**6) == DEFAULT_BLOCK_SIZE


@pytest.mark.parametrize("impl", IMPLS)
def test_large_logits(impl, rng):
    """Logits of magnitude ~50-150 (q scaled up 30x): exp would overflow float32
    without max subtraction; the softmax is nearly one-hot.  Float32 rounding of
    a logit x is ~|x| * 2^-24 absolute, i.e. ~1e-5 relative on the weights, so
    the forward tolerance is relaxed to 1e-4 here."""
    q, k, v = make_qkv(rng, B=1, T=100, H=4, H_kv=2, K=16, V=24, q_scale=30.0)
    kw = {"impl": impl, "window": 40}
    if impl == "chunked":
        kw["block_size"] = 16
    o = np.asarray(jax.jit(functools.partial(ops.softmax_attn, **kw))(q, k, v))
    assert np.isfinite(o).all()
    assert rel_err(o, ref.np_softmax_attn(q, k, v, window=40)) <= 1e-4


# bf16 inputs vs the float64 reference on the float32 originals.  Rounding an
# input to bf16 costs a relative error up to u = 2^-9 ~ 2e-3; logits are
# bilinear in q, k (errors ~2u, entering the weights with |logit| ~ 1), the
# output is linear in v and may itself be rounded to bf16: ~4 roundings of
# size u, i.e. ~5e-3 typically.  2e-2 (~10u) leaves room for bf16 matmul
# operands inside the op, and is still far below the error of e.g. a
# bf16-accumulated softmax denominator over 1024 keys.
BF16_TOL = 2e-2


BF16_CASES = [(impl, c, w) for impl in IMPLS
              for c, w in [(True, None), (True, 100), (False, None)]
              if impl != "recurrent" or c]  # (see test_recurrent_non_causal)


@pytest.mark.parametrize("impl,causal,window", BF16_CASES)
def test_bf16(impl, causal, window, rng):
    q, k, v = make_qkv(rng, B=1, T=1024, H=4, H_kv=2, K=32, V=32)
    bf = lambda x: jnp.asarray(x, jnp.bfloat16)
    attn = functools.partial(ops.softmax_attn, causal=causal, window=window, impl=impl)
    o = jax.jit(attn)(bf(q), bf(k), bf(v))
    o = np.asarray(jnp.asarray(o, jnp.float32))
    assert np.isfinite(o).all()
    e = rel_err(o, ref.np_softmax_attn(q, k, v, causal=causal, window=window))
    assert e <= BF16_TOL, f"rel err {e:.3g}"


# ---------------------------------------------------------------------------
# decode step
# ---------------------------------------------------------------------------


def _garbage(rng, shape):
    # contents of empty / out-of-window slots: large, so any leak is visible
    return (100.0 * rng.standard_normal(shape)).astype(np.float32)


@pytest.mark.parametrize("H_kv", (2, 1))
@pytest.mark.parametrize("window", (None, 7))
def test_decode_linear_cache(window, H_kv, rng):
    """Cache with one slot per position (slot = pos); unfilled slots hold -1
    and garbage.  Output at every step equals the full causal output."""
    B, T, H, D, Dv, scale = 2, 24, 4, 16, 24, None
    q, k, v = make_qkv(rng, B=B, T=T, H=H, H_kv=H_kv, K=D, V=Dv)
    full = ref.np_softmax_attn(q, k, v, causal=True, window=window)
    k_cache, v_cache = _garbage(rng, k.shape), _garbage(rng, v.shape)
    pos = np.full((T,), -1, np.int32)
    outs = []
    for t in range(T):
        k_cache[:, t], v_cache[:, t], pos[t] = k[:, t], v[:, t], t
        o = ops.softmax_decode_step(q[:, t], k_cache, v_cache, pos, t,
                                    scale=scale, window=window)
        assert o.shape == (B, H, Dv)
        outs.append(np.asarray(o))
    assert rel_err(np.stack(outs, axis=1), full) <= FWD_TOL


@pytest.mark.parametrize("window,H_kv", [(8, 2), (5, 1)])
def test_decode_ring_buffer(window, H_kv, rng):
    """`window` slots, slot = pos % window, starting empty (-1 with garbage)."""
    B, T, H, D, Dv, scale = 2, 30, 4, 16, 24, 0.3
    q, k, v = make_qkv(rng, B=B, T=T, H=H, H_kv=H_kv, K=D, V=Dv)
    full = ref.np_softmax_attn(q, k, v, scale=scale, causal=True, window=window)
    k_cache = _garbage(rng, (B, window, H_kv, D))
    v_cache = _garbage(rng, (B, window, H_kv, Dv))
    pos = np.full((window,), -1, np.int32)
    outs = []
    for t in range(T):
        s = t % window
        k_cache[:, s], v_cache[:, s], pos[s] = k[:, t], v[:, t], t
        outs.append(np.asarray(ops.softmax_decode_step(
            q[:, t], k_cache, v_cache, pos, t, scale=scale, window=window)))
    assert rel_err(np.stack(outs, axis=1), full) <= FWD_TOL


def test_decode_with_segment_ids_sees_only_its_segment(rng):
    """A Document term: the query's id against each slot's; every step equals the per-query loop over the earlier
    tokens of the query's segment (segments interleaved, not contiguous), and the ids are refused without one."""
    B, T, H, D = 2, 13, 2, 8
    q, k, v = make_qkv(rng, B=B, T=T, H=H, H_kv=H, K=D, V=D)
    ids = rng.integers(0, 3, (B, T)).astype(np.int32)
    mask = masks.Causal() & masks.Document()
    for t in range(T):
        got = ops.softmax_decode_step(q[:, t], k, v, np.arange(T, dtype=np.int32), t, mask=mask,
                                      segment_ids=(ids[:, t], ids))
        for b in range(B):
            seen = [s for s in range(t + 1) if ids[b, s] == ids[b, t]]
            scores = np.einsum("hd,shd->hs", q[b, t], k[b, seen]) / np.sqrt(D)
            weights = np.exp(scores - scores.max(-1, keepdims=True))
            want = np.einsum("hs,shd->hd", weights / weights.sum(-1, keepdims=True), v[b, seen])
            assert rel_err(got[b], want) <= FWD_TOL
    with pytest.raises(ValueError, match="segment_ids: the query's"):
        ops.softmax_decode_step(q[:, 0], k, v, np.arange(T, dtype=np.int32), 0, mask=mask)


def test_decode_masks_future_and_stale_slots(rng):
    """Positions in the cache beyond query_position, and positions that fell
    out of the window, are invisible; the cache order is arbitrary."""
    B, H, H_kv, D, Dv, L = 1, 4, 2, 8, 6, 12
    q = rng.standard_normal((B, H, D)).astype(np.float32)
    k_cache = rng.standard_normal((B, L, H_kv, D)).astype(np.float32)
    v_cache = rng.standard_normal((B, L, H_kv, Dv)).astype(np.float32)
    pos = np.array([9, 3, -1, 11, 0, 7, 20, 5, -1, 8, 2, 10], np.int32)
    for qp, window in [(10, None), (10, 4), (8, 3), (0, None), (9, 1)]:
        o = ops.softmax_decode_step(q, k_cache, v_cache, pos, qp, window=window)
        o_ref = ref.np_decode_step(q, k_cache, v_cache, pos, qp, window=window)
        assert rel_err(o, o_ref) <= FWD_TOL, (qp, window)


def test_decode_under_jit_with_traced_position(rng):
    """query_position and key_positions as traced values (as in a decode loop)."""
    B, T, H, H_kv, D, window = 1, 20, 4, 2, 16, 6
    q, k, v = make_qkv(rng, B=B, T=T, H=H, H_kv=H_kv, K=D, V=D)
    full = ref.np_softmax_attn(q, k, v, causal=True, window=window)
    step = jax.jit(functools.partial(ops.softmax_decode_step, window=window))
    k_cache, v_cache = _garbage(rng, (B, window, H_kv, D)), _garbage(rng, (B, window, H_kv, D))
    pos = np.full((window,), -1, np.int32)
    outs = []
    for t in range(T):
        s = t % window
        k_cache[:, s], v_cache[:, s], pos[s] = k[:, t], v[:, t], t
        outs.append(np.asarray(step(q[:, t], k_cache, v_cache, jnp.asarray(pos),
                                    jnp.asarray(t, jnp.int32))))
    assert rel_err(np.stack(outs, axis=1), full) <= FWD_TOL


# ---------------------------------------------------------------------------
# invalid input
# ---------------------------------------------------------------------------


def names(*ns):
    """Regex matching any of the argument names as a whole word."""
    return "|".join(rf"(?<![A-Za-z0-9_]){re.escape(n)}(?![A-Za-z0-9_])" for n in ns)


def _attn_bad_cases():
    B, T, H, H_kv, K, V = 1, 8, 4, 2, 4, 6
    z = lambda *s: np.zeros(s, np.float32)
    good = (z(B, T, H, K), z(B, T, H_kv, K), z(B, T, H_kv, V))
    yield "impl", good, {"impl": "flash"}, names("impl")
    yield "block_size0", good, {"block_size": 0}, names("block_size")
    yield "block_size-8", good, {"block_size": -8}, names("block_size")
    yield "window0", good, {"window": 0}, names("window")
    yield "qk_dim", (z(B, T, H, K), z(B, T, H_kv, K + 1), z(B, T, H_kv, V)), {}, names("q", "k")
    yield "kv_len", (z(B, T, H, K), z(B, T, H_kv, K), z(B, T + 1, H_kv, V)), {}, names("k", "v")
    yield "kv_heads", (z(B, T, H, K), z(B, T, 2, K), z(B, T, 1, V)), {}, names("k", "v")
    yield "heads_not_dividing", (z(B, T, H, K), z(B, T, 3, K), z(B, T, 3, V)), {}, \
        names("q", "k", "v")
    yield "batch", (z(B, T, H, K), z(B + 1, T, H_kv, K), z(B + 1, T, H_kv, V)), {}, \
        names("q", "k", "v")
    yield "rank", (z(T, H, K), z(T, H_kv, K), z(T, H_kv, V)), {}, names("q", "k", "v")


ATTN_BAD = list(_attn_bad_cases())


@pytest.mark.parametrize("case,arrays,kw,pattern", ATTN_BAD, ids=[c[0] for c in ATTN_BAD])
def test_softmax_attn_invalid_input_raises(case, arrays, kw, pattern):
    B, T, H, H_kv, K, V = 1, 8, 4, 2, 4, 6
    o = ops.softmax_attn(np.zeros((B, T, H, K), np.float32), np.zeros((B, T, H_kv, K), np.float32),
                         np.zeros((B, T, H_kv, V), np.float32))
    assert o.shape == (B, T, H, V)  # the unmodified call is accepted
    with pytest.raises(ValueError, match=pattern):
        ops.softmax_attn(*arrays, **kw)


def _decode_bad_cases():
    B, L, H, H_kv, D, Dv = 1, 6, 4, 2, 4, 5
    z = lambda *s: np.zeros(s, np.float32)
    pos = np.arange(L, dtype=np.int32)
    yield "qk_dim", (z(B, H, D + 1), z(B, L, H_kv, D), z(B, L, H_kv, Dv), pos), \
        names("q", "k_cache")
    yield "cache_len", (z(B, H, D), z(B, L, H_kv, D), z(B, L + 1, H_kv, Dv), pos), \
        names("k_cache", "v_cache", "key_positions")
    yield "positions_len", (z(B, H, D), z(B, L, H_kv, D), z(B, L, H_kv, Dv),
                            np.arange(L + 2, dtype=np.int32)), names("key_positions")
    yield "heads_not_dividing", (z(B, H, D), z(B, L, 3, D), z(B, L, 3, Dv), pos), \
        names("q", "k_cache", "v_cache")


DECODE_BAD = list(_decode_bad_cases())


@pytest.mark.parametrize("case,arrays,pattern", DECODE_BAD, ids=[c[0] for c in DECODE_BAD])
def test_decode_invalid_input_raises(case, arrays, pattern):
    B, L, H, H_kv, D, Dv = 1, 6, 4, 2, 4, 5
    o = ops.softmax_decode_step(np.zeros((B, H, D), np.float32),
                                np.zeros((B, L, H_kv, D), np.float32),
                                np.zeros((B, L, H_kv, Dv), np.float32),
                                np.arange(L, dtype=np.int32), 3)
    assert o.shape == (B, H, Dv)  # the unmodified call is accepted
    with pytest.raises(ValueError, match=pattern):
        ops.softmax_decode_step(*arrays, 3)
