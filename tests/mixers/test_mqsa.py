"""Multi-query self-attention ("Collaboration and Transition: Distilling Item Transitions into Multi-Query
Self-Attention for Sequential Recommendation") against a per-query loop of its definition, written here with the
layer's own projections: the query of head h at t is the mean of the queries of the window's items
max(0, t − L + 1) .. t, attending to every s <= t of its key/value head; the output mixes the long- and the
short-window attention, α·o_long + (1 − α)·o_short, through W_o. Forward in float64 (1e-5), gradients from the
same loop in jnp (1e-4); bf16; decode from a prompt shorter than the window; packed documents against each
document alone; bad arguments.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mixer_references import (assert_layer_matches, check_decode_prefill_and_cache, f64, heads, inputs, linear, merge,
                              perturbed_params, raises_naming, rope)
from reference import rel_err
from seqlab import mixers
from seqlab.core.documents import Documents

B, D = 2, 16


def attend(xp, q, k, v, t: int, window: int, first_key: int):
    """o_t [B, H, d]: the mean query of the window's items (q [B, T, H, d]) against the keys and values
    first_key <= s <= t (k, v [B, T, H, d], each query head's own key/value head)."""
    items = list(range(max(0, t - window + 1), t + 1))
    query = q[:, items].sum(axis=1) / len(items)
    scores = xp.einsum("bhd,bshd->bhs", query, k[:, first_key : t + 1]) / math.sqrt(q.shape[-1])
    e = xp.exp(scores - scores.max(axis=-1, keepdims=True))
    return xp.einsum("bhs,bshd->bhd", e / e.sum(axis=-1, keepdims=True), v[:, first_key : t + 1])


def layer(xp, params, x, *, num_heads: int, num_kv_heads: int, long_window: int, short_window: int, alpha: float,
          use_rope: bool = False, attention_window: int | None = None):
    """y [B, T, D] of x [B, T, D], query by query; attention_window w: query t sees the keys t − w < s <= t."""
    q = heads(linear(x, params["q_proj"]), num_heads)
    k = heads(linear(x, params["k_proj"]), num_kv_heads)
    v = heads(linear(x, params["v_proj"]), num_kv_heads)
    if use_rope:
        q, k = rope(xp, q, np.arange(x.shape[1])), rope(xp, k, np.arange(x.shape[1]))
    group = num_heads // num_kv_heads
    k, v = (xp.repeat(a, group, axis=2) for a in (k, v))  # query head h reads key/value head h // group
    rows = []
    for t in range(x.shape[1]):
        first = 0 if attention_window is None else max(0, t - attention_window + 1)
        rows.append(alpha * attend(xp, q, k, v, t, long_window, first)
                    + (1 - alpha) * attend(xp, q, k, v, t, short_window, first))
    return linear(merge(xp.stack(rows, axis=1)), params["o_proj"])


CASES = [  # num_heads, num_kv_heads, long_window, short_window, alpha, rope, T
    (2, 2, 3, 1, 0.5, False, 13),
    (4, 2, 5, 2, 0.3, True, 17),
    (2, 1, 1, 1, 0.7, False, 13),
    (2, 2, 20, 5, 0.8, False, 17),  # the long window exceeds the sequence
]


def make(num_heads, num_kv_heads, long_window, short_window, alpha, use_rope, **kw):
    return mixers.create("mqsa", d_model=D, num_heads=num_heads, num_kv_heads=num_kv_heads, long_window=long_window,
                         short_window=short_window, alpha=alpha, rope=use_rope, rngs=nnx.Rngs(0), **kw)


def formula_of(num_heads, num_kv_heads, long_window, short_window, alpha, use_rope, attention_window=None):
    return lambda xp, params, x: layer(xp, params, x, num_heads=num_heads, num_kv_heads=num_kv_heads,
                                       long_window=long_window, short_window=short_window, alpha=alpha,
                                       use_rope=use_rope, attention_window=attention_window)


@pytest.mark.parametrize("num_heads, num_kv_heads, long_window, short_window, alpha, use_rope, T", CASES)
def test_mqsa_matches_its_definition(num_heads, num_kv_heads, long_window, short_window, alpha, use_rope, T):
    args = (num_heads, num_kv_heads, long_window, short_window, alpha, use_rope)
    assert_layer_matches(make(*args), formula_of(*args), (B, T, D),
                         param_grads=("q_proj", "k_proj", "v_proj", "o_proj"))


def test_an_attention_window_restricts_the_keys():
    """SoftmaxAttention's window: the pooled queries attend to the last 4 keys only (forward and input gradient)."""
    args = (2, 1, 3, 1, 0.4, False)
    assert_layer_matches(make(*args, window=4), formula_of(*args, attention_window=4), (B, 13, D))


def test_bf16_matches_the_float32_definition():
    args = CASES[1][:-1]
    mixer = make(*args, dtype=jnp.bfloat16)
    params = perturbed_params(mixer)
    nnx.update(mixer, params)
    x, _ = inputs(0, (B, 15, D))
    y = mixer(x.astype(jnp.bfloat16))
    want = formula_of(*args)(np, f64(params), np.asarray(x, np.float64))
    assert y.dtype == jnp.bfloat16 and rel_err(y, want) <= 3e-2


@pytest.mark.parametrize("prompt", [2, 9])
def test_decode_from_a_prompt_matches_the_forward(prompt):
    """prefill(x[:, :prompt]) + decode == forward == decode, the prompt shorter (2) and longer (9) than the window;
    prefill's cache == the cache after stepping the prompt."""
    mixer = make(4, 2, 5, 2, 0.3, True)
    nnx.update(mixer, perturbed_params(mixer))
    check_decode_prefill_and_cache(mixer, inputs(2, (B, 13, D))[0], prompt)


def test_packed_documents_equal_each_document_alone():
    """A packed row: windows and attention restart at every document start (documents shorter than the window)."""
    args = (4, 2, 5, 2, 0.3, True)
    mixer = make(*args)
    params = perturbed_params(mixer)
    nnx.update(mixer, params)
    lengths = (3, 7, 1, 6)
    x, _ = inputs(3, (1, sum(lengths), D))
    ids = jnp.asarray(np.repeat(np.arange(len(lengths)), lengths)[None], jnp.int32)
    y = nnx.jit(lambda m, a: m(a, documents=Documents.of(ids)))(mixer, x)
    bounds = np.cumsum((0,) + lengths)
    x64, p64 = np.asarray(x, np.float64), f64(params)
    want = np.concatenate([formula_of(*args)(np, p64, x64[:, s:e]) for s, e in zip(bounds[:-1], bounds[1:])], 1)
    assert rel_err(y, want) <= 1e-5


@pytest.mark.parametrize("kwargs, arg", [
    (dict(long_window=0), "long_window"),
    (dict(long_window=2.5), "long_window"),
    (dict(short_window=0), "short_window"),
    (dict(long_window=2, short_window=3), "short_window"),
    (dict(alpha=1.5), "alpha"),
    (dict(alpha=-0.1), "alpha"),
    (dict(alpha=True), "alpha"),
])
def test_bad_arguments_name_the_argument(kwargs, arg):
    raises_naming(lambda: mixers.create("mqsa", d_model=D, num_heads=2, **kwargs), arg)


def test_a_query_sees_its_window_and_its_past_only():
    """Gradient support: y_t depends on x_s iff s <= t (causal), however long the window."""
    mixer = make(2, 2, 4, 1, 0.5, False)
    x, _ = inputs(5, (1, 9, D))
    jac = jax.jit(jax.jacobian(lambda a: mixer(a)[0].sum(-1)))(x)[:, 0]  # [T_out, T_in, D]
    reach = np.abs(np.asarray(jac)).sum(-1) > 0
    np.testing.assert_array_equal(reach, np.tril(np.ones((9, 9), bool)))
