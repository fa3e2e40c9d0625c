"""Sequence classifier: backbone, pooling over the sequence, a linear head.

    logits [B, C] = W pool(backbone(tokens)) + b

pooling="mean" averages the hidden states of the real tokens (positions < length); pooling="cls" takes the hidden
state of the last real token (the task appends a CLS token there; with causal mixers it is the only position that
has seen the whole sequence).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from seqlab.mixers.base import check_choice, check_positive_int
from seqlab.models.backbone import Backbone

POOLINGS = ("mean", "cls")


class SequenceClassifier(nnx.Module):
    def __init__(self, *, num_classes: int, pooling: str = "mean", **backbone_args: Any):
        check_positive_int("num_classes", num_classes)
        check_choice("model.pooling", pooling, POOLINGS)
        self.pooling = pooling
        self.backbone = Backbone(**backbone_args)
        d_model = backbone_args["d_model"]
        self.head = nnx.Linear(
            d_model, num_classes, kernel_init=nnx.initializers.normal(0.02),
            param_dtype=backbone_args.get("param_dtype", jnp.float32), rngs=backbone_args["rngs"],
        )  # fmt: skip

    def __call__(self, tokens: jax.Array, lengths: jax.Array, *, dropout_rng: jax.Array | None = None) -> jax.Array:
        """tokens [B, T] int, lengths [B] int (real tokens per row) -> logits [B, C] float32."""
        h = self.backbone(tokens, dropout_rng=dropout_rng).astype(jnp.float32)
        return self.head(pool(h, lengths, self.pooling))


def pool(h: jax.Array, lengths: jax.Array, pooling: str) -> jax.Array:
    """h [B, T, D], lengths [B] -> [B, D]: the mean over positions < length, or the state at length - 1."""
    if pooling == "cls":
        return jnp.take_along_axis(h, (lengths - 1)[:, None, None], axis=1)[:, 0]
    mask = (jnp.arange(h.shape[1])[None, :] < lengths[:, None]).astype(h.dtype)
    return jnp.einsum("btd,bt->bd", h, mask) / jnp.maximum(lengths, 1)[:, None].astype(h.dtype)
