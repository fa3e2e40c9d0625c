"""LoLCATs' window + linear hybrid op (seqlab.ops.window_hybrid) and the LoLCATs and Liger mixers.

Ground truth is written here from the equations (families.md §9, §10) and imports nothing under test:
* `np_hybrid`: float64 numpy, a double loop over queries i and keys j <= i with the window rule written literally
  (`in_window`); the layer references (`np_lolcats_layer`, `np_liger_layer`) add projections, RoPE, the Hedgehog
  map, the GLA recurrence (token by token) and sliding-window softmax in numpy, reading only the mixers' parameters;
* `jnp_hybrid`: float32 jnp, the dense masked T x T form, for gradients.

Sizes are tiny: T = 21 (odd, not a multiple of the windows 4 and 8 nor of the chunk sizes 3 and 8), H = 2 query
heads sharing one key/value head in the op tests. Tolerances (relative error over the whole tensor): forward 1e-5,
gradients 1e-4.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from seqlab.mixers.hybrid.liger import LigerAttention
from seqlab.mixers.hybrid.lolcats import LoLCATsAttention
from seqlab.mixers.softmax.softmax_attention import SlidingWindowAttention, SoftmaxAttention
from seqlab.ops.lolcats_attn import lolcats_attn

FWD_TOL, GRAD_TOL = 1e-5, 1e-4
B, T, H, DK, DV, F = 2, 21, 2, 8, 5, 6
D_MODEL, T_MIX, PROMPT = 32, 21, 11
FORMS = [("chunked", 3), ("chunked", 8), ("recurrent", 8), ("parallel", 8)]


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert np.linalg.norm(b) > 0, "the reference is zero; the comparison would be vacuous"
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# --------------------------------------------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------------------------------------------


def in_window(i: int, j: int, window: int, kind: str) -> bool:
    """sw: the query and the window - 1 keys before it; tk: the query's block (causal) and the whole block before."""
    if kind == "sw":
        return i - window < j <= i
    return j <= i and j // window >= i // window - 1


def np_hybrid(q, k, v, phi_q, phi_k, gamma, lam, window, kind, state=None):
    """y_i = [g sum_{j in W} e^{s_ij - m_i} v_j + l sum_{j <= i, not in W} phi_q_i.phi_k_j v_j] / [same with 1 for v],
    s_ij = q_i.k_j / sqrt(d), m_i = max over W only; state [B, H, F, V + 1] adds l phi_q_i . (S | z)."""
    q, k, v, phi_q, phi_k = (np.asarray(a, np.float64) for a in (q, k, v, phi_q, phi_k))
    gamma, lam = np.asarray(gamma, np.float64), np.asarray(lam, np.float64)
    batch, length, heads, dim = q.shape
    group = heads // k.shape[2]
    out = np.zeros((batch, length, heads, v.shape[-1]))
    for i in range(length):
        window_keys = [j for j in range(i + 1) if in_window(i, j, window, kind)]
        for h in range(heads):
            g = h // group
            s = np.stack([np.sum(q[:, i, h] * k[:, j, g], -1) / np.sqrt(dim) for j in window_keys], -1)
            e = gamma[h] * np.exp(s - s.max(-1, keepdims=True))  # [B, |W|]
            num = np.einsum("bj,bjv->bv", e, v[:, window_keys, g])
            den = e.sum(-1)
            for j in range(i + 1):
                if j not in window_keys:
                    a = lam[h] * np.sum(phi_q[:, i, h] * phi_k[:, j, h], -1)
                    num, den = num + a[:, None] * v[:, j, g], den + a
            if state is not None:
                read = lam[h] * np.einsum("bf,bfv->bv", phi_q[:, i, h], np.asarray(state, np.float64)[:, h])
                num, den = num + read[:, :-1], den + read[:, -1]
            out[:, i, h] = num / den[:, None]
    return out


def dense_masks(length: int, window: int, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(window, causal-outside-window) masks [T, T] from `in_window`."""
    win = np.array([[in_window(i, j, window, kind) for j in range(length)] for i in range(length)])
    return win, np.tril(np.ones((length, length), bool)) & ~win


def jnp_hybrid(q, k, v, phi_q, phi_k, gamma, lam, window, kind):
    """Dense masked form in float32 (differentiable)."""
    heads, dim = q.shape[2], q.shape[3]
    k, v = (jnp.repeat(a, heads // a.shape[2], axis=2) for a in (k, v))
    win, outside = dense_masks(q.shape[1], window, kind)
    s = jnp.einsum("bihd,bjhd->bhij", q, k) / np.sqrt(dim)
    m = jnp.max(jnp.where(win, s, -jnp.inf), -1, keepdims=True)
    weights = gamma[:, None, None] * jnp.exp(jnp.where(win, s - m, -jnp.inf))
    weights = weights + lam[:, None, None] * jnp.where(outside, jnp.einsum("bihf,bjhf->bhij", phi_q, phi_k), 0.0)
    return jnp.einsum("bhij,bjhv->bihv", weights, v) / jnp.sum(weights, -1).transpose(0, 2, 1)[..., None]


def np_rope(x, base=10000.0):
    """Half-split rotary embedding of [B, T, H, d] at positions 0..T-1."""
    d = x.shape[-1]
    angle = np.arange(x.shape[1])[:, None] * base ** (-np.arange(d // 2) * 2.0 / d)  # [T, d/2]
    cos, sin = np.cos(angle)[None, :, None], np.sin(angle)[None, :, None]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return np.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)


def np_softmax(y, axis=-1):
    e = np.exp(y - y.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def np_hedgehog(x, weight):
    """[softmax(x W_h), softmax(-x W_h)] per head, clamped at 1e-12."""
    y = np.einsum("bthd,hdf->bthf", x, weight)
    return np.maximum(np.concatenate([np_softmax(y), np_softmax(-y)], -1), 1e-12)


def f64(param) -> np.ndarray:
    return np.asarray(param[...], np.float64)


def np_projections(mixer, x):
    """q [B, T, H, d], k, v [B, T, H_kv, d] (pre-RoPE) from the mixer's kernels (and biases)."""
    x = np.asarray(x, np.float64)

    def project(name):
        layer = getattr(mixer, name)
        y = x @ f64(layer.kernel)
        return (y if layer.bias is None else y + f64(layer.bias)).reshape(*x.shape[:2], -1, mixer.head_dim)

    return project("q_proj"), project("k_proj"), project("v_proj")


def np_output(mixer, o):
    return o.reshape(*o.shape[:2], -1) @ f64(mixer.o_proj.kernel)


def np_lolcats_layer(mixer: LoLCATsAttention, x):
    q, k, v = np_projections(mixer, x)
    q, k = np_rope(q), np_rope(k)
    phi_q = np_hedgehog(q, f64(mixer.q_map.weight))
    phi_k = np_hedgehog(np.repeat(k, mixer.num_heads // k.shape[2], axis=2), f64(mixer.k_map.weight))
    gamma = 1.0 / (1.0 + np.exp(-f64(mixer.window_factor)))
    lam = 1.0 - gamma if mixer.affine_attention_factors else np.ones_like(gamma)
    return np_output(mixer, np_hybrid(q, k, v, phi_q, phi_k, gamma, lam, mixer.window, mixer.kind))


def np_liger_layer(mixer: LigerAttention, x):
    """mix * SWA(RoPE q, k) + (1 - mix) * GLA(softmax q, softmax k, gate logsigmoid(k)/16), token by token."""
    q, k, v = np_projections(mixer, x)
    batch, length, heads, d = q.shape
    group = heads // k.shape[2]
    log_alpha = -np.logaddexp(0.0, -k) / mixer.gate_logit_normalizer
    phi_q, phi_k = np_softmax(q), np_softmax(k)
    qr, kr = np_rope(q), np_rope(k)
    gla, swa = np.zeros_like(q), np.zeros_like(q)
    state = np.zeros((batch, heads, d, d))
    for t in range(length):
        for h in range(heads):
            g = h // group
            state[:, h] = np.exp(log_alpha[:, t, g])[..., None] * state[:, h]
            state[:, h] += phi_k[:, t, g][:, :, None] * v[:, t, g][:, None, :]
            gla[:, t, h] = np.einsum("bk,bkv->bv", phi_q[:, t, h], state[:, h])
            keys = [s for s in range(t + 1) if t - s < mixer.window]
            scores = np.stack([np.sum(qr[:, t, h] * kr[:, s, g], -1) / np.sqrt(d) for s in keys], -1)
            swa[:, t, h] = np.einsum("bs,bsv->bv", np_softmax(scores), v[:, keys, g])
    return np_output(mixer, mixer.mix * swa + (1.0 - mixer.mix) * gla)


# --------------------------------------------------------------------------------------------------------------
# The op
# --------------------------------------------------------------------------------------------------------------


def op_inputs(rng, q_scale=1.0):
    q = rng.normal(size=(B, T, H, DK)) * q_scale
    k = rng.normal(size=(B, T, 1, DK))
    v = rng.normal(size=(B, T, 1, DV))
    phi_q, phi_k = rng.uniform(0.05, 1.0, size=(2, B, T, H, F))
    gamma, lam = np.array([0.3, 0.8]), np.array([1.0, 0.5])
    return [np.asarray(a, np.float32) for a in (q, k, v, phi_q, phi_k, gamma, lam)]


@pytest.mark.parametrize("impl, chunk_size", FORMS)
@pytest.mark.parametrize("window", [4, 8])
@pytest.mark.parametrize("kind", ["sw", "tk"])
def test_lolcats_attn_matches_per_token_reference(rng, kind, window, impl, chunk_size):
    q, k, v, phi_q, phi_k, gamma, lam = op_inputs(rng)
    o, _ = lolcats_attn(q, k, v, phi_q, phi_k, gamma, linear_factor=lam, window=window, kind=kind, impl=impl,
                        chunk_size=chunk_size)
    assert o.dtype == jnp.float32
    assert rel_err(o, np_hybrid(q, k, v, phi_q, phi_k, gamma, lam, window, kind)) < FWD_TOL


@pytest.mark.parametrize("kind", ["sw", "tk"])
def test_lolcats_attn_large_logits_keep_the_max_on_the_softmax_term_only(rng, kind):
    """Scores beyond 89, where e^s overflows float32: the max-subtracted softmax term still weighs against the raw
    linear scores exactly as the reference does."""
    q, k, v, phi_q, phi_k, gamma, lam = op_inputs(rng, q_scale=40.0)
    assert np.max(np.einsum("bihd,bjhd->bhij", q, np.repeat(k, H, axis=2))) / np.sqrt(DK) > 89.0
    o, _ = lolcats_attn(q, k, v, phi_q, phi_k, gamma, linear_factor=lam, window=4, kind=kind, chunk_size=8)
    assert bool(jnp.all(jnp.isfinite(o)))
    assert rel_err(o, np_hybrid(q, k, v, phi_q, phi_k, gamma, lam, 4, kind)) < FWD_TOL


@pytest.mark.parametrize("kind", ["sw", "tk"])
def test_lolcats_attn_gradients_match_dense_reference(rng, kind):
    """Every form (chunked with chunk 3, recurrent, parallel): gradients of all seven inputs."""
    inputs = [jnp.asarray(a) for a in op_inputs(rng)]
    cotangent = jnp.asarray(rng.normal(size=(B, T, H, DV)), jnp.float32)
    argnums = tuple(range(7))

    def loss_ref(*args):
        return jnp.sum(jnp_hybrid(*args, 4, kind) * cotangent)

    def loss_op(q, k, v, phi_q, phi_k, gamma, lam, impl, chunk_size):
        o, _ = lolcats_attn(q, k, v, phi_q, phi_k, gamma, linear_factor=lam, window=4, kind=kind, impl=impl,
                            chunk_size=chunk_size)
        return jnp.sum(o * cotangent)

    want = jax.jit(jax.grad(loss_ref, argnums))(*inputs)
    for impl, chunk_size in (("chunked", 3), ("recurrent", 8), ("parallel", 8)):
        got = jax.jit(jax.grad(loss_op, argnums), static_argnums=(7, 8))(*inputs, impl, chunk_size)
        for name, g, w in zip(("q", "k", "v", "phi_q", "phi_k", "window_factor", "linear_factor"), got, want):
            assert rel_err(g, w) < GRAD_TOL, (impl, name, rel_err(g, w))


@pytest.mark.parametrize("kind", ["sw", "tk"])
def test_lolcats_attn_final_state_and_initial_state(rng, kind):
    """The final state is (S | z) of the tokens before T - R (R = window, or 2 windows for tk); an initial state
    adds lam * phi_q . (S | z) to every query."""
    q, k, v, phi_q, phi_k, gamma, lam = op_inputs(rng)
    window, reach = 4, (4 if kind == "sw" else 8)
    _, final = lolcats_attn(q, k, v, phi_q, phi_k, gamma, linear_factor=lam, window=window, kind=kind,
                            output_final_state=True, chunk_size=8)
    v1 = np.concatenate([np.repeat(v, H, axis=2), np.ones((B, T, H, 1), np.float32)], -1).astype(np.float64)
    expected = np.einsum("bthf,bthv->bhfv", phi_k[:, : T - reach].astype(np.float64), v1[:, : T - reach])
    assert final.shape == (B, H, F, DV + 1) and rel_err(final, expected) < FWD_TOL
    state = np.einsum("bthf,bthv->bhfv", rng.uniform(0.0, 1.0, (B, 5, H, F)), np.abs(rng.normal(size=(B, 5, H, DV + 1))))
    for impl in ("chunked", "recurrent"):
        o, _ = lolcats_attn(q, k, v, phi_q, phi_k, gamma, linear_factor=lam, window=window, kind=kind,
                            initial_state=jnp.asarray(state, jnp.float32), impl=impl, chunk_size=8)
        assert rel_err(o, np_hybrid(q, k, v, phi_q, phi_k, gamma, lam, window, kind, state)) < FWD_TOL


def test_lolcats_attn_keeps_the_value_dtype(rng):
    q, k, v, phi_q, phi_k, gamma, _ = op_inputs(rng)
    o, _ = lolcats_attn(q, k, jnp.asarray(v, jnp.bfloat16), phi_q, phi_k, gamma, window=4)
    assert o.dtype == jnp.bfloat16


@pytest.mark.parametrize(
    "change, arg",
    [
        (dict(window=0), "window"),
        (dict(kind="banded"), "kind"),
        (dict(window_factor=np.ones(3, np.float32)), "window_factor"),
        (dict(linear_factor=np.ones((2, 2), np.float32)), "linear_factor"),
        (dict(phi_k=np.ones((B, T, H, F + 1), np.float32)), "phi_k"),
        (dict(k=np.ones((B, T, 3, DK), np.float32)), "k"),
        (dict(impl="flash"), "impl"),
        (dict(chunk_size=0), "chunk_size"),
    ],
)
def test_lolcats_attn_bad_arguments_name_the_argument(rng, change, arg):
    q, k, v, phi_q, phi_k, gamma, lam = op_inputs(rng)
    args = dict(q=q, k=k, v=v, phi_q=phi_q, phi_k=phi_k, window_factor=gamma, linear_factor=lam, window=4,
                kind="tk", impl="chunked", chunk_size=8)
    args.update(change)
    with pytest.raises(ValueError) as info:
        lolcats_attn(**args)
    assert str(info.value).startswith(arg), str(info.value)


# --------------------------------------------------------------------------------------------------------------
# The mixers
# --------------------------------------------------------------------------------------------------------------


def mixer_input(seed: int = 0, length: int = T_MIX):
    return jax.random.normal(jax.random.key(seed), (B, length, D_MODEL), jnp.float32)


def lolcats(kind: str, **kw) -> LoLCATsAttention:
    args = dict(num_heads=4, num_kv_heads=2, window=4, kind=kind, num_features=4, chunk_size=8, rngs=nnx.Rngs(0))
    mixer = LoLCATsAttention(D_MODEL, **{**args, **kw})
    mixer.window_factor[...] = jnp.linspace(-1.0, 1.5, mixer.num_heads)  # distinct per-head factors
    return mixer


def liger(**kw) -> LigerAttention:
    args = dict(num_heads=4, num_kv_heads=2, window=4, chunk_size=8, rngs=nnx.Rngs(0))
    return LigerAttention(D_MODEL, **{**args, **kw})


@pytest.mark.parametrize(
    "kind, options", [("sw", {}), ("tk", {}), ("tk", dict(affine_attention_factors=True, num_kv_heads=1))]
)
def test_lolcats_layer_matches_numpy_reference(kind, options):
    mixer = lolcats(kind, **options)
    x = mixer_input()
    assert rel_err(nnx.jit(lambda m, x: m(x))(mixer, x), np_lolcats_layer(mixer, x)) < FWD_TOL


@pytest.mark.parametrize("options", [{}, dict(mix=0.2, num_kv_heads=4, use_bias=True, impl="recurrent")])
def test_liger_layer_matches_numpy_reference(options):
    mixer = liger(**options)
    x = mixer_input()
    assert rel_err(nnx.jit(lambda m, x: m(x))(mixer, x), np_liger_layer(mixer, x)) < FWD_TOL


def steps(mixer, x, cache):
    """(y [B, T, D], cache) feeding x one token at a time through `step`."""

    def body(c, x_t):
        y_t, c = mixer.step(x_t, c)
        return c, y_t

    cache, ys = jax.lax.scan(body, cache, jnp.swapaxes(x, 0, 1))
    return jnp.swapaxes(ys, 0, 1), cache


DECODE_CASES = {"lolcats-sw": lambda: lolcats("sw"), "lolcats-tk": lambda: lolcats("tk"), "liger": liger}


def decode_outputs(mixer, x):
    """(token-by-token decode, prefill(PROMPT) + decode, the prefilled cache, the cache after stepping PROMPT)."""
    y_decode, _ = steps(mixer, x, mixer.init_cache(B, T_MIX))
    y_prompt, prefilled = mixer.prefill(x[:, :PROMPT], mixer.init_cache(B, T_MIX))
    y_rest, _ = steps(mixer, x[:, PROMPT:], prefilled)
    _, stepped = steps(mixer, x[:, :PROMPT], mixer.init_cache(B, T_MIX))
    return y_decode, jnp.concatenate([y_prompt, y_rest], 1), prefilled, stepped


@pytest.mark.parametrize("case", sorted(DECODE_CASES))
def test_decode_and_prefill_match_full_forward(case):
    """T = 21 > 2 R for R = 8 (tk) and 4 (sw, liger): the ring buffer wraps and tokens leave the window. Token by
    token decode == the training path; prefill(11 tokens) + decode == the training path, and the prefilled cache ==
    the cache after stepping the same 11 tokens."""
    mixer = DECODE_CASES[case]()
    x = mixer_input(1)
    y_full, (y_decode, y_prefill, prefilled, stepped) = nnx.jit(lambda m, x: (m(x), decode_outputs(m, x)))(mixer, x)
    assert rel_err(y_decode, y_full) < FWD_TOL and rel_err(y_prefill, y_full) < FWD_TOL
    assert int(prefilled.pos) == PROMPT
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(prefilled), jax.tree_util.tree_leaves(stepped)):
        assert got.shape == want.shape and got.dtype == want.dtype, jax.tree_util.keystr(path)
        if jnp.issubdtype(want.dtype, jnp.integer):
            np.testing.assert_array_equal(got, want, err_msg=jax.tree_util.keystr(path))
        else:
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_decode_gradient_matches_full_gradient():
    """jit + grad through both paths of LoLCATs-tk: every parameter gets the same, nonzero gradient."""
    mixer = lolcats("tk")
    x = mixer_input(1)
    w = jax.random.normal(jax.random.key(2), x.shape)
    graphdef, params, rest = nnx.split(mixer, nnx.Param, ...)

    def loss(p, decode: bool):
        m = nnx.merge(graphdef, p, rest)
        y = steps(m, x, m.init_cache(B, T_MIX))[0] if decode else m(x)
        return jnp.sum(y * w)

    g_full, g_decode = jax.jit(lambda p: (jax.grad(loss)(p, False), jax.grad(loss)(p, True)))(params)
    full_leaves = jax.tree_util.tree_leaves_with_path(g_full)
    assert len(full_leaves) == len(jax.tree_util.tree_leaves(g_decode)) == 7  # 4 kernels, 2 maps, window_factor
    for (path, g), g_dec in zip(full_leaves, jax.tree_util.tree_leaves(g_decode)):
        assert float(jnp.max(jnp.abs(g))) > 0, jax.tree_util.keystr(path)
        assert rel_err(g_dec, g) < GRAD_TOL, (jax.tree_util.keystr(path), rel_err(g_dec, g))


def test_cache_layouts():
    sw, tk, lig = lolcats("sw").init_cache(3, 100), lolcats("tk").init_cache(3, 100), liger().init_cache(3, 100)
    assert sw.k.shape == sw.v.shape == (3, 4, 2, 8) and sw.phi_k.shape == (3, 4, 4, 8)
    assert tk.k.shape == (3, 8, 2, 8) and tk.phi_k.shape == (3, 8, 4, 8) and tk.key_positions.shape == (8,)
    assert sw.state.shape == tk.state.shape == (3, 4, 8, 9) and sw.state.dtype == jnp.float32
    assert lig.k.shape == (3, 4, 2, 8) and lig.state.shape == (3, 4, 8, 8) and lig.phi_k is None
    assert lolcats("tk").init_cache(1, 5).k.shape[1] == 5  # never more slots than max_len
    assert int(tk.pos) == 0 and bool(jnp.all(tk.key_positions == -1))


def test_lolcats_defaults_follow_the_paper():
    mixer = LoLCATsAttention(D_MODEL, 4, rngs=nnx.Rngs(0))
    gamma, lam = mixer.factors()
    assert (mixer.kind, mixer.window, mixer.q_map.out_dim) == ("tk", 64, 128)
    np.testing.assert_allclose(gamma, 0.1, rtol=1e-4)
    np.testing.assert_array_equal(lam, 1.0)
    affine = LoLCATsAttention(D_MODEL, 4, affine_attention_factors=True, num_features=4, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(affine.factors()[1], 0.9, rtol=1e-4)
    assert LigerAttention(D_MODEL, 4).window == 64 and LigerAttention(D_MODEL, 4).mix == 0.5


def trained_softmax() -> SoftmaxAttention:
    return SoftmaxAttention(D_MODEL, 4, num_kv_heads=2, use_bias=True, rope_base=500.0, rngs=nnx.Rngs(7))


@pytest.mark.parametrize("kind", ["sw", "tk"])
def test_lolcats_from_softmax_copies_weights_and_a_full_window_is_the_teacher(kind):
    """With window >= T every key is in the window: the hybrid is softmax attention for any window factor."""
    attn = trained_softmax()
    mixer = LoLCATsAttention.from_softmax(attn, window=T_MIX, kind=kind, num_features=4, chunk_size=8)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        np.testing.assert_array_equal(getattr(mixer, name).kernel[...], getattr(attn, name).kernel[...])
        np.testing.assert_array_equal(getattr(mixer, name).bias[...], getattr(attn, name).bias[...])
    assert (mixer.num_kv_heads, mixer.rope, mixer.kind) == (2, attn.rope, kind)
    x = mixer_input(3)
    y, y_teacher = nnx.jit(lambda m, a, x: (m(x), a(x)))(mixer, attn, x)
    assert rel_err(y, y_teacher) < FWD_TOL


def test_lolcats_transfer_outputs_are_the_layer_and_its_teacher_before_o_proj():
    attn = trained_softmax()
    mixer = LoLCATsAttention.from_softmax(attn, window=4, num_features=4, chunk_size=8)
    x = mixer_input(4)

    @nnx.jit
    def run(mixer, attn, x):
        y_hybrid, y_softmax = mixer.transfer_outputs(x)

        def teacher_energy(m):
            return jnp.sum(m.transfer_outputs(x)[1] ** 2)

        project = lambda y: mixer.o_proj(y.reshape(*y.shape[:2], -1))
        return project(y_hybrid), project(y_softmax), mixer(x), attn(x), y_hybrid, nnx.grad(teacher_energy)(mixer)

    hybrid_out, softmax_out, y_mixer, y_attn, y_hybrid, teacher_grads = run(mixer, attn, x)
    assert y_hybrid.shape == (B, T_MIX, 4, D_MODEL // 4)
    assert rel_err(hybrid_out, y_mixer) < FWD_TOL and rel_err(softmax_out, y_attn) < FWD_TOL
    assert rel_err(hybrid_out, y_attn) > 1e-2  # the window (4 < T) matters
    assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree_util.tree_leaves(teacher_grads))


def test_liger_from_softmax_copies_weights_and_mix_one_with_a_full_window_is_the_teacher():
    """Also: jit + grad of the default mix (0.5) reach every parameter."""
    attn = trained_softmax()
    mixer = LigerAttention.from_softmax(attn, window=T_MIX, mix=1.0, chunk_size=8)
    assert len(jax.tree_util.tree_leaves(nnx.state(mixer, nnx.Param))) == 8  # q, k, v, o kernels and biases only
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        np.testing.assert_array_equal(getattr(mixer, name).kernel[...], getattr(attn, name).kernel[...])
    x = mixer_input(5)
    y, y_teacher = nnx.jit(lambda m, a, x: (m(x), a(x)))(mixer, attn, x)
    assert rel_err(y, y_teacher) < FWD_TOL
    hybrid = LigerAttention.from_softmax(attn, window=4, chunk_size=8)
    grads = nnx.jit(lambda m: nnx.grad(lambda m: jnp.sum(jnp.sin(m(x))))(m))(hybrid)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.max(jnp.abs(g))) > 0, jax.tree_util.keystr(path)


@pytest.mark.parametrize(
    "build, arg",
    [
        (lambda: LoLCATsAttention(D_MODEL, 4, kind="banded"), "kind"),
        (lambda: LoLCATsAttention(D_MODEL, 4, window=0), "window"),
        (lambda: LoLCATsAttention(D_MODEL, 4, num_kv_heads=3), "num_heads"),
        (lambda: LoLCATsAttention(D_MODEL, 4, num_features=0), "num_features"),
        (lambda: LoLCATsAttention(D_MODEL, 4, window_factor_init=float("nan")), "window_factor_init"),
        (lambda: LoLCATsAttention(D_MODEL, 4, head_dim=7), "head_dim"),
        (lambda: LoLCATsAttention(D_MODEL, 4, impl="flash"), "impl"),
        (lambda: LoLCATsAttention(D_MODEL, 4).init_cache(0, 8), "batch"),
        (lambda: LoLCATsAttention.from_softmax(liger()), "attn"),
        (lambda: LoLCATsAttention.from_softmax(SlidingWindowAttention(D_MODEL, 4, window=8)), "attn"),
        (lambda: LigerAttention(D_MODEL, 4, mix=1.5), "mix"),
        (lambda: LigerAttention(D_MODEL, 4, window=None), "window"),
        (lambda: LigerAttention(D_MODEL, 4, gate_logit_normalizer=0.0), "gate_logit_normalizer"),
        (lambda: LigerAttention(D_MODEL, 4, num_kv_heads=0), "num_kv_heads"),
        (lambda: LigerAttention(D_MODEL, 4).init_cache(2, 0), "max_len"),
        (lambda: LigerAttention.from_softmax(SlidingWindowAttention(D_MODEL, 4, window=8)), "attn"),
    ],
)
def test_bad_arguments_name_the_argument(build, arg):
    with pytest.raises(ValueError) as info:
        build()
    assert str(info.value).startswith(arg), str(info.value)


@pytest.mark.parametrize("make", [lambda: lolcats("tk"), liger], ids=["lolcats", "liger"])
def test_bad_inputs_name_the_argument(make):
    mixer = make()
    with pytest.raises(ValueError, match=r"^x "):
        mixer(jnp.zeros((B, D_MODEL)))
    with pytest.raises(ValueError, match=r"^x_t last dim"):
        mixer.step(jnp.zeros((B, D_MODEL - 1)), mixer.init_cache(B, 4))
