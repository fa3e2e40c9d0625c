"""Feature maps phi for linear attention, applied per head to [B, T, H, d] -> [B, T, H, out_dim].

  identity  phi(x) = x                                                    (no positivity; use normalize=False)
  elu1      phi(x) = elu(x) + 1        "Transformers are RNNs" (Katharopoulos et al., 2020)
  relu      phi(x) = max(x, 0)
  taylor    phi(x) = [1, x / d^(1/4), vec(x x^T) / (sqrt(2) sqrt(d))]   "Simple linear attention language models
            balance the recall-throughput tradeoff" (Based, Arora et al., 2024); 1 + d + d^2 features, the full
            outer product with its symmetric duplicates (as HazyResearch/based), so
            phi(q).phi(k) = 1 + s + s^2/2 with s = q.k/sqrt(d), always >= 1/2.
  hedgehog  phi(x) = [softmax(x W_h), softmax(-x W_h)]   "The Hedgehog & the Porcupine: Expressive Linear Attentions
            with Softmax Mimicry" (Zhang et al., 2024). We use the LoLCATs normalisation: two *separate* softmaxes,
            each over its own f features (so each half sums to 1), W_h in R^{H x d x f} per head, no bias,
            Kaiming-uniform init (fan_in = d), outputs clamped >= 1e-12; q and k get separate (untied) maps.
            (fla's HedgehogFeatureMap instead uses a d x d identity-initialised linear with bias and a single
            softmax over concat[2y, -2y]; that variant is not implemented.)
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from seqlab.checks import check_choice, check_positive_int


class FeatureMap(nnx.Module):
    """phi applied to the last axis of [B, T, H, d]; `out_dim` is the feature count per head."""

    def __init__(self, dim: int):
        check_positive_int("feature_dim", dim)
        self.dim = dim
        self.out_dim = dim

    def __call__(self, x: jax.Array) -> jax.Array:
        raise NotImplementedError


class Identity(FeatureMap):
    def __call__(self, x):
        return x


class Elu1(FeatureMap):
    def __call__(self, x):
        return jax.nn.elu(x) + 1.0


class ReLU(FeatureMap):
    def __call__(self, x):
        return jax.nn.relu(x)


class Taylor(FeatureMap):
    def __init__(self, dim: int):
        super().__init__(dim)
        self.out_dim = 1 + dim + dim * dim

    def __call__(self, x):
        d = self.dim
        x2 = (x[..., :, None] * x[..., None, :]).reshape(*x.shape[:-1], d * d)
        ones = jnp.ones((*x.shape[:-1], 1), x.dtype)
        return jnp.concatenate([ones, x / d**0.25, x2 / (math.sqrt(2.0) * math.sqrt(d))], axis=-1)


class Hedgehog(FeatureMap):
    def __init__(self, dim: int, *, num_heads: int, num_features: int, rngs: nnx.Rngs, param_dtype: Any):
        super().__init__(dim)
        check_positive_int("num_features", num_features)
        self.out_dim = 2 * num_features
        bound = math.sqrt(6.0 / dim)  # kaiming_uniform, gain sqrt(2), fan_in = d
        w = jax.random.uniform(rngs.params(), (num_heads, dim, num_features), param_dtype, -bound, bound)
        self.weight = nnx.Param(w)

    def __call__(self, x):
        y = jnp.einsum("bthd,hdf->bthf", x.astype(jnp.float32), self.weight[...].astype(jnp.float32))
        phi = jnp.concatenate([jax.nn.softmax(y, axis=-1), jax.nn.softmax(-y, axis=-1)], axis=-1)
        return jnp.maximum(phi, 1e-12).astype(x.dtype)


FEATURE_MAPS = {"identity": Identity, "elu1": Elu1, "relu": ReLU, "taylor": Taylor, "hedgehog": Hedgehog}


def make_feature_map(
    name: str,
    dim: int,
    *,
    num_heads: int,
    num_features: int | None = None,
    rngs: nnx.Rngs,
    param_dtype: Any = jnp.float32,
) -> FeatureMap:
    """Build the feature map `name` for per-head inputs of size `dim` (num_features: Hedgehog's f, default dim)."""
    check_choice("feature_map", name, FEATURE_MAPS)
    if name == "hedgehog":
        f = dim if num_features is None else num_features
        return Hedgehog(dim, num_heads=num_heads, num_features=f, rngs=rngs, param_dtype=param_dtype)
    if num_features is not None:
        raise ValueError(f"num_features only applies to feature_map='hedgehog', got feature_map={name!r}")
    return FEATURE_MAPS[name](dim)
