"""SLAB (simplified linear attention: ReLU features, learned key positions, depthwise conv on the values) and its
progressive re-parameterised BatchNorm PRepBN (seqlab.models.prepbn), against references written here from the
equations.

Forward: a plain per-token loop (causal) or the dense formula (non-causal) in numpy float64, compared at rel err
<= 1e-5 for every engine form (chunked at two chunk sizes, recurrent, parallel) with T = 37 (not a multiple of the
chunk sizes) and H = 2. Gradients: the same reference in jax.numpy float32 (the loop as lax.scan); gradients with
respect to every parameter and the input compared at rel err <= 1e-4. All parameters are perturbed away from their
init (zero position embeddings) so every one of them matters. Causal SLAB: token-by-token decode and prefill +
decode == full forward; positions past max_len are refused (NaN when stepped). PRepBN: the lambda schedule, train
mode (batch statistics, running averages updated), eval mode (running averages), lambda = 0 == RepBN. Bad arguments
raise ValueError naming the argument.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from mixer_references import (
    FWD_TOL,
    ReferenceCases,
    causal_conv,
    check_decode_and_prefill,
    check_non_causal_has_no_cache,
    f64,
    heads,
    inputs,
    layer_norm,
    linear,
    merge,
    over_tokens,
    perturbed_params,
    raises_naming,
    steps,
)
from reference import rel_err

from seqlab.mixers.linear.slab import SLAB
from seqlab.models.prepbn import PRepBN, prepbn_lambda, set_progress

B, T, D, H = 2, 37, 32, 2
d = D // H
PROMPT = 21


# --------------------------------------------------------------------------------------------------------------
# Reference (xp = numpy for float64 forwards, jax.numpy for float32 gradients)
# --------------------------------------------------------------------------------------------------------------


def relu(xp, a):
    return xp.maximum(a, 0.0)


def slab_reference(xp, p, x, *, causal, eps=1e-6):
    q = relu(xp, heads(linear(x, p["q_proj"]), H))
    k = relu(xp, heads(linear(x, p["k_proj"]) + p["pos_embedding"][: x.shape[1]], H))
    v = heads(linear(x, p["v_proj"]), H)
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


# --------------------------------------------------------------------------------------------------------------
# Cases: a constructor and its reference
# --------------------------------------------------------------------------------------------------------------

CASES = ReferenceCases(
    {
        "slab-causal": (
            lambda **kw: SLAB(D, H, max_len=48, **kw),
            lambda xp, p, x: slab_reference(xp, p, x, causal=True),
        ),
        "slab-noncausal": (
            lambda **kw: SLAB(D, H, causal=False, max_len=48, **kw),
            lambda xp, p, x: slab_reference(xp, p, x, causal=False),
        ),
    },
    shape=(B, T, D),
)
make = CASES.make


@pytest.mark.parametrize("case, form", CASES.forms())
def test_forward_and_gradients_match_reference(case, form):
    CASES.check_forward_and_gradients(case, *form)


# --------------------------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------------------------


def test_decode_and_prefill_match_full_forward():
    mixer = make("slab-causal", chunk_size=8)
    nnx.update(mixer, perturbed_params(mixer))
    check_decode_and_prefill(mixer, inputs(3, (B, T, D))[0], PROMPT)


def test_non_causal_slab_has_no_cache():
    check_non_causal_has_no_cache(make("slab-noncausal"), B)


def test_slab_positions_beyond_max_len():
    mixer = SLAB(D, H, max_len=10, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"^x: 12 positions exceed .*max_len=10"):
        mixer(jnp.zeros((B, 12, D)))
    with pytest.raises(ValueError, match=r"^max_len: 11 positions exceed"):
        mixer.init_cache(B, 11)
    with pytest.raises(ValueError, match=r"^x: 11 positions"):
        mixer.prefill(jnp.zeros((B, 11, D)), mixer.init_cache(B, 10))
    x, _ = inputs(6, (B, 11, D))
    y, _ = nnx.jit(steps)(mixer, x, mixer.init_cache(B, 10))  # the 11th step is past the table: NaN, not a clamp
    assert bool(jnp.all(jnp.isfinite(y[:, :10]))) and bool(jnp.all(jnp.isnan(y[:, 10])))


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
    return f64(nnx.to_pure_dict(nnx.state(norm, nnx.Param)))


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
        (lambda: SLAB(D, H, max_len=0), "max_len"),
        (lambda: SLAB(D, H, conv_size=0), "conv_size"),
        (lambda: SLAB(D, H, eps=0.0), "eps"),
        (lambda: SLAB(D, H, chunk_size=0), "chunk_size"),
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
    raises_naming(build, arg)
