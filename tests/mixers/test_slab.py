"""InLine attention, SLAB (+ PRepBN) and LinFusion against references written in this file from the equations.

Forward: plain per-token loops (causal) or dense formulas (non-causal) run in numpy float64, compared at rel err
<= 1e-5 for every engine form (chunked at two chunk sizes, recurrent, parallel) with T = 37 (not a multiple of the
chunk sizes) and H = 2. Gradients: the same reference functions run in jax.numpy float32 (the per-token loops as
lax.scan); gradients with respect to every parameter and the input compared at rel err <= 1e-4. All parameters are
perturbed away from their init (zero position embeddings, zero-initialised MLP outputs) so every one of them
matters. The InLine references are the paper's weights w_ij (rows checked to sum to 1); the causal one applies the
non-causal weights to every prefix, which checks the derived causal recurrence. Causal mixers: token-by-token
decode and prefill + decode == full forward. PRepBN: the lambda schedule, train mode (batch statistics, running
averages updated), eval mode (running averages), lambda = 0 == RepBN. Bad arguments raise ValueError naming the
argument.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from seqlab.mixers.linear.inline import InLineAttention
from seqlab.mixers.linear.linfusion import LinFusionAttention
from seqlab.mixers.linear.slab import SLAB
from seqlab.mixers.softmax.softmax_attention import SoftmaxAttention
from seqlab.models.prepbn import PRepBN, prepbn_lambda, set_progress

B, T, D, H = 2, 37, 32, 2
d = D // H
PROMPT = 21
FWD_TOL, GRAD_TOL = 1e-5, 1e-4
FORMS = [("chunked", 8), ("chunked", 16), ("recurrent", 16), ("parallel", 16)]
FORM_IDS = [f"{impl}-{chunk}" for impl, chunk in FORMS]


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def inputs(seed: int = 0, length: int = T):
    kx, kw = jax.random.split(jax.random.key(seed))
    return jax.random.normal(kx, (B, length, D), jnp.float32), jax.random.normal(kw, (B, length, D), jnp.float32)


def perturbed_params(mixer: nnx.Module, seed: int = 1) -> dict:
    """The mixer's parameters as a pure nested dict, each moved by 0.1·N(0, 1)."""
    pure = nnx.to_pure_dict(nnx.state(mixer, nnx.Param))
    leaves, treedef = jax.tree.flatten(pure)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    moved = [a + 0.1 * jax.random.normal(k, a.shape, a.dtype) for a, k in zip(leaves, keys)]
    return jax.tree.unflatten(treedef, moved)


def float64(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


# --------------------------------------------------------------------------------------------------------------
# References (xp = numpy for float64 forwards, jax.numpy for float32 gradients)
# --------------------------------------------------------------------------------------------------------------


def linear(x, layer: dict):
    y = x @ layer["kernel"]
    return y + layer["bias"] if "bias" in layer else y


def heads(x):
    return x.reshape(*x.shape[:-1], H, -1)


def merge(x):
    return x.reshape(*x.shape[:-2], -1)


def over_tokens(xp, step, carry, xs):
    """The per-token loop: step(carry, x_t) -> (carry, y_t) over axis 1 of xs [B, T, ...] (an array or a tuple of
    arrays); ys stacked on axis 1. A Python loop in numpy; lax.scan in jax.numpy (one compiled body)."""
    xs = xs if isinstance(xs, tuple) else (xs,)
    if xp is np:
        ys = []
        for t in range(xs[0].shape[1]):
            carry, y = step(carry, *(a[:, t] for a in xs))
            ys.append(y)
        return np.stack(ys, axis=1)
    _, ys = jax.lax.scan(lambda c, x_t: step(c, *x_t), carry, tuple(jnp.moveaxis(a, 1, 0) for a in xs))
    return jnp.moveaxis(ys, 0, 1)


def causal_conv(xp, x, weight, bias=None):
    """y_t = sum_i w_i * x_{t-K+1+i} (+ b), zeros before the first token; x [B, T, ...C], weight [K, C]."""
    size = weight.shape[0]
    taps = weight.reshape(size, *[1] * (x.ndim - 3), weight.shape[-1])  # broadcast over the axes between T and C

    def step(previous, x_t):  # previous: x_{t-K+1} .. x_{t-1}
        window = xp.concatenate([previous, x_t[:, None]], axis=1)
        y = (window * taps).sum(axis=1)
        return window[:, 1:], y if bias is None else y + bias

    return over_tokens(xp, step, xp.zeros_like(x[:, : size - 1]), x)


def inline_weights(xp, q, k, scale, visible=None):
    """The paper's w_ij = s q_i.k_j / N - s q_i.kbar / N + 1/N over the N visible keys j (kbar: their mean; 0 for
    the others): queries q [B, M, H, d], keys k [B, L, H, d], visible [L] (None: all) -> [B, H, M, L]."""
    visible = xp.ones(k.shape[1]) if visible is None else visible
    n = visible.sum()
    k_mean = xp.einsum("bjhd,j->bhd", k, visible) / n
    qk = xp.einsum("bihd,bjhd->bhij", q, k)
    q_kmean = xp.einsum("bihd,bhd->bhi", q, k_mean)
    return (scale * qk / n - scale * q_kmean[..., None] / n + 1.0 / n) * visible


def inline_reference(xp, p, x, *, causal, scale):
    q, k, v = (heads(linear(x, p[name])) for name in ("q_proj", "k_proj", "v_proj"))
    if causal:  # token t: the non-causal weights over the prefix j <= t (N = t + 1)

        def step(t, q_t):
            w = inline_weights(xp, q_t[:, None], k, scale, visible=1.0 * (xp.arange(k.shape[1]) <= t))
            return t + 1, xp.einsum("bhij,bjhd->bihd", w, v)[:, 0]

        o = over_tokens(xp, step, 0, q)
    else:
        o = xp.einsum("bhij,bjhd->bihd", inline_weights(xp, q, k, scale), v)
    y = merge(o)
    if "local_conv" in p:
        y = y + causal_conv(xp, merge(v), p["local_conv"]["weight"])
    return linear(y, p["o_proj"])


def relu(xp, a):
    return xp.maximum(a, 0.0)


def elu1(xp, a):
    return xp.where(a > 0, a + 1.0, xp.exp(xp.minimum(a, 0.0)))


def slab_reference(xp, p, x, *, causal, eps=1e-6):
    q = relu(xp, heads(linear(x, p["q_proj"])))
    k = relu(xp, heads(linear(x, p["k_proj"]) + p["pos_embedding"][: x.shape[1]]))
    v = heads(linear(x, p["v_proj"]))
    if causal:  # S_t = S_{t-1} + k_t v_t^T, z_t = z_{t-1} + k_t, o_t = S_t^T q_t / (q_t.z_t + eps)

        def step(carry, q_t, k_t, v_t):
            state, key_sum = carry
            state = state + xp.einsum("bhk,bhv->bhkv", k_t, v_t)
            key_sum = key_sum + k_t
            numerator = xp.einsum("bhk,bhkv->bhv", q_t, state)
            return (state, key_sum), numerator / (xp.einsum("bhk,bhk->bh", q_t, key_sum)[..., None] + eps)

        o = over_tokens(xp, step, (xp.zeros((x.shape[0], H, d, d)), xp.zeros((x.shape[0], H, d))), (q, k, v))
    else:
        scores = xp.einsum("bihd,bjhd->bhij", q, k)
        o = xp.einsum("bhij,bjhd->bihd", scores, v) / (xp.swapaxes(scores.sum(-1), 1, 2)[..., None] + eps)
    local = causal_conv(xp, v, p["conv"]["weight"], p["conv"]["bias"])  # one [K, d] filter for every head
    return linear(merge(o + local), p["o_proj"])


def layer_norm(xp, x, scale, bias, eps=1e-5):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / xp.sqrt(var + eps) * scale + bias


def projection_mlp(xp, p, x):
    h = layer_norm(xp, linear(x, p["inner"]), p["norm"]["scale"], p["norm"]["bias"])
    return linear(xp.where(h > 0, h, 0.01 * h), p["outer"])


def linfusion_reference(xp, p, x, eps=1e-4):
    n = x.shape[1]
    q = elu1(xp, heads(linear(x + projection_mlp(xp, p["q_mlp"], x), p["q_proj"])))
    k = elu1(xp, heads(linear(x + projection_mlp(xp, p["k_mlp"], x), p["k_proj"])))
    v = heads(linear(x, p["v_proj"]))
    kv_mean = xp.einsum("bjhk,bjhv->bhkv", k, v) / n
    denominator = xp.einsum("bihk,bhk->bih", q, k.mean(axis=1)) + eps
    return linear(merge(xp.einsum("bihk,bhkv->bihv", q, kv_mean) / denominator[..., None]), p["o_proj"])


# --------------------------------------------------------------------------------------------------------------
# Cases: a constructor and its reference
# --------------------------------------------------------------------------------------------------------------

SCALE = d**-0.5
CASES = {
    "inline-causal": (
        lambda **kw: InLineAttention(D, H, **kw),
        lambda xp, p, x: inline_reference(xp, p, x, causal=True, scale=SCALE),
    ),
    "inline-noncausal": (
        lambda **kw: InLineAttention(D, H, causal=False, **kw),
        lambda xp, p, x: inline_reference(xp, p, x, causal=False, scale=SCALE),
    ),
    "slab-causal": (
        lambda **kw: SLAB(D, H, max_len=48, **kw),
        lambda xp, p, x: slab_reference(xp, p, x, causal=True),
    ),
    "slab-noncausal": (
        lambda **kw: SLAB(D, H, causal=False, max_len=48, **kw),
        lambda xp, p, x: slab_reference(xp, p, x, causal=False),
    ),
    "linfusion": (lambda **kw: LinFusionAttention(D, H, **kw), linfusion_reference),
}


def make(case: str, **kw) -> nnx.Module:
    return CASES[case][0](rngs=nnx.Rngs(0), **kw)


def loss_and_grads(forward, params, x, w):
    """(y, d loss / d (params, x)) for loss = sum(forward(params, x) * w), jitted."""

    def loss(params, x):
        y = forward(params, x)
        return jnp.sum(y * w), y

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)


@pytest.fixture(scope="module")
def references():
    """Per case: (params, x, w, numpy float64 forward, jnp float32 gradients) — shared by the forms."""
    cache = {}

    def get(case):
        if case not in cache:
            mixer, reference = make(case), CASES[case][1]
            params = perturbed_params(mixer)
            x, w = inputs()
            y64 = reference(np, float64(params), np.asarray(x, np.float64))
            (_, _), grads = loss_and_grads(lambda p, x: reference(jnp, p, x), params, x, w)
            cache[case] = (params, x, w, y64, grads)
        return cache[case]

    return get


@pytest.mark.parametrize("form", FORMS, ids=FORM_IDS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_and_gradients_match_reference(case, form, references):
    impl, chunk = form
    params, x, w, y64, ref_grads = references(case)
    graphdef, _, rest = nnx.split(make(case, impl=impl, chunk_size=chunk), nnx.Param, ...)
    (_, y), grads = loss_and_grads(lambda p, x: nnx.merge(graphdef, p, rest)(x), params, x, w)
    assert rel_err(y, y64) <= FWD_TOL, rel_err(y, y64)
    flat_ref = dict(jax.tree_util.tree_leaves_with_path(ref_grads))
    flat = jax.tree_util.tree_leaves_with_path(grads)
    assert len(flat) == len(flat_ref) > 0
    for path, g in flat:
        assert float(jnp.max(jnp.abs(g))) > 0, jax.tree_util.keystr(path)
        assert rel_err(g, flat_ref[path]) <= GRAD_TOL, (jax.tree_util.keystr(path), rel_err(g, flat_ref[path]))


def test_inline_weights_rows_sum_to_one_and_give_the_output():
    """The reference's weights: rows sum to 1, some are negative, and o_i = sum_j w_ij v_j equals the closed form
    s q_i^T (sum_j k_j v_j^T / N) + (1 - s q_i.kbar) vbar."""
    rng = np.random.default_rng(0)
    q, k, v = rng.normal(size=(3, B, 9, H, d))
    w = inline_weights(np, q, k, SCALE)
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=0, atol=1e-12)
    assert (w < 0).any()
    closed = (
        SCALE * np.einsum("bihk,bjhk,bjhv->bihv", q, k, v) / 9
        + (1 - SCALE * np.einsum("bihk,bhk->bih", q, k.mean(1)))[..., None] * v.mean(1)[:, None]
    )
    np.testing.assert_allclose(np.einsum("bhij,bjhd->bihd", w, v), closed, rtol=1e-10, atol=1e-12)


def test_inline_without_local_module_matches_reference():
    mixer = make("inline-causal", local_conv_size=0, chunk_size=8)
    assert mixer.local_conv is None
    params = nnx.to_pure_dict(nnx.state(mixer, nnx.Param))
    x, _ = inputs(2)
    expected = inline_reference(np, float64(params), np.asarray(x, np.float64), causal=True, scale=SCALE)
    assert rel_err(nnx.jit(lambda m, x: m(x))(mixer, x), expected) <= FWD_TOL


# --------------------------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------------------------


def steps(mixer, x, cache):
    def body(c, x_t):
        y_t, c = mixer.step(x_t, c)
        return c, y_t

    cache, ys = jax.lax.scan(body, cache, jnp.swapaxes(x, 0, 1))
    return jnp.swapaxes(ys, 0, 1), cache


@pytest.mark.parametrize("case", ["inline-causal", "slab-causal"])
def test_decode_and_prefill_match_full_forward(case):
    mixer = make(case, chunk_size=8)
    nnx.update(mixer, perturbed_params(mixer))
    x, _ = inputs(3)

    @nnx.jit
    def run(m, x):
        y_steps, stepped = steps(m, x, m.init_cache(B, T))
        y_prompt, prefilled = m.prefill(x[:, :PROMPT], m.init_cache(B, T))
        y_rest, continued = steps(m, x[:, PROMPT:], prefilled)
        return m(x), y_steps, jnp.concatenate([y_prompt, y_rest], axis=1), stepped, continued

    y_full, y_steps, y_prefill, stepped, continued = run(mixer, x)
    assert rel_err(y_steps, y_full) <= FWD_TOL, rel_err(y_steps, y_full)
    assert rel_err(y_prefill, y_full) <= FWD_TOL, rel_err(y_prefill, y_full)
    assert int(stepped.pos) == int(continued.pos) == T
    assert rel_err(continued.state, stepped.state) <= FWD_TOL
    assert stepped.state.dtype == jnp.float32


def test_cache_layouts():
    inline = make("inline-causal", local_conv_size=4).init_cache(3, 5)
    assert inline.state.shape == (3, H, d + 1, d + 1) and inline.conv.shape == (3, 3, D)
    assert make("inline-causal", local_conv_size=0).init_cache(3, 5).conv is None
    slab = make("slab-causal").init_cache(3, 5)
    assert slab.state.shape == (3, H, d, d + 1) and slab.conv.shape == (3 * H, 4, d)


def test_inline_cache_holds_the_augmented_sums():
    """After decoding a sequence the cache is [[S, z], [u^T, t]] per head: sum_j [k_j; 1][v_j; 1]^T."""
    mixer = make("inline-causal", local_conv_size=0)
    x, _ = inputs(4, length=7)
    _, cache = nnx.jit(lambda m, x: m.prefill(x, m.init_cache(B, 7)))(mixer, x)
    k = heads(np.asarray(x, np.float64) @ np.asarray(mixer.k_proj.kernel[...], np.float64))
    v = heads(np.asarray(x, np.float64) @ np.asarray(mixer.v_proj.kernel[...], np.float64))
    ones = np.ones((*k.shape[:-1], 1))
    expected = np.einsum("bthk,bthv->bhkv", np.concatenate([k, ones], -1), np.concatenate([v, ones], -1))
    assert rel_err(cache.state, expected) <= FWD_TOL
    np.testing.assert_allclose(cache.state[..., -1, -1], 7.0)


@pytest.mark.parametrize("case", ["inline-noncausal", "slab-noncausal", "linfusion"])
def test_non_causal_mixers_have_no_cache(case):
    mixer = make(case)
    assert mixer.causal is False
    with pytest.raises(ValueError, match="non-causal"):
        mixer.init_cache(B, 8)


def test_slab_positions_beyond_max_len():
    mixer = SLAB(D, H, max_len=10, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"^x: 12 positions exceed .*max_len=10"):
        mixer(jnp.zeros((B, 12, D)))
    with pytest.raises(ValueError, match=r"^max_len: 11 positions exceed"):
        mixer.init_cache(B, 11)
    with pytest.raises(ValueError, match=r"^x: 11 positions"):
        mixer.prefill(jnp.zeros((B, 11, D)), mixer.init_cache(B, 10))
    x, _ = inputs(6, length=11)
    y, _ = nnx.jit(steps)(mixer, x, mixer.init_cache(B, 10))  # the 11th step is past the table: NaN, not a clamp
    assert bool(jnp.all(jnp.isfinite(y[:, :10]))) and bool(jnp.all(jnp.isnan(y[:, 10])))


# --------------------------------------------------------------------------------------------------------------
# LinFusion from a softmax layer
# --------------------------------------------------------------------------------------------------------------


def test_linfusion_from_softmax_copies_projections():
    teacher = SoftmaxAttention(D, 4, num_kv_heads=2, use_bias=True, rngs=nnx.Rngs(3))
    student = LinFusionAttention.from_softmax(teacher, chunk_size=8, rngs=nnx.Rngs(4))
    x, _ = inputs(8)
    y, q_mlp, k_mlp = nnx.jit(lambda m, x: (m(x), m.q_mlp(x), m.k_mlp(x)))(student, x)
    assert float(jnp.max(jnp.abs(q_mlp))) == 0.0 and float(jnp.max(jnp.abs(k_mlp))) == 0.0
    t = float64(nnx.to_pure_dict(nnx.state(teacher, nnx.Param)))
    xs = np.asarray(x, np.float64)
    dh = D // 4
    q = (xs @ t["q_proj"]["kernel"] + t["q_proj"]["bias"]).reshape(B, T, 4, dh)
    k = (xs @ t["k_proj"]["kernel"] + t["k_proj"]["bias"]).reshape(B, T, 2, dh)[:, :, [0, 0, 1, 1]]
    v = (xs @ t["v_proj"]["kernel"] + t["v_proj"]["bias"]).reshape(B, T, 2, dh)[:, :, [0, 0, 1, 1]]
    phi_q, phi_k = elu1(np, q), elu1(np, k)
    o = np.einsum("bihk,bjhk,bjhv->bihv", phi_q, phi_k, v) / T
    o = o / (np.einsum("bihk,bhk->bih", phi_q, phi_k.mean(1)) + 1e-4)[..., None]
    expected = o.reshape(B, T, D) @ t["o_proj"]["kernel"] + t["o_proj"]["bias"]
    assert rel_err(y, expected) <= FWD_TOL


# --------------------------------------------------------------------------------------------------------------
# PRepBN
# --------------------------------------------------------------------------------------------------------------


def test_prepbn_lambda_schedule():
    """Warm-up (LN only, lambda = 1), then r0 * (total - step) / (total - warmup) down to 0."""
    expected = {0: 1.0, 2: 1.0, 3: 0.8, 8: 0.8 * 5 / 10, 12: 0.8 * 1 / 10, 13: 0.0, 20: 0.0}
    for step, value in expected.items():
        assert float(prepbn_lambda(step, 13, r0=0.8, warmup_steps=3)) == pytest.approx(value, abs=1e-7), step
    norm = PRepBN(D, r0=0.8, warmup_steps=3, rngs=nnx.Rngs(0))
    assert float(norm.lam[...]) == 1.0

    @nnx.jit
    def set_at(model, step):  # a traced step, as inside a jitted train step
        set_progress(model, step, 13)

    model = nnx.List([norm, PRepBN(D, rngs=nnx.Rngs(1))])
    set_at(model, jnp.asarray(8))
    assert float(model[0].lam[...]) == pytest.approx(0.4, abs=1e-7)
    assert float(model[1].lam[...]) == pytest.approx(5 / 13, abs=1e-7)


def bn_params(norm: PRepBN):
    return float64(nnx.to_pure_dict(nnx.state(norm, nnx.Param)))


def test_prepbn_train_mode_mixes_layernorm_and_batch_statistics():
    norm = PRepBN(D, rngs=nnx.Rngs(0))
    nnx.update(norm, perturbed_params(norm))
    norm.set_progress(3, 4)  # lambda = 0.25
    x = 2.0 + 3.0 * jax.random.normal(jax.random.key(9), (B, 5, D))
    y = norm(x)
    p, xs = bn_params(norm), np.asarray(x, np.float64)
    mean, var = xs.mean((0, 1)), xs.var((0, 1))  # batch statistics over every axis but the features
    repbn = (xs - mean) / np.sqrt(var + 1e-5) * p["repbn"]["bn"]["scale"] + p["repbn"]["bn"]["bias"]
    repbn = repbn + p["repbn"]["alpha"] * xs
    ln = layer_norm(np, xs, p["layer_norm"]["scale"], p["layer_norm"]["bias"])
    assert rel_err(y, 0.25 * ln + 0.75 * repbn) <= FWD_TOL
    assert rel_err(norm.repbn.bn.mean[...], 0.1 * mean) <= FWD_TOL  # running averages moved (momentum 0.9)
    assert rel_err(norm.repbn.bn.var[...], 0.9 + 0.1 * var) <= FWD_TOL
    norm.set_progress(4, 4)  # lambda = 0: RepBN alone
    assert rel_err(norm(x), repbn) <= FWD_TOL


@pytest.mark.parametrize("eval_norm", ["repbn", "mixed"])
def test_prepbn_eval_mode_uses_running_averages(eval_norm):
    norm = PRepBN(D, eval_norm=eval_norm, rngs=nnx.Rngs(0))
    nnx.update(norm, perturbed_params(norm))
    norm.set_progress(1, 2)  # lambda = 0.5
    x = 1.0 + 2.0 * jax.random.normal(jax.random.key(10), (B, 5, D))
    norm(x)  # one training call moves the running statistics
    container = nnx.List([norm])
    container.eval()
    assert not norm.training
    mean, var = np.asarray(norm.repbn.bn.mean[...], np.float64), np.asarray(norm.repbn.bn.var[...], np.float64)
    p, xs = bn_params(norm), np.asarray(x, np.float64)
    repbn = (xs - mean) / np.sqrt(var + 1e-5) * p["repbn"]["bn"]["scale"] + p["repbn"]["bn"]["bias"]
    repbn = repbn + p["repbn"]["alpha"] * xs
    ln = layer_norm(np, xs, p["layer_norm"]["scale"], p["layer_norm"]["bias"])
    expected = repbn if eval_norm == "repbn" else 0.5 * ln + 0.5 * repbn
    assert rel_err(norm(x[:1, :1]), expected[:1, :1]) <= FWD_TOL  # one token: no batch statistics involved
    np.testing.assert_array_equal(norm.repbn.bn.mean[...], mean)  # eval leaves the running averages alone
    container.train()
    assert norm.training


# --------------------------------------------------------------------------------------------------------------
# Argument errors
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build, arg",
    [
        (lambda: InLineAttention(30, 4), "d_model"),
        (lambda: InLineAttention(D, H, local_conv_size=-1), "local_conv_size"),
        (lambda: InLineAttention(D, H, scale=0.0), "scale"),
        (lambda: InLineAttention(D, H, impl="flash"), "impl"),
        (lambda: InLineAttention(D, H, head_dim=0), "head_dim"),
        (lambda: SLAB(D, H, max_len=0), "max_len"),
        (lambda: SLAB(D, H, conv_size=0), "conv_size"),
        (lambda: SLAB(D, H, eps=0.0), "eps"),
        (lambda: SLAB(D, H, chunk_size=0), "chunk_size"),
        (lambda: LinFusionAttention(D, H, mlp_dim=0), "mlp_dim"),
        (lambda: LinFusionAttention(D, H, eps=-1.0), "eps"),
        (lambda: LinFusionAttention.from_softmax(SLAB(D, H)), "attention"),
        (lambda: PRepBN(D, r0=0.0, rngs=nnx.Rngs(0)), "r0"),
        (lambda: PRepBN(D, warmup_steps=-2, rngs=nnx.Rngs(0)), "warmup_steps"),
        (lambda: PRepBN(D, eval_norm="layernorm", rngs=nnx.Rngs(0)), "eval_norm"),
        (lambda: PRepBN(0, rngs=nnx.Rngs(0)), "num_features"),
        (lambda: PRepBN(D, rngs=nnx.Rngs(0)).set_progress(1, 0), "total_steps"),
        (lambda: PRepBN(D, warmup_steps=5, rngs=nnx.Rngs(0)).set_progress(1, 4), "total_steps"),
        (lambda: PRepBN(D, rngs=nnx.Rngs(0)).set_progress(-1, 4), "step"),
    ],
)
def test_bad_arguments_name_the_argument(build, arg):
    with pytest.raises(ValueError) as info:
        build()
    assert str(info.value).startswith(arg), str(info.value)
