"""Gated positional self-attention ("ConViT: Improving Vision Transformers with Soft Convolutional Inductive
Biases") against a pair-by-pair loop of the paper's formula, written here with the layer's own projections:

    A_ij^h = (1 − σ(λ_h)) softmax_j(q_i·k_j / √d) + σ(λ_h) softmax_j(v_pos^h · (‖δ_ij‖², δ_ij)),   δ_ij = c(j) − c(i)

over the visible keys (j <= i in 1-d causal; every token on the 2-d grid, c = (row, col) in raster order), then
o_i = Σ_j A_ij v_j and y = concat_h o W_o. Forward in float64 (1e-5), gradients of the gate λ and v_pos from the
same loop in jnp (1e-4); at initialisation head h's positional attention peaks at its centre (1-d: h tokens back).
"""

from __future__ import annotations

import functools
import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mixer_references import assert_layer_matches, heads, linear, merge
from seqlab import mixers

B, T, D = 2, 11, 16


def coordinates(i: int, grid) -> tuple[int, ...]:
    return (i,) if grid is None else divmod(i, grid[1])


def layer(xp, params, x, *, num_heads: int, grid, causal: bool):
    q, k, v = (heads(linear(x, params[name]), num_heads) for name in ("q_proj", "k_proj", "v_proj"))
    gate = 1.0 / (1.0 + xp.exp(-params["gate"]))  # [H]
    rows = []
    for i in range(x.shape[1]):
        keys = range(i + 1) if causal else range(x.shape[1])
        content = xp.einsum("bhd,bjhd->bhj", q[:, i], k[:, list(keys)]) / math.sqrt(q.shape[-1])
        feats = np.array([[sum(d * d for d in delta), *delta] for delta in
                          (np.subtract(coordinates(j, grid), coordinates(i, grid)) for j in keys)], np.float64)
        position = xp.einsum("hc,jc->hj", params["pos_weights"], feats)[None]
        a = (1 - gate[:, None]) * softmax(xp, content) + gate[:, None] * softmax(xp, position)
        rows.append(xp.einsum("bhj,bjhd->bhd", a, v[:, list(keys)]))
    return linear(merge(xp.stack(rows, axis=1)), params["o_proj"])


def softmax(xp, s):
    e = xp.exp(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize("num_heads, grid, causal", [(2, None, True), (4, (3, 4), False)])
def test_gpsa_matches_the_papers_formula(num_heads, grid, causal):
    mixer = mixers.create("gpsa", d_model=D, num_heads=num_heads, grid=grid, causal=causal, rngs=nnx.Rngs(0))
    formula = functools.partial(layer, num_heads=num_heads, grid=grid, causal=causal)
    assert_layer_matches(mixer, formula, (B, T, D), param_grads=("gate", "pos_weights"))


def test_initial_positional_attention_is_a_soft_convolution():
    """Head h's positional term at initialisation: a Gaussian around h tokens back (locality strength 4)."""
    mixer = mixers.create("gpsa", d_model=18, num_heads=3, locality_strength=4.0)
    q_idx, k_idx = jnp.arange(T)[:, None], jnp.arange(T)[None]
    logits = mixer.positional_logits(mixer.pos_weights[...])(jnp.zeros((1, 3, T, T)), q_idx, k_idx,
                                                             jnp.arange(3)[:, None, None])  # fmt: skip
    logits = jnp.where(k_idx <= q_idx, logits, -jnp.inf)
    peaks = np.asarray(jnp.argmax(logits[0, :, 10], axis=-1))  # query 10
    np.testing.assert_array_equal(peaks, [10, 9, 8])
