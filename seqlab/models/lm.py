"""Decoder language model: backbone, then logits = h Eᵀ with the head tied to the token embedding.

    logits [B, T, V] = final_norm(blocks(embed(tokens))) @ embed.weightᵀ       (float32 logits)

Decoding: ``init_cache(batch, max_len)``, ``prefill(tokens [B, T], cache) -> (logits [B, T, V], cache)`` for the
prompt, then ``step(token [B], cache) -> (logits [B, V], cache)`` run every layer's mixer through its own cache
(recurrent state, KV cache or ring buffer). `seqlab.generate` builds generation on them.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from seqlab.core.documents import Documents
from seqlab.models.backbone import Backbone, DecodeCache


class DecoderLM(nnx.Module):
    def __init__(self, **backbone_args: Any):
        """Keyword arguments: those of `Backbone` (vocab_size, d_model, num_layers, mixers, ...)."""
        self.backbone = Backbone(**backbone_args)

    def __call__(
        self, tokens: jax.Array, *, documents: Documents | None = None, dropout_rng: jax.Array | None = None
    ) -> jax.Array:  # fmt: skip
        """tokens [B, T] int -> logits [B, T, V] float32; documents: packed rows (`Backbone`)."""
        return self._logits(self.backbone(tokens, documents=documents, dropout_rng=dropout_rng))

    def prefill(self, tokens: jax.Array, cache: DecodeCache) -> tuple[jax.Array, DecodeCache]:
        """A prompt tokens [B, T] int into a fresh cache -> (logits [B, T, V] float32, cache advanced by T)."""
        h, cache = self.backbone.prefill(tokens, cache)
        return self._logits(h), cache

    def step(self, token: jax.Array, cache: DecodeCache) -> tuple[jax.Array, DecodeCache]:
        """token [B] int -> (logits [B, V] float32, cache advanced by one position)."""
        h, cache = self.backbone.step(token, cache)
        return self._logits(h), cache

    def init_cache(self, batch: int, max_len: int) -> DecodeCache:
        return self.backbone.init_cache(batch, max_len)

    def on_train_progress(self, step: int | jax.Array, total_steps: int) -> None:
        """Called by the train step before step `step` of `total_steps` (see `Backbone.on_train_progress`)."""
        self.backbone.on_train_progress(step, total_steps)

    def _logits(self, h: jax.Array) -> jax.Array:
        table = self.backbone.embed.embedding[...]
        return jnp.einsum("...d,vd->...v", h.astype(jnp.float32), table.astype(jnp.float32))
