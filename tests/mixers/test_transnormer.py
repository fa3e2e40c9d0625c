"""TransNormer (NormAttention, DiagAttention), TransNormerLLM (TNLAttention), block-local attention, URPE and LRPE.

Ground truth is written here from the equations (families.md §2, §3), token by token, without seqlab code: each
reference takes the array module `xp` — numpy on float64 inputs (a Python loop over tokens) for the forward checks,
jax.numpy in float32 (the same per-token step under lax.scan, differentiated with jax.grad) for the gradient checks.
The mixers are only read for their parameters. Tolerances are relative errors over whole tensors: forward 1e-5,
gradients 1e-4.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from reference import rel_err

from seqlab.layers.lrpe import LRPE, URPE
from seqlab.mixers.caches import BlockCache
from seqlab.mixers.linear.tnl import TNLAttention
from seqlab.mixers.linear.transnormer import DiagAttention, NormAttention, transnormer_layout
from seqlab.ops.block_local_attn import block_local_attn, block_local_attn_cached

FWD_TOL = 1e-5
GRAD_TOL = 1e-4
B, T, D, H = 2, 23, 16, 2  # head dim 8; T is not a multiple of any chunk / block size below
HEAD = D // H
CHUNKS = (4, 16)


# --------------------------------------------------------------------------------------------------------------
# Independent per-token references (xp = numpy or jax.numpy)
# --------------------------------------------------------------------------------------------------------------


def elu(xp, x):
    return xp.where(x > 0, x, xp.expm1(xp.minimum(x, 0.0)))


def silu(xp, x):
    return x / (1.0 + xp.exp(-x))


def softmax(xp, z):
    e = xp.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def transnormer_srms(xp, x, eps=1e-8):
    """x / (||x||_2 * D^-1/2 + eps) over the last axis (the root taken of positive sums only, so that a zero row,
    which T1's ReLU weights can produce, has a finite gradient under jax.grad)."""
    sum_sq = (x * x).sum(axis=-1, keepdims=True)
    norm = xp.where(sum_sq > 0, xp.sqrt(xp.where(sum_sq > 0, sum_sq, 1.0)), 0.0)
    return x / (norm / math.sqrt(x.shape[-1]) + eps)


def llm_srms(xp, x, eps=1e-6):
    """x / sqrt(mean(x^2) + eps) over the last axis."""
    return x / xp.sqrt((x * x).mean(axis=-1, keepdims=True) + eps)


def urpe_token(xp, x, t, theta, u):
    """x [..., d] at position t: Householder reflection by u, then rotation of the pairs (2i, 2i+1) by t theta_i."""
    y = x - 2.0 * (x * u).sum(axis=-1, keepdims=True) * u
    even, odd = y[..., 0::2], y[..., 1::2]
    c, s = xp.cos(t * theta), xp.sin(t * theta)
    return xp.stack([even * c - odd * s, even * s + odd * c], axis=-1).reshape(x.shape)


def lrpe_token(xp, x, t, theta):
    """x [B, H, d] at position t, theta [H, d] -> [B, H, 2d]."""
    return xp.concatenate([x * xp.cos(theta * t), x * xp.sin(theta * t)], axis=-1)


def loop(xp, step, carry, length):
    """Outputs of `carry, out = step(carry, t)` for t = 0..length-1, stacked on axis 1: a Python loop for numpy,
    `lax.scan` for jax.numpy (the same per-token step, traced once)."""
    if xp is np:
        outs = []
        for t in range(length):
            carry, out = step(carry, t)
            outs.append(out)
        return np.stack(outs, axis=1)
    _, outs = jax.lax.scan(step, carry, jnp.arange(length))
    return jnp.moveaxis(outs, 0, 1)


def block_local_ref(xp, q, k, v, block, weights, scale=None):
    """o_t = sum over the keys s of t's block with s <= t of w(q_t.k_s * scale) v_s.

    q, k: [B, T, H, K]; v: [B, T, H, V]."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    keys = xp.arange(q.shape[1])

    def step(carry, t):
        logits = xp.einsum("bhk,bshk->bhs", q[:, t] * scale, k)
        visible = (keys // block == t // block) & (keys <= t)
        if weights == "softmax":
            w = softmax(xp, xp.where(visible, logits, -1e30))
        else:
            w = xp.where(visible, xp.maximum(logits, 0.0), 0.0)
        return carry, xp.einsum("bhs,bshv->bhv", w, v)

    return loop(xp, step, None, q.shape[1])


def heads(x):
    return x.reshape(*x.shape[:-1], H, -1)


def transnormer_projections(xp, p, x):
    return tuple(heads(x @ p[f"w{n}"] + p[f"b{n}"]) for n in "qkv")


def urpe_or_identity(xp, p, x, t):
    return urpe_token(xp, x, t, p["theta"], p["u"]) if "theta" in p else x


def norm_attention_ref(xp, p, x, variant):
    """S_t = S_{t-1} + phi(k_t) v_t^T, o_t = S_t^T phi(q_t) (URPE after phi); srms over the heads; W_o."""
    q, k, v = transnormer_projections(xp, p, x)
    phi = (lambda z: elu(xp, z) + 1.0) if variant == "t2" else (lambda z: elu(xp, z))

    def step(state, t):
        q_t, k_t = urpe_or_identity(xp, p, phi(q[:, t]), t), urpe_or_identity(xp, p, phi(k[:, t]), t)
        state = state + xp.einsum("bhk,bhv->bhkv", k_t, v[:, t])
        o = xp.einsum("bhkv,bhk->bhv", state, q_t).reshape(x.shape[0], -1)
        return state, transnormer_srms(xp, o) @ p["wo"] + p["bo"]

    return loop(xp, step, xp.zeros((x.shape[0], H, HEAD, HEAD)), x.shape[1])


def diag_attention_ref(xp, p, x, variant, block):
    """Block-local attention on the raw projections (+URPE); T1: relu weights + srms, T2: softmax; W_o."""
    q, k, v = transnormer_projections(xp, p, x)
    q = loop(xp, lambda c, t: (c, urpe_or_identity(xp, p, q[:, t], t)), None, x.shape[1])
    k = loop(xp, lambda c, t: (c, urpe_or_identity(xp, p, k[:, t], t)), None, x.shape[1])
    o = block_local_ref(xp, q, k, v, block, "relu" if variant == "t1" else "softmax")
    o = o.reshape(*x.shape[:2], -1)
    if variant == "t1":
        o = transnormer_srms(xp, o)
    return o @ p["wo"] + p["bo"]


def tnl_ref(xp, p, x, log_decay):
    """[q,k,v,u] = x W; q, k = silu (+LRPE); S_t = lambda S_{t-1} + k_t v_t^T; o_t = S_t^T q_t; srms(o) * u; W_out."""
    q, k, v, u = (x @ p["w"][:, i * D : (i + 1) * D] for i in range(4))
    q, k, v = heads(silu(xp, q)), heads(silu(xp, k)), heads(v)
    decay = xp.exp(log_decay)[None, :, None, None]
    key_dim = 2 * HEAD if "theta" in p else HEAD

    def step(state, t):
        q_t, k_t = q[:, t], k[:, t]
        if "theta" in p:
            theta = p["theta"][:, 0]  # [H, 1, d] -> [H, d]
            q_t, k_t = lrpe_token(xp, q_t, t, theta), lrpe_token(xp, k_t, t, theta)
        state = decay * state + xp.einsum("bhk,bhv->bhkv", k_t, v[:, t])
        o = xp.einsum("bhkv,bhk->bhv", state, q_t).reshape(x.shape[0], -1)
        return state, (llm_srms(xp, o) * u[:, t]) @ p["wo"]

    return loop(xp, step, xp.zeros((x.shape[0], H, key_dim, HEAD)), x.shape[1])


def alibi_slopes(num_heads):
    """ALiBi slopes: 2^(-8h/H), h = 1..H, for a power of two; the other head counts tested, spelled out."""
    spelled = {
        3: [2**-4, 2**-8, 2**-2],
        6: [2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3],
        12: [2.0**-h for h in range(1, 9)] + [2**-0.5, 2**-1.5, 2**-2.5, 2**-3.5],
    }
    if num_heads in spelled:
        return np.array(spelled[num_heads])
    return 2.0 ** (-8.0 * np.arange(1, num_heads + 1) / num_heads)


def expected_log_decay(num_heads, layer, layers, decay):
    if decay == "paper":
        return -(8.0 / num_heads) * (1.0 - layer / layers) * np.arange(num_heads)
    ratio = layer / (layers - 1) if layers > 1 else 0.0
    return -alibi_slopes(num_heads) * (1.0 - ratio + 1e-5)


# --------------------------------------------------------------------------------------------------------------
# Parameters of the mixers, read by path (works for the module's Param state and for its gradients)
# --------------------------------------------------------------------------------------------------------------

TRANSNORMER_PATHS = {
    "wq": ("q_proj", "kernel"), "bq": ("q_proj", "bias"), "wk": ("k_proj", "kernel"), "bk": ("k_proj", "bias"),
    "wv": ("v_proj", "kernel"), "bv": ("v_proj", "bias"), "wo": ("o_proj", "kernel"), "bo": ("o_proj", "bias"),
    "theta": ("urpe", "theta"),
}  # fmt: skip
TNL_PATHS = {"w": ("qkvu_proj", "kernel"), "wo": ("out_proj", "kernel"), "theta": ("lrpe", "theta")}


def pick(state, paths):
    return {name: state[module][leaf][...] for name, (module, leaf) in paths.items() if module in state}


def mixer_params(mixer, paths):
    """The mixer's parameters by reference name (plus URPE's fixed Householder vector), as float32 arrays."""
    params = pick(nnx.state(mixer, nnx.Param), paths)
    if getattr(mixer, "urpe", None) is not None:
        params["u"] = mixer.urpe.householder[...]
    return params


def inputs(seed=0, length=T):
    kx, kw = jax.random.split(jax.random.key(seed))
    return jax.random.normal(kx, (B, length, D), jnp.float32), jax.random.normal(kw, (B, length, D), jnp.float32)


def f64(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


@nnx.jit
def mixer_value_and_grads(mixer, x, w):
    def loss(m):
        y = m(x)
        return jnp.sum(y * w), y

    (_, y), grads = nnx.value_and_grad(loss, has_aux=True)(mixer)
    return y, grads


def check_forms(mixer, forms, paths, reference, x, w):
    """For every (attribute overrides) in forms: forward == numpy reference, parameter gradients == jax.grad of the
    jnp reference (both references from the mixer's own parameters)."""
    params = mixer_params(mixer, paths)
    want = reference(np, f64(params), f64(x))
    trainable = {n: a for n, a in params.items() if n != "u"}
    fixed = {n: a for n, a in params.items() if n == "u"}
    ref_grads = jax.jit(jax.grad(lambda p: jnp.sum(reference(jnp, {**p, **fixed}, x) * w)))(trainable)
    for form in forms:
        for attr, value in form.items():
            setattr(mixer, attr, value)
        y, grads = mixer_value_and_grads(mixer, x, w)
        assert rel_err(y, want) <= FWD_TOL, (form, rel_err(y, want))
        got = pick(grads, paths)
        assert set(got) == set(ref_grads), (form, sorted(got), sorted(ref_grads))
        for name, g in got.items():
            assert rel_err(g, ref_grads[name]) <= GRAD_TOL, (form, name, rel_err(g, ref_grads[name]))


# Every form of the linear ops; the variants that only change a feature map or a positional encoding run one form.
LINEAR_FORMS = [{"impl": "chunked", "chunk_size": c} for c in CHUNKS] + [{"impl": "recurrent"}, {"impl": "parallel"}]
ONE_FORM = LINEAR_FORMS[:1]


# --------------------------------------------------------------------------------------------------------------
# block_local_attn
# --------------------------------------------------------------------------------------------------------------


def qkv(rng, length=37, k_dim=8, v_dim=6):
    q = rng.normal(size=(B, length, H, k_dim)).astype(np.float32)
    k = rng.normal(size=(B, length, H, k_dim)).astype(np.float32)
    v = rng.normal(size=(B, length, H, v_dim)).astype(np.float32)
    return q, k, v


@pytest.mark.parametrize("weights", ["softmax", "relu"])
@pytest.mark.parametrize("block", [1, 5, 16, 64])
def test_block_local_attn_matches_per_token_reference(weights, block, rng):
    q, k, v = qkv(rng)  # T = 37: a partial last block (and one block shorter than T for block = 64)
    o = block_local_attn(q, k, v, block_size=block, weights=weights)
    assert o.shape == v.shape and o.dtype == jnp.float32
    assert rel_err(o, block_local_ref(np, *f64((q, k, v)), block, weights)) <= FWD_TOL


def test_block_local_attn_scale_and_blocks_matter(rng):
    q, k, v = qkv(rng)
    o = block_local_attn(q, k, v, block_size=8, weights="softmax", scale=0.3)
    assert rel_err(o, block_local_ref(np, *f64((q, k, v)), 8, "softmax", scale=0.3)) <= FWD_TOL
    assert rel_err(o, block_local_ref(np, *f64((q, k, v)), 16, "softmax", scale=0.3)) > 1e-2


@pytest.mark.parametrize("weights", ["softmax", "relu"])
def test_block_local_attn_gradient(weights, rng):
    q, k, v = qkv(rng, length=T)
    w = rng.normal(size=v.shape).astype(np.float32)
    for block in (4, 16):

        def op_loss(q, k, v, block=block):
            return jnp.sum(block_local_attn(q, k, v, block_size=block, weights=weights) * w)

        def ref_loss(q, k, v, block=block):
            return jnp.sum(block_local_ref(jnp, q, k, v, block, weights) * w)

        got = jax.jit(jax.grad(op_loss, argnums=(0, 1, 2)))(q, k, v)
        want = jax.jit(jax.grad(ref_loss, argnums=(0, 1, 2)))(q, k, v)
        for name, g, r in zip("qkv", got, want):
            assert rel_err(g, r) <= GRAD_TOL, (block, name, rel_err(g, r))


@pytest.mark.parametrize("weights", ["softmax", "relu"])
def test_block_local_attn_cached_matches_full_in_any_split(weights, rng):
    """Calls of 1, 5, 1, 13 and 3 tokens (block 4): prompts that start mid-block, end on a boundary and span
    several blocks, and single steps, continue exactly; the cache ends with the last block's keys, zeros after."""
    block = 4
    q, k, v = qkv(rng, length=T)
    want = block_local_ref(np, *f64((q, k, v)), block, weights)
    k_block = jnp.zeros((B, block, H, q.shape[-1]), jnp.float32)
    v_block = jnp.zeros((B, block, H, v.shape[-1]), jnp.float32)
    cached = jax.jit(lambda *a: block_local_attn_cached(*a, weights=weights))
    outs, pos = [], 0
    for size in (1, 5, 1, 13, 3):
        o, k_block, v_block = cached(q[:, pos : pos + size], k[:, pos : pos + size], v[:, pos : pos + size],
                                     k_block, v_block, jnp.int32(pos))  # fmt: skip
        outs.append(o)
        pos += size
        last_start = (pos - 1) - (pos - 1) % block
        filled = pos - last_start
        np.testing.assert_array_equal(k_block[:, :filled], k[:, last_start:pos])
        np.testing.assert_array_equal(v_block[:, :filled], v[:, last_start:pos])
        assert not np.any(np.asarray(k_block[:, filled:])), pos
    assert pos == T
    assert rel_err(jnp.concatenate(outs, axis=1), want) <= FWD_TOL


# --------------------------------------------------------------------------------------------------------------
# URPE and LRPE
# --------------------------------------------------------------------------------------------------------------


def test_urpe_init_reference_isometry_and_relativity(rng):
    d = 8
    urpe = URPE(d, rngs=nnx.Rngs(3))
    theta, u = np.asarray(urpe.theta[...]), np.asarray(urpe.householder[...])
    np.testing.assert_allclose(theta, 10000.0 ** (-2.0 * np.arange(d // 2) / d), rtol=1e-6)
    assert abs(np.linalg.norm(u) - 1.0) < 1e-6
    assert "householder" not in nnx.state(urpe, nnx.Param)  # fixed, not trained
    np.testing.assert_array_equal(URPE(d, rngs=nnx.Rngs(3)).householder[...], u)  # deterministic from rngs
    assert np.max(np.abs(URPE(d, rngs=nnx.Rngs(4)).householder[...] - u)) > 1e-3

    x = rng.normal(size=(B, 11, H, d)).astype(np.float32)
    pos = jnp.arange(11) + 5
    y = urpe(x, pos)
    want = np.stack([urpe_token(np, f64(x[:, t]), t + 5, f64(theta), f64(u)) for t in range(11)], axis=1)
    assert rel_err(y, want) <= FWD_TOL
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)

    qv, kv = rng.normal(size=(2, d)).astype(np.float32)
    n = 12
    q = urpe(np.broadcast_to(qv, (1, n, 1, d)), jnp.arange(n))[0, :, 0]
    k = urpe(np.broadcast_to(kv, (1, n, 1, d)), jnp.arange(n))[0, :, 0]
    scores = np.asarray(q, np.float64) @ np.asarray(k, np.float64).T  # scores[t, s] depends on t - s only
    np.testing.assert_allclose(scores[1:, 1:], scores[:-1, :-1], atol=1e-5)
    assert np.ptp(np.diag(scores, -3)) < 1e-5 and abs(scores[3, 0] - scores[0, 0]) > 1e-3


def test_lrpe_init_reference_and_relative_scores(rng):
    d = 4
    lrpe = LRPE(H, d)
    theta = np.asarray(lrpe.theta[...])
    m = np.arange(H * d).reshape(H, 1, d)
    np.testing.assert_allclose(theta, 10000.0 ** (-2.0 * m / (H * d)), rtol=1e-6)

    x = rng.normal(size=(B, 9, H, d)).astype(np.float32)
    y = lrpe(x, jnp.arange(9) + 2)
    assert y.shape == (B, 9, H, 2 * d)
    want = np.stack([lrpe_token(np, f64(x[:, t]), t + 2, f64(theta[:, 0])) for t in range(9)], axis=1)
    assert rel_err(y, want) <= FWD_TOL

    qv, kv = rng.normal(size=(2, H, d))
    n = 10
    q = np.asarray(lrpe(np.broadcast_to(qv, (1, n, H, d)).astype(np.float32), jnp.arange(n))[0], np.float64)
    k = np.asarray(lrpe(np.broadcast_to(kv, (1, n, H, d)).astype(np.float32), jnp.arange(n))[0], np.float64)
    scores = np.einsum("thi,shi->hts", q, k)
    delta = np.arange(n)[:, None] - np.arange(n)[None, :]
    want = np.einsum("hi,hi,htsi->hts", qv, kv, np.cos(theta[:, 0][:, None, None, :] * delta[None, :, :, None]))
    np.testing.assert_allclose(scores, want, atol=1e-5)


# --------------------------------------------------------------------------------------------------------------
# Mixers against the per-token references, every form, forward and gradient
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant, use_urpe, forms", [("t1", True, LINEAR_FORMS), ("t2", True, ONE_FORM),
                                                      ("t1", False, ONE_FORM)])  # fmt: skip
def test_norm_attention_matches_reference(variant, use_urpe, forms):
    mixer = NormAttention(D, H, variant=variant, use_urpe=use_urpe, rngs=nnx.Rngs(1))
    x, w = inputs(1)
    check_forms(mixer, forms, TRANSNORMER_PATHS, lambda xp, p, x: norm_attention_ref(xp, p, x, variant), x, w)


@pytest.mark.parametrize("variant, blocks", [("t1", (4, 8)), ("t2", (8,))])
def test_diag_attention_matches_reference(variant, blocks):
    x, w = inputs(2)
    for block in blocks:
        mixer = DiagAttention(D, H, variant=variant, block_size=block, rngs=nnx.Rngs(2))
        reference = functools.partial(diag_attention_ref, variant=variant, block=block)
        check_forms(mixer, [{}], TRANSNORMER_PATHS, reference, x, w)


@pytest.mark.parametrize("decay, use_lrpe, forms", [("official", True, LINEAR_FORMS), ("paper", True, ONE_FORM),
                                                    ("official", False, ONE_FORM)])  # fmt: skip
def test_tnl_attention_matches_reference(decay, use_lrpe, forms):
    mixer = TNLAttention(D, H, decay=decay, use_lrpe=use_lrpe, layer_index=1, num_layers=3, rngs=nnx.Rngs(3))
    log_decay = expected_log_decay(H, 1, 3, decay)
    x, w = inputs(3)
    check_forms(mixer, forms, TNL_PATHS, lambda xp, p, x: tnl_ref(xp, p, x, xp.asarray(log_decay)), x, w)


@pytest.mark.parametrize("decay", ["official", "paper"])
@pytest.mark.parametrize("num_heads", [1, 2, 3, 4, 6, 8, 12])
def test_tnl_decay_schedule(decay, num_heads):
    for layer, layers in [(0, 1), (0, 4), (2, 4), (3, 4), (4, 7)]:
        # the schedule is fixed at construction: an abstract mixer (no parameter values) is enough
        build = functools.partial(TNLAttention, 2 * num_heads, num_heads, decay=decay, layer_index=layer,
                                  num_layers=layers)  # fmt: skip
        mixer = nnx.eval_shape(build)
        got = np.asarray(mixer.log_decay())
        assert got.dtype == np.float32 and np.all(got <= 0.0)
        np.testing.assert_allclose(got, expected_log_decay(num_heads, layer, layers, decay), rtol=1e-6, atol=0)


def test_outputs_keep_the_input_dtype(rng):
    q, k, v = (a.astype(jnp.bfloat16) for a in qkv(rng, length=9))
    assert jax.eval_shape(lambda: block_local_attn(q, k, v, block_size=4)).dtype == jnp.bfloat16
    blocks = (jnp.zeros((B, 4, H, 8), jnp.float32), jnp.zeros((B, 4, H, 6), jnp.float32))
    for length in (1, 9):
        o, *cache = jax.eval_shape(block_local_attn_cached, q[:, :length], k[:, :length], v[:, :length], *blocks, 0)
        assert o.dtype == jnp.bfloat16 and all(c.dtype == jnp.float32 for c in cache)
    pos = jnp.arange(9)
    assert jax.eval_shape(lambda: URPE(8, rngs=nnx.Rngs(0))(q, pos)).dtype == jnp.bfloat16
    assert jax.eval_shape(lambda: LRPE(H, 8)(q, pos)).dtype == jnp.bfloat16


def test_transnormer_layout():
    pattern, args = transnormer_layout(4, "t2")
    assert pattern == ("transnormer_diag",) * 2 + ("transnormer_norm",) * 2
    assert args == {"transnormer_diag": {"variant": "t2"}, "transnormer_norm": {"variant": "t2"}}
    assert transnormer_layout(5)[0] == ("transnormer_diag",) * 2 + ("transnormer_norm",) * 3


# --------------------------------------------------------------------------------------------------------------
# Decode: token-by-token and prefill + decode == the full forward
# --------------------------------------------------------------------------------------------------------------

DECODE_CASES = {
    "norm": lambda: NormAttention(D, H, chunk_size=4, rngs=nnx.Rngs(5)),
    "diag-t1": lambda: DiagAttention(D, H, block_size=8, rngs=nnx.Rngs(5)),
    "diag-t2": lambda: DiagAttention(D, H, variant="t2", block_size=8, rngs=nnx.Rngs(5)),
    "tnl": lambda: TNLAttention(D, H, chunk_size=4, layer_index=1, num_layers=4, rngs=nnx.Rngs(5)),
}


def steps(mixer, x, cache):
    def body(c, x_t):
        y_t, c = mixer.step(x_t, c)
        return c, y_t

    cache, ys = jax.lax.scan(body, cache, jnp.swapaxes(x, 0, 1))
    return jnp.swapaxes(ys, 0, 1), cache


@pytest.mark.parametrize(  # prompts end mid-block (11) or on a block boundary (16); block 8, chunk 4, T = 23
    "case, prompt", [("norm", 11), ("diag-t1", 11), ("diag-t1", 16), ("diag-t2", 16), ("tnl", 11)]
)
def test_decode_and_prefill_match_full_forward(case, prompt):
    mixer = DECODE_CASES[case]()
    x, _ = inputs(6)

    @nnx.jit
    def run(m, x):
        y_steps, stepped_all = steps(m, x, m.init_cache(B, T))
        y_prompt, prefilled = m.prefill(x[:, :prompt], m.init_cache(B, T))
        y_rest, _ = steps(m, x[:, prompt:], prefilled)
        _, stepped = steps(m, x[:, :prompt], m.init_cache(B, T))
        return m(x), y_steps, jnp.concatenate([y_prompt, y_rest], axis=1), prefilled, stepped, stepped_all

    y_full, y_steps, y_prefill, prefilled, stepped, stepped_all = run(mixer, x)
    assert rel_err(y_steps, y_full) <= FWD_TOL, rel_err(y_steps, y_full)
    assert rel_err(y_prefill, y_full) <= FWD_TOL, rel_err(y_prefill, y_full)
    assert int(prefilled.pos) == prompt and int(stepped_all.pos) == T
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(prefilled), jax.tree_util.tree_leaves(stepped)):
        assert got.shape == want.shape and got.dtype == want.dtype, jax.tree_util.keystr(path)
        assert rel_err(got, want) <= FWD_TOL, (jax.tree_util.keystr(path), rel_err(got, want))


def test_cache_layouts():
    norm = NormAttention(D, H).init_cache(3, 5)
    assert norm.state.shape == (3, H, HEAD, HEAD) and norm.state.dtype == jnp.float32
    diag = DiagAttention(D, H, block_size=8).init_cache(3, 100)
    assert isinstance(diag, BlockCache) and diag.k.shape == diag.v.shape == (3, 8, H, HEAD)
    assert diag.k.dtype == jnp.float32 and int(diag.pos) == 0
    assert TNLAttention(D, H).init_cache(3, 5).state.shape == (3, H, 2 * HEAD, HEAD)
    assert TNLAttention(D, H, use_lrpe=False).init_cache(3, 5).state.shape == (3, H, HEAD, HEAD)


# --------------------------------------------------------------------------------------------------------------
# Errors name the argument
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build, name",
    [
        (lambda: NormAttention(D, H, variant="t3"), "variant"),
        (lambda: DiagAttention(D, H, variant="T1"), "variant"),
        (lambda: DiagAttention(D, H, block_size=0), "block_size"),
        (lambda: NormAttention(D, H, norm_eps=0.0), "norm_eps"),
        (lambda: NormAttention(6, 2), "head_dim"),  # URPE needs an even head dim
        (lambda: NormAttention(D, 3), "d_model"),
        (lambda: TNLAttention(D, H, decay="fla"), "decay"),
        (lambda: TNLAttention(D, H, layer_index=3, num_layers=3), "layer_index"),
        (lambda: TNLAttention(D, H, layer_index=-1, num_layers=3), "layer_index"),
        (lambda: TNLAttention(D, H, num_layers=0), "num_layers"),
        (lambda: TNLAttention(D, H, impl="scan"), "impl"),
        (lambda: transnormer_layout(0), "num_layers"),
        (lambda: transnormer_layout(4, "t3"), "variant"),
        (lambda: NormAttention(D, H).init_cache(0, 4), "batch"),
        (lambda: DiagAttention(D, H).init_cache(2, 0), "max_len"),
    ],
)
def test_bad_constructor_arguments_name_the_argument(build, name):
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        build()


def test_bad_op_arguments_name_the_argument(rng):
    q, k, v = qkv(rng, length=9)
    with pytest.raises(ValueError, match=r"^weights\b"):
        block_local_attn(q, k, v, weights="gelu")
    with pytest.raises(ValueError, match=r"^block_size\b"):
        block_local_attn(q, k, v, block_size=0)
    with pytest.raises(ValueError, match=r"^k\b"):
        block_local_attn(q, k[:, :5], v)
    with pytest.raises(ValueError, match=r"^v\b"):
        block_local_attn(q, k, v[:, :5])
    with pytest.raises(ValueError, match=r"^k_block\b"):
        block_local_attn_cached(q, k, v, np.zeros((B, 4, H, 3), np.float32), np.zeros((B, 4, H, 6), np.float32), 0)


def test_diag_attention_sequence_shards_must_hold_whole_blocks():
    mixer = DiagAttention(D, H, block_size=8)
    mixer.sequence_axis = "seq"
    with pytest.raises(ValueError, match=r"^x: a sequence shard of 23 tokens"):
        mixer(inputs()[0])
