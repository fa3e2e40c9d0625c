"""The `Mixer` base class: the decode API every token mixer shares, and the projections and op arguments its
subclasses build from.

Every mixer maps x [B, T, D] -> y [B, T, D], reads a prompt into a decode cache, and decodes one token at a time:

    cache = mixer.init_cache(batch, max_len)
    y, cache = mixer.prefill(x, cache)           # x, y: [B, T, D] (the prompt; the cache must be fresh)
    y_t, cache = mixer.step(x_t, cache)          # x_t, y_t: [B, D]

Packed rows: ``mixer(x, documents=Documents(segment_ids, positions))`` (`seqlab.core.documents`) mixes each
document of a row as if it were alone: a mixer that sets ``takes_documents = True`` implements
``_forward(x, cache, documents=None)`` and passes them on (`_op_kwargs` gives the ops their segment_ids,
`ShortConv` restarts, `_positions` restarts RoPE-style positions); any other mixer refuses them.

Initial-state tuning (Lina-Speech's, after RWKV's state tuning; prefix-tuning for recurrences):
``mixer.learn_initial_state()`` gives a mixer whose cache carries a recurrent ``state`` [B, ...] one learnt
parameter ``learnt_initial_state`` [...] (the state without its batch axis, float32, zero at first, so the mixer
starts out unchanged). Every sequence then starts from it: the training path is a prefill from a cache holding it,
and `init_cache` returns caches holding it, so decoding starts there too. Packed documents and sequence
parallelism are refused with it (each would need the state at every document start or device boundary). Train only
it with ``optim.trainable`` (`seqlab.training.optim`).

A mixer implements a single `_forward(x, cache)`. With `cache=None` it is the full-sequence (training) path and
runs the op with the mixer's `impl`; with a cache it runs the same op form from the cached state (at T = 1 every
form of the engine is one recurrent step) and returns the updated cache. Softmax attention reads a T > 1 prompt
with its training path and writes the prompt's keys and values into the cache. All paths share every projection,
gate and norm, so neither prefill nor decoding can drift from the training path. The caches are in
`seqlab.mixers.caches`, the shared layers in `seqlab.layers`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from seqlab.checks import (
    check_choice,
    check_divisible,
    check_even,
    check_input,
    check_optional_positive_int,
    check_positive_int,
    resolve_dim,
)
from seqlab.core.documents import Documents
from seqlab.layers.positional import RoPE, positions
from seqlab.ops import _common as ops_common
from seqlab.parallel.mesh import shard_sequence

IMPLS = ops_common.IMPLS  # "auto": the Pallas kernel on GPU/TPU where the op has one, else "chunked"


class Mixer(nnx.Module):
    """Base class of all token mixers.

    Subclasses call `super().__init__`, build their layers, and implement `init_cache` and `_forward`; they are
    registered by name with `seqlab.mixers.register`. Constructors take ``rngs: nnx.Rngs | None = None`` and call
    ``rngs = self._rngs(rngs)``: rngs=None means ``nnx.Rngs(0)``, so two mixers built without rngs have the same
    (deterministic) weights.
    A non-causal mixer (every output sees the whole sequence: classification, diffusion, vision) sets
    ``self.causal = False``; it has no decode path, and its `init_cache` raises through `_check_cache_args`.
    Mixers whose constructor takes ``layer_index`` (and ``num_layers``) get their depth from the model
    (per-layer schedules such as TransNormerLLM's decay).

    impl: the op form ("auto", "chunked", "recurrent", "parallel", "pallas"). chunk_size: the linear ops' chunk
    (None for a mixer that runs none: softmax attention has its own `block_size`).
    """

    causal: bool = True
    takes_documents: bool = False
    documents_refused: str = ""  # why a causal built-in mixer does not take packed documents
    single_device_state: str = ""  # what nnx.BatchStat state the mixer updates in training (the launcher: one device)
    learnt_initial_state: nnx.Param | None = None  # set by learn_initial_state()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "init_cache" in vars(cls):  # a learnt initial state seeds every cache the subclass builds
            cls.init_cache = _from_learnt_initial_state(vars(cls)["init_cache"])

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        *,
        impl: str = "auto",
        chunk_size: int | None = 64,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
    ):
        check_positive_int("d_model", d_model)
        check_positive_int("num_heads", num_heads)
        check_choice("impl", impl, IMPLS)
        check_optional_positive_int("chunk_size", chunk_size)
        self.d_model = d_model
        self.num_heads = num_heads
        self.impl = impl
        self.chunk_size = chunk_size
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.sequence_axis: str | None = None

    # public API -----------------------------------------------------------------------------------------------

    def __call__(self, x: jax.Array, *, documents: Documents | None = None) -> jax.Array:
        """x [B, T, d_model] -> y [B, T, d_model] (causal); documents: the rows' packed documents (module
        docstring), segment_ids and positions [B, T]."""
        check_input(x, self.d_model, rank=3, name="x")
        if self.learnt_initial_state is not None:
            return self._from_initial_state(x, documents)
        if documents is None:
            y, _ = self._forward(x, None)
            return y
        self._check_documents(x, documents)
        y, _ = self._forward(x, None, documents)
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
        """An empty decode cache for `batch` sequences of at most `max_len` tokens (a non-causal mixer has none:
        ValueError)."""
        self._check_cache_args(batch, max_len)
        raise NotImplementedError(f"{type(self).__name__} defines no init_cache")

    def learn_initial_state(self) -> None:
        """Give the mixer a learnt initial state (module docstring): a zero ``nnx.Param`` shaped like its cache's
        ``state`` without the batch axis. ValueError where `initial_state_refusal` says why not."""
        refusal = self.initial_state_refusal()
        if refusal:
            raise ValueError(f"learn_initial_state: {refusal}")
        state = jax.eval_shape(lambda: self.init_cache(1, 1)).state
        self.learnt_initial_state = nnx.Param(jnp.zeros(state.shape[1:], jnp.float32))

    def initial_state_refusal(self) -> str:
        """Why the mixer cannot learn an initial state ("" if it can): it is non-causal, updates batch statistics in
        training (its training path is then not a prefill from a state), or its cache holds no recurrent state."""
        name = type(self).__name__
        if not self.causal:
            return f"{name} is non-causal and has no decode state"
        if self.single_device_state:
            return (f"{name} updates {self.single_device_state} in training, so its training path is not a prefill "
                    "from a state")
        state = getattr(jax.eval_shape(lambda: self.init_cache(1, 1)), "state", None)
        if not isinstance(state, jax.ShapeDtypeStruct):
            return (f"{name}'s cache holds no recurrent state (a `state` field); initial-state tuning applies to "
                    "linear-state and hybrid mixers")
        return ""

    def shard_sequence(self, axis_name: str | None) -> None:
        """Run the training path on a sequence split over the mesh axis `axis_name` (None: whole sequences); see
        `seqlab.parallel.mesh.shard_sequence`."""
        shard_sequence(self, axis_name)

    # for subclasses -------------------------------------------------------------------------------------------

    def _from_initial_state(self, x: jax.Array, documents: Documents | None) -> jax.Array:
        """The training path from the learnt initial state: a prefill of x [B, T, d_model] from a fresh cache."""
        name = type(self).__name__
        if documents is not None:
            raise ValueError(f"{name}: packed documents are not supported with a learnt initial state (every "
                             "document would have to start from it)")
        if self.sequence_axis is not None:
            raise ValueError(f"{name}: sequence parallelism is not supported with a learnt initial state")
        y, _ = self._forward(x, self.init_cache(x.shape[0], x.shape[1]))
        return y

    def _forward(self, x: jax.Array, cache: Any) -> tuple[jax.Array, Any]:
        raise NotImplementedError

    def _on_whole_sequence(self, layer, x: jax.Array) -> jax.Array:
        """layer(x) for a layer that needs the whole sequence (global pooling, FFT, scans in other orders): on a
        sequence split along ``sequence_axis`` it gathers x [B, T_local, D] into the whole sequence, applies layer,
        and keeps this device's outputs. The gather is a psum of each device's segment in place, so the whole
        sequence is typed as the same on every device and a layer's scans start from replicated carries."""
        if self.sequence_axis is None:
            return layer(x)
        t_local, offset = x.shape[1], jax.lax.axis_index(self.sequence_axis) * x.shape[1]
        whole = jnp.zeros((x.shape[0], t_local * jax.lax.axis_size(self.sequence_axis), *x.shape[2:]), x.dtype)
        whole = jax.lax.psum(jax.lax.dynamic_update_slice_in_dim(whole, x, offset, axis=1), self.sequence_axis)
        return jax.lax.dynamic_slice_in_dim(layer(whole), offset, t_local, axis=1)

    def _check_documents(self, x: jax.Array, documents: Documents) -> None:
        if not self.causal:
            raise ValueError(f"documents: {type(self).__name__} is non-causal here (causal=False); packed documents "
                             "are for causal mixers")  # fmt: skip
        if not self.takes_documents:
            why = f" ({self.documents_refused})" if self.documents_refused else ""
            raise ValueError(f"documents: {type(self).__name__} does not take packed documents (takes_documents is "
                             f"False{why}); train it on unpacked rows (data.bytes.pack=False)")  # fmt: skip
        for name, array in zip(documents._fields, documents):
            if jnp.shape(array) != x.shape[:2]:
                raise ValueError(f"documents.{name} must be [batch, time] {x.shape[:2]}, got {jnp.shape(array)}")

    def _positions(self, cache: Any, length: int, documents: Documents | None) -> jax.Array:
        """The positions of this call's tokens: within each document [B, T] (packed rows), else absolute [T]
        (`seqlab.layers.positional.positions`: after the cache, or offset by the devices before this one)."""
        if documents is not None:
            return documents.positions
        return positions(cache, length, None if cache is not None else self.sequence_axis)

    @staticmethod
    def _rngs(rngs: nnx.Rngs | None) -> nnx.Rngs:
        """The constructor's rngs, or ``nnx.Rngs(0)`` for None (deterministic initialisation)."""
        return nnx.Rngs(0) if rngs is None else rngs

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

    def _op_kwargs(self, state: jax.Array | None, documents: Documents | None = None) -> dict:
        """Keyword arguments of a linear-family op: the training path (restarting at `documents`' boundaries), or
        the same form continuing from a cached `state` and returning the final state (a prefill; at T = 1, one
        recurrent step)."""
        if state is None:
            segments = {} if documents is None else dict(segment_ids=documents.segment_ids)
            return dict(impl=self.impl, chunk_size=self.chunk_size, sequence_axis=self.sequence_axis, **segments)
        return dict(impl=self.impl, chunk_size=self.chunk_size, initial_state=state, output_final_state=True)

    def _heads(self, x: jax.Array, head_dim: int) -> jax.Array:
        """[B, T, H*d] -> [B, T, H, d]."""
        return x.reshape(*x.shape[:-1], -1, head_dim)

    def _merge_heads(self, x: jax.Array) -> jax.Array:
        """[B, T, H, d] -> [B, T, H*d]."""
        return x.reshape(*x.shape[:-2], -1)


def _from_learnt_initial_state(init_cache: Callable) -> Callable:
    """init_cache, with the cache's ``state`` set to the mixer's learnt initial state (if it has one) on every row."""

    @functools.wraps(init_cache)
    def seeded(self: Mixer, batch: int, max_len: int) -> Any:
        cache = init_cache(self, batch, max_len)
        if self.learnt_initial_state is None:
            return cache
        learnt = self.learnt_initial_state[...]
        return cache.replace(state=jnp.broadcast_to(learnt, cache.state.shape).astype(cache.state.dtype))

    return seeded
