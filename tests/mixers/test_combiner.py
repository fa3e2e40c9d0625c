"""Combiner ("Combiner: Full Attention Transformer with Sparse Computation Cost") against a per-query loop of its
Combiner-Fixed factorisation, written here with the layer's own projections: query t attends directly to the
tokens of its span (up to itself when causal) and to one abstraction per other span (causal: the spans completed
before its own) — the span's max-pooled key, and as value the span's local expectation, softmax over the span's
keys against its max-pooled query (over tokens and the key/value head's query group) — all under one softmax.
Odd lengths end in a partial span. Forward in float64 (1e-5), gradients from the same loop in jnp (1e-4); bf16;
the full support Combiner claims; decode across span boundaries from a prompt that ends mid-span.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mixer_references import (assert_layer_matches, f64, heads, inputs, linear, merge, perturbed_params,
                              prompt_then_steps)
from reference import rel_err
from seqlab import mixers

B, D = 2, 16


def softmax_over(xp, scores):
    e = xp.exp(scores - scores.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def layer(xp, params, x, *, num_heads: int, num_kv_heads: int, span: int, causal: bool):
    T, group = x.shape[1], num_heads // num_kv_heads
    q = heads(linear(x, params["q_proj"]), num_heads)  # [B, T, H, d]
    k, v = (heads(linear(x, params[n]), num_kv_heads) for n in ("k_proj", "v_proj"))
    d = q.shape[-1]
    members = [list(range(j, min(j + span, T))) for j in range(0, T, span)]
    k_hat, v_hat = [], []  # per span: [B, H_kv, d]
    for m in members:
        k_hat.append(k[:, m].max(axis=1))
        q_hat = q[:, m].reshape(q.shape[0], len(m), num_kv_heads, group, d).max(axis=(1, 3))
        weights = softmax_over(xp, xp.einsum("bhd,buhd->bhu", q_hat, k[:, m]) / math.sqrt(d))
        v_hat.append(xp.einsum("bhu,buhd->bhd", weights, v[:, m]))
    rows = []
    for t in range(T):
        own = t // span
        direct = [u for u in members[own] if u <= t or not causal]
        remote = [j for j in range(len(members)) if (j < own if causal else j != own)]
        keys = xp.concatenate([k[:, direct]] + [k_hat[j][:, None] for j in remote], axis=1)  # [B, n_t, H_kv, d]
        values = xp.concatenate([v[:, direct]] + [v_hat[j][:, None] for j in remote], axis=1)
        keys, values = (xp.repeat(a, group, axis=2) for a in (keys, values))
        weights = softmax_over(xp, xp.einsum("bhd,bnhd->bhn", q[:, t], keys) / math.sqrt(d))
        rows.append(xp.einsum("bhn,bnhd->bhd", weights, values))
    return linear(merge(xp.stack(rows, axis=1)), params["o_proj"])


CASES = [  # num_heads, num_kv_heads, span, causal, T
    (4, 2, 4, True, 13), (2, 2, 3, False, 13), (4, 1, 1, True, 9), (2, 1, 5, True, 23), (4, 4, 16, True, 11),
]


@pytest.mark.parametrize("num_heads, num_kv_heads, span, causal, T", CASES)
def test_combiner_matches_its_factorisation(num_heads, num_kv_heads, span, causal, T):
    mixer = mixers.create("combiner", d_model=D, num_heads=num_heads, num_kv_heads=num_kv_heads, span=span,
                          causal=causal, rngs=nnx.Rngs(0))

    def formula(xp, params, x):
        return layer(xp, params, x, num_heads=num_heads, num_kv_heads=num_kv_heads, span=span, causal=causal)

    assert_layer_matches(mixer, formula, (B, T, D), param_grads=("q_proj", "k_proj", "v_proj", "o_proj"))


@pytest.mark.parametrize("impl", ["parallel", "pallas"])
def test_other_forms_match_the_blockwise_form(impl):
    T = 21
    x, _ = inputs(3, (B, T, D))
    make = lambda impl: mixers.create("combiner", d_model=D, num_heads=4, num_kv_heads=2, span=4,  # noqa: E731
                                      impl=impl, block_size=16, rngs=nnx.Rngs(0))
    assert rel_err(make(impl)(x), make("chunked")(x)) <= 1e-5


def test_bf16_matches_the_float32_factorisation():
    T, span = 19, 4
    mixer = mixers.create("combiner", d_model=D, num_heads=4, num_kv_heads=2, span=span, dtype=jnp.bfloat16,
                          rngs=nnx.Rngs(0))
    params = perturbed_params(mixer)
    nnx.update(mixer, params)
    x, _ = inputs(0, (B, T, D))
    y = mixer(x.astype(jnp.bfloat16))
    want = layer(np, f64(params), np.asarray(x, np.float64), num_heads=4, num_kv_heads=2, span=span, causal=True)
    assert y.dtype == jnp.bfloat16 and rel_err(y, want) <= 3e-2


def test_every_query_reaches_every_earlier_token():
    """Full support: y_t depends on every x_s with s <= t (directly or through s's span) and on no later one."""
    T = 12
    mixer = mixers.create("combiner", d_model=D, num_heads=2, span=3, rngs=nnx.Rngs(0))
    x, _ = inputs(1, (1, T, D))
    jac = jax.jit(jax.jacobian(lambda a: mixer(a)[0].sum(-1)))(x)[:, 0]  # [T_out, T_in, D]
    reach = np.abs(np.asarray(jac)).sum(-1) > 0
    np.testing.assert_array_equal(reach, np.tril(np.ones((T, T), bool)))


def test_decode_from_a_prompt_that_ends_mid_span():
    T, prompt, span = 17, 6, 4
    mixer = mixers.create("combiner", d_model=D, num_heads=4, num_kv_heads=2, span=span, rngs=nnx.Rngs(0))
    x, _ = inputs(2, (B, T, D))
    y_decoded, y, cache = prompt_then_steps(mixer, x, prompt)
    assert rel_err(y_decoded, y) <= 1e-5
    assert cache.summary_k.shape[1] == math.ceil(T / span) and cache.local.k.shape[1] == span  # O(s + T/s) keys


@pytest.mark.parametrize("kwargs, match", [
    (dict(span=0), "span"),
    (dict(rope=True), "rope: Combiner's abstractions"),
    (dict(window=4), "window:"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mixers.create("combiner", d_model=D, num_heads=2, **kwargs)


def test_prompt_longer_than_the_cache_is_refused():
    mixer = mixers.create("combiner", d_model=D, num_heads=2, span=4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="x: a prompt of 13 tokens does not fit a Combiner cache of 12 tokens"):
        mixer.prefill(jnp.zeros((1, 13, D)), mixer.init_cache(1, 10))
