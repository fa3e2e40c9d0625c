"""A model whose every logit is decoded from the backbone's output at the last position alone (MAD's compression
task: the mixers must pack the whole sequence into that one state; the decoder cannot look back at the inputs).

    code [B, D]        = backbone(tokens)[:, -1]                      (the compression token's output)
    x [B, T, D]        = code[:, None] + index_embed[:T]              (a learned embedding per target index t)
    logits [B, T, V]   = unembed(norm(mlp(x)))                        mlp: (RMSNorm, Linear D->D, GELU) x 2

As in MAD's auto-encoder: a non-expanding two-layer MLP decoder, an untied unembedding; MAD adds a fixed sin-cos
embedding of the index where this learns one. The logits line up with the labels of an "lm" task (index t at
position t), so the usual LM loss and accuracy apply. No decode form, and no sequence parallelism (the last position
lives on one device).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from seqlab.checks import check_positive_int
from seqlab.models.backbone import Backbone


class LastStateDecoder(nnx.Module):
    def __init__(self, *, num_targets: int, **backbone_args: Any):
        """num_targets: how many indices the decoder can reconstruct (the task's seq_len); keyword arguments: those
        of `Backbone`."""
        check_positive_int("num_targets", num_targets)
        self.backbone = Backbone(**backbone_args)
        d, rngs = backbone_args["d_model"], backbone_args["rngs"]
        param_dtype = backbone_args.get("param_dtype", jnp.float32)
        init = nnx.initializers.normal(0.02)
        self.index_embed = nnx.Param(init(rngs.params(), (num_targets, d), param_dtype))
        linear = dict(kernel_init=init, param_dtype=param_dtype, rngs=rngs)
        self.norm1, self.norm2, self.out_norm = (nnx.RMSNorm(d, param_dtype=param_dtype, rngs=rngs) for _ in range(3))
        self.fc1, self.fc2 = nnx.Linear(d, d, **linear), nnx.Linear(d, d, **linear)
        self.unembed = nnx.Linear(d, backbone_args["vocab_size"], **linear)

    def __call__(self, tokens: jax.Array, *, dropout_rng: jax.Array | None = None) -> jax.Array:
        """tokens [B, T] int -> logits [B, T, V] float32; row t reconstructs token t from the last position."""
        if self.backbone.sequence_axis is not None:
            raise ValueError("mesh.seq: a last-state decoder (data.task=compression) reads the last position of the "
                             "whole sequence, so it cannot run sequence-sharded; use mesh.seq=1")
        num = tokens.shape[1]
        if num > self.index_embed.shape[0]:
            raise ValueError(f"tokens: {num} positions, but the decoder has {self.index_embed.shape[0]} target indices")
        code = self.backbone(tokens, dropout_rng=dropout_rng)[:, -1].astype(jnp.float32)  # [B, D]
        x = code[:, None, :] + self.index_embed[...][:num].astype(jnp.float32)  # [B, T, D]
        x = jax.nn.gelu(self.fc1(self.norm1(x)))
        x = jax.nn.gelu(self.fc2(self.norm2(x)))
        return self.unembed(self.out_norm(x)).astype(jnp.float32)  # [B, T, V]

    def on_train_progress(self, step: int | jax.Array, total_steps: int) -> None:
        """Called by the train step before step `step` of `total_steps` (see `Backbone.on_train_progress`)."""
        self.backbone.on_train_progress(step, total_steps)
