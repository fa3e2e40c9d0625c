"""Based: the split-order op (seqlab.ops.based) and the Based mixer.

References are written here from the equations and share no code with seqlab:
* forward: a float64 numpy per-token loop over the FULL 273 Taylor features (1, x/d^(1/4), vec(x xᵀ)/(√2√d)),
  and its state folded into the documented split-order layout;
* gradients: a float32 `lax.scan` per-token loop over the same full features;
* the mixer: against LinearAttention with the materialised Taylor map and the same weights.

Tolerances (relative error ||a - b|| / ||b||): forward 1e-5, gradients 1e-4.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from reference import rel_err

from seqlab.mixers.linear.based import Based
from seqlab.mixers.linear.linear_attention import LinearAttention
from seqlab.ops.based import based_attn

FWD_TOL = 1e-5
GRAD_TOL = 1e-4
EPS = 1e-6
B, T, H, DIM, V = 2, 37, 2, 16, 6  # T odd: a multiple of neither chunk size
FORMS = [("chunked", 8), ("chunked", 16), ("recurrent", 8), ("parallel", 8)]
FORM_IDS = ["chunked8", "chunked16", "recurrent", "parallel"]


# ----------------------------------------------------------------------------------------------------------------
# independent references
# ----------------------------------------------------------------------------------------------------------------


def taylor_np(x):
    """The full Based feature map in float64: [..., d] -> [..., 1 + d + d²]."""
    d = x.shape[-1]
    outer = (x[..., :, None] * x[..., None, :]).reshape(*x.shape[:-1], d * d)
    ones = np.ones((*x.shape[:-1], 1))
    return np.concatenate([ones, x / d**0.25, outer / (np.sqrt(2.0) * np.sqrt(d))], axis=-1)


def based_loop_np(q, k, v, eps=EPS):
    """Per-token loop: S += phi(k) vᵀ, z += phi(k), o = Sᵀphi(q) / (phi(q)·z + eps). Returns o, S [B,H,F,V], z."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    phi_q, phi_k = taylor_np(q), taylor_np(k)
    b, t, h, f = phi_q.shape
    S = np.zeros((b, h, f, v.shape[-1]))
    z = np.zeros((b, h, f))
    o = np.zeros(v.shape)
    for i in range(t):
        S += phi_k[:, i, :, :, None] * v[:, i, :, None, :]
        z += phi_k[:, i]
        num = np.einsum("bhf,bhfv->bhv", phi_q[:, i], S)
        o[:, i] = num / (np.einsum("bhf,bhf->bh", phi_q[:, i], z)[..., None] + eps)
    return o, S, z


def fold_full_state(S, z):
    """The documented split-order layout from a full-map state: [S | z] with the rows (a, b) and (b, a), a < b, of
    the 2nd order summed into one row, pairs a <= b in row-major order."""
    full = np.concatenate([S, z[..., None]], axis=-1)  # [B, H, 1 + d + d², V + 1]
    d = round((np.sqrt(4 * full.shape[2] - 3) - 1) / 2)
    rows = [full[:, :, : 1 + d]]
    second = full[:, :, 1 + d :].reshape(*full.shape[:2], d, d, -1)
    for a in range(d):
        for b in range(a, d):
            pair = second[:, :, a, b] if a == b else second[:, :, a, b] + second[:, :, b, a]
            rows.append(pair[:, :, None])
    return np.concatenate(rows, axis=2)


def based_scan_jnp(q, k, v, eps=EPS):
    """float32 per-token reference for gradients (full 273 features, lax.scan over tokens)."""
    d = q.shape[-1]

    def phi(x):
        outer = (x[..., :, None] * x[..., None, :]).reshape(*x.shape[:-1], d * d)
        return jnp.concatenate([jnp.ones((*x.shape[:-1], 1)), x / d**0.25, outer / jnp.sqrt(2.0 * d)], axis=-1)

    def step(carry, token):
        S, z = carry
        qt, kt, vt = token
        S = S + phi(kt)[..., :, None] * vt[..., None, :]
        z = z + phi(kt)
        pq = phi(qt)
        o = jnp.einsum("bhf,bhfv->bhv", pq, S) / (jnp.sum(pq * z, axis=-1)[..., None] + eps)
        return (S, z), o

    f = 1 + d + d * d
    init = (jnp.zeros((q.shape[0], q.shape[2], f, v.shape[-1])), jnp.zeros((q.shape[0], q.shape[2], f)))
    _, o = jax.lax.scan(step, init, tuple(jnp.moveaxis(a, 1, 0) for a in (q, k, v)))
    return jnp.moveaxis(o, 0, 1)


def make_qkv(rng, t=T, dim=DIM, v_dim=V):
    q = rng.normal(size=(B, t, H, dim)).astype(np.float32)
    k = rng.normal(size=(B, t, H, dim)).astype(np.float32)
    v = rng.normal(size=(B, t, H, v_dim)).astype(np.float32)
    return q, k, v


# ----------------------------------------------------------------------------------------------------------------
# based_attn
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl, chunk", FORMS, ids=FORM_IDS)
def test_based_attn_matches_full_taylor_loop(rng, impl, chunk):
    q, k, v = make_qkv(rng)
    o, state = based_attn(q, k, v, eps=EPS, impl=impl, chunk_size=chunk, output_final_state=True)
    o_ref, S_ref, z_ref = based_loop_np(q, k, v)
    assert o.dtype == jnp.float32 and o.shape == (B, T, H, V)
    assert rel_err(o, o_ref) < FWD_TOL
    assert state.dtype == jnp.float32
    assert rel_err(state, fold_full_state(S_ref, z_ref)) < FWD_TOL


def test_based_state_has_153_rows_for_feature_dim_16(rng):
    q, k, v = make_qkv(rng, t=5)
    _, state = based_attn(q, k, v, output_final_state=True)
    assert state.shape == (B, H, 153, V + 1)
    cache = Based(32, 2, rngs=nnx.Rngs(0)).init_cache(3, 10)
    assert cache.state.shape == (3, 2, 153, 16 + 1) and cache.state.dtype == jnp.float32


@pytest.mark.parametrize("impl, chunk", FORMS, ids=FORM_IDS)
def test_based_attn_initial_state_carries_the_sequence(rng, impl, chunk):
    q, k, v = make_qkv(rng)
    split = 19
    first, state = based_attn(q[:, :split], k[:, :split], v[:, :split], impl=impl, chunk_size=chunk,
                              output_final_state=True)  # fmt: skip
    second, final = based_attn(q[:, split:], k[:, split:], v[:, split:], impl=impl, chunk_size=chunk,
                               initial_state=state, output_final_state=True)  # fmt: skip
    o_ref, S_ref, z_ref = based_loop_np(q, k, v)
    assert rel_err(jnp.concatenate([first, second], axis=1), o_ref) < FWD_TOL
    assert rel_err(final, fold_full_state(S_ref, z_ref)) < FWD_TOL


def test_based_attn_keeps_bfloat16_values_dtype(rng):
    q, k, v = make_qkv(rng, t=9)
    o = based_attn(jnp.asarray(q, jnp.bfloat16), jnp.asarray(k, jnp.bfloat16), jnp.asarray(v, jnp.bfloat16))[0]
    assert o.dtype == jnp.bfloat16


@pytest.mark.parametrize("impl, chunk", FORMS, ids=FORM_IDS)
def test_based_attn_gradients_match_per_token_reference(rng, impl, chunk):
    q, k, v = make_qkv(rng, t=21)
    w = jnp.asarray(rng.normal(size=(B, 21, H, V)), jnp.float32)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * w)

    op = lambda q, k, v: based_attn(q, k, v, eps=EPS, impl=impl, chunk_size=chunk)[0]
    grads = jax.grad(loss(op), argnums=(0, 1, 2))(q, k, v)
    expected = jax.grad(loss(based_scan_jnp), argnums=(0, 1, 2))(q, k, v)
    for got, want in zip(grads, expected):
        assert rel_err(got, want) < GRAD_TOL


@pytest.mark.parametrize(
    "kwargs, arg",
    [
        (dict(impl="flash"), "impl"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(eps=0.0), "eps"),
        (dict(initial_state=jnp.zeros((B, H, 273, V + 1))), "initial_state"),
    ],
)
def test_based_attn_bad_arguments_name_the_argument(rng, kwargs, arg):
    q, k, v = make_qkv(rng, t=4)
    with pytest.raises(ValueError, match=f"^{arg}"):
        based_attn(q, k, v, **kwargs)


def test_based_attn_bad_shapes_name_the_argument(rng):
    q, k, v = make_qkv(rng, t=4)
    with pytest.raises(ValueError, match="^k "):
        based_attn(q, k[..., :8], v)
    with pytest.raises(ValueError, match="^v "):
        based_attn(q, k, v[:, :3])


# ----------------------------------------------------------------------------------------------------------------
# Based mixer
# ----------------------------------------------------------------------------------------------------------------

D_MODEL = 32


def mixers_with_same_weights(impl="chunked"):
    based = Based(D_MODEL, 2, impl=impl, chunk_size=8, rngs=nnx.Rngs(0))
    taylor = LinearAttention(D_MODEL, 2, feature_map="taylor", impl=impl, chunk_size=8, rngs=nnx.Rngs(1))
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        getattr(taylor, name).kernel[...] = getattr(based, name).kernel[...]
    return based, taylor


def test_based_mixer_equals_materialised_taylor_linear_attention(rng):
    based, taylor = mixers_with_same_weights()
    x = jnp.asarray(rng.normal(size=(B, T, D_MODEL)), jnp.float32)
    assert rel_err(based(x), taylor(x)) < FWD_TOL
    _, cache = based.prefill(x, based.init_cache(B, T))
    _, taylor_cache = taylor.prefill(x, taylor.init_cache(B, T))
    full_state = np.asarray(taylor_cache.state, np.float64)
    assert rel_err(cache.state, fold_full_state(full_state[..., :-1], full_state[..., -1])) < FWD_TOL


@pytest.mark.parametrize("impl", ["chunked", "recurrent", "parallel"])
def test_based_decode_equals_full_forward(rng, impl):
    based, _ = mixers_with_same_weights(impl)
    x = jnp.asarray(rng.normal(size=(B, T, D_MODEL)), jnp.float32)
    prompt = 13
    y_prompt, cache = based.prefill(x[:, :prompt], based.init_cache(B, T))
    step = nnx.jit(lambda m, x_t, c: m.step(x_t, c))
    ys = [y_prompt]
    for t in range(prompt, T):
        y_t, cache = step(based, x[:, t], cache)
        ys.append(y_t[:, None])
    assert int(cache.pos) == T
    assert rel_err(jnp.concatenate(ys, axis=1), based(x)) < FWD_TOL


def test_based_mixer_jit_and_grad_match_taylor_linear_attention(rng):
    based, taylor = mixers_with_same_weights()
    x = jnp.asarray(rng.normal(size=(B, T, D_MODEL)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(B, T, D_MODEL)), jnp.float32)

    @nnx.jit
    def grads(model, x):
        return nnx.grad(lambda m: jnp.sum(m(x) * w))(model)

    g_based, g_taylor = grads(based, x), grads(taylor, x)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        got, want = getattr(g_based, name).kernel[...], getattr(g_taylor, name).kernel[...]
        assert rel_err(got, want) < GRAD_TOL


@pytest.mark.parametrize(
    "kwargs, arg",
    [(dict(feature_dim=0), "feature_dim"), (dict(eps=-1.0), "eps"), (dict(value_dim=0), "value_dim"),
     (dict(impl="flash"), "impl"), (dict(chunk_size=0), "chunk_size")],
)  # fmt: skip
def test_based_mixer_bad_arguments_name_the_argument(kwargs, arg):
    with pytest.raises(ValueError, match=f"^{arg}"):
        Based(D_MODEL, 2, rngs=nnx.Rngs(0), **kwargs)


def test_based_cache_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="^max_len"):
        Based(D_MODEL, 2, rngs=nnx.Rngs(0)).init_cache(2, 0)
