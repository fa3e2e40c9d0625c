"""Based's split-order op and mixer, and the Hedgehog / LoLCATs attention-transfer objectives.

References are written here from the equations and share no code with seqlab:
* forward: a float64 numpy per-token loop over the FULL 273 Taylor features (1, x/d^(1/4), vec(x xᵀ)/(√2√d)),
  and its state folded into the documented split-order layout;
* gradients: a float32 `lax.scan` per-token loop over the same full features;
* distillation losses: float64 numpy.

Tolerances (relative error ||a - b|| / ||b||): forward 1e-5, gradients 1e-4.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from reference import rel_err

from seqlab.layers.feature_maps import Hedgehog
from seqlab.mixers.linear.based import Based
from seqlab.mixers.linear.linear_attention import LinearAttention
from seqlab.ops.based import based_attn
from seqlab.training.distill import (
    attention_weights_linear,
    attention_weights_softmax,
    hedgehog_distillation_loss,
    output_mse_loss,
)

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


# ----------------------------------------------------------------------------------------------------------------
# distillation objectives
# ----------------------------------------------------------------------------------------------------------------

TD, HD, DD, FD = 9, 2, 8, 5  # time, heads, head dim, feature count for the distillation tests


def softmax_weights_np(q, k, scale, causal):
    """[B, H, T, T] float64 teacher weights."""
    logits = np.einsum("bihd,bjhd->bhij", q.astype(np.float64), k.astype(np.float64)) * scale
    if causal:
        logits = np.where(np.tril(np.ones(logits.shape[-2:], bool)), logits, -np.inf)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def linear_weights_np(phi_q, phi_k, causal, eps=1e-12):
    scores = np.einsum("bihf,bjhf->bhij", phi_q.astype(np.float64), phi_k.astype(np.float64))
    if causal:
        scores = scores * np.tril(np.ones(scores.shape[-2:]))
    return scores / (scores.sum(-1, keepdims=True) + eps)


def distill_inputs(rng, t=TD):
    q = rng.normal(size=(B, t, HD, DD)).astype(np.float32) * 2.0
    k = rng.normal(size=(B, t, HD, DD)).astype(np.float32)
    phi_q = rng.uniform(0.1, 1.0, size=(B, t, HD, FD)).astype(np.float32)
    phi_k = rng.uniform(0.1, 1.0, size=(B, t, HD, FD)).astype(np.float32)
    return q, k, phi_q, phi_k


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("scale", [None, 0.7])
def test_attention_weights_match_numpy(rng, causal, scale):
    q, k, phi_q, phi_k = distill_inputs(rng)
    teacher = attention_weights_softmax(q, k, scale=scale, causal=causal)
    expected = softmax_weights_np(q, k, DD**-0.5 if scale is None else scale, causal)
    assert teacher.shape == (B, HD, TD, TD) and teacher.dtype == jnp.float32
    assert rel_err(teacher, expected) < FWD_TOL
    student = attention_weights_linear(phi_q, phi_k, causal=causal)
    assert rel_err(student, linear_weights_np(phi_q, phi_k, causal)) < FWD_TOL


@pytest.mark.parametrize("causal", [True, False])
def test_hedgehog_loss_matches_numpy_and_jits(rng, causal):
    q, k, phi_q, phi_k = distill_inputs(rng)
    a = softmax_weights_np(q, k, DD**-0.5, causal)
    a_hat = linear_weights_np(phi_q, phi_k, causal)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(a > 0, a * np.log(a_hat), 0.0)
    expected = -terms.sum(-1).mean()  # mean over the B·H·T rows
    loss = hedgehog_distillation_loss(q, k, phi_q, phi_k, causal=causal)
    assert loss.shape == () and abs(float(loss) - expected) < FWD_TOL * abs(expected)
    jitted = jax.jit(lambda *a: hedgehog_distillation_loss(*a, causal=causal))(q, k, phi_q, phi_k)
    assert abs(float(jitted) - expected) < FWD_TOL * abs(expected)


def test_hedgehog_loss_is_minimal_teacher_entropy_when_weights_match(rng):
    """phi_k_j = e_j and phi_q_i[j] = exp(s_ij - max_j s_ij) make â = a exactly: the loss is the teacher's mean row
    entropy, and any other (positive) phi_q gives a larger loss (Gibbs' inequality)."""
    q, k, _, _ = distill_inputs(rng)
    logits = np.einsum("bihd,bjhd->bihj", q.astype(np.float64), k.astype(np.float64)) * DD**-0.5
    phi_q = np.exp(logits - logits.max(-1, keepdims=True)).astype(np.float32)  # [B, T, H, T]
    phi_k = np.broadcast_to(np.eye(TD, dtype=np.float32)[None, :, None, :], (B, TD, HD, TD))
    a = softmax_weights_np(q, k, DD**-0.5, True)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.where(a > 0, a * np.log(a), 0.0).sum(-1).mean()
    at_match = float(hedgehog_distillation_loss(q, k, phi_q, phi_k))
    assert abs(at_match - entropy) < 1e-5 * abs(entropy)
    for _ in range(3):
        noisy = phi_q * np.exp(0.5 * rng.normal(size=phi_q.shape)).astype(np.float32)
        assert float(hedgehog_distillation_loss(q, k, noisy, phi_k)) > at_match + 1e-4


class HedgehogPair(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        fm = dict(num_heads=HD, num_features=FD, rngs=rngs, param_dtype=jnp.float32)
        self.q_map = Hedgehog(DD, **fm)
        self.k_map = Hedgehog(DD, **fm)


def test_gradient_descent_on_hedgehog_maps_lowers_the_loss(rng):
    q, k, _, _ = distill_inputs(rng, t=16)
    maps = HedgehogPair(nnx.Rngs(0))

    @nnx.jit
    def descend(maps):
        loss, grads = nnx.value_and_grad(
            lambda m: hedgehog_distillation_loss(q, k, m.q_map(jnp.asarray(q)), m.k_map(jnp.asarray(k))))(maps)
        nnx.update(maps, jax.tree.map(lambda p, g: p - 0.5 * g, nnx.state(maps, nnx.Param), grads))
        return loss, grads

    losses = []
    for _ in range(20):
        loss, grads = descend(maps)
        losses.append(float(loss))
        assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    assert losses[-1] < 0.95 * losses[0], losses


def test_output_mse_loss_matches_numpy(rng):
    y_s = rng.normal(size=(B, TD, HD, 4)).astype(np.float32)
    y_t = rng.normal(size=(B, TD, HD, 4)).astype(np.float32)
    mse = np.mean((y_s.astype(np.float64) - y_t) ** 2)
    assert abs(float(output_mse_loss(y_s, y_t)) - 1000.0 * mse) < FWD_TOL * 1000.0 * mse
    assert abs(float(output_mse_loss(y_s, y_t, factor=2.0)) - 2.0 * mse) < FWD_TOL * 2.0 * mse
    grad = jax.grad(lambda y: output_mse_loss(y, y_t))(jnp.asarray(y_s))
    assert rel_err(grad, 2000.0 * (y_s.astype(np.float64) - y_t) / y_s.size) < FWD_TOL


def test_distill_bad_arguments_name_the_argument(rng):
    q, k, phi_q, phi_k = distill_inputs(rng)
    cases = [
        (lambda: attention_weights_softmax(q[0], k[0]), "q"),
        (lambda: attention_weights_softmax(q, k[:, :4]), "k"),
        (lambda: attention_weights_softmax(q, k, scale=0.0), "scale"),
        (lambda: attention_weights_linear(phi_q, phi_k[..., :2]), "phi_k"),
        (lambda: attention_weights_linear(phi_q, phi_k, eps=0.0), "eps"),
        (lambda: hedgehog_distillation_loss(q, k, phi_q[:, :4], phi_k[:, :4]), "phi_q"),
        (lambda: output_mse_loss(phi_q, phi_k[..., :2]), "y_student"),
        (lambda: output_mse_loss(phi_q, phi_k, factor=-1.0), "factor"),
    ]
    for call, arg in cases:
        with pytest.raises(ValueError, match=f"^{arg} "):
            call()
