"""LiT's simplified linear attention ("LiT: Delving into a Simplified Linear Diffusion Transformer for Image
Generation") against references written here from the equations with the layer's own parameters.

Reference: q̃ = ReLU(x W_q), k̃ = ReLU(x W_k), v = x W_v, y = W_o(o + DWConv(v)) with one d-channel filter for every
head. Non-causal: pair by pair over the tokens (a dense [N, N] score matrix), o_i = Σ_j (q̃_i·k̃_j) v_j / N divided
by Σ_j q̃_i·k̃_j / N + 1e-6, the convolution a loop over the taps of a zero-padded centred kernel (1-D, or 3×3 / 5×5
on a 5 × 7 grid). Causal: a per-token loop over the running sums S_t, z_t, o_t = S_tᵀq̃_t / (q̃_t·z_t + 1e-6), and a
causal conv. Forward in numpy float64 at rel err <= 1e-5 for every engine form (chunked at two chunk sizes,
recurrent, parallel); gradients of every parameter and the input against jax.grad of the same formula in jnp at
<= 1e-4; T = 37; bf16 compute within 3e-2. Causal: token-by-token decode and prefill + decode == the full forward.
Bad arguments raise ValueError naming the argument.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from mixer_references import (
    ReferenceCases,
    causal_conv,
    depthwise_same,
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

from seqlab.mixers.linear.lit import LiT

B, T, D, H = 2, 37, 32, 2
GRID = (5, 7)
PROMPT = 21
d = D // H


# --------------------------------------------------------------------------------------------------------------
# Reference (xp = numpy for float64 forwards, jax.numpy for float32 gradients)
# --------------------------------------------------------------------------------------------------------------


def causal_attention(xp, q, k, v, eps):
    """S_t = S_{t-1} + k_t v_tᵀ, z_t = z_{t-1} + k_t, o_t = S_tᵀ q_t / (q_t·z_t + eps), token by token."""

    def step(carry, q_t, k_t, v_t):
        state, key_sum = carry
        state = state + xp.einsum("bhk,bhv->bhkv", k_t, v_t)
        key_sum = key_sum + k_t
        numerator = xp.einsum("bhk,bhkv->bhv", q_t, state)
        return (state, key_sum), numerator / (xp.einsum("bhk,bhk->bh", q_t, key_sum)[..., None] + eps)

    return over_tokens(xp, step, (xp.zeros((q.shape[0], H, d, d)), xp.zeros((q.shape[0], H, d))), (q, k, v))


def global_attention(xp, q, k, v, eps):
    n = q.shape[1]
    scores = xp.einsum("bihd,bjhd->bhij", q, k) / n
    return xp.einsum("bhij,bjhd->bihd", scores, v) / (xp.swapaxes(scores.sum(-1), 1, 2)[..., None] + eps)


def lit_reference(xp, p, x, *, causal, grid=None, eps=1e-6):
    q = xp.maximum(heads(linear(x, p["q_proj"]), H), 0.0)
    k = xp.maximum(heads(linear(x, p["k_proj"]), H), 0.0)
    v = heads(linear(x, p["v_proj"]), H)
    if causal:
        o = causal_attention(xp, q, k, v, eps)
        local = causal_conv(xp, v, p["conv"]["weight"], p["conv"]["bias"])  # one [K, d] filter for every head
    else:
        o = global_attention(xp, q, k, v, eps)
        local = xp.stack([depthwise_same(xp, v[:, :, h], p["conv"]["conv"], grid) for h in range(H)], axis=2)
    return linear(merge(o + local), p["o_proj"])


# --------------------------------------------------------------------------------------------------------------
# Cases: a constructor and its reference
# --------------------------------------------------------------------------------------------------------------

SEQUENCE = ReferenceCases(
    {
        "lit-causal": (lambda **kw: LiT(D, H, **kw), lambda xp, p, x: lit_reference(xp, p, x, causal=True)),
        "lit-noncausal": (lambda **kw: LiT(D, H, causal=False, **kw),
                          lambda xp, p, x: lit_reference(xp, p, x, causal=False)),
    },
    shape=(B, T, D),
)
ON_GRID = ReferenceCases(
    {"lit-grid": (lambda **kw: LiT(D, H, causal=False, grid=GRID, conv_size=3, **kw),
                  lambda xp, p, x: lit_reference(xp, p, x, causal=False, grid=GRID))},
    shape=(B, GRID[0] * GRID[1], D),
)


@pytest.mark.parametrize("case, form", SEQUENCE.forms())
def test_forward_and_gradients_match_reference(case, form):
    SEQUENCE.check_forward_and_gradients(case, *form)


@pytest.mark.parametrize("case, form", ON_GRID.forms())
def test_grid_forward_and_gradients_match_reference(case, form):
    ON_GRID.check_forward_and_gradients(case, *form)


@pytest.mark.parametrize("causal, grid", [(True, None), (False, GRID)])
def test_bf16_compute_stays_close_to_the_reference(causal, grid):
    mixer = LiT(D, H, causal=causal, grid=grid, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    params = perturbed_params(mixer)
    nnx.update(mixer, params)
    x, _ = inputs(0, (B, T if grid is None else grid[0] * grid[1], D))
    y = nnx.jit(lambda m, a: m(a))(mixer, x)
    assert y.dtype == jnp.bfloat16
    expected = lit_reference(np, f64(params), np.asarray(x, np.float64), causal=causal, grid=grid)
    assert rel_err(y, expected) <= 3e-2


# --------------------------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------------------------


def test_decode_and_prefill_match_full_forward():
    mixer = SEQUENCE.make("lit-causal", chunk_size=8)
    nnx.update(mixer, perturbed_params(mixer))
    check_decode_and_prefill(mixer, inputs(3, (B, T, D))[0], PROMPT)
    cache = mixer.init_cache(B, T)
    assert cache.state.shape == (B, H, d, d + 1) and cache.conv.shape == (B * H, 4, d)


def test_non_causal_lit_has_no_cache():
    check_non_causal_has_no_cache(SEQUENCE.make("lit-noncausal"), B)


# --------------------------------------------------------------------------------------------------------------
# Argument errors
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build, arg",
    [
        (lambda: LiT(D, H, grid=GRID), "causal"),
        (lambda: LiT(D, H, causal=False, grid=(5, 7, 1)), "grid"),
        (lambda: LiT(D, H, causal=False, grid=(5, True)), "grid"),
        (lambda: LiT(D, H, causal=False, conv_size=4), "conv_size"),
        (lambda: LiT(D, H, conv_size=0), "conv_size"),
        (lambda: LiT(D, H, eps=-1.0), "eps"),
        (lambda: LiT(D, H, chunk_size=0), "chunk_size"),
        (lambda: LiT(D, H, causal=False, grid=GRID)(jnp.zeros((B, T, D))), "x"),
    ],
)
def test_bad_arguments_name_the_argument(build, arg):
    raises_naming(build, arg)
