"""Token embedding, a stack of residual blocks whose mixers follow a repeating pattern, and a final norm.

The pattern ``mixers = ("baseconv", "based")`` repeats over ``num_layers`` layers (layer i uses
``mixers[i % len(mixers)]``), so hybrid models are configuration, not code.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx, struct

from seqlab.checks import check_choice, check_positive_int
from seqlab.core.documents import Documents
from seqlab.layers.positional import positions
from seqlab.models.blocks import Block, make_norm
from seqlab.models.prepbn import set_progress

POSITION_EMBEDDINGS = ("none", "learned")


@struct.dataclass
class DecodeCache:
    """Per-layer mixer caches and the position [] int32 of the next token."""

    layers: tuple
    pos: jax.Array


def layer_mixers(pattern: Sequence[str], num_layers: int) -> list[str]:
    """The mixer name of every layer: the pattern repeated (and cut) to num_layers."""
    if not pattern:
        raise ValueError("model.mixers must name at least one mixer")
    return [pattern[i % len(pattern)] for i in range(num_layers)]


def make_blocks(pattern: Sequence[str], mixer_args: Mapping[str, Mapping[str, Any]], *, d_model: int, num_layers: int,
                num_heads: int, mlp: str, mlp_ratio: float, norm: str, rngs: nnx.Rngs, dtype: Any = None,
                param_dtype: Any = jnp.float32) -> nnx.List:
    """The num_layers blocks of the pattern (repeated), each told its depth."""
    return nnx.List([
        Block(name, d_model=d_model, num_heads=num_heads, mixer_args=mixer_args.get(name, {}), mlp=mlp,
              mlp_ratio=mlp_ratio, norm=norm, rngs=rngs, layer_index=index, num_layers=num_layers, dtype=dtype,
              param_dtype=param_dtype)
        for index, name in enumerate(layer_mixers(pattern, num_layers))
    ])


class Backbone(nnx.Module):
    """tokens [B, T] int -> hidden states [B, T, d_model] (after the final norm)."""

    def __init__(
        self,
        *,
        vocab_size: int,
        d_model: int,
        num_layers: int,
        num_heads: int,
        mixers: Sequence[str],
        mixer_args: Mapping[str, Mapping[str, Any]],
        mlp: str,
        mlp_ratio: float,
        norm: str,
        position_embedding: str,
        max_len: int,
        embed_dropout: float,
        rngs: nnx.Rngs,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
    ):
        check_positive_int("model.vocab_size", vocab_size)
        check_positive_int("model.num_layers", num_layers)
        check_choice("model.position_embedding", position_embedding, POSITION_EMBEDDINGS)
        if not 0.0 <= embed_dropout < 1.0:
            raise ValueError(f"model.embed_dropout must lie in [0, 1), got {embed_dropout}")
        self.dtype = dtype
        self.embed_dropout = embed_dropout
        init = nnx.initializers.normal(0.02)
        self.embed = nnx.Embed(vocab_size, d_model, embedding_init=init, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        learned = position_embedding == "learned"
        if learned:
            check_positive_int("max_len", max_len)
        self.positions = nnx.Param(init(rngs.params(), (max_len, d_model), param_dtype)) if learned else None
        self.blocks = make_blocks(mixers, mixer_args, d_model=d_model, num_layers=num_layers, num_heads=num_heads,
                                  mlp=mlp, mlp_ratio=mlp_ratio, norm=norm, rngs=rngs, dtype=dtype,
                                  param_dtype=param_dtype)
        self.final_norm = make_norm(norm, d_model, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.sequence_axis: str | None = None

    def __call__(
        self, tokens: jax.Array, *, documents: Documents | None = None, dropout_rng: jax.Array | None = None
    ) -> jax.Array:  # fmt: skip
        """tokens [B, T] -> [B, T, d_model]; `documents`: packed rows (every layer mixes each document alone and
        learned positions restart per document); `dropout_rng` enables embedding dropout (training)."""
        pos = positions(None, tokens.shape[1], self.sequence_axis) if documents is None else documents.positions
        h = self._dropout(self._embed(tokens, pos), dropout_rng)
        for block in self.blocks:
            h = block(h, documents)
        return self.final_norm(h)

    def mixer_inputs(self, tokens: jax.Array) -> list[jax.Array]:
        """The input of every layer's mixer (after its block's norm), [B, T, d_model] each, for tokens [B, T]
        (what layer-wise distillation feeds a student's mixers)."""
        h = self._embed(tokens, positions(None, tokens.shape[1], self.sequence_axis))
        inputs = []
        for block in self.blocks:
            inputs.append(block.norm_mixer(h))
            h = block(h)
        return inputs

    def prefill(self, tokens: jax.Array, cache: DecodeCache) -> tuple[jax.Array, DecodeCache]:
        """A prompt tokens [B, T] into a fresh cache (from `init_cache`) -> (hidden [B, T, d_model], cache after T)."""
        length = tokens.shape[1]
        h = self._embed(tokens, positions(cache, length))
        h, layers = self._through_caches(Block.prefill, h, cache.layers)
        return self.final_norm(h), DecodeCache(layers=layers, pos=cache.pos + length)

    def step(self, token: jax.Array, cache: DecodeCache) -> tuple[jax.Array, DecodeCache]:
        """One token [B] at position cache.pos -> (hidden [B, d_model], updated cache)."""
        h = self._embed(token[:, None], cache.pos[None])[:, 0]
        h, layers = self._through_caches(Block.step, h, cache.layers)
        return self.final_norm(h), DecodeCache(layers=layers, pos=cache.pos + 1)

    def init_cache(self, batch: int, max_len: int) -> DecodeCache:
        layers = tuple(block.init_cache(batch, max_len) for block in self.blocks)
        return DecodeCache(layers=layers, pos=jnp.zeros((), jnp.int32))

    def on_train_progress(self, step: int | jax.Array, total_steps: int) -> None:
        """Training step `step` of `total_steps` is next: set λ of every PRepBN norm (model.norm="prepbn"; no norm
        of another kind depends on the step)."""
        set_progress(self, step, total_steps)

    def _through_caches(self, advance: Callable, h: jax.Array, caches: tuple) -> tuple[jax.Array, tuple]:
        """h through every block by `advance(block, h, cache) -> (h, cache)`; returns h and the new caches."""
        layers = []
        for block, layer_cache in zip(self.blocks, caches):
            h, layer_cache = advance(block, h, layer_cache)
            layers.append(layer_cache)
        return h, tuple(layers)

    def _embed(self, tokens: jax.Array, pos: jax.Array) -> jax.Array:
        h = self.embed(tokens)
        if self.positions is not None:
            h = h + self.positions[...][pos].astype(h.dtype)
        return h

    def _dropout(self, h: jax.Array, rng: jax.Array | None) -> jax.Array:
        if rng is None or self.embed_dropout == 0.0:
            return h
        if self.sequence_axis is not None:
            rng = jax.random.fold_in(rng, jax.lax.axis_index(self.sequence_axis))
        keep = jax.random.bernoulli(rng, 1.0 - self.embed_dropout, h.shape)
        return jnp.where(keep, h / (1.0 - self.embed_dropout), 0.0).astype(h.dtype)

