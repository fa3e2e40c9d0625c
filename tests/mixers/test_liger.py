"""The Liger mixer (GLA gated from W_k + sliding-window softmax) against a numpy reference written here from the
equations (families.md §10), reading only the mixer's parameters: projections, RoPE for the window, softmax feature
maps and the GLA recurrence token by token in float64. Also its decode path, `from_softmax` and argument errors.

Sizes are tiny: T = 21 (odd, not a multiple of the window 4 nor of the chunk size 8). Tolerance (relative error
over the whole tensor): forward 1e-5.
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
    T_MIX,
    check_bad_inputs_name_the_argument,
    check_decode_prefill_and_cache_allclose,
    liger,
    mixer_input,
    np_output,
    np_projections,
    np_rope,
    raises_naming,
    softmax,
    trained_softmax,
)
from reference import rel_err

from seqlab.mixers.hybrid.liger import LigerAttention
from seqlab.mixers.softmax.softmax_attention import SlidingWindowAttention


def np_liger_layer(mixer: LigerAttention, x):
    """mix * SWA(RoPE q, k) + (1 - mix) * GLA(softmax q, softmax k, gate logsigmoid(k)/16), token by token."""
    q, k, v = np_projections(mixer, x)
    batch, length, heads, d = q.shape
    group = heads // k.shape[2]
    log_alpha = -np.logaddexp(0.0, -k) / mixer.gate_logit_normalizer
    phi_q, phi_k = softmax(np, q), softmax(np, k)
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
            swa[:, t, h] = np.einsum("bs,bsv->bv", softmax(np, scores), v[:, keys, g])
    return np_output(mixer, mixer.mix * swa + (1.0 - mixer.mix) * gla)


@pytest.mark.parametrize("options", [{}, dict(mix=0.2, num_kv_heads=4, use_bias=True, impl="recurrent")])
def test_liger_layer_matches_numpy_reference(options):
    mixer = liger(**options)
    x = mixer_input()
    assert rel_err(nnx.jit(lambda m, x: m(x))(mixer, x), np_liger_layer(mixer, x)) < FWD_TOL


def test_decode_and_prefill_match_full_forward():
    """T = 21 > 2 R for R = 4: the ring buffer wraps and tokens leave the window. Token by token decode == the
    training path; prefill(11 tokens) + decode == the training path, and the prefilled cache == the cache after
    stepping the same 11 tokens."""
    check_decode_prefill_and_cache_allclose(liger(), mixer_input(1))


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
        (lambda: LigerAttention(D_MODEL, 4, mix=1.5), "mix"),
        (lambda: LigerAttention(D_MODEL, 4, window=None), "window"),
        (lambda: LigerAttention(D_MODEL, 4, gate_logit_normalizer=0.0), "gate_logit_normalizer"),
        (lambda: LigerAttention(D_MODEL, 4, num_kv_heads=0), "num_kv_heads"),
        (lambda: LigerAttention(D_MODEL, 4).init_cache(2, 0), "max_len"),
        (lambda: LigerAttention.from_softmax(SlidingWindowAttention(D_MODEL, 4, window=8)), "attn"),
    ],
)
def test_bad_arguments_name_the_argument(build, arg):
    raises_naming(build, arg)


def test_bad_inputs_name_the_argument():
    check_bad_inputs_name_the_argument(liger())
