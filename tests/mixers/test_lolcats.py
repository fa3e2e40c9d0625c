"""LoLCATs: the window + linear hybrid op (seqlab.ops.lolcats_attn) and the LoLCATs mixer (its decode path,
defaults, `from_softmax` and transfer outputs).

Ground truth is written here from the equations (families.md §9) and imports nothing under test:
* `np_hybrid`: float64 numpy, a double loop over queries i and keys j <= i with the window rule written literally
  (`in_window`); the layer reference (`np_lolcats_layer`) adds projections, RoPE, the Hedgehog map and the hybrid
  in numpy, reading only the mixer's parameters;
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
from mixer_references import (
    D_MODEL,
    FWD_TOL,
    GRAD_TOL,
    T_MIX,
    B,
    check_bad_inputs_name_the_argument,
    check_decode_prefill_and_cache_allclose,
    f64,
    liger,
    mixer_input,
    np_output,
    np_projections,
    np_rope,
    raises_naming,
    softmax,
    steps,
    trained_softmax,
)
from reference import rel_err

from seqlab.mixers.hybrid.liger import LigerAttention
from seqlab.mixers.hybrid.lolcats import LoLCATsAttention
from seqlab.mixers.softmax.softmax_attention import SlidingWindowAttention
from seqlab.ops.lolcats_attn import lolcats_attn

T, H, DK, DV, F = 21, 2, 8, 5, 6
FORMS = [("chunked", 3), ("chunked", 8), ("recurrent", 8), ("parallel", 8)]


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


def np_hedgehog(x, weight):
    """[softmax(x W_h), softmax(-x W_h)] per head, clamped at 1e-12."""
    y = np.einsum("bthd,hdf->bthf", x, weight)
    return np.maximum(np.concatenate([softmax(np, y), softmax(np, -y)], -1), 1e-12)


def np_lolcats_layer(mixer: LoLCATsAttention, x):
    q, k, v = np_projections(mixer, x)
    q, k = np_rope(q), np_rope(k)
    phi_q = np_hedgehog(q, f64(mixer.q_map.weight[...]))
    phi_k = np_hedgehog(np.repeat(k, mixer.num_heads // k.shape[2], axis=2), f64(mixer.k_map.weight[...]))
    gamma = 1.0 / (1.0 + np.exp(-f64(mixer.window_factor[...])))
    lam = 1.0 - gamma if mixer.affine_attention_factors else np.ones_like(gamma)
    return np_output(mixer, np_hybrid(q, k, v, phi_q, phi_k, gamma, lam, mixer.window, mixer.kind))


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
# The mixer
# --------------------------------------------------------------------------------------------------------------


def lolcats(kind: str, **kw) -> LoLCATsAttention:
    args = dict(num_heads=4, num_kv_heads=2, window=4, kind=kind, num_features=4, chunk_size=8, rngs=nnx.Rngs(0))
    mixer = LoLCATsAttention(D_MODEL, **{**args, **kw})
    mixer.window_factor[...] = jnp.linspace(-1.0, 1.5, mixer.num_heads)  # distinct per-head factors
    return mixer


@pytest.mark.parametrize(
    "kind, options", [("sw", {}), ("tk", {}), ("tk", dict(affine_attention_factors=True, num_kv_heads=1))]
)
def test_lolcats_layer_matches_numpy_reference(kind, options):
    mixer = lolcats(kind, **options)
    x = mixer_input()
    assert rel_err(nnx.jit(lambda m, x: m(x))(mixer, x), np_lolcats_layer(mixer, x)) < FWD_TOL


@pytest.mark.parametrize("kind", ["sw", "tk"])
def test_decode_and_prefill_match_full_forward(kind):
    """T = 21 > 2 R for R = 8 (tk) and 4 (sw): the ring buffer wraps and tokens leave the window. Token by token
    decode == the training path; prefill(11 tokens) + decode == the training path, and the prefilled cache == the
    cache after stepping the same 11 tokens."""
    check_decode_prefill_and_cache_allclose(lolcats(kind), mixer_input(1))


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
    ],
)
def test_bad_arguments_name_the_argument(build, arg):
    raises_naming(build, arg)


def test_bad_inputs_name_the_argument():
    check_bad_inputs_name_the_argument(lolcats("tk"))
