"""LightNet (+ MD-LRPE), Flowformer (causal and non-causal) and DSF normalised attention against independent
per-token references written here from the equations (families.md §12, §24, §25).

References read only the mixers' parameters. Each is written once over an array module `xp`: with numpy in float64
it is the forward ground truth (rel. err <= 1e-5); with jax.numpy in float32 it is differentiated for the gradient
check (rel. err <= 1e-4 on every parameter). LightNet's reference is the ADDITIVE form (S'_t = Σ e^{k_s} v_sᵀ
divided by Z_t = Σ e^{k_s}), so it checks the gated rewrite the mixer runs on `ops.gla`. Every form (chunked with
two chunk sizes, recurrent, parallel) is checked, with T = 21 (not a multiple of either chunk size) and H = 2.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from seqlab.layers.md_lrpe import grid_positions, md_lrpe
from seqlab.mixers.linear.dsf import DSFAttention
from seqlab.mixers.linear.flowformer import FlowAttention
from seqlab.mixers.linear.lightnet import LightNet

B, T, D, H = 2, 21, 16, 2
F_DIM, LOW_RANK = 8, 4
FWD_TOL, GRAD_TOL = 1e-5, 1e-4
FORMS = [("chunked", 8), ("chunked", 16), ("recurrent", 8), ("parallel", 8)]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    norm = np.linalg.norm(b)
    assert norm > 0, "reference is identically zero"
    return float(np.linalg.norm(a - b) / norm)


def inputs(seed: int = 0):
    kx, kw = jax.random.split(jax.random.key(seed))
    return jax.random.normal(kx, (B, T, D), jnp.float32), jax.random.normal(kw, (B, T, D), jnp.float32)


def sigmoid(xp, a):
    return 1.0 / (1.0 + xp.exp(-a))


def silu(xp, a):
    return a * sigmoid(xp, a)


def per_token(xp, step, carry, xs):
    """Run step(carry, x_t) -> (carry, y_t) over the time-major arrays xs ([T, ...] each) and stack y: [B, T, ...].
    numpy: a plain Python loop over t; jax.numpy: the same step under lax.scan (a small program to differentiate)."""
    if xp is np:
        ys = []
        for t in range(T):
            carry, y = step(carry, [a[t] for a in xs])
            ys.append(y)
        return np.stack(ys, axis=1)
    _, ys = jax.lax.scan(lambda c, x_t: step(c, list(x_t)), carry, [jnp.asarray(a) for a in xs])
    return jnp.moveaxis(ys, 0, 1)


def time_major(xp, *arrays):
    return [xp.moveaxis(a, 1, 0) for a in arrays]


def weights(module, names: dict[str, tuple[str, str]], to) -> dict:
    """{name: to(module.<layer>.<param>)}: the parameters the references read."""
    return {name: to(getattr(getattr(module, layer), param)[...]) for name, (layer, param) in names.items()}


def f64(a):
    return np.asarray(a, np.float64)


def check_forward_and_grad(make, reference, names, x, w, forms=FORMS):
    """For every form: the mixer's output == the float64 numpy reference, and its parameter gradients of
    sum(y * w) == those of the float32 jnp reference. make(impl, chunk_size) builds the mixer (same parameters)."""
    base = make("chunked", 8)
    want = reference(weights(base, names, f64), f64(x), np)
    graphdef, params = nnx.split(base, nnx.Param)

    def reference_loss(p):  # differentiated through the module's parameters: the same tree as the mixer's gradient
        return jnp.sum(reference(weights(nnx.merge(graphdef, p), names, lambda a: a), x, jnp) * w)

    g_ref = jax.jit(jax.grad(reference_loss))(params)
    for impl, chunk in forms:
        mixer = make(impl, chunk)
        gdef, prm = nnx.split(mixer, nnx.Param)

        (_, y), g = _value_and_grad(gdef, prm, x, w)
        assert rel_err(y, want) < FWD_TOL, (impl, chunk, rel_err(y, want))
        got = dict(jax.tree_util.tree_leaves_with_path(g))
        ref_leaves = jax.tree_util.tree_leaves_with_path(g_ref)
        assert len(ref_leaves) == len(got) > 0
        for path, g_want in ref_leaves:
            assert bool(jnp.all(jnp.isfinite(got[path]))), (impl, jax.tree_util.keystr(path))
            err = rel_err(got[path], g_want)
            assert err < GRAD_TOL, (impl, chunk, jax.tree_util.keystr(path), err)


def _loss(mixer, x, w):
    y = mixer(x)
    return jnp.sum(y * w), y


def _value_and_grad(graphdef, params, x, w):
    """((sum(y * w), y), d/dparams) of the mixer (graphdef, params), jitted."""
    return jax.jit(jax.value_and_grad(lambda p: _loss(nnx.merge(graphdef, p), x, w), has_aux=True))(params)


def decode_matches_forward(mixer, x, splits: tuple[int, ...]):
    """y of the full forward vs. prefill(x[:, :s0]) -> prefill continuing from that cache (x[:, s0:s1]) -> steps
    over the rest; returns (full y, incremental y, final cache)."""

    @jax.jit
    def incremental(x):
        cache = mixer.init_cache(x.shape[0], x.shape[1])
        pieces, start = [], 0
        for stop in splits:
            y, cache = mixer.prefill(x[:, start:stop], cache)
            pieces.append(y)
            start = stop

        def body(c, x_t):
            y_t, c = mixer.step(x_t, c)
            return c, y_t

        cache, ys = jax.lax.scan(body, cache, jnp.swapaxes(x[:, start:], 0, 1))
        return jnp.concatenate(pieces + [jnp.swapaxes(ys, 0, 1)], axis=1), cache

    y_inc, cache = incremental(x)
    return jax.jit(mixer.__call__)(x), y_inc, cache


# ----------------------------------------------------------------------------------------------------------------
# MD-LRPE
# ----------------------------------------------------------------------------------------------------------------


def np_lrpe_angles(positions, num_heads, head_dim, kind, base=10000.0):
    """Θ [T, H, n]: θ_{h,j} = base^(-2 (h n + j) / (H d)), axis a uses the head's first n/m, times p_a."""
    n = head_dim // 2 if kind == "rotate" else head_dim
    m = positions.shape[1]
    theta = np.array([[base ** (-2.0 * (h * n + j) / (num_heads * head_dim)) for j in range(n)]
                      for h in range(num_heads)])  # fmt: skip
    out = np.zeros((positions.shape[0], num_heads, n))
    for t, p in enumerate(np.asarray(positions, np.float64)):
        out[t] = np.concatenate([p[a] * theta[:, : n // m] for a in range(m)], axis=-1)
    return out


def np_md_lrpe(x, positions, kind, base=10000.0):
    x = f64(x)
    angles = np_lrpe_angles(positions, x.shape[2], x.shape[3], kind, base)[None]
    if kind == "cosine":
        return np.concatenate([x * np.cos(angles), x * np.sin(angles)], axis=-1)
    z = (x[..., 0::2] + 1j * x[..., 1::2]) * np.exp(1j * angles)  # complex rotation of adjacent pairs
    return np.stack([z.real, z.imag], axis=-1).reshape(x.shape)


def test_grid_positions_raster_order():
    got = np.asarray(grid_positions((3, 4)))
    want = np.array([(r, c) for r in range(3) for c in range(4)])
    np.testing.assert_array_equal(got, want)
    index = jnp.arange(10, 30)  # past the grid: rows continue (the first axis is unbounded)
    np.testing.assert_array_equal(np.asarray(grid_positions((3, 4), index)), np.stack([np.arange(10, 30) // 4,
                                                                                      np.arange(10, 30) % 4], -1))
    want_3d = np.array([(a, b, c) for a in range(2) for b in range(3) for c in range(4)])
    np.testing.assert_array_equal(np.asarray(grid_positions((2, 3, 4))), want_3d)


@pytest.mark.parametrize("kind", ["rotate", "cosine"])
def test_md_lrpe_matches_formula(kind, rng):
    x = rng.standard_normal((B, 12, H, 8)).astype(np.float32)
    pos = grid_positions((3, 4))
    got = md_lrpe(jnp.asarray(x), pos, kind=kind)
    assert got.shape == (B, 12, H, 16 if kind == "cosine" else 8)
    assert rel_err(got, np_md_lrpe(x, np.asarray(pos), kind)) < FWD_TOL


@pytest.mark.parametrize("kind", ["rotate", "cosine"])
def test_md_lrpe_relative_in_2d(kind, rng):
    """<f(q, p), f(k, p')> depends on p - p' only (2-D positions), and does change with p - p' along each axis."""
    d = 8
    q, k = (jnp.asarray(rng.standard_normal((1, 1, H, d)), jnp.float32) for _ in range(2))

    def score(p, p_prime):
        fq = md_lrpe(q, jnp.array([p]), kind=kind)
        fk = md_lrpe(k, jnp.array([p_prime]), kind=kind)
        return np.asarray(jnp.sum(fq * fk, axis=-1))[0, 0]  # [H]

    base = score((2, 5), (1, 3))
    for shift in [(3, 0), (0, 7), (4, 11)]:
        shifted = score((2 + shift[0], 5 + shift[1]), (1 + shift[0], 3 + shift[1]))
        np.testing.assert_allclose(shifted, base, rtol=1e-4, atol=1e-5)
    for other in [(0, 3), (1, 4)]:  # offset (2, 2) then (1, 1) instead of (1, 2): each axis matters
        assert np.max(np.abs(score((2, 5), other) - base)) > 1e-3


def test_md_lrpe_bad_args():
    x = jnp.ones((1, 4, 2, 6))
    with pytest.raises(ValueError, match="kind"):
        md_lrpe(x, jnp.zeros((4, 1), jnp.int32), kind="complex")
    with pytest.raises(ValueError, match="head_dim"):
        md_lrpe(x, jnp.zeros((4, 2), jnp.int32), kind="rotate")  # 3 angles over 2 axes
    with pytest.raises(ValueError, match="positions"):
        md_lrpe(x, jnp.zeros((5, 1), jnp.int32))


# ----------------------------------------------------------------------------------------------------------------
# LightNet
# ----------------------------------------------------------------------------------------------------------------

LIGHTNET_PARAMS = {
    "wq": ("q_proj", "kernel"), "wk": ("k_proj", "kernel"), "wv": ("v_proj", "kernel"),
    "wg1": ("g_down", "kernel"), "wg2": ("g_up", "kernel"), "norm": ("norm", "weight"), "wo": ("o_proj", "kernel"),
}  # fmt: skip


def lightnet_reference(lrpe=None, grid=None):
    """The LightNet layer per token. No LRPE or cosine LRPE: the additive form S'_t = S'_{t-1} + e^{k_t} v_tᵀ,
    Z_t = Z_{t-1} + e^{k_t}, S_t = S'_t / Z_t (cosine: each key feature is the pair e^{k} [cos Θ, sin Θ], both
    divided by the feature's Z). Rotate LRPE mixes features with different normalisers, so it has no additive
    form: its reference is the gated recurrence S_t = (Z_{t-1}/Z_t) S_{t-1} + R_t(e^{k_t}/Z_t) v_tᵀ."""
    V = D // H
    index = np.arange(T)
    pos = index[:, None] if grid is None else np.stack([index // grid[1], index % grid[1]], -1)
    angles = None if lrpe is None else np_lrpe_angles(pos, H, F_DIM, lrpe)  # [T, H, n]

    def rotate(xp, a, ang):  # a [B, H, F] by angles [H, F/2] on adjacent pairs
        c, s = xp.cos(ang), xp.sin(ang)
        even, odd = a[..., 0::2], a[..., 1::2]
        return xp.stack([even * c - odd * s, even * s + odd * c], axis=-1).reshape(a.shape)

    def run(p, x, xp):
        q = silu(xp, x @ p["wq"]).reshape(B, T, H, F_DIM)
        k = (x @ p["wk"]).reshape(B, T, H, F_DIM)
        v = (x @ p["wv"]).reshape(B, T, H, V)
        width = 2 * F_DIM if lrpe == "cosine" else F_DIM
        carry = (xp.zeros((B, H, width, V)), xp.zeros((B, H, F_DIM)), xp.zeros((B, H, width, V)))
        ang = np.zeros((T, H, F_DIM)) if angles is None else angles

        def step(carry, token):
            num, z_prev, state = carry
            q_t, k_t, v_t, ang_t = token
            e = xp.exp(k_t)
            z = z_prev + e
            if lrpe == "rotate":
                ratio = xp.where(z_prev > 0, z_prev / z, 0.0)
                state = ratio[..., None] * state + rotate(xp, e / z, ang_t)[..., None] * v_t[..., None, :]
                q_t = rotate(xp, q_t, ang_t)
            else:
                feat, norm = e, z
                if lrpe == "cosine":
                    cos, sin = xp.cos(ang_t), xp.sin(ang_t)
                    feat, norm = xp.concatenate([e * cos, e * sin], -1), xp.concatenate([z, z], -1)
                    q_t = xp.concatenate([q_t * cos, q_t * sin], -1)
                num = num + feat[..., None] * v_t[..., None, :]
                state = num / norm[..., None]
            return (num, z, state), xp.einsum("bhf,bhfv->bhv", q_t, state) * F_DIM**-0.5

        o = per_token(xp, step, carry, time_major(xp, q, k, v) + [ang]).reshape(B, T, H * V)
        gate = x @ p["wg1"] @ p["wg2"]
        o = o / xp.sqrt(xp.mean(o * o, axis=-1, keepdims=True) + 1e-5) * p["norm"] * silu(xp, gate)
        return o @ p["wo"]

    return run


def make_lightnet(impl="chunked", chunk_size=8, **kw):
    return LightNet(D, H, feature_dim=F_DIM, gate_low_rank_dim=LOW_RANK, impl=impl, chunk_size=chunk_size,
                    rngs=nnx.Rngs(0), **kw)  # fmt: skip


def test_lightnet_matches_additive_reference():
    x, w = inputs()
    check_forward_and_grad(make_lightnet, lightnet_reference(), LIGHTNET_PARAMS, x, w)


@pytest.mark.parametrize("lrpe, grid", [("cosine", (3, 4)), ("rotate", None)])
def test_lightnet_lrpe_matches_reference(lrpe, grid):
    """MD-LRPE on a 3 x 4 grid (T = 21 runs past it: rows continue) and 1-D rotate. The positions are computed
    before the op, whose forms are all checked above; the decode test below runs the recurrent step with LRPE."""
    x, w = inputs(9)
    make = lambda impl, c: make_lightnet(impl, c, lrpe=lrpe, grid_shape=grid)
    check_forward_and_grad(make, lightnet_reference(lrpe, grid), LIGHTNET_PARAMS, x, w, forms=[("chunked", 8)])


def test_lightnet_extreme_keys_stay_finite():
    """Key logits of magnitude ~30 (std 30, up to ~100) in the chunked form (log gates down to ~-100 inside a
    chunk): outputs and gradients finite, output still == the float64 reference."""
    mixer = make_lightnet("chunked", 8)
    kernel = mixer.k_proj.kernel
    kernel[...] = 30.0 / D**0.5 * kernel[...] / jnp.std(kernel[...])  # key logits k_proj(x) ~ N(0, 30^2)
    x, w = inputs(1)
    k = x @ kernel[...]
    assert float(jnp.max(jnp.abs(k))) > 30.0
    want = lightnet_reference()(weights(mixer, LIGHTNET_PARAMS, f64), f64(x), np)
    (_, y), grads = nnx.jit(nnx.value_and_grad(_loss, has_aux=True))(mixer, x, w)
    assert bool(jnp.all(jnp.isfinite(y)))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    assert rel_err(y, want) < 1e-4


def test_lightnet_decode_matches_forward():
    """With 2-D MD-LRPE (positions from the cache's counter): prefill (5 tokens) -> prefill continuing from that
    cache (to 13) -> steps == full forward; the cached z is the logsumexp of all key logits, pos counts tokens."""
    mixer = make_lightnet("chunked", 8, lrpe="cosine", grid_shape=(3, 4))
    x, _ = inputs(2)
    y_full, y_inc, cache = decode_matches_forward(mixer, x, (5, 13))
    assert rel_err(y_inc, y_full) < FWD_TOL
    k = f64(x) @ f64(mixer.k_proj.kernel[...])
    z = np.log(np.sum(np.exp(k), axis=1)).reshape(B, H, F_DIM)
    assert rel_err(cache.z, z) < FWD_TOL and int(cache.pos) == T


def test_lightnet_bad_args():
    bad = [
        ({"feature_dim": 0}, "feature_dim"),
        ({"lrpe": "bogus"}, "lrpe"),
        ({"grid_shape": (3, 4)}, "grid_shape"),  # positions without LRPE
        ({"lrpe": "rotate", "feature_dim": 6, "grid_shape": (3, 4)}, "feature_dim"),  # 3 angles over 2 axes
        ({"impl": "scan"}, "impl"),
        ({"gate_low_rank_dim": -1}, "gate_low_rank_dim"),
    ]
    for kw, name in bad:
        with pytest.raises(ValueError, match=name):
            LightNet(D, H, **{"feature_dim": F_DIM, **kw})
    with pytest.raises(ValueError, match="batch"):
        make_lightnet().init_cache(0, 8)


# ----------------------------------------------------------------------------------------------------------------
# Flowformer
# ----------------------------------------------------------------------------------------------------------------

FLOW_PARAMS = {
    "wq": ("q_proj", "kernel"), "bq": ("q_proj", "bias"), "wk": ("k_proj", "kernel"), "bk": ("k_proj", "bias"),
    "wv": ("v_proj", "kernel"), "bv": ("v_proj", "bias"), "wo": ("o_proj", "kernel"), "bo": ("o_proj", "bias"),
}  # fmt: skip
EPS = 1e-6


def flow_inputs(p, x, xp):
    d = D // H
    q = sigmoid(xp, x @ p["wq"] + p["bq"]).reshape(B, T, H, d)
    k = sigmoid(xp, x @ p["wk"] + p["bk"]).reshape(B, T, H, d)
    return q, k, (x @ p["wv"] + p["bv"]).reshape(B, T, H, d)


def flow_causal_reference(p, x, xp):
    """Causal Flow-Attention with literal prefix sums (t = 1..T), ε where the official code puts it."""
    q, k, v = flow_inputs(p, x, xp)
    d = D // H
    zero = xp.zeros((B, H, d))
    carry = (zero, zero, zero, zero, xp.zeros((B, H)), xp.zeros((B, H, d, d)))

    def step(carry, token):
        k_sum, q_sum, k_flow, q_flow, source_sum, state = carry
        q_t, k_t, v_t, t = token
        k_sum, q_sum = k_sum + k_t, q_sum + q_t
        incoming = t / xp.sum((q_t + EPS) * (k_sum + EPS), -1)
        outgoing = t / xp.sum((k_t + EPS) * (q_sum + EPS), -1)
        k_flow, q_flow = k_flow + k_t * outgoing[..., None], q_flow + q_t * incoming[..., None]
        sink = xp.sum((q_t + EPS) * (k_flow + EPS), -1) / t
        source = xp.clip(xp.sum((k_t + EPS) * (q_flow + EPS), -1) / t, -1.0, 1.0)
        source_sum = source_sum + xp.exp(source)
        competition = t * xp.exp(source) / source_sum
        state = state + k_t[..., :, None] * (competition[..., None] * v_t)[..., None, :]
        read = xp.einsum("bhk,bhkv->bhv", q_t * (incoming / t)[..., None], state)
        return (k_sum, q_sum, k_flow, q_flow, source_sum, state), sigmoid(xp, sink)[..., None] * read

    t_values = np.arange(1.0, T + 1.0)  # 1-based positions
    o = per_token(xp, step, carry, time_major(xp, q, k, v) + [t_values])
    return o.reshape(B, T, D) @ p["wo"] + p["bo"]


def flow_bidirectional_reference(p, x, xp):
    """Non-causal Flow-Attention literally from the formulas (N = M = T)."""
    q, k, v = flow_inputs(p, x, xp)
    n = m = T
    incoming = 1.0 / xp.einsum("bihd,bhd->bih", q + EPS, xp.sum(k, 1) + EPS)
    outgoing = 1.0 / xp.einsum("bjhd,bhd->bjh", k + EPS, xp.sum(q, 1) + EPS)
    sink = xp.einsum("bihd,bhd->bih", q + EPS, xp.sum(k * outgoing[..., None], 1) + EPS)
    source = xp.clip(xp.einsum("bjhd,bhd->bjh", k + EPS, xp.sum(q * incoming[..., None], 1) + EPS), -1.0, 1.0)
    allocation = sigmoid(xp, sink * n / m)
    competition = xp.exp(source) / xp.sum(xp.exp(source), 1, keepdims=True) * m
    kv = xp.einsum("bjhk,bjhv->bhkv", k, competition[..., None] * v)
    o = allocation[..., None] * xp.einsum("bihk,bhkv->bihv", q * incoming[..., None], kv)
    return o.reshape(B, T, D) @ p["wo"] + p["bo"]


def make_flow(impl="chunked", chunk_size=8, **kw):
    return FlowAttention(D, H, impl=impl, chunk_size=chunk_size, rngs=nnx.Rngs(0), **kw)


def test_flowformer_causal_matches_reference():
    x, w = inputs(3)
    check_forward_and_grad(make_flow, flow_causal_reference, FLOW_PARAMS, x, w)


def test_flowformer_bidirectional_matches_reference():
    x, w = inputs(4)
    mixer = make_flow(causal=False)
    assert mixer.causal is False
    y = jax.jit(mixer.__call__)(x)
    assert rel_err(y, flow_bidirectional_reference(weights(mixer, FLOW_PARAMS, f64), f64(x), np)) < FWD_TOL
    graphdef, params = nnx.split(mixer, nnx.Param)
    g = jax.jit(jax.grad(lambda p: _loss(nnx.merge(graphdef, p), x, w)[0]))(params)
    g_ref = jax.jit(jax.grad(lambda p: jnp.sum(
        flow_bidirectional_reference(weights(nnx.merge(graphdef, p), FLOW_PARAMS, lambda a: a), x, jnp) * w)))(params)
    got = dict(jax.tree_util.tree_leaves_with_path(g))
    for path, want in jax.tree_util.tree_leaves_with_path(g_ref):
        assert rel_err(got[path], want) < GRAD_TOL, jax.tree_util.keystr(path)
    # every output sees the future: changing the last token changes the first output
    y2 = jax.jit(mixer.__call__)(x.at[:, -1].add(1.0))
    assert float(jnp.max(jnp.abs(y2[:, 0] - y[:, 0]))) > 1e-6


def test_flowformer_decode_matches_forward():
    x, _ = inputs(5)
    y_full, y_inc, cache = decode_matches_forward(make_flow(), x, (6, 17))
    assert rel_err(y_inc, y_full) < FWD_TOL and int(cache.pos) == T


def test_flowformer_bad_args():
    with pytest.raises(ValueError, match="causal"):
        make_flow(causal=False).init_cache(B, T)
    with pytest.raises(ValueError, match="eps"):
        make_flow(eps=0.0)
    with pytest.raises(ValueError, match="causal"):
        make_flow(causal="yes")
    with pytest.raises(ValueError, match="d_model"):
        FlowAttention(D, 3)


# ----------------------------------------------------------------------------------------------------------------
# DSF normalised attention
# ----------------------------------------------------------------------------------------------------------------

DSF_PARAMS = {**FLOW_PARAMS, "wn": ("n_proj", "kernel"), "bn": ("n_proj", "bias")}
ETA = {
    "exp": lambda xp, n: xp.exp(-n),
    "softplus": lambda xp, n: 1.0 / xp.logaddexp(0.0, n),
    "sigmoid": lambda xp, n: 1.0 + xp.exp(-n),
}


def dsf_reference(norm_fn):
    def run(p, x, xp):
        d = D // H
        q = (x @ p["wq"] + p["bq"]).reshape(B, T, H, d)
        k = (x @ p["wk"] + p["bk"]).reshape(B, T, H, d)
        v = (x @ p["wv"] + p["bv"]).reshape(B, T, H, d)
        eta = ETA[norm_fn](xp, x @ p["wn"] + p["bn"])  # [B, T, H]

        def step(state, token):
            q_t, k_t, v_t, eta_t = token
            state = state + k_t[..., :, None] * v_t[..., None, :]
            return state, eta_t[..., None] * xp.einsum("bhk,bhkv->bhv", q_t, state)

        o = per_token(xp, step, xp.zeros((B, H, d, d)), time_major(xp, q, k, v, eta))
        return o.reshape(B, T, D) @ p["wo"] + p["bo"]

    return run


def make_dsf(impl="chunked", chunk_size=8, **kw):
    return DSFAttention(D, H, impl=impl, chunk_size=chunk_size, rngs=nnx.Rngs(0), **kw)


def test_dsf_matches_reference():
    x, w = inputs(6)
    check_forward_and_grad(make_dsf, dsf_reference("exp"), DSF_PARAMS, x, w)


@pytest.mark.parametrize("norm_fn", ["softplus", "sigmoid"])
def test_dsf_norm_variants(norm_fn):
    x, _ = inputs(7)
    mixer = make_dsf(norm_fn=norm_fn)
    want = dsf_reference(norm_fn)(weights(mixer, DSF_PARAMS, f64), f64(x), np)
    assert rel_err(jax.jit(mixer.__call__)(x), want) < FWD_TOL


def test_dsf_decode_matches_forward():
    x, _ = inputs(8)
    y_full, y_inc, _ = decode_matches_forward(make_dsf(), x, (9,))
    assert rel_err(y_inc, y_full) < FWD_TOL


def test_dsf_bad_args():
    with pytest.raises(ValueError, match="norm_fn"):
        make_dsf(norm_fn="tanh")
    with pytest.raises(ValueError, match="key_dim"):
        make_dsf(key_dim=0)


# ----------------------------------------------------------------------------------------------------------------
# Sequence parallelism (2 host devices, own process): sharded forward and gradient == one device
# ----------------------------------------------------------------------------------------------------------------

SP_SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from jax.sharding import Mesh, PartitionSpec as P
    from seqlab.parallel.mesh import shard_sequence
    from seqlab.mixers.linear.flowformer import FlowAttention
    from seqlab.mixers.linear.lightnet import LightNet

    jax.config.update("jax_default_matmul_precision", "highest")
    mesh = Mesh(np.array(jax.devices()[:2]), ("seq",))
    x = jax.random.normal(jax.random.key(0), (2, 16, 16))
    w = jax.random.normal(jax.random.key(1), (2, 16, 16))
    cases = {
        "lightnet-lrpe": LightNet(16, 2, feature_dim=8, gate_low_rank_dim=4, lrpe="cosine", grid_shape=(4, 4),
                                  chunk_size=4, rngs=nnx.Rngs(0)),
        "flowformer": FlowAttention(16, 2, chunk_size=4, rngs=nnx.Rngs(0)),
        "flowformer-bidirectional": FlowAttention(16, 2, causal=False, rngs=nnx.Rngs(0)),
    }
    rel = lambda a, b: float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))
    for name, mixer in cases.items():
        graphdef, params = nnx.split(mixer)
        loss = lambda p, x: jnp.sum(nnx.merge(graphdef, p)(x) * w)
        shard_sequence(mixer, "seq")
        sgraph, _ = nnx.split(mixer)
        local = lambda p, x, w: jax.lax.psum(jnp.sum(nnx.merge(sgraph, p)(x) * w), "seq")
        sharded = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(None, "seq"), P(None, "seq")), out_specs=P())
        l_sp, g_sp = jax.jit(jax.value_and_grad(sharded))(params, x, w)
        l_1, g_1 = jax.jit(jax.value_and_grad(loss))(params, x)
        errs = [rel(l_sp, l_1)] + [rel(a, b) for a, b in zip(jax.tree.leaves(g_sp), jax.tree.leaves(g_1))]
        assert len(errs) > 4 and max(errs) < 1e-5, (name, errs)
        print(name, "ok", max(errs))
    """
)


def test_sequence_parallel_matches_single_device():
    """LightNet (with 2-D MD-LRPE) and Flowformer (both forms) sequence-sharded over 2 devices: the logcumsumexp
    prefix and the grid positions across devices, Flowformer's prefix sums / psums, the op's state summaries. Loss
    and every parameter gradient == one device. (DSF's only cross-token part is `linear_attn`'s own summary.)"""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()
    cmd = [sys.executable, "-c", SP_SCRIPT]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count(" ok ") == 3, proc.stdout
