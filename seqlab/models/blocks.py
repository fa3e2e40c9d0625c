"""The residual block shared by every model: h = x + mixer(norm(x)); y = h + mlp(norm(h)) (pre-norm).

The mixer is any registered token mixer (`seqlab.mixers.create`); the MLP is SwiGLU or absent (Zoology's MQAR sweeps
use no MLP). Decoding prefills the prompt into the mixer's cache, then steps the mixer through it; the norms and the
MLP act token-wise.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from seqlab import mixers
from seqlab.checks import check_choice, check_positive
from seqlab.core.documents import Documents
from seqlab.models.prepbn import PRepBN

NORMS = ("layernorm", "rmsnorm", "prepbn")
MLPS = ("swiglu", "none")


class SwiGLU(nnx.Module):
    """y = W_down (silu(W_gate x) ⊙ W_up x), hidden = round(mlp_ratio · d_model)."""

    def __init__(self, d_model: int, hidden: int, *, rngs: nnx.Rngs, dtype: Any, param_dtype: Any):
        dense = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs, kernel_init=_init())
        self.gate = nnx.Linear(d_model, hidden, **dense)
        self.up = nnx.Linear(d_model, hidden, **dense)
        self.down = nnx.Linear(hidden, d_model, **dense)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., d_model] -> [..., d_model]."""
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


def make_norm(kind: str, d_model: int, *, rngs: nnx.Rngs, dtype: Any, param_dtype: Any) -> nnx.Module:
    """A LayerNorm, RMSNorm (computed in float32 by Flax) or PRepBN (SLAB's progressive LayerNorm -> BatchNorm,
    `seqlab.models.prepbn`) over the last axis."""
    check_choice("model.norm", kind, NORMS)
    if kind == "prepbn":
        return PRepBN(d_model, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    cls = nnx.LayerNorm if kind == "layernorm" else nnx.RMSNorm
    return cls(d_model, epsilon=1e-5, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def _init() -> Any:
    return nnx.initializers.normal(0.02)


class Block(nnx.Module):
    """Pre-norm residual block around one token mixer and an optional SwiGLU MLP."""

    def __init__(
        self,
        mixer: str,
        *,
        d_model: int,
        num_heads: int,
        mixer_args: Mapping[str, Any],
        mlp: str,
        mlp_ratio: float,
        norm: str,
        rngs: nnx.Rngs,
        layer_index: int = 0,
        num_layers: int = 1,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
    ):
        check_choice("model.mlp", mlp, MLPS)
        dt = dict(dtype=dtype, param_dtype=param_dtype)
        self.mixer_name = mixer
        self.norm_mixer = make_norm(norm, d_model, rngs=rngs, **dt)
        depth = dict(layer_index=layer_index, num_layers=num_layers) if mixers.takes_depth(mixer) else {}
        self.mixer = mixers.create(
            mixer, d_model=d_model, num_heads=num_heads, rngs=rngs, **dt, **depth, **mixer_args
        )
        if mlp == "swiglu":
            check_positive("model.mlp_ratio", mlp_ratio)
        with_mlp = mlp == "swiglu"
        self.norm_mlp = make_norm(norm, d_model, rngs=rngs, **dt) if with_mlp else None
        self.mlp = SwiGLU(d_model, max(1, round(mlp_ratio * d_model)), rngs=rngs, **dt) if with_mlp else None

    def __call__(self, x: jax.Array, documents: Documents | None = None) -> jax.Array:
        """x [B, T, d_model] -> [B, T, d_model]; documents: the rows' packed documents (the mixer's)."""
        h = self.norm_mixer(x)
        return self._mlp(x + (self.mixer(h) if documents is None else self.mixer(h, documents=documents)))

    def prefill(self, x: jax.Array, cache: Any) -> tuple[jax.Array, Any]:
        """A prompt x [B, T, d_model] into the mixer's fresh cache -> (y [B, T, d_model], cache after T tokens)."""
        y, cache = self.mixer.prefill(self.norm_mixer(x), cache)
        return self._mlp(x + y), cache

    def step(self, x_t: jax.Array, cache: Any) -> tuple[jax.Array, Any]:
        """One token x_t [B, d_model] through the mixer's cache."""
        y_t, cache = self.mixer.step(self.norm_mixer(x_t), cache)
        return self._mlp(x_t + y_t), cache

    def init_cache(self, batch: int, max_len: int) -> Any:
        return self.mixer.init_cache(batch, max_len)

    def _mlp(self, h: jax.Array) -> jax.Array:
        if self.mlp is None:
            return h
        return h + self.mlp(self.norm_mlp(h))
