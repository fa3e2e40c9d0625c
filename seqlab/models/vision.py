"""A small vision backbone: patch embedding, the mixer stack on the patch grid, mean pooling, a linear head.

    pixels [B, H, W] = (tokens − 1) / (levels − 1)                 the image task's tokens read back (data.images)
    patches [B, (H/p)·(W/p), p²]                                    p × p patches in raster order of the patch grid
    h = patches W_e + b_e + E_pos                                   a linear patch embedding (a stride-p conv) and
                                                                    learnt positions [(H/p)·(W/p), d_model]
    h = final_norm(blocks(h));  logits = W mean_tokens(h) + b

Every mixer that takes a ``grid`` argument gets the patch grid (H/p, W/p) (ViG, LaMamba, RALA, LiT, the conv
mixers, neighbourhood attention...); the others read the patches as a raster sequence (a ViT). A mixer whose grid is
set in ``mixer_args`` to anything else is refused. Whole images only: no packed documents and no sequence axis.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from seqlab import mixers
from seqlab.checks import check_positive_int
from seqlab.models.backbone import make_blocks
from seqlab.models.blocks import make_norm
from seqlab.models.prepbn import set_progress


def patch_grid(image_shape: Sequence[int], patch_size: int) -> tuple[int, int]:
    """(H/p, W/p), or ValueError naming model.patch_size unless p divides both sides."""
    check_positive_int("model.patch_size", patch_size)
    h, w = image_shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"model.patch_size ({patch_size}) must divide both sides of the {h} × {w} images")
    return h // patch_size, w // patch_size


def with_grid(mixer_args: Mapping[str, Mapping[str, Any]], pattern: Sequence[str],
              grid: tuple[int, int]) -> dict[str, dict[str, Any]]:
    """Every pattern mixer's arguments, with grid=grid for the mixers that take one; ValueError for a mixer whose
    grid is already set to something else."""
    out = {}
    for name in pattern:
        args = dict(mixer_args.get(name, {}))
        if "grid" in mixers.keyword_arguments(mixers.get(name)):
            given = args.get("grid")
            if given is not None and tuple(given) != grid:
                raise ValueError(f"model.mixer_args.{name}.grid: the model sets the patch grid {grid}; leave it "
                                 f"unset (got {tuple(given)})")
            args["grid"] = grid
        out[name] = args
    return out


class PatchBackbone(nnx.Module):
    """tokens [B, H·W] (an image task's pixels) -> hidden states [B, (H/p)·(W/p), d_model] after the final norm."""

    def __init__(self, *, image_shape: Sequence[int], levels: int, patch_size: int, d_model: int, num_layers: int,
                 num_heads: int, mixers: Sequence[str], mixer_args: Mapping[str, Mapping[str, Any]], mlp: str,
                 mlp_ratio: float, norm: str, rngs: nnx.Rngs, dtype: Any = None, param_dtype: Any = jnp.float32):
        self.image_shape, self.levels, self.patch_size = tuple(image_shape), levels, patch_size
        self.grid = patch_grid(image_shape, patch_size)
        dt = dict(dtype=dtype, param_dtype=param_dtype)
        self.patch_embed = nnx.Linear(patch_size * patch_size, d_model, rngs=rngs, **dt)
        init = nnx.initializers.normal(0.02)
        self.positions = nnx.Param(init(rngs.params(), (self.grid[0] * self.grid[1], d_model), param_dtype))
        self.blocks = make_blocks(mixers, with_grid(mixer_args, mixers, self.grid), d_model=d_model,
                                  num_layers=num_layers, num_heads=num_heads, mlp=mlp, mlp_ratio=mlp_ratio, norm=norm,
                                  rngs=rngs, **dt)
        self.final_norm = make_norm(norm, d_model, rngs=rngs, **dt)
        self.dtype = dtype
        self.sequence_axis: str | None = None

    def patches(self, tokens: jax.Array) -> jax.Array:
        """tokens [B, H·W] -> patches [B, (H/p)·(W/p), p²] float32 intensities in [0, 1]."""
        (h, w), p = self.image_shape, self.patch_size
        if tokens.shape[1:] != (h * w,):
            raise ValueError(f"tokens: the {h} × {w} images take {h * w} tokens, got shape {tokens.shape}")
        pixels = (tokens.astype(jnp.float32) - 1.0) / (self.levels - 1)
        grid = pixels.reshape(-1, h // p, p, w // p, p).transpose(0, 1, 3, 2, 4)
        return grid.reshape(tokens.shape[0], (h // p) * (w // p), p * p)

    def __call__(self, tokens: jax.Array, *, dropout_rng: jax.Array | None = None) -> jax.Array:
        if self.sequence_axis is not None:
            raise ValueError("mesh.seq: the vision backbone mixes whole images; set mesh.seq = 1")
        patches = self.patches(tokens).astype(self.dtype or jnp.float32)
        h = self.patch_embed(patches) + self.positions[...].astype(patches.dtype)
        for block in self.blocks:
            h = block(h)
        return self.final_norm(h)

    def on_train_progress(self, step: int | jax.Array, total_steps: int) -> None:
        set_progress(self, step, total_steps)


class PatchClassifier(nnx.Module):
    """An image task's tokens [B, H·W] and lengths [B] (every pixel: H·W) -> logits [B, num_classes] float32."""

    def __init__(self, *, num_classes: int, **backbone_args: Any):
        check_positive_int("num_classes", num_classes)
        self.backbone = PatchBackbone(**backbone_args)
        self.head = nnx.Linear(backbone_args["d_model"], num_classes, kernel_init=nnx.initializers.normal(0.02),
                               param_dtype=backbone_args.get("param_dtype", jnp.float32), rngs=backbone_args["rngs"])

    def __call__(self, tokens: jax.Array, lengths: jax.Array, *, dropout_rng: jax.Array | None = None) -> jax.Array:
        h = self.backbone(tokens, dropout_rng=dropout_rng).astype(jnp.float32)
        return self.head(h.mean(axis=1))

    def on_train_progress(self, step: int | jax.Array, total_steps: int) -> None:
        self.backbone.on_train_progress(step, total_steps)
