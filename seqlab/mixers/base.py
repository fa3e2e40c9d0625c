"""Shared building blocks of the token mixers: the `Mixer` decode API, argument checks, and the layers several
families use (per-head RMSNorm with an optional swish gate, depthwise causal short convolution, rotary embedding).

Every mixer maps x [B, T, D] -> y [B, T, D], reads a prompt into a decode cache, and decodes one token at a time:

    cache = mixer.init_cache(batch, max_len)
    y, cache = mixer.prefill(x, cache)           # x, y: [B, T, D] (the prompt; the cache must be fresh)
    y_t, cache = mixer.step(x_t, cache)          # x_t, y_t: [B, D]

A mixer implements a single `_forward(x, cache)`. With `cache=None` it is the full-sequence (training) path and
runs the op with the mixer's `impl`; with a cache it runs the same op form from the cached state (at T = 1 every
form of the engine is one recurrent step) and returns the updated cache. Softmax attention reads a T > 1 prompt
with its training path and writes the prompt's keys and values into the cache. All paths share every projection,
gate and norm, so neither prefill nor decoding can drift from the training path.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from seqlab.ops import _common as ops_common
from seqlab.parallel.mesh import previous_segment_tail

IMPLS = ops_common.IMPLS  # "auto": the Pallas kernel on GPU/TPU where the op has one, else "chunked"


# --------------------------------------------------------------------------------------------------------------
# Argument checks. Each raises ValueError with the argument's name first in the message.
# --------------------------------------------------------------------------------------------------------------


def check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_optional_positive_int(name: str, value: Any) -> None:
    if value is not None:
        check_positive_int(name, value)


def check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")


def check_finite(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


def check_fraction(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")


def check_divisible(name: str, value: int, divisor: int, divisor_name: str) -> None:
    if value % divisor:
        raise ValueError(f"{name} ({value}) must be divisible by {divisor_name} ({divisor})")


def check_choice(name: str, value: Any, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}, got {value!r}")


def check_even(name: str, value: int) -> None:
    if value % 2:
        raise ValueError(f"{name} must be even for the rotary embedding, got {value}")


def check_input(x: Any, d_model: int, *, rank: int, name: str) -> None:
    """x must be an array of `rank` dims whose last dim is d_model."""
    shape = getattr(x, "shape", None)
    if shape is None:
        raise ValueError(f"{name} must be an array, got {type(x).__name__}")
    layout = "[B, T, d_model]" if rank == 3 else "[B, d_model]"
    if len(shape) != rank:
        raise ValueError(f"{name} must have shape {layout} (rank {rank}), got shape {tuple(shape)}")
    if shape[-1] != d_model:
        raise ValueError(f"{name} last dim must equal d_model={d_model}, got shape {tuple(shape)}")


def resolve_dim(name: str, value: int | None, total: int, total_name: str, parts: int, parts_name: str) -> int:
    """A per-head size: `value` if given, else total // parts (which must divide)."""
    if value is not None:
        check_positive_int(name, value)
        return value
    check_divisible(total_name, total, parts, parts_name)
    return total // parts


def expand_dim(name: str, base: int, ratio: float, num_heads: int, base_name: str = "d_model") -> int:
    """Per-head size base * ratio / num_heads (fla's expand_k / expand_v), checked to be an integer."""
    check_positive(name, ratio)
    total = base * ratio
    if total != int(total) or int(total) % num_heads:
        raise ValueError(
            f"{name}: {base_name} * {name} = {total} must be an integer divisible by num_heads ({num_heads})"
        )
    return int(total) // num_heads


# --------------------------------------------------------------------------------------------------------------
# Caches
# --------------------------------------------------------------------------------------------------------------


@struct.dataclass
class RecurrentCache:
    """Decode cache of the linear-recurrent families.

    state: [B, H, K, V] float32, the op's state (V+1 columns for normalised linear attention).
    pos:   [] int32, number of tokens consumed so far (the position of the next token); the sequences of a batch
           decode in lockstep, so one counter serves all of them.
    conv:  [B, kernel_size - 1, C], the last inputs of the short convolution, or None if the mixer has none.
    """

    state: jax.Array
    pos: jax.Array
    conv: jax.Array | None = None

    @classmethod
    def empty(cls, state_shape: tuple[int, ...], conv: jax.Array | None = None) -> "RecurrentCache":
        """Zero state, position 0, and the given (zero) conv cache."""
        return cls(state=jnp.zeros(state_shape, jnp.float32), pos=jnp.zeros((), jnp.int32), conv=conv)


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


def ring_write(
    buffers: tuple[jax.Array, ...], values: tuple[jax.Array, ...], key_positions: jax.Array, pos: jax.Array
) -> tuple[tuple[jax.Array, ...], jax.Array]:
    """Write the next T tokens (positions pos .. pos+T-1) of each values [B, T, ...] into its ring buffer [B, L, ...]
    at slots p % L (of T > L tokens only the last L land). Returns the buffers and key_positions [L] (the absolute
    position held by each slot, -1 = empty)."""
    length, slots = values[0].shape[1], buffers[0].shape[1]
    kept = min(length, slots)
    written = pos + jnp.arange(length - kept, length, dtype=jnp.int32)
    slot = written % slots
    new = tuple(b.at[:, slot].set(v[:, length - kept :].astype(b.dtype)) for b, v in zip(buffers, values))
    return new, key_positions.at[slot].set(written)


def shard_sequence(module: nnx.Module, axis_name: str | None) -> None:
    """Run the training path of `module` (a mixer or a whole model) on a sequence split over the mesh axis
    `axis_name` — inside shard_map, each device holding a contiguous segment — or on whole sequences again with
    None. Every submodule with a ``sequence_axis`` attribute (mixers, short convolutions, the model backbone) takes
    it; ops then exchange chunk summaries (LASP-2), keys/values or halos along the axis. Decoding is unaffected."""
    for _, child in nnx.iter_modules(module):
        if hasattr(child, "sequence_axis"):
            child.sequence_axis = axis_name


# --------------------------------------------------------------------------------------------------------------
# Mixer base
# --------------------------------------------------------------------------------------------------------------


class Mixer(nnx.Module):
    """Base class of all token mixers.

    Subclasses call `super().__init__`, build their layers, and implement `init_cache` and `_forward`.
    A non-causal mixer (every output sees the whole sequence: classification, diffusion, vision) sets
    ``self.causal = False``; it has no decode path, and its `init_cache` raises through `_check_cache_args`.
    Mixers whose constructor takes ``layer_index`` (and ``num_layers``) get their depth from the model
    (per-layer schedules such as TransNormerLLM's decay).
    """

    causal: bool = True

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        *,
        impl: str = "auto",
        chunk_size: int = 64,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
    ):
        check_positive_int("d_model", d_model)
        check_positive_int("num_heads", num_heads)
        check_choice("impl", impl, IMPLS)
        check_positive_int("chunk_size", chunk_size)
        self.d_model = d_model
        self.num_heads = num_heads
        self.impl = impl
        self.chunk_size = chunk_size
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.sequence_axis: str | None = None

    # public API -----------------------------------------------------------------------------------------------

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, T, d_model] -> y [B, T, d_model] (causal)."""
        check_input(x, self.d_model, rank=3, name="x")
        y, _ = self._forward(x, None)
        return y

    def prefill(self, x: jax.Array, cache: Any) -> tuple[jax.Array, Any]:
        """A prompt x [B, T, d_model] read into an empty cache (fresh from `init_cache`) with the training path ->
        (y [B, T, d_model], the cache after T tokens)."""
        check_input(x, self.d_model, rank=3, name="x")
        return self._forward(x, cache)

    def step(self, x_t: jax.Array, cache: Any) -> tuple[jax.Array, Any]:
        """One decode step: x_t [B, d_model] -> (y_t [B, d_model], updated cache)."""
        check_input(x_t, self.d_model, rank=2, name="x_t")
        y, cache = self._forward(x_t[:, None, :], cache)
        return y[:, 0], cache

    def init_cache(self, batch: int, max_len: int) -> Any:
        """An empty decode cache for `batch` sequences of at most `max_len` tokens."""
        raise NotImplementedError

    def shard_sequence(self, axis_name: str | None) -> None:
        """See `shard_sequence`."""
        shard_sequence(self, axis_name)

    # for subclasses -------------------------------------------------------------------------------------------

    def _forward(self, x: jax.Array, cache: Any) -> tuple[jax.Array, Any]:
        raise NotImplementedError

    def _check_cache_args(self, batch: int, max_len: int) -> None:
        if not self.causal:
            raise ValueError(f"{type(self).__name__}: a non-causal mixer has no decode cache (causal=False)")
        check_positive_int("batch", batch)
        check_positive_int("max_len", max_len)

    def _linear(self, in_features: int, out_features: int, rngs: nnx.Rngs, *, use_bias: bool = False, **kw):
        return nnx.Linear(
            in_features, out_features, use_bias=use_bias, dtype=self.dtype, param_dtype=self.param_dtype, rngs=rngs, **kw
        )

    def _attention_projections(
        self,
        *,
        num_kv_heads: int | None,
        head_dim: int | None,
        rope: bool,
        rope_base: float,
        rope_interleaved: bool,
        use_bias: bool,
        rngs: nnx.Rngs,
    ) -> None:
        """The layout of softmax-style attention: head_dim, num_kv_heads (GQA: they divide num_heads), an optional
        RoPE and the q [D, H d], k, v [D, H_kv d] and o [H d, D] projections."""
        self.head_dim = resolve_dim("head_dim", head_dim, self.d_model, "d_model", self.num_heads, "num_heads")
        self.num_kv_heads = self.num_heads if num_kv_heads is None else num_kv_heads
        check_positive_int("num_kv_heads", self.num_kv_heads)
        check_divisible("num_heads", self.num_heads, self.num_kv_heads, "num_kv_heads")
        if rope:
            check_even("head_dim", self.head_dim)
        self.rope = RoPE(self.head_dim, base=rope_base, interleaved=rope_interleaved) if rope else None
        self._projections(self.head_dim, self.head_dim, rngs, kv_heads=self.num_kv_heads, use_bias=use_bias)

    def _projections(
        self, key_dim: int, value_dim: int, rngs: nnx.Rngs, *, kv_heads: int | None = None, use_bias: bool = False
    ) -> None:
        """q_proj [D, H key_dim], k_proj [D, H_kv key_dim], v_proj [D, H_kv value_dim], o_proj [H value_dim, D]
        (H_kv = kv_heads, default num_heads)."""
        hq, hkv = self.num_heads, self.num_heads if kv_heads is None else kv_heads
        self.q_proj = self._linear(self.d_model, hq * key_dim, rngs, use_bias=use_bias)
        self.k_proj = self._linear(self.d_model, hkv * key_dim, rngs, use_bias=use_bias)
        self.v_proj = self._linear(self.d_model, hkv * value_dim, rngs, use_bias=use_bias)
        self.o_proj = self._linear(hq * value_dim, self.d_model, rngs, use_bias=use_bias)

    def _op_kwargs(self, state: jax.Array | None) -> dict:
        """Keyword arguments of a linear-family op: the training path, or the same form continuing from a cached
        `state` and returning the final state (a prefill; at T = 1, one recurrent step)."""
        if state is None:
            return dict(impl=self.impl, chunk_size=self.chunk_size, sequence_axis=self.sequence_axis)
        return dict(impl=self.impl, chunk_size=self.chunk_size, initial_state=state, output_final_state=True)

    def _heads(self, x: jax.Array, head_dim: int) -> jax.Array:
        """[B, T, H*d] -> [B, T, H, d]."""
        return x.reshape(*x.shape[:-1], -1, head_dim)

    def _merge_heads(self, x: jax.Array) -> jax.Array:
        """[B, T, H, d] -> [B, T, H*d]."""
        return x.reshape(*x.shape[:-2], -1)


# --------------------------------------------------------------------------------------------------------------
# Shared layers
# --------------------------------------------------------------------------------------------------------------


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """x / sqrt(sum(x^2) + eps) over the last axis, computed in float32 (fla's l2norm)."""
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis, optionally gated by swish(gate).

    Applied to [..., H, d] with dim=d it is a per-head norm whose weight is shared by the heads (fla's layers).
    With a gate:
      norm_before_gate=True  (fla FusedRMSNormGated):  y = rmsnorm(x) * w * silu(gate)
      norm_before_gate=False (Mamba2 RMSNormGated):    y = rmsnorm(x * silu(gate)) * w
    Computed in float32 and cast back to x.dtype.
    """

    def __init__(
        self,
        dim: int,
        *,
        eps: float = 1e-5,
        affine: bool = True,
        norm_before_gate: bool = True,
        param_dtype: Any = jnp.float32,
    ):
        check_positive_int("dim", dim)
        self.dim = dim
        self.eps = eps
        self.norm_before_gate = norm_before_gate
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype)) if affine else None

    def __call__(self, x: jax.Array, gate: jax.Array | None = None) -> jax.Array:
        y = x.astype(jnp.float32)
        if gate is not None and not self.norm_before_gate:
            y = y * jax.nn.silu(gate.astype(jnp.float32))
        y = y * jax.lax.rsqrt(jnp.mean(y * y, axis=-1, keepdims=True) + self.eps)
        if self.weight is not None:
            y = y * self.weight[...].astype(jnp.float32)
        if gate is not None and self.norm_before_gate:
            y = y * jax.nn.silu(gate.astype(jnp.float32))
        return y.astype(x.dtype)


def srms_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """SimpleRMSNorm (TransNormer, TransNormerLLM): x / sqrt(mean(x^2) + eps) over the last axis, no weights.

    Computed in float32, cast back to x.dtype. Both papers apply it to all heads concatenated: x [..., H*d].
    """
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


class ShortConv(nnx.Module):
    """Depthwise causal 1-D convolution over time (kernel 4 by default), optionally followed by SiLU.

    y_t[c] = sum_{i<K} w[i, c] * x_{t-K+1+i}[c] (+ b[c]), with zeros before the first token.
    The decode cache holds the last K-1 inputs, [B, K-1, C]. Init as PyTorch's Conv1d: U(+-1/sqrt(K)).
    On a sequence split over devices (`shard_sequence`), a shard's first K-1 inputs come from the previous shard.
    """

    def __init__(
        self,
        channels: int,
        *,
        kernel_size: int = 4,
        use_bias: bool = False,
        activation: str | None = "silu",
        rngs: nnx.Rngs,
        param_dtype: Any = jnp.float32,
        dtype: Any = None,
    ):
        check_positive_int("channels", channels)
        check_positive_int("conv_size", kernel_size)
        check_choice("activation", activation, {None, "silu"})
        self.channels = channels
        self.kernel_size = kernel_size
        self.activation = activation
        self.dtype = dtype
        self.sequence_axis: str | None = None
        bound = 1.0 / math.sqrt(kernel_size)
        init = jax.nn.initializers.uniform(2 * bound)
        self.weight = nnx.Param(init(rngs.params(), (kernel_size, channels), param_dtype) - bound)
        self.bias = nnx.Param(init(rngs.params(), (channels,), param_dtype) - bound) if use_bias else None

    def init_state(self, batch: int) -> jax.Array:
        return jnp.zeros((batch, self.kernel_size - 1, self.channels), self.dtype or jnp.float32)

    def __call__(self, x: jax.Array, state: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """x [B, T, C], state [B, K-1, C] or None (start of sequence) -> (y [B, T, C], new state [B, K-1, C])."""
        B, T, C = x.shape
        K = self.kernel_size
        if state is None and self.sequence_axis is not None and K > 1:
            state = previous_segment_tail(x, K - 1, self.sequence_axis)
        elif state is None:
            state = jnp.zeros((B, K - 1, C), x.dtype)
        xp = jnp.concatenate([state.astype(x.dtype), x], axis=1)  # [B, T+K-1, C]
        w = self.weight[...].astype(x.dtype)
        y = sum(xp[:, i : i + T] * w[i] for i in range(K))
        if self.bias is not None:
            y = y + self.bias[...].astype(x.dtype)
        if self.activation == "silu":
            y = jax.nn.silu(y)
        return y, xp[:, T:].astype(state.dtype)


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


def init_mamba_decay(
    rngs: nnx.Rngs, num_heads: int, *, a_range: tuple[float, float], dt_min=1e-3, dt_max=0.1, dt_floor=1e-4
) -> tuple[nnx.Param, nnx.Param]:
    """Mamba2's decay parameters (A_log, dt_bias), each [H] float32: A ~ U(a_range), A_log = log A;
    dt ~ logU(dt_min, dt_max) floored at dt_floor, dt_bias = inverse-softplus(dt)."""
    a = jax.random.uniform(rngs.params(), (num_heads,), jnp.float32, *a_range)
    a_log = jnp.log(jnp.maximum(a, jnp.finfo(jnp.float32).tiny))
    u = jax.random.uniform(rngs.params(), (num_heads,), jnp.float32)
    dt = jnp.maximum(jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)), dt_floor)
    dt_bias = dt + jnp.log(-jnp.expm1(-dt))
    return nnx.Param(a_log), nnx.Param(dt_bias)


def mamba_decay(dt_raw: jax.Array, a_log: nnx.Param, dt_bias: nnx.Param) -> tuple[jax.Array, jax.Array]:
    """Delta = softplus(dt_raw + dt_bias) and log alpha = -exp(A_log) * Delta, both [..., H] float32."""
    dt = jax.nn.softplus(dt_raw.astype(jnp.float32) + dt_bias[...])
    return dt, -jnp.exp(a_log[...]) * dt


def repeat_kv_columns(weight: jax.Array, head_dim: int, groups: int) -> jax.Array:
    """[..., H_kv·d] -> [..., H_kv·groups·d]: each key/value head's d columns repeated for the `groups` query heads
    that read it (GQA head h reads key/value head h // groups); for kernels [D, H_kv·d] and biases [H_kv·d]."""
    heads = weight.reshape(*weight.shape[:-1], -1, head_dim)
    return jnp.repeat(heads, groups, axis=-2).reshape(*weight.shape[:-1], -1)


def default_rngs(rngs: nnx.Rngs | None) -> nnx.Rngs:
    return nnx.Rngs(0) if rngs is None else rngs

