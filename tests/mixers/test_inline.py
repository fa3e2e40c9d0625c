"""InLine attention (causal and non-causal) against references written here from the equations.

Forward: the paper's weights w_ij (rows checked to sum to 1) in numpy float64, per token for the causal form (the
non-causal weights applied to every prefix, which checks the derived causal recurrence), compared at rel err
<= 1e-5 for every engine form (chunked at two chunk sizes, recurrent, parallel) with T = 37 (not a multiple of the
chunk sizes) and H = 2. Gradients: the same reference in jax.numpy float32 (the loop as lax.scan); gradients with
respect to every parameter and the input compared at rel err <= 1e-4, with all parameters perturbed away from their
init. Causal InLine: token-by-token decode and prefill + decode == full forward; the cache holds the augmented sums.
Bad arguments raise ValueError naming the argument.
"""

from __future__ import annotations

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
    linear,
    merge,
    over_tokens,
    perturbed_params,
    raises_naming,
)
from reference import rel_err

from seqlab.mixers.linear.inline import InLineAttention
from seqlab.mixers.linear.slab import SLAB

B, T, D, H = 2, 37, 32, 2
d = D // H
PROMPT = 21
SCALE = d**-0.5


# --------------------------------------------------------------------------------------------------------------
# Reference (xp = numpy for float64 forwards, jax.numpy for float32 gradients)
# --------------------------------------------------------------------------------------------------------------


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
    q, k, v = (heads(linear(x, p[name]), H) for name in ("q_proj", "k_proj", "v_proj"))
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


# --------------------------------------------------------------------------------------------------------------
# Cases: a constructor and its reference
# --------------------------------------------------------------------------------------------------------------

CASES = ReferenceCases(
    {
        "inline-causal": (
            lambda **kw: InLineAttention(D, H, **kw),
            lambda xp, p, x: inline_reference(xp, p, x, causal=True, scale=SCALE),
        ),
        "inline-noncausal": (
            lambda **kw: InLineAttention(D, H, causal=False, **kw),
            lambda xp, p, x: inline_reference(xp, p, x, causal=False, scale=SCALE),
        ),
    },
    shape=(B, T, D),
)
make = CASES.make


@pytest.mark.parametrize("case, form", CASES.forms())
def test_forward_and_gradients_match_reference(case, form):
    CASES.check_forward_and_gradients(case, *form)


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
    x, _ = inputs(2, (B, T, D))
    expected = inline_reference(np, f64(params), np.asarray(x, np.float64), causal=True, scale=SCALE)
    assert rel_err(nnx.jit(lambda m, x: m(x))(mixer, x), expected) <= FWD_TOL


# --------------------------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------------------------


def test_decode_and_prefill_match_full_forward():
    mixer = make("inline-causal", chunk_size=8)
    nnx.update(mixer, perturbed_params(mixer))
    check_decode_and_prefill(mixer, inputs(3, (B, T, D))[0], PROMPT)


def test_cache_layouts():
    inline = make("inline-causal", local_conv_size=4).init_cache(3, 5)
    assert inline.state.shape == (3, H, d + 1, d + 1) and inline.conv.shape == (3, 3, D)
    assert make("inline-causal", local_conv_size=0).init_cache(3, 5).conv is None
    slab = SLAB(D, H, max_len=48, rngs=nnx.Rngs(0)).init_cache(3, 5)
    assert slab.state.shape == (3, H, d, d + 1) and slab.conv.shape == (3 * H, 4, d)


def test_inline_cache_holds_the_augmented_sums():
    """After decoding a sequence the cache is [[S, z], [u^T, t]] per head: sum_j [k_j; 1][v_j; 1]^T."""
    mixer = make("inline-causal", local_conv_size=0)
    x, _ = inputs(4, (B, 7, D))
    _, cache = nnx.jit(lambda m, x: m.prefill(x, m.init_cache(B, 7)))(mixer, x)
    k = heads(np.asarray(x, np.float64) @ np.asarray(mixer.k_proj.kernel[...], np.float64), H)
    v = heads(np.asarray(x, np.float64) @ np.asarray(mixer.v_proj.kernel[...], np.float64), H)
    ones = np.ones((*k.shape[:-1], 1))
    expected = np.einsum("bthk,bthv->bhkv", np.concatenate([k, ones], -1), np.concatenate([v, ones], -1))
    assert rel_err(cache.state, expected) <= FWD_TOL
    np.testing.assert_allclose(cache.state[..., -1, -1], 7.0)


def test_non_causal_inline_has_no_cache():
    check_non_causal_has_no_cache(make("inline-noncausal"), B)


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
    ],
)
def test_bad_arguments_name_the_argument(build, arg):
    raises_naming(build, arg)
