"""Linearizing a trained softmax-attention model: swap its attention layers for a linear family, transfer the
attention, then fine-tune with LoRA.

    student = nnx.clone(teacher)
    layers = linearize.swap_attention(student, "lolcats", rngs=nnx.Rngs(1))
    linearize.attention_transfer(student, teacher, batches, target="lolcats", steps=300)
    linearize.add_lora(student, layers, rngs=nnx.Rngs(2))
    linearize.finetune_lora(student, batches, steps=300)

Targets (every full-attention `SoftmaxAttention` layer is replaced; sliding-window layers are kept):
  hedgehog  normalised linear attention with Hedgehog feature maps on the teacher's q and k projections ("The
            Hedgehog & the Porcupine: Expressive Linear Attentions with Softmax Mimicry"). Transfer: the row-wise
            cross-entropy between the teacher's softmax weights (with RoPE) and the linear weights. The linear
            layer has no positional encoding, so it can only match what the features of x carry.
  lolcats   sliding-window softmax plus Hedgehog linear attention with one normaliser ("LoLCATs: On Low-Rank
            Linearizing of Large Language Models"). Transfer: 1000 · MSE between the hybrid's and the teacher's
            attention outputs (before the output projection).
  liger     GLA with gates built from the key projection plus a sliding window ("Liger: Linearizing Large Language
            Models to Gated Recurrent Structures"). Nothing new to train: no transfer stage.

The transfer stage trains only the new parameters (feature maps, window factors), every layer on the teacher's own
hidden states (all layers at once, as LoLCATs does), with Adam. The LoRA stage adds rank-r adapters
(y = x W + (alpha / r) x A B, B = 0 at the start, so the model is unchanged) to the q, k, v and output projections
of the swapped layers and trains only the adapters with the language-modelling loss.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from seqlab.checks import check_choice, check_positive, check_positive_int
from seqlab.data import Task, eval_batches
from seqlab.layers.heads import repeat_kv_columns
from seqlab.layers.positional import positions
from seqlab.mixers import LigerAttention, LinearAttention, LoLCATsAttention, Mixer, SoftmaxAttention
from seqlab.training import distill
from seqlab.training.steps import lm_sums, make_eval_step, means

Batch = dict[str, jax.Array]
TARGETS = ("hedgehog", "lolcats", "liger")
TRANSFER_TARGETS = ("hedgehog", "lolcats")
LORA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


# --------------------------------------------------------------------------------------------------------------
# Stage 0: the swap
# --------------------------------------------------------------------------------------------------------------


def swap_attention(model: nnx.Module, target: str, *, rngs: nnx.Rngs, **mixer_args) -> list[int]:
    """Replace every full-attention softmax layer of `model` (a DecoderLM or SequenceClassifier) in place by the
    `target` family built from its weights; returns the indices of the replaced layers. `mixer_args` go to the new
    mixers (e.g. window=32 for lolcats, num_features=16 for hedgehog)."""
    check_choice("target", target, TARGETS)
    swapped = [i for i, block in enumerate(model.backbone.blocks) if type(block.mixer) is SoftmaxAttention]
    if not swapped:
        raise ValueError("model: has no full softmax attention layer to linearize")
    build = {"hedgehog": hedgehog_from_softmax, "lolcats": LoLCATsAttention.from_softmax,
             "liger": LigerAttention.from_softmax}[target]
    for i in swapped:
        block = model.backbone.blocks[i]
        block.mixer = build(block.mixer, rngs=rngs, **mixer_args)
        block.mixer_name = target
    return swapped


def hedgehog_from_softmax(
    softmax: SoftmaxAttention, *, rngs: nnx.Rngs, num_features: int | None = None, eps: float = 1e-6
) -> LinearAttention:
    """Normalised linear attention with Hedgehog maps (f = num_features, default head_dim) whose q, k, v and output
    projections are the softmax layer's (grouped k/v heads are repeated to every query head)."""
    if softmax.q_proj.bias is not None:
        raise ValueError("softmax: a layer with projection biases (use_bias=True) cannot become hedgehog")
    d, h = softmax.head_dim, softmax.num_heads
    linear = LinearAttention(
        softmax.d_model, h, feature_map="hedgehog", feature_dim=d, value_dim=d, num_features=num_features,
        normalize=True, eps=eps, impl="auto", rngs=rngs, dtype=softmax.dtype,
        param_dtype=softmax.param_dtype,
    )  # fmt: skip
    groups = h // softmax.num_kv_heads
    linear.q_proj.kernel[...] = softmax.q_proj.kernel[...]
    linear.k_proj.kernel[...] = repeat_kv_columns(softmax.k_proj.kernel[...], d, groups)
    linear.v_proj.kernel[...] = repeat_kv_columns(softmax.v_proj.kernel[...], d, groups)
    linear.o_proj.kernel[...] = softmax.o_proj.kernel[...]
    return linear


# --------------------------------------------------------------------------------------------------------------
# Stage 1: attention transfer
# --------------------------------------------------------------------------------------------------------------


def transfer_loss(target: str, student: Mixer, teacher: SoftmaxAttention, x: jax.Array) -> jax.Array:
    """The attention-transfer loss of one layer on its input x [B, T, d_model]."""
    if target == "lolcats":
        hybrid, softmax = student.transfer_outputs(x)
        return distill.output_mse_loss(hybrid, softmax)
    q, k = teacher.queries_keys(x, positions(None, x.shape[1]))
    k = jnp.repeat(k, teacher.num_heads // teacher.num_kv_heads, axis=2)
    phi_q, phi_k = student.features(x)
    return distill.hedgehog_distillation_loss(q, k, phi_q, phi_k, scale=teacher.head_dim**-0.5)


def transfer_parameters(target: str) -> nnx.filterlib.Filter:
    """The parameters the transfer stage trains: the feature maps (and LoLCATs' window factors)."""
    check_choice("target", target, TRANSFER_TARGETS)
    names = ("q_map", "k_map") + (("window_factor",) if target == "lolcats" else ())
    return nnx.All(nnx.Param, nnx.Any(*(nnx.PathContains(name) for name in names)))


def attention_transfer(
    student: nnx.Module,
    teacher: nnx.Module,
    batches: Iterable[Batch],
    *,
    target: str,
    steps: int,
    learning_rate: float = 1e-2,
) -> list[float]:
    """Train the student's new attention parameters so that every swapped layer mimics the teacher's layer on the
    teacher's hidden states (the sum of the per-layer losses, mean over layers). Returns the loss of every step."""
    check_choice("target", target, TRANSFER_TARGETS)
    layers = [i for i, block in enumerate(student.backbone.blocks) if block.mixer_name == target]
    if not layers:
        raise ValueError(f"student: has no {target!r} layer; call swap_attention(student, {target!r}) first")

    def loss_fn(model: nnx.Module, batch: Batch) -> jax.Array:
        inputs = teacher.backbone.mixer_inputs(batch["inputs"])
        losses = [
            transfer_loss(target, model.backbone.blocks[i].mixer, teacher.backbone.blocks[i].mixer,
                          jax.lax.stop_gradient(inputs[i]))
            for i in layers
        ]  # fmt: skip
        return sum(losses) / len(losses)

    return _train(student, loss_fn, transfer_parameters(target), batches, steps, optax.adam(learning_rate))


# --------------------------------------------------------------------------------------------------------------
# Stage 2: LoRA
# --------------------------------------------------------------------------------------------------------------


class LoRALinear(nnx.Module):
    """y = base(x) + (alpha / rank) · (x A) B with the base layer frozen by the training filter (A: [in, r]
    Kaiming-uniform, B: [r, out] zeros, both `nnx.LoRAParam`), "LoRA: Low-Rank Adaptation of Large Language Models"."""

    def __init__(self, base: nnx.Linear, *, rank: int, alpha: float, rngs: nnx.Rngs):
        check_positive_int("rank", rank)
        check_positive("alpha", alpha)
        self.base = base
        fan_in = base.in_features
        bound = math.sqrt(6.0 / fan_in) / math.sqrt(1.0 + 5.0)  # kaiming_uniform(a=sqrt(5)), as torch's LoRA
        self.lora_a = nnx.LoRAParam(jax.random.uniform(rngs.params(), (fan_in, rank), jnp.float32, -bound, bound))
        self.lora_b = nnx.LoRAParam(jnp.zeros((rank, base.out_features), jnp.float32))
        self.scale = alpha / rank

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., in] -> [..., out]."""
        low_rank = (x @ self.lora_a[...].astype(x.dtype)) @ self.lora_b[...].astype(x.dtype)
        return self.base(x) + self.scale * low_rank


def add_lora(model: nnx.Module, layers: Iterable[int], *, rngs: nnx.Rngs, rank: int = 8, alpha: float = 16.0) -> int:
    """Wrap the q, k, v and output projections of the mixers of `layers` in `LoRALinear`; returns how many."""
    count = 0
    for i in layers:
        mixer = model.backbone.blocks[i].mixer
        for name in LORA_PROJECTIONS:
            base = getattr(mixer, name, None)
            if isinstance(base, nnx.Linear):
                setattr(mixer, name, LoRALinear(base, rank=rank, alpha=alpha, rngs=rngs))
                count += 1
    if count == 0:
        raise ValueError(f"layers: none of {list(layers)} has a projection named one of {LORA_PROJECTIONS}")
    return count


def lm_loss(model: nnx.Module, batch: Batch) -> jax.Array:
    """Mean next-token cross-entropy over the supervised positions of an LM batch."""
    sums = lm_sums(model(batch["inputs"]), batch["labels"])
    return sums["loss_sum"] / jnp.maximum(sums["weight"], 1.0)


def finetune_lora(model: nnx.Module, batches: Iterable[Batch], *, steps: int, learning_rate: float = 1e-3) -> list[float]:
    """Train only the LoRA adapters with the language-modelling loss; returns the loss of every step."""
    return _train(model, lm_loss, nnx.LoRAParam, batches, steps, optax.adamw(learning_rate, weight_decay=0.0))


# --------------------------------------------------------------------------------------------------------------
# Shared
# --------------------------------------------------------------------------------------------------------------


def _train(
    model: nnx.Module,
    loss_fn: Callable[[nnx.Module, Batch], jax.Array],
    wrt: nnx.filterlib.Filter,
    batches: Iterable[Batch],
    steps: int,
    tx: optax.GradientTransformation,
) -> list[float]:
    """`steps` jitted steps of `tx` on the parameters `wrt` selects (the rest frozen); updates `model` in place."""
    check_positive_int("steps", steps)
    graphdef, trainable, frozen = nnx.split(model, wrt, ...)
    if not jax.tree.leaves(trainable):
        raise ValueError(f"model: no parameter matches the training filter {wrt}")
    opt_state = tx.init(trainable)

    @jax.jit
    def step(trainable, opt_state, batch):
        loss, grads = jax.value_and_grad(lambda t: loss_fn(nnx.merge(graphdef, t, frozen), batch))(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    losses = []
    iterator: Iterator[Batch] = iter(batches)
    for _ in range(steps):
        batch = {key: jnp.asarray(value) for key, value in next(iterator).items()}
        trainable, opt_state, loss = step(trainable, opt_state, batch)
        losses.append(float(loss))
    nnx.update(model, trainable)
    return losses


def evaluate_lm(model: nnx.Module, task: Task, *, batch_size: int = 64) -> float:
    """Mean cross-entropy of `model` over the task's whole eval split."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    eval_step = make_eval_step(graphdef, rest, "lm")
    totals: dict[str, float] = {}
    for batch in eval_batches(task, batch_size=batch_size):
        for key, value in eval_step(params, batch).items():
            totals[key] = totals.get(key, 0.0) + float(value)
    return means(totals)["loss"]
