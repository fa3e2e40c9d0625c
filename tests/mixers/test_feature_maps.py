"""The Hedgehog feature map (seqlab.layers.feature_maps.Hedgehog) trained by its attention-transfer objective:
gradient descent on a query map and a key map lowers `hedgehog_distillation_loss`, with finite gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from mixer_references import DD, FD, HD, distill_inputs

from seqlab.layers.feature_maps import Hedgehog
from seqlab.training.distill import hedgehog_distillation_loss


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
