"""Attention calibration hooks for softmax mixers: ACT, and the dense attention weights they act on.

ACT ("Unveiling and Harnessing Hidden Attention Sinks: Enhancing Large Language Models without Training through
Attention Calibration", Yu et al., ICML 2024), per input and per calibrated head, on the attention weights
a [B, H, T, T] of a whole input (row i: query i over the keys it sees):

    s_j = Σ_i a_ij / |{i : i sees j}|                    the mean attention key j receives
    sink_j = s_j > τ  (j > 0 unless keep_first=False: the first token is left alone)
    a'_ij = β a_ij                                       for a sink j
    a'_ij = a_ij + (1 − β) (Σ_{sink j'} a_ij') · a_ij / Σ_{non-sink j'} a_ij'     for every other key j

so each row still sums to 1; a row that sees no non-sink key is left as it is. The official scripts use τ = 0.1,
β = 0.4 and calibrate only heads chosen on a calibration set (`heads`).

A softmax mixer (`SoftmaxAttention` and its masked families) takes a hook as its ``attention_hook`` attribute
(`calibrate_attention(model, {layer: ACT(...)})` sets it per layer). With a hook its training path recomputes the
attention densely — q, k (RoPE), the family's score_mod and mask, float32 softmax —, applies the hook to the
weights and reads the values with them (`hooked_attention`); with no hook set nothing changes. ACT works on whole
inputs, so a hooked mixer refuses the decode path (init_cache) and sequence parallelism.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from seqlab.checks import check_positive
from seqlab.core import masks
from seqlab.core.online_softmax import masked_softmax, modified_scores


@dataclasses.dataclass(frozen=True)
class ACT:
    """ACT's rule (module docstring): tau the sink threshold, beta the scale of a sink's weight, heads the query
    heads calibrated (None: all), keep_first leaves key 0 alone."""

    tau: float = 0.1
    beta: float = 0.4
    heads: tuple[int, ...] | None = None
    keep_first: bool = True

    def __post_init__(self):
        check_positive("tau", self.tau)
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta must lie in [0, 1] (1 changes nothing), got {self.beta}")
        if self.heads is not None:
            if not all(isinstance(h, int) and not isinstance(h, bool) and h >= 0 for h in self.heads):
                raise ValueError(f"heads must be None or a tuple of head indices >= 0, got {self.heads!r}")
            object.__setattr__(self, "heads", tuple(self.heads))

    def sinks(self, weights: jax.Array, visible: jax.Array) -> jax.Array:
        """[B, H, Tk] bool: the keys ACT calls sinks in each calibrated head, for weights [B, H, Tq, Tk] and
        visible [Tq, Tk] (query i sees key j)."""
        num_heads, tk = weights.shape[1], weights.shape[-1]
        if self.heads is not None and max(self.heads, default=-1) >= num_heads:
            raise ValueError(f"heads: the mixer has {num_heads} heads, got {self.heads!r}")
        seen_by = jnp.maximum(visible.sum(0), 1)  # [Tk]
        score = weights.sum(-2) / seen_by  # [B, H, Tk]
        sink = score > self.tau
        if self.keep_first:
            sink = sink & (jnp.arange(tk) > 0)
        if self.heads is not None:
            sink = sink & jnp.isin(jnp.arange(num_heads), jnp.asarray(self.heads, jnp.int32))[None, :, None]
        return sink

    def __call__(self, weights: jax.Array, visible: jax.Array) -> jax.Array:
        """Calibrated weights [B, H, Tq, Tk] float32."""
        sink = self.sinks(weights, visible)[:, :, None, :]  # [B, H, 1, Tk]
        rest = jnp.where(sink, 0.0, weights)
        rest_sum = rest.sum(-1, keepdims=True)
        removed = (1.0 - self.beta) * jnp.where(sink, weights, 0.0).sum(-1, keepdims=True)
        spread = weights + removed * rest / jnp.where(rest_sum > 0, rest_sum, 1.0)
        calibrated = jnp.where(sink, self.beta * weights, spread)
        return jnp.where(rest_sum > 0, calibrated, weights)


def attention_weights(q: jax.Array, k: jax.Array, mask: masks.Mask, score_mod: masks.ScoreMod | None = None,
                      scale: float | None = None) -> tuple[jax.Array, jax.Array]:
    """(weights [B, H, T, T] float32, visible [T, T]) of q [B, T, H, d] against k [B, T, H_kv, d] (H_kv dividing
    H) under mask and score_mod: softmax_j(scale q_i·k_j) over the keys j the mask shows query i (positions 0..T-1)."""
    b, t, h, d = q.shape
    group = h // k.shape[2]
    scale = d**-0.5 if scale is None else scale
    qg = q.astype(jnp.float32).reshape(b, t, k.shape[2], group, d)
    scores = jnp.einsum("bqngd,bknd->bngqk", qg, k.astype(jnp.float32)) * scale  # [B, H_kv, G, T, T]
    pos = jnp.arange(t, dtype=jnp.int32)
    scores = modified_scores(score_mod, scores, pos, pos, t).reshape(b, h, t, t)
    visible = mask.visible(pos[:, None], pos[None, :])
    if visible.shape != (t, t):
        raise ValueError(f"mask: an attention hook needs one [T, T] pattern for all heads, got {type(mask).__name__}")
    return masked_softmax(scores, visible), visible


def hooked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: masks.Mask, score_mod: masks.ScoreMod | None,
                     hook) -> jax.Array:
    """o [B, T, H, d_v] = hook(weights, visible) · v for q [B, T, H, d], k, v [B, T, H_kv, ·]."""
    weights, visible = attention_weights(q, k, mask, score_mod)
    weights = hook(weights, visible)
    b, t, h, _ = q.shape
    group = h // v.shape[2]
    wg = weights.reshape(b, v.shape[2], group, t, t)
    o = jnp.einsum("bngqk,bknv->bqngv", wg, v.astype(jnp.float32))
    return o.reshape(b, t, h, v.shape[-1])


def calibrate_attention(model: nnx.Module, hooks: Mapping[int, ACT | None]) -> None:
    """Set (or, with None, clear) the attention hook of the softmax mixer of each layer index in `hooks`
    (model.backbone.blocks); ValueError for an index out of range or a layer without a softmax mixer."""
    blocks = model.backbone.blocks
    for layer, hook in hooks.items():
        if not isinstance(layer, int) or not 0 <= layer < len(blocks):
            raise ValueError(f"hooks: layer {layer!r} is not a layer index in [0, {len(blocks)})")
        mixer = blocks[layer].mixer
        if not hasattr(mixer, "attention_hook"):
            raise ValueError(f"hooks: layer {layer} is {type(mixer).__name__}, not a softmax attention mixer")
        mixer.attention_hook = hook
