"""TransNormerLLM's TNLAttention (Lightning Attention-2): its per-head decay schedule ("official" ALiBi-style and
"paper"), LRPE and output gate, against a per-token reference written here from the equations (families.md §3).

The reference takes the array module `xp` — numpy on float64 inputs (a Python loop over tokens) for the forward
checks, jax.numpy in float32 (the same per-token step under lax.scan, differentiated with jax.grad) for the gradient
checks; the mixer is only read for its parameters. Every form of the linear op (chunked at chunk sizes 4 and 16,
recurrent, parallel), T = 23. Token-by-token decode and prefill + decode == the full forward. Tolerances are
relative errors over whole tensors: forward 1e-5, gradients 1e-4.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
from flax import nnx
from mixer_references import check_decode_prefill_and_cache, check_forms, heads, inputs, loop, lrpe_token, silu

from seqlab.mixers.linear.tnl import TNLAttention

B, T, D, H = 2, 23, 16, 2  # head dim 8; T is not a multiple of any chunk size below
HEAD = D // H
CHUNKS = (4, 16)


def llm_srms(xp, x, eps=1e-6):
    """x / sqrt(mean(x^2) + eps) over the last axis."""
    return x / xp.sqrt((x * x).mean(axis=-1, keepdims=True) + eps)


def tnl_ref(xp, p, x, log_decay):
    """[q,k,v,u] = x W; q, k = silu (+LRPE); S_t = lambda S_{t-1} + k_t v_t^T; o_t = S_t^T q_t; srms(o) * u; W_out."""
    q, k, v, u = (x @ p["w"][:, i * D : (i + 1) * D] for i in range(4))
    q, k, v = heads(silu(xp, q), H), heads(silu(xp, k), H), heads(v, H)
    decay = xp.exp(log_decay)[None, :, None, None]
    key_dim = 2 * HEAD if "theta" in p else HEAD

    def step(state, t):
        q_t, k_t = q[:, t], k[:, t]
        if "theta" in p:
            theta = p["theta"][:, 0]  # [H, 1, d] -> [H, d]
            q_t, k_t = lrpe_token(xp, q_t, t, theta), lrpe_token(xp, k_t, t, theta)
        state = decay * state + xp.einsum("bhk,bhv->bhkv", k_t, v[:, t])
        o = xp.einsum("bhkv,bhk->bhv", state, q_t).reshape(x.shape[0], -1)
        return state, (llm_srms(xp, o) * u[:, t]) @ p["wo"]

    return loop(xp, step, xp.zeros((x.shape[0], H, key_dim, HEAD)), x.shape[1])


def alibi_slopes(num_heads):
    """ALiBi slopes: 2^(-8h/H), h = 1..H, for a power of two; the other head counts tested, spelled out."""
    spelled = {
        3: [2**-4, 2**-8, 2**-2],
        6: [2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3],
        12: [2.0**-h for h in range(1, 9)] + [2**-0.5, 2**-1.5, 2**-2.5, 2**-3.5],
    }
    if num_heads in spelled:
        return np.array(spelled[num_heads])
    return 2.0 ** (-8.0 * np.arange(1, num_heads + 1) / num_heads)


def expected_log_decay(num_heads, layer, layers, decay):
    if decay == "paper":
        return -(8.0 / num_heads) * (1.0 - layer / layers) * np.arange(num_heads)
    ratio = layer / (layers - 1) if layers > 1 else 0.0
    return -alibi_slopes(num_heads) * (1.0 - ratio + 1e-5)


# Parameters of the mixer, read by path (works for the module's Param state and for its gradients)
TNL_PATHS = {"w": ("qkvu_proj", "kernel"), "wo": ("out_proj", "kernel"), "theta": ("lrpe", "theta")}

# Every form of the linear op; the variants that only change the decay or the positional encoding run one form.
LINEAR_FORMS = [{"impl": "chunked", "chunk_size": c} for c in CHUNKS] + [{"impl": "recurrent"}, {"impl": "parallel"}]
ONE_FORM = LINEAR_FORMS[:1]


@pytest.mark.parametrize("decay, use_lrpe, forms", [("official", True, LINEAR_FORMS), ("paper", True, ONE_FORM),
                                                    ("official", False, ONE_FORM)])  # fmt: skip
def test_tnl_attention_matches_reference(decay, use_lrpe, forms):
    mixer = TNLAttention(D, H, decay=decay, use_lrpe=use_lrpe, layer_index=1, num_layers=3, rngs=nnx.Rngs(3))
    log_decay = expected_log_decay(H, 1, 3, decay)
    x, w = inputs(3, (B, T, D))
    check_forms(mixer, forms, TNL_PATHS, lambda xp, p, x: tnl_ref(xp, p, x, xp.asarray(log_decay)), x, w)


@pytest.mark.parametrize("decay", ["official", "paper"])
@pytest.mark.parametrize("num_heads", [1, 2, 3, 4, 6, 8, 12])
def test_tnl_decay_schedule(decay, num_heads):
    for layer, layers in [(0, 1), (0, 4), (2, 4), (3, 4), (4, 7)]:
        # the schedule is fixed at construction: an abstract mixer (no parameter values) is enough
        build = functools.partial(TNLAttention, 2 * num_heads, num_heads, decay=decay, layer_index=layer,
                                  num_layers=layers)  # fmt: skip
        mixer = nnx.eval_shape(build)
        got = np.asarray(mixer.log_decay())
        assert got.dtype == np.float32 and np.all(got <= 0.0)
        np.testing.assert_allclose(got, expected_log_decay(num_heads, layer, layers, decay), rtol=1e-6, atol=0)


def test_decode_and_prefill_match_full_forward():
    """The prompt (11 tokens) ends mid-chunk (chunk 4), T = 23."""
    mixer = TNLAttention(D, H, chunk_size=4, layer_index=1, num_layers=4, rngs=nnx.Rngs(5))
    check_decode_prefill_and_cache(mixer, inputs(6, (B, T, D))[0], 11)


@pytest.mark.parametrize(
    "build, name",
    [
        (lambda: TNLAttention(D, H, decay="fla"), "decay"),
        (lambda: TNLAttention(D, H, layer_index=3, num_layers=3), "layer_index"),
        (lambda: TNLAttention(D, H, layer_index=-1, num_layers=3), "layer_index"),
        (lambda: TNLAttention(D, H, num_layers=0), "num_layers"),
        (lambda: TNLAttention(D, H, impl="scan"), "impl"),
    ],
)
def test_bad_constructor_arguments_name_the_argument(build, name):
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        build()
