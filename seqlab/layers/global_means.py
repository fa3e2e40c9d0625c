"""Global means of a non-causal layer (InLine, SLAB and LinFusion with causal=False): Σ k vᵀ / N, k̄ and v̄ over
every token, read from the final state of one `linear_attn` call (so `impl` / `chunk_size` pick the form that sums
over tokens, and a sequence split over devices sums over all of them)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from seqlab import ops
from seqlab.ops import _common as ops_common


class GlobalMeans(NamedTuple):
    """Means over every token of the sequence, float32: kv = Σ_j k_j v_jᵀ / N [B, H, K, V], k = Σ_j k_j / N [B, H, K],
    v = Σ_j v_j / N [B, H, V]; length = N."""

    kv: jax.Array
    k: jax.Array
    v: jax.Array
    length: int


def global_means(
    k: jax.Array, v: jax.Array, *, impl: str, chunk_size: int, sequence_axis: str | None = None
) -> GlobalMeans:
    """The means of a non-causal layer from k [B, T, H, K], v [B, T, H, V] via the engine: the final state of
    `linear_attn` on the keys [k, 1] / √N and values [v, 1] / √N is [[Σ k vᵀ / N, k̄], [v̄ᵀ, 1]] (1/√N on each factor
    keeps the state's range that of a mean). With `sequence_axis` (inside shard_map) N and the means cover the whole
    sequence and are replicated on every device."""
    length = k.shape[1] * (1 if sequence_axis is None else jax.lax.axis_size(sequence_axis))
    root = length**-0.5
    keys = ops_common.with_ones(k) * root
    values = ops_common.with_ones(v) * root
    _, state = ops.linear_attn(
        jnp.zeros_like(keys), keys, values, scale=1.0, output_final_state=True, impl=impl, chunk_size=chunk_size,
        sequence_axis=sequence_axis,
    )  # fmt: skip
    return GlobalMeans(state[..., :-1, :-1], state[..., :-1, -1], state[..., -1, :-1], length)


def normalized_readout(q: jax.Array, means: GlobalMeans, eps: float) -> jax.Array:
    """Normalised global linear attention from the means: q [B, T, H, K] -> o [B, T, H, V] float32 =
    q·(Σ k vᵀ / N) / (q·(Σ k / N) + eps)."""
    q32 = q.astype(jnp.float32)
    numerator = jnp.einsum("bthk,bhkv->bthv", q32, means.kv)
    return numerator / (jnp.einsum("bthk,bhk->bth", q32, means.k)[..., None] + eps)
