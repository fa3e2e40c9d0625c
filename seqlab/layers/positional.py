"""Token positions and rotary embeddings: `positions` (absolute positions of a call's tokens), RoPE and the pair
rotation it shares with URPE (`seqlab.layers.lrpe`)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from seqlab.checks import check_choice, check_even, check_positive_int


def positions(cache: Any, length: int, sequence_axis: str | None = None) -> jax.Array:
    """Absolute positions [T] of the tokens of this call: continuing from cache.pos when decoding; offset by the
    segments of the devices before this one when the sequence is split over the mesh axis `sequence_axis`."""
    if cache is not None:
        start = cache.pos
    elif sequence_axis is not None:
        start = jax.lax.axis_index(sequence_axis) * length
    else:
        start = 0
    return start + jnp.arange(length, dtype=jnp.int32)


@dataclasses.dataclass(frozen=True)
class RoPE:
    """Rotary position embedding on the first `dim` features of [B, T, H, D] (RoFormer).

    interleaved=False rotates halves (x[:d/2], x[d/2:]) (GPT-NeoX / Llama); interleaved=True rotates adjacent pairs
    (x[0::2], x[1::2]) (GPT-J / RetNet). freqs="standard": theta_i = base^(-2i/d); freqs="retnet": theta_i =
    base^(-linspace(0, 1, d/2)) as in torchscale's RetNetRelPos. Stateless (no parameters).
    """

    dim: int
    base: float = 10000.0
    interleaved: bool = False
    freqs: str = "standard"

    def __post_init__(self):
        check_positive_int("rotary_dim", self.dim)
        check_even("rotary_dim", self.dim)
        check_choice("freqs", self.freqs, {"standard", "retnet"})

    def inv_freq(self) -> jax.Array:
        half = self.dim // 2
        if self.freqs == "retnet":
            exponent = jnp.linspace(0.0, 1.0, half, dtype=jnp.float32)
        else:
            exponent = jnp.arange(half, dtype=jnp.float32) * 2.0 / self.dim
        return self.base ** (-exponent)

    def __call__(self, x: jax.Array, pos: jax.Array) -> jax.Array:
        """x [B, T, H, D] with D >= dim; pos [T] or [B, T] integer positions."""
        angle = pos.astype(jnp.float32)[..., None] * self.inv_freq()  # [(B,) T, d/2]
        angle = angle[None, :, None, :] if pos.ndim == 1 else angle[:, :, None, :]
        rot, rest = x[..., : self.dim].astype(jnp.float32), x[..., self.dim :]
        out = rotate_pairs(rot, angle, interleaved=self.interleaved)
        return jnp.concatenate([out.astype(x.dtype), rest], axis=-1)


def rotate_pairs(x: jax.Array, angle: jax.Array, *, interleaved: bool) -> jax.Array:
    """Rotate the feature pairs of x [..., d] by angle [..., d/2] (broadcast against x's leading axes): adjacent
    pairs (x_2i, x_2i+1) when interleaved, else (x_i, x_{i+d/2}). Float32 in, float32 out."""
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return jnp.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).reshape(x.shape)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
