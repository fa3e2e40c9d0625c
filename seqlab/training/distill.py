"""Attention-transfer objectives for turning softmax attention into linear attention.

Hedgehog — "The Hedgehog & the Porcupine: Expressive Linear Attentions with Softmax Mimicry" (Zhang et al., 2024):
train the feature maps phi (base model frozen) so that the linear attention weights mimic the softmax weights,

    a_ij = softmax_j(scale · q_i·k_j)  (j <= i when causal),    â_ij = phi(q_i)·phi(k_j) / Σ_j' phi(q_i)·phi(k_j'),
    loss = mean over the B·H·T query rows i of  −Σ_j a_ij log â_ij        (row-wise cross-entropy).

LoLCATs — "LoLCATs: On Low-Rank Linearizing of Large Language Models" (Zhang et al., 2024), stage 1 ("attention
transfer"): match each layer's attention output before the output projection,

    loss = factor · mean((y_student − y_teacher)²)   over every element, factor = 1000 as in LoLCATs
    (its main config sets the cross-entropy factor to 0; LoLCATs averages this loss over the layers).

All functions are pure jnp, jit-able and differentiable in the student's feature-map parameters. The teacher's
weights and outputs are targets: no gradient flows into them (jax.lax.stop_gradient). Everything is computed in
float32. The attention weights are dense [B, H, T, T] — O(T²) memory by design, since distillation runs on short
sequences (LoLCATs uses 1024-token chunks).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from seqlab.checks import check_positive
from seqlab.core import chunk_math

Array = jax.Array

LOG_FLOOR = 1e-12  # â is clamped to >= this before the log (as LoLCATs), so a zero weight costs a finite loss


def _check_same_shape(name: str, x: Array, other_name: str, other: Array) -> None:
    if x.shape != other.shape:
        raise ValueError(f"{name} must have the shape of {other_name} {other.shape}, got {x.shape}")


def _check_heads_layout(name: str, x: Array, leading: tuple[int, ...] | None = None) -> None:
    """x must be [B, T, H, dim], with (B, T, H) = `leading` when given."""
    if x.ndim != 4:
        raise ValueError(f"{name} must be [batch, time, heads, dim], got shape {x.shape}")
    if leading is not None and x.shape[:3] != leading:
        raise ValueError(f"{name} must be [batch, time, heads, dim] with (batch, time, heads) = {leading}, got {x.shape}")


def _visible(length: int, causal: bool) -> Array:
    """[T, T] bool: key j visible to query i."""
    if causal:
        return chunk_math.causal_mask(length)
    return jnp.ones((length, length), bool)


def attention_weights_softmax(q: Array, k: Array, *, scale: float | None = None, causal: bool = True) -> Array:
    """Teacher weights a [B, H, T, T] float32: softmax over keys of scale · q_i·k_j (keys j <= i when causal).

    q, k: [B, T, H, d] raw queries and keys; scale defaults to d^-1/2.
    """
    _check_heads_layout("q", q)
    _check_same_shape("k", k, "q", q)
    if scale is not None:
        check_positive("scale", scale)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = jnp.einsum("bihd,bjhd->bhij", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
    logits = jnp.where(_visible(q.shape[1], causal), logits, -jnp.inf)
    return jax.nn.softmax(logits, axis=-1)


def attention_weights_linear(phi_q: Array, phi_k: Array, *, causal: bool = True, eps: float = 1e-12) -> Array:
    """Linear-attention weights â [B, H, T, T] float32: â_ij = phi_q_i·phi_k_j / (Σ_j' phi_q_i·phi_k_j' + eps),
    over keys j, j' <= i when causal (0 elsewhere).

    phi_q, phi_k: [B, T, H, F] feature-mapped queries and keys (non-negative features, e.g. Hedgehog's).
    """
    _check_heads_layout("phi_q", phi_q)
    _check_same_shape("phi_k", phi_k, "phi_q", phi_q)
    check_positive("eps", eps)
    scores = jnp.einsum("bihf,bjhf->bhij", phi_q.astype(jnp.float32), phi_k.astype(jnp.float32))
    scores = jnp.where(_visible(phi_q.shape[1], causal), scores, 0.0)
    return scores / (jnp.sum(scores, axis=-1, keepdims=True) + eps)


def hedgehog_distillation_loss(
    q: Array, k: Array, phi_q: Array, phi_k: Array, *, scale: float | None = None, causal: bool = True
) -> Array:
    """Hedgehog's attention-distillation loss, a scalar float32: the row-wise cross-entropy −Σ_j a_ij log â_ij,
    averaged (arithmetic mean) over all B·H·T query rows — batch, heads and positions alike.

    q, k: [B, T, H, d] raw queries and keys (teacher logits scale · q·k, scale default d^-1/2);
    phi_q, phi_k: [B, T, H, F] the student's feature-mapped queries and keys. Its minimum over â is the mean
    entropy of the teacher rows, reached when â = a. â is clamped to >= LOG_FLOOR before the log.
    """
    _check_heads_layout("q", q)
    _check_same_shape("k", k, "q", q)
    _check_heads_layout("phi_q", phi_q, q.shape[:3])
    _check_same_shape("phi_k", phi_k, "phi_q", phi_q)
    teacher = jax.lax.stop_gradient(attention_weights_softmax(q, k, scale=scale, causal=causal))
    student = attention_weights_linear(phi_q, phi_k, causal=causal)
    visible = _visible(q.shape[1], causal)
    log_student = jnp.log(jnp.where(visible, jnp.maximum(student, LOG_FLOOR), 1.0))
    return -jnp.mean(jnp.sum(teacher * log_student, axis=-1))


def output_mse_loss(y_student: Array, y_teacher: Array, *, factor: float = 1000.0) -> Array:
    """LoLCATs' attention-transfer loss, a scalar float32: factor · mean((y_student − y_teacher)²), the mean over
    every element. y_student, y_teacher: one layer's attention outputs of the same shape (e.g. [B, T, H, V]);
    average the per-layer losses over layers as LoLCATs does."""
    _check_same_shape("y_student", y_student, "y_teacher", y_teacher)
    check_positive("factor", factor)
    diff = y_student.astype(jnp.float32) - jax.lax.stop_gradient(y_teacher).astype(jnp.float32)
    return factor * jnp.mean(diff * diff)
