"""Flowformer's Flow-Attention (causal and non-causal) against independent references written here from the
equations (families.md §24): the causal one per token with literal prefix sums, the non-causal one from the dense
formulas.

The references read only the mixer's parameters and are written once over an array module `xp`: numpy in float64
for the forward (rel. err <= 1e-5), jax.numpy in float32 differentiated for the gradient check (rel. err <= 1e-4 on
every parameter). Every form of the causal mixer (chunked with two chunk sizes, recurrent, parallel) is checked,
with T = 21 (not a multiple of either chunk size) and H = 2; prefill + decode == full forward.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from mixer_references import (
    FWD_TOL,
    GRAD_TOL,
    QKVO_PARAMS,
    check_forward_and_grad,
    decode_matches_forward,
    f64,
    inputs,
    mixer_loss,
    per_token,
    sigmoid,
    time_major,
    weights,
)
from reference import rel_err

from seqlab.mixers.linear.flowformer import FlowAttention

B, T, D, H = 2, 21, 16, 2
FORMS = [("chunked", 8), ("chunked", 16), ("recurrent", 8), ("parallel", 8)]
EPS = 1e-6


def flow_inputs(p, x, xp):
    d = D // H
    q = sigmoid(xp, x @ p["wq"] + p["bq"]).reshape(B, T, H, d)
    k = sigmoid(xp, x @ p["wk"] + p["bk"]).reshape(B, T, H, d)
    return q, k, (x @ p["wv"] + p["bv"]).reshape(B, T, H, d)


def flow_causal_reference(p, x, xp):
    """Causal Flow-Attention with literal prefix sums (t = 1..T), ε where the official code puts it."""
    q, k, v = flow_inputs(p, x, xp)
    d = D // H
    zero = xp.zeros((B, H, d))
    carry = (zero, zero, zero, zero, xp.zeros((B, H)), xp.zeros((B, H, d, d)))

    def step(carry, token):
        k_sum, q_sum, k_flow, q_flow, source_sum, state = carry
        q_t, k_t, v_t, t = token
        k_sum, q_sum = k_sum + k_t, q_sum + q_t
        incoming = t / xp.sum((q_t + EPS) * (k_sum + EPS), -1)
        outgoing = t / xp.sum((k_t + EPS) * (q_sum + EPS), -1)
        k_flow, q_flow = k_flow + k_t * outgoing[..., None], q_flow + q_t * incoming[..., None]
        sink = xp.sum((q_t + EPS) * (k_flow + EPS), -1) / t
        source = xp.clip(xp.sum((k_t + EPS) * (q_flow + EPS), -1) / t, -1.0, 1.0)
        source_sum = source_sum + xp.exp(source)
        competition = t * xp.exp(source) / source_sum
        state = state + k_t[..., :, None] * (competition[..., None] * v_t)[..., None, :]
        read = xp.einsum("bhk,bhkv->bhv", q_t * (incoming / t)[..., None], state)
        return (k_sum, q_sum, k_flow, q_flow, source_sum, state), sigmoid(xp, sink)[..., None] * read

    t_values = np.arange(1.0, T + 1.0)  # 1-based positions
    o = per_token(xp, step, carry, time_major(xp, q, k, v) + [t_values])
    return o.reshape(B, T, D) @ p["wo"] + p["bo"]


def flow_bidirectional_reference(p, x, xp):
    """Non-causal Flow-Attention literally from the formulas (N = M = T)."""
    q, k, v = flow_inputs(p, x, xp)
    n = m = T
    incoming = 1.0 / xp.einsum("bihd,bhd->bih", q + EPS, xp.sum(k, 1) + EPS)
    outgoing = 1.0 / xp.einsum("bjhd,bhd->bjh", k + EPS, xp.sum(q, 1) + EPS)
    sink = xp.einsum("bihd,bhd->bih", q + EPS, xp.sum(k * outgoing[..., None], 1) + EPS)
    source = xp.clip(xp.einsum("bjhd,bhd->bjh", k + EPS, xp.sum(q * incoming[..., None], 1) + EPS), -1.0, 1.0)
    allocation = sigmoid(xp, sink * n / m)
    competition = xp.exp(source) / xp.sum(xp.exp(source), 1, keepdims=True) * m
    kv = xp.einsum("bjhk,bjhv->bhkv", k, competition[..., None] * v)
    o = allocation[..., None] * xp.einsum("bihk,bhkv->bihv", q * incoming[..., None], kv)
    return o.reshape(B, T, D) @ p["wo"] + p["bo"]


def make_flow(impl="chunked", chunk_size=8, **kw):
    return FlowAttention(D, H, impl=impl, chunk_size=chunk_size, rngs=nnx.Rngs(0), **kw)


def test_flowformer_causal_matches_reference():
    x, w = inputs(3, (B, T, D))
    check_forward_and_grad(make_flow, flow_causal_reference, QKVO_PARAMS, x, w, FORMS)


def test_flowformer_bidirectional_matches_reference():
    x, w = inputs(4, (B, T, D))
    mixer = make_flow(causal=False)
    assert mixer.causal is False
    y = jax.jit(mixer.__call__)(x)
    assert rel_err(y, flow_bidirectional_reference(weights(mixer, QKVO_PARAMS, f64), f64(x), np)) < FWD_TOL
    graphdef, params = nnx.split(mixer, nnx.Param)
    g = jax.jit(jax.grad(lambda p: mixer_loss(nnx.merge(graphdef, p), x, w)[0]))(params)
    g_ref = jax.jit(jax.grad(lambda p: jnp.sum(
        flow_bidirectional_reference(weights(nnx.merge(graphdef, p), QKVO_PARAMS, lambda a: a), x, jnp) * w)))(params)
    got = dict(jax.tree_util.tree_leaves_with_path(g))
    for path, want in jax.tree_util.tree_leaves_with_path(g_ref):
        assert rel_err(got[path], want) < GRAD_TOL, jax.tree_util.keystr(path)
    # every output sees the future: changing the last token changes the first output
    y2 = jax.jit(mixer.__call__)(x.at[:, -1].add(1.0))
    assert float(jnp.max(jnp.abs(y2[:, 0] - y[:, 0]))) > 1e-6


def test_flowformer_decode_matches_forward():
    x, _ = inputs(5, (B, T, D))
    y_full, y_inc, cache = decode_matches_forward(make_flow(), x, (6, 17))
    assert rel_err(y_inc, y_full) < FWD_TOL and int(cache.pos) == T


def test_flowformer_bad_args():
    with pytest.raises(ValueError, match="causal"):
        make_flow(causal=False).init_cache(B, T)
    with pytest.raises(ValueError, match="eps"):
        make_flow(eps=0.0)
    with pytest.raises(ValueError, match="causal"):
        make_flow(causal="yes")
    with pytest.raises(ValueError, match="d_model"):
        FlowAttention(D, 3)
