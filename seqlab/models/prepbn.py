"""Progressive re-parameterised BatchNorm (PRepBN), a drop-in replacement for LayerNorm over the last axis:

    y = λ·LN(x) + (1 − λ)·RepBN(x),   RepBN(x) = BN(x) + α·x   (α a learnable scalar, init 1)
    λ = 1 (LayerNorm only) for the first `warmup_steps` steps, then
    λ = r0 · (total_steps − step) / (total_steps − warmup_steps), clipped to [0, r0]: r0 right after the warm-up,
        decaying linearly to 0 at the last step (r0 = 1 by default).

Paper: "SLAB: Efficient Transformers with Simplified Linear Attention and Progressive Re-parameterized Batch
Normalization" (Guo et al., ICML 2024); read from xinghaochen/SLAB `classification/models/prepbn.py` (`LinearNorm`,
`RepBN`). Defaults follow it: r0 = 1, no warm-up, LayerNorm and BatchNorm eps 1e-5, BatchNorm momentum 0.9 in
Flax's convention (PyTorch's 0.1), scalar α. The official module counts steps itself; here λ is a non-trainable
variable (`PRepBNLambda`) set from the step by `set_progress`, so a resumed or jitted step sees the same λ. During the
warm-up the official module skips the BatchNorm; here it is computed with weight 0 (same output, but its running
statistics already move).

Train / eval (the nested `nnx.BatchNorm`'s ``use_running_average``, flipped with the rest of a model by
``model.train()`` / ``model.eval()``):
    train: BatchNorm uses the batch statistics over every axis but the last (all B·T tokens) and updates its running
           mean / variance (nnx.BatchStat) in place; y is the λ-mix.
    eval:  BatchNorm uses the running averages; with eval_norm="repbn" (default, the official code and the paper's
           inference, where λ has reached 0) y = RepBN(x) only, which can be folded into the next linear layer;
           eval_norm="mixed" keeps the λ-mix (an evaluation mid-schedule then matches training's mixture).

What a model and its training loop must do:
    1. Before every training step set λ for that step: `set_progress(model, step, total_steps)` (every PRepBN in the
       model; `step` may be a traced integer inside jit).
    2. Carry the non-parameter state between steps: the BatchNorm running statistics (nnx.BatchStat) change in
       place in train mode, and λ (PRepBNLambda) changes with the step; both must be part of the state a jitted step
       takes and returns (nnx.split(model, nnx.Param, ...) puts them in the "rest" part).
    3. Train in train mode; evaluate and decode in eval mode (``model.eval()``): in train mode a single decode step
       would normalise with the statistics of its B tokens alone.
Caution: train-mode batch statistics mix all tokens of the batch, so in a causal LM a token's normalisation sees
later tokens during training (as in the paper's LLaMA runs); on a sequence split over devices they cover only the
local shard.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from seqlab.checks import check_choice, check_positive, check_positive_int

EVAL_NORMS = ("repbn", "mixed")


class PRepBNLambda(nnx.Variable):
    """The LayerNorm weight λ of PRepBN: [] float32, set by `PRepBN.set_progress`, never trained."""


def prepbn_lambda(step: int | jax.Array, total_steps: int, *, r0: float, warmup_steps: int) -> jax.Array:
    """λ at `step` (0-based, int or traced int) of a run of `total_steps`: 1 during the warm-up, then
    r0·(total_steps − step)/(total_steps − warmup_steps) clipped to [0, r0]. Returns [] float32."""
    step = jnp.asarray(step, jnp.float32)
    decay_steps = max(total_steps - warmup_steps, 1)
    remaining = jnp.clip((total_steps - step) / decay_steps, 0.0, 1.0)
    return jnp.where(step < warmup_steps, 1.0, r0 * remaining).astype(jnp.float32)


class RepBN(nnx.Module):
    """RepBN(x) = BN(x) + α·x over the last axis of x [..., C] (BN over all other axes), α a scalar (init 1)."""

    def __init__(
        self,
        num_features: int,
        *,
        epsilon: float = 1e-5,
        momentum: float = 0.9,
        use_running_average: bool = False,
        rngs: nnx.Rngs,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
    ):
        self.bn = nnx.BatchNorm(
            num_features, use_running_average=use_running_average, momentum=momentum, epsilon=epsilon, dtype=dtype,
            param_dtype=param_dtype, rngs=rngs,
        )  # fmt: skip
        self.alpha = nnx.Param(jnp.ones((), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.bn(x) + self.alpha[...].astype(x.dtype) * x


class PRepBN(nnx.Module):
    """y = λ·LN(x) + (1 − λ)·RepBN(x) over the last axis of x [..., num_features]; see the module docstring."""

    def __init__(
        self,
        num_features: int,
        *,
        r0: float = 1.0,
        warmup_steps: int = 0,
        eval_norm: str = "repbn",
        epsilon: float = 1e-5,
        momentum: float = 0.9,
        use_running_average: bool = False,
        rngs: nnx.Rngs,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
    ):
        check_positive_int("num_features", num_features)
        check_positive("r0", r0)
        if warmup_steps != 0:
            check_positive_int("warmup_steps", warmup_steps)
        check_choice("eval_norm", eval_norm, EVAL_NORMS)
        self.r0, self.warmup_steps, self.eval_norm = r0, warmup_steps, eval_norm
        self.layer_norm = nnx.LayerNorm(num_features, epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.repbn = RepBN(
            num_features, epsilon=epsilon, momentum=momentum, use_running_average=use_running_average, rngs=rngs,
            dtype=dtype, param_dtype=param_dtype,
        )  # fmt: skip
        self.lam = PRepBNLambda(jnp.asarray(1.0 if warmup_steps else r0, jnp.float32))

    @property
    def training(self) -> bool:
        """Whether BatchNorm uses batch statistics (train mode) rather than its running averages."""
        return not self.repbn.bn.use_running_average

    def set_progress(self, step: int | jax.Array, total_steps: int) -> None:
        """Set λ for training step `step` (0-based; an int or a traced int) of `total_steps`."""
        check_positive_int("total_steps", total_steps)
        if total_steps < self.warmup_steps:
            raise ValueError(f"total_steps ({total_steps}) must be at least warmup_steps ({self.warmup_steps})")
        if isinstance(step, int) and step < 0:
            raise ValueError(f"step must be a non-negative integer, got {step}")
        self.lam[...] = prepbn_lambda(step, total_steps, r0=self.r0, warmup_steps=self.warmup_steps)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., num_features] -> y of the same shape and dtype."""
        if not self.training and self.eval_norm == "repbn":
            return self.repbn(x)
        lam = self.lam[...]
        mixed = lam * self.layer_norm(x).astype(jnp.float32) + (1.0 - lam) * self.repbn(x).astype(jnp.float32)
        return mixed.astype(x.dtype)


def set_progress(model: nnx.Module, step: int | jax.Array, total_steps: int) -> None:
    """Set λ of every PRepBN in `model` for training step `step` of `total_steps`."""
    for _, module in nnx.iter_modules(model):
        if isinstance(module, PRepBN):
            module.set_progress(step, total_steps)
