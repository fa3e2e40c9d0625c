"""LightNet: an additive recurrence normalised per key feature, run as gated linear attention.

Paper: "You Only Scan Once: Efficient Multi-dimension Sequential Modeling with LightNet" (Qin et al., 2024); the
layer is read from flash-linear-attention's `fla/layers/lightnet.py` (OpenNLPLab/LightNet could not be read).

Additive form (per head; exp elementwise over the d_f key features, ⊘ divides row f of S'_t by Z_t[f]):

    S'_t = S'_{t-1} + e^{k_t} v_tᵀ,   Z_t = Z_{t-1} + e^{k_t},   S_t = S'_t ⊘ Z_t,   o_t = S_tᵀ SiLU(q_t) · d_f^-1/2

i.e. a softmax over time per key feature. It runs as the equivalent gated form on `ops.gla`:

    z_t = logcumsumexp(k)_t (float32),   k̃_t = e^{k_t - z_t} <= 1,   log α_t = z_{t-1} - z_t <= 0,
    S_t = diag(α_t) S_{t-1} + k̃_t v_tᵀ.

With no earlier token z_{-1} = -inf and log α_0 would be -inf; the state before the first token is zero, so any
gate is exact there and we use log α_0 = 0 (as fla does): nothing is infinite inside the op and the chunk cumsums
of the log gates stay small. Output: RMSNorm over all heads concatenated (affine, eps 1e-5) times swish(x W₁ W₂)
(low rank 128), then W_o (fla's FusedRMSNormGated over hidden_size).

Defaults (fla): feature_dim d_f = 128 per head (fla's `expand_ratio`; fla then takes H = d_model / 128), value head
dim d_model / H, no short convolution, no positional encoding, no biases.

Positions (option): MD-LRPE (`layers.md_lrpe`) on SiLU(q) and on the normalised k̃, with positions of a `grid_shape`
read in raster order (1-D token positions when grid_shape is None). The "cosine" kind (default when enabled) acts
elementwise, so it commutes with the per-feature normalisation: each key feature f becomes the pair
(k̃_f cos Θ_f, k̃_f sin Θ_f) sharing the gate α_f, and the additive form above holds with e^{k} replaced by those
pairs (the key dim doubles). "rotate" mixes adjacent key features whose normalisers differ; it is applied to the
gated form as is (as LRPE is applied in LightNet-style layers), without an additive-form counterpart.

Sequence parallelism (`shard_sequence`): the logcumsumexp crosses devices through one all-gather of each
segment's logsumexp [B, H, d_f]; each device starts its z from the log-sum of the segments before it, and the GLA
op exchanges its state summaries as usual.

Decode cache (`LightNetCache`): the GLA state [B, H, d_f (2 d_f with cosine LRPE), d_v] float32, z_T [B, H, d_f]
float32 (the running logsumexp of the keys; -inf before the first token) and the position counter. A prefill or
step continues z from the cached z.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from seqlab import ops
from seqlab.checks import check_positive, check_positive_int, resolve_dim
from seqlab.core.documents import Documents, document_scan, document_starts
from seqlab.core.halo import previous_segment_tail
from seqlab.layers.md_lrpe import check_lrpe, grid_positions, lrpe_out_dim, md_lrpe
from seqlab.layers.norms import RMSNorm
from seqlab.mixers.base import Mixer
from seqlab.mixers.caches import LightNetCache
from seqlab.mixers.registry import register


def lightnet_gate(
    k: jax.Array, z_start: jax.Array | None = None, sequence_axis: str | None = None, starts: jax.Array | None = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Normalised keys, log gates and the final logsumexp of key logits k [B, T, H, K].

    z_start [B, H, K]: logsumexp of the keys before this call (None or -inf: no earlier key). starts [B, T]:
    packed documents' starts (``seqlab.core.documents.document_starts``), where z restarts; None: one document.
    Returns k̃ = e^{k - z} and log α = z_prev - z (0 where no earlier key exists), both [B, T, H, K] float32, and
    z_T [B, H, K] (the logsumexp of all keys of this device's prefix, of its last document).
    """
    k32 = k.astype(jnp.float32)
    if z_start is None:
        z_start = jnp.full((k.shape[0], *k.shape[2:]), -jnp.inf, jnp.float32)
    if starts is not None:
        z = document_scan(k32, starts, jnp.logaddexp, -jnp.inf, sequence_axis, z_start)
        z_prev = jnp.concatenate([_incoming_z(z, z_start, sequence_axis), z[:, :-1]], axis=1)
        z_prev = jnp.where(starts[:, :, None, None], -jnp.inf, z_prev)  # no earlier key of the document
        log_gate = jnp.where(jnp.isneginf(z_prev), 0.0, z_prev - z)
        return jnp.exp(k32 - z), log_gate, z[:, -1]
    if sequence_axis is not None:
        z_start = jnp.logaddexp(z_start, _earlier_segments_logsumexp(k32, sequence_axis))
    z = jnp.logaddexp(z_start[:, None], jax.lax.cumlogsumexp(k32, axis=1))
    z_prev = jnp.concatenate([z_start[:, None], z[:, :-1]], axis=1)
    log_gate = jnp.where(jnp.isneginf(z_prev), 0.0, z_prev - z)
    return jnp.exp(k32 - z), log_gate, z[:, -1]


def _incoming_z(z: jax.Array, z_start: jax.Array, sequence_axis: str | None) -> jax.Array:
    """z before this device's first token [B, 1, H, K]: z_start on the first (or only) device, else the previous
    device's last z (one ppermute)."""
    if sequence_axis is None:
        return z_start[:, None]
    before = previous_segment_tail(z, 1, sequence_axis)
    return jnp.where(jax.lax.axis_index(sequence_axis) == 0, z_start[:, None], before)


def _earlier_segments_logsumexp(k32: jax.Array, axis_name: str) -> jax.Array:
    """logsumexp [B, H, K] of the keys of the sequence segments on the devices before this one along `axis_name`
    (-inf on the first device): one all-gather of every segment's logsumexp."""
    totals = jax.lax.all_gather(jax.nn.logsumexp(k32, axis=1), axis_name)  # [P, B, H, K]
    earlier = jnp.arange(totals.shape[0]) < jax.lax.axis_index(axis_name)
    return jax.nn.logsumexp(jnp.where(earlier[:, None, None, None], totals, -jnp.inf), axis=0)


@register(
    "lightnet",
    kind="linear",
    paper="You Only Scan Once: Efficient Multi-dimension Sequential Modeling with LightNet",
    examples={"default": dict(num_heads=2, feature_dim=8, gate_low_rank_dim=4)},
)
class LightNet(Mixer):
    takes_documents = True

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        *,
        feature_dim: int = 128,
        value_dim: int | None = None,
        gate_low_rank_dim: int = 128,
        norm_eps: float = 1e-5,
        lrpe: str | None = None,
        grid_shape: tuple[int, ...] | None = None,
        lrpe_base: float = 10000.0,
        impl: str = "auto",
        chunk_size: int = 64,
        rngs: nnx.Rngs | None = None,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
    ):
        super().__init__(d_model, num_heads, impl=impl, chunk_size=chunk_size, dtype=dtype, param_dtype=param_dtype)
        rngs = self._rngs(rngs)
        check_positive_int("feature_dim", feature_dim)
        check_positive_int("gate_low_rank_dim", gate_low_rank_dim)
        check_positive("norm_eps", norm_eps)
        check_positive("lrpe_base", lrpe_base)
        self.feature_dim = feature_dim
        self.value_dim = resolve_dim("value_dim", value_dim, d_model, "d_model", num_heads, "num_heads")
        self.lrpe, self.lrpe_base = lrpe, lrpe_base
        self.grid_shape = self._check_grid(lrpe, grid_shape)
        if lrpe is not None:
            num_axes = 1 if grid_shape is None else len(grid_shape)
            check_lrpe(lrpe, feature_dim, num_axes, kind_name="lrpe", dim_name="feature_dim")
        self.state_key_dim = feature_dim if lrpe is None else lrpe_out_dim(feature_dim, lrpe)
        H, F, V = num_heads, feature_dim, self.value_dim
        self.q_proj = self._linear(d_model, H * F, rngs)
        self.k_proj = self._linear(d_model, H * F, rngs)
        self.v_proj = self._linear(d_model, H * V, rngs)
        self.g_down = self._linear(d_model, gate_low_rank_dim, rngs)
        self.g_up = self._linear(gate_low_rank_dim, H * V, rngs)
        self.norm = RMSNorm(H * V, eps=norm_eps, param_dtype=param_dtype)
        self.o_proj = self._linear(H * V, d_model, rngs)

    @staticmethod
    def _check_grid(lrpe: str | None, grid_shape: tuple[int, ...] | None) -> tuple[int, ...] | None:
        """grid_shape as a tuple (None: 1-D token positions); it needs lrpe."""
        if grid_shape is None:
            return None
        if lrpe is None:
            raise ValueError("grid_shape: positions are only used by MD-LRPE; set lrpe='cosine' or 'rotate'")
        if not isinstance(grid_shape, (tuple, list)) or not grid_shape:
            raise ValueError(f"grid_shape must be a non-empty tuple of positive ints, got {grid_shape!r}")
        for size in grid_shape:
            check_positive_int("grid_shape", size)
        return tuple(grid_shape)

    def init_cache(self, batch: int, max_len: int) -> LightNetCache:
        self._check_cache_args(batch, max_len)
        H = self.num_heads
        return LightNetCache(
            state=jnp.zeros((batch, H, self.state_key_dim, self.value_dim), jnp.float32),
            z=jnp.full((batch, H, self.feature_dim), -jnp.inf, jnp.float32),
            pos=jnp.zeros((), jnp.int32),
        )

    def _forward(self, x: jax.Array, cache: LightNetCache | None, documents: Documents | None = None):
        q = jax.nn.silu(self._heads(self.q_proj(x), self.feature_dim))
        k = self._heads(self.k_proj(x), self.feature_dim)
        v = self._heads(self.v_proj(x), self.value_dim)
        sequence_axis = self.sequence_axis if cache is None else None
        starts = None
        if documents is not None:
            if self.grid_shape is not None:
                raise ValueError("documents: packed documents are 1-D sequences; LightNet with grid_shape takes none")
            starts = document_starts(documents.segment_ids, sequence_axis)
        k, log_gate, z_last = lightnet_gate(k, None if cache is None else cache.z, sequence_axis, starts)
        if self.lrpe is not None:
            q, k, log_gate = self._encode_positions(q, k, log_gate, cache, documents)
        o, state = ops.gla(
            q, k, v, log_gate, scale=self.feature_dim**-0.5,
            **self._op_kwargs(None if cache is None else cache.state, documents),
        )  # fmt: skip
        if cache is not None:
            cache = cache.replace(state=state, z=z_last, pos=cache.pos + x.shape[1])
        o = self.norm(self._merge_heads(o.astype(x.dtype)), self.g_up(self.g_down(x)))
        return self.o_proj(o), cache

    def _encode_positions(
        self, q: jax.Array, k: jax.Array, log_gate: jax.Array, cache: LightNetCache | None,
        documents: Documents | None = None,
    ):  # fmt: skip
        """MD-LRPE on q, k [B, T, H, d_f] at the grid positions of these tokens (within each document of packed
        rows); the cosine kind doubles the key features, and each copy keeps its feature's gate."""
        index = self._positions(cache, q.shape[1], documents)
        pos = index[..., None] if self.grid_shape is None else grid_positions(self.grid_shape, index)
        q = md_lrpe(q, pos, kind=self.lrpe, base=self.lrpe_base)
        k = md_lrpe(k, pos, kind=self.lrpe, base=self.lrpe_base)
        if self.lrpe == "cosine":
            log_gate = jnp.concatenate([log_gate, log_gate], axis=-1)
        return q, k, log_gate
