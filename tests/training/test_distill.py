"""The attention-distillation objectives of seqlab.training.distill (Hedgehog's attention transfer, LoLCATs' output
MSE): softmax and linear attention weights, the Hedgehog cross-entropy loss and the output MSE, against float64
numpy written here from the equations; bad arguments name the argument.

Tolerance (relative error): 1e-5.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from mixer_references import B, DD, HD, TD, distill_inputs
from reference import rel_err

from seqlab.training.distill import (
    attention_weights_linear,
    attention_weights_softmax,
    hedgehog_distillation_loss,
    output_mse_loss,
)

FWD_TOL = 1e-5


def softmax_weights_np(q, k, scale, causal):
    """[B, H, T, T] float64 teacher weights."""
    logits = np.einsum("bihd,bjhd->bhij", q.astype(np.float64), k.astype(np.float64)) * scale
    if causal:
        logits = np.where(np.tril(np.ones(logits.shape[-2:], bool)), logits, -np.inf)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def linear_weights_np(phi_q, phi_k, causal, eps=1e-12):
    scores = np.einsum("bihf,bjhf->bhij", phi_q.astype(np.float64), phi_k.astype(np.float64))
    if causal:
        scores = scores * np.tril(np.ones(scores.shape[-2:]))
    return scores / (scores.sum(-1, keepdims=True) + eps)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("scale", [None, 0.7])
def test_attention_weights_match_numpy(rng, causal, scale):
    q, k, phi_q, phi_k = distill_inputs(rng)
    teacher = attention_weights_softmax(q, k, scale=scale, causal=causal)
    expected = softmax_weights_np(q, k, DD**-0.5 if scale is None else scale, causal)
    assert teacher.shape == (B, HD, TD, TD) and teacher.dtype == jnp.float32
    assert rel_err(teacher, expected) < FWD_TOL
    student = attention_weights_linear(phi_q, phi_k, causal=causal)
    assert rel_err(student, linear_weights_np(phi_q, phi_k, causal)) < FWD_TOL


@pytest.mark.parametrize("causal", [True, False])
def test_hedgehog_loss_matches_numpy_and_jits(rng, causal):
    q, k, phi_q, phi_k = distill_inputs(rng)
    a = softmax_weights_np(q, k, DD**-0.5, causal)
    a_hat = linear_weights_np(phi_q, phi_k, causal)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(a > 0, a * np.log(a_hat), 0.0)
    expected = -terms.sum(-1).mean()  # mean over the B·H·T rows
    loss = hedgehog_distillation_loss(q, k, phi_q, phi_k, causal=causal)
    assert loss.shape == () and abs(float(loss) - expected) < FWD_TOL * abs(expected)
    jitted = jax.jit(lambda *a: hedgehog_distillation_loss(*a, causal=causal))(q, k, phi_q, phi_k)
    assert abs(float(jitted) - expected) < FWD_TOL * abs(expected)


def test_hedgehog_loss_is_minimal_teacher_entropy_when_weights_match(rng):
    """phi_k_j = e_j and phi_q_i[j] = exp(s_ij - max_j s_ij) make â = a exactly: the loss is the teacher's mean row
    entropy, and any other (positive) phi_q gives a larger loss (Gibbs' inequality)."""
    q, k, _, _ = distill_inputs(rng)
    logits = np.einsum("bihd,bjhd->bihj", q.astype(np.float64), k.astype(np.float64)) * DD**-0.5
    phi_q = np.exp(logits - logits.max(-1, keepdims=True)).astype(np.float32)  # [B, T, H, T]
    phi_k = np.broadcast_to(np.eye(TD, dtype=np.float32)[None, :, None, :], (B, TD, HD, TD))
    a = softmax_weights_np(q, k, DD**-0.5, True)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.where(a > 0, a * np.log(a), 0.0).sum(-1).mean()
    at_match = float(hedgehog_distillation_loss(q, k, phi_q, phi_k))
    assert abs(at_match - entropy) < 1e-5 * abs(entropy)
    for _ in range(3):
        noisy = phi_q * np.exp(0.5 * rng.normal(size=phi_q.shape)).astype(np.float32)
        assert float(hedgehog_distillation_loss(q, k, noisy, phi_k)) > at_match + 1e-4


def test_output_mse_loss_matches_numpy(rng):
    y_s = rng.normal(size=(B, TD, HD, 4)).astype(np.float32)
    y_t = rng.normal(size=(B, TD, HD, 4)).astype(np.float32)
    mse = np.mean((y_s.astype(np.float64) - y_t) ** 2)
    assert abs(float(output_mse_loss(y_s, y_t)) - 1000.0 * mse) < FWD_TOL * 1000.0 * mse
    assert abs(float(output_mse_loss(y_s, y_t, factor=2.0)) - 2.0 * mse) < FWD_TOL * 2.0 * mse
    grad = jax.grad(lambda y: output_mse_loss(y, y_t))(jnp.asarray(y_s))
    assert rel_err(grad, 2000.0 * (y_s.astype(np.float64) - y_t) / y_s.size) < FWD_TOL


def test_distill_bad_arguments_name_the_argument(rng):
    q, k, phi_q, phi_k = distill_inputs(rng)
    cases = [
        (lambda: attention_weights_softmax(q[0], k[0]), "q"),
        (lambda: attention_weights_softmax(q, k[:, :4]), "k"),
        (lambda: attention_weights_softmax(q, k, scale=0.0), "scale"),
        (lambda: attention_weights_linear(phi_q, phi_k[..., :2]), "phi_k"),
        (lambda: attention_weights_linear(phi_q, phi_k, eps=0.0), "eps"),
        (lambda: hedgehog_distillation_loss(q, k, phi_q[:, :4], phi_k[:, :4]), "phi_q"),
        (lambda: output_mse_loss(phi_q, phi_k[..., :2]), "y_student"),
        (lambda: output_mse_loss(phi_q, phi_k, factor=-1.0), "factor"),
    ]
    for call, arg in cases:
        with pytest.raises(ValueError, match=f"^{arg} "):
            call()
