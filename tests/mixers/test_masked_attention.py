"""The mask families (NATTEN, HaloNet, S2-Attention, CLEAR: every registered `MaskedAttention` that is softmax
attention under its mask, found through the registry) as layers against a dense softmax written here: the
layer's own projections, then for every query the keys its family's definition shows — visibility pair by pair
from ``reference.reference_visible`` (each family's formula: NATTEN's per-axis windows in its reference kernel's
form, haloed blocks, S2's block stripes, circular windows), no code shared with seqlab's masks — and
softmax(q·k/√d) over them, in float64.

Forward (1e-5) and gradients with respect to the input and the projections (1e-4), at T = 37 (a partial grid for
the 8×8 examples, odd lengths for the 1-d ones). Decode = forward, jit, sharded = one device and packed rows are
the registry's shared checks.
"""
from __future__ import annotations

import functools

import numpy as np
import pytest
from flax import nnx

from mixer_references import assert_layer_matches, heads, linear, merge
from reference import reference_mask
from seqlab import mixers
from seqlab.mixers.softmax.softmax_attention import MaskedAttention, SoftmaxAttention

B, T, D = 2, 37, 32
# every MaskedAttention whose layer is softmax attention under its mask (gpsa adds a positional pass: test_gpsa)
CASES = [f"{name}-{example}" for name in mixers.available() if issubclass(mixers.get(name), MaskedAttention)
         and mixers.get(name)._forward is SoftmaxAttention._forward for example in mixers.info(name).examples]


def layer(xp, params, x, *, visible: np.ndarray, num_heads: int, num_kv_heads: int):
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
    name, _, example = case.partition("-")
    mixer = mixers.create(name, d_model=D, rngs=nnx.Rngs(0), **mixers.info(name).examples[example])
    visible = reference_mask(mixer.attention_mask(), T, mixer.num_heads)
    assert visible.any(-1).all() and not visible.all()  # every query sees a key; the pattern is sparse
    formula = functools.partial(layer, visible=visible, num_heads=mixer.num_heads, num_kv_heads=mixer.num_kv_heads)
    assert_layer_matches(mixer, formula, (B, T, D), param_grads=("q_proj", "k_proj", "v_proj", "o_proj"))
