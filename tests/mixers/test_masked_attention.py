"""The mask families (NATTEN, HaloNet, S2-Attention, CLEAR: every registered `MaskedAttention` that is softmax
attention under its mask, found through the registry) as layers against a dense softmax written here: the layer's
own projections, then for every query the keys its family's definition shows — visibility pair by pair from ``reference.reference_visible`` (each family's
formula: NATTEN's per-axis windows in its reference kernel's form, haloed blocks, S2's block stripes, circular
windows), no code shared with seqlab's masks — and softmax(q·k/√d) over them, in float64.

Forward (1e-5) and gradients with respect to the input and the projections (1e-4), at T = 37 (a partial grid for
the 8×8 examples, odd lengths for the 1-d ones). Decode = forward, jit, sharded = one device and the refusal of
packed rows are the registry's shared checks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mixer_references import f64, heads, linear, merge, perturbed_params
from reference import reference_mask, rel_err
from seqlab import mixers
from seqlab.mixers.softmax.softmax_attention import MaskedAttention, SoftmaxAttention

B, T, D = 2, 37, 32
# every MaskedAttention whose layer is softmax attention under its mask (gpsa adds a positional pass: test_gpsa)
CASES = [f"{name}-{example}" for name in mixers.available() if issubclass(mixers.get(name), MaskedAttention)
         and mixers.get(name)._forward is SoftmaxAttention._forward for example in mixers.info(name).examples]


def make(case: str):
    name, _, example = case.partition("-")
    mixer = mixers.create(name, d_model=D, rngs=nnx.Rngs(0), **mixers.info(name).examples[example])
    params = perturbed_params(mixer)
    nnx.update(mixer, params)
    return mixer, params


def layer(xp, params, x, visible: np.ndarray, num_heads: int, num_kv_heads: int):
    """y [B, T, D] (numpy: float64; jnp, for the gradient: float32 at full matmul precision): every head's softmax
    over the keys visible [1, H, T, T] shows it."""
    q = heads(linear(x, params["q_proj"]), num_heads)
    k, v = (xp.repeat(heads(linear(x, params[n]), num_kv_heads), num_heads // num_kv_heads, axis=2)
            for n in ("k_proj", "v_proj"))
    scores = xp.where(visible, xp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1]), -np.inf)
    weights = xp.exp(scores - scores.max(axis=-1, keepdims=True))
    weights = weights / weights.sum(axis=-1, keepdims=True)
    return linear(merge(xp.einsum("bhts,bshd->bthd", weights, v)), params["o_proj"])


@pytest.mark.parametrize("case", CASES)
def test_mask_family_layer_matches_the_dense_pairwise_formula(case):
    mixer, params = make(case)
    visible = reference_mask(mixer.attention_mask(), T, mixer.num_heads)
    assert visible.any(-1).all() and not visible.all()  # every query sees a key; the pattern is sparse
    x = jax.random.normal(jax.random.key(0), (B, T, D), jnp.float32)
    w = jax.random.normal(jax.random.key(1), (B, T, D), jnp.float32)
    shape = (mixer.num_heads, mixer.num_kv_heads)
    expected = layer(np, f64(params), np.asarray(x, np.float64), visible, *shape)

    def loss(m, x):
        return jnp.sum(m(x) * w)

    y, (dx, dparams) = nnx.jit(lambda m, x: (m(x), nnx.grad(loss, argnums=(1, 0))(m, x)))(mixer, x)
    assert rel_err(y, expected) <= 1e-5
    with jax.default_matmul_precision("highest"):
        want_dx, want_dp = jax.grad(lambda p, x: jnp.sum(layer(jnp, p, x, visible, *shape) * w), argnums=(1, 0))(
            jax.tree.map(jnp.asarray, params), x)
    assert rel_err(dx, want_dx) <= 1e-4
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert rel_err(dparams[name]["kernel"][...], want_dp[name]["kernel"]) <= 1e-4, name
