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

from seqlab.checks import check_choice, check_positive_int
from seqlab.layers.positional import positions
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
        return self.head(pool(h, lengths, self.pooling, self.backbone.sequence_axis))

    def on_train_progress(self, step: int | jax.Array, total_steps: int) -> None:
        """Called by the train step before step `step` of `total_steps` (see `Backbone.on_train_progress`)."""
        self.backbone.on_train_progress(step, total_steps)


def pool(h: jax.Array, lengths: jax.Array, pooling: str, sequence_axis: str | None = None) -> jax.Array:
    """h [B, T, D], lengths [B] -> [B, D]: the mean over positions < length, or the state at length - 1.

    With `sequence_axis`, h is this device's segment of the sequence and lengths count the whole sequence; the
    pooled vector is summed over the axis (one psum of [B, D]).
    """
    pos = positions(None, h.shape[1], sequence_axis)[None, :]
    if pooling == "cls":
        weights = (pos == lengths[:, None] - 1).astype(h.dtype)
    else:
        weights = (pos < lengths[:, None]).astype(h.dtype) / jnp.maximum(lengths, 1)[:, None].astype(h.dtype)
    pooled = jnp.einsum("btd,bt->bd", h, weights)
    return pooled if sequence_axis is None else jax.lax.psum(pooled, sequence_axis)
