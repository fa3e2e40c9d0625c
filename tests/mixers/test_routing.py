"""Routing Transformer ("Efficient Content-Based Sparse Attention with Routing Transformers") against a per-query
loop of its definition, written here with the layer's own projections and centroids: keys are the unit-norm
queries (shared QK); a routing head sends every token to its nearest centroid and query t attends to the earlier
tokens s < t of its own cluster — to itself only when no such token exists — and a local head to the earlier
tokens of its window (the same self rule). Forward in float64 (1e-5), gradients from the same loop in jnp (1e-4);
bf16; the online k-means step and the commitment loss against their formulas; decode across a prompt; bad
arguments.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mixer_references import (assert_layer_matches, aux_losses_of, f64, heads, inputs, linear, merge,
                              perturbed_params, prompt_then_steps)
from reference import rel_err
from seqlab import mixers

B, D = 2, 16


def unit(xp, a):
    return a / xp.sqrt((a * a).sum(axis=-1, keepdims=True))


def clusters_of(xp, k, centroids, local_heads: int):
    """c [B, T, H_r]: each routing head's nearest centroid (centroids [H_r, C, d]) of the keys k [B, T, H, d]."""
    return xp.einsum("bthd,hcd->bthc", k[:, :, local_heads:], centroids).argmax(axis=-1)


def visible_keys(t: int, clusters, *, num_heads: int, local_heads: int, window: int):
    """[B, H, t + 1] bools: the keys query t of each row and head attends to — the earlier tokens of its window
    (local heads) or of its cluster (routing heads, clusters [B, T, H_r]), and itself only when there is none."""
    s = np.arange(t + 1)
    earlier = np.empty((clusters.shape[0], num_heads, t + 1), bool)
    earlier[:, :local_heads] = (s < t) & (s > t - window)
    earlier[:, local_heads:] = (s < t) & (np.swapaxes(clusters[:, : t + 1], 1, 2) == clusters[:, t, :, None])
    earlier[..., t] = ~earlier.any(axis=-1)
    return earlier


def layer(xp, params, x, c, *, num_heads: int, local_heads: int, window: int):
    """The layer's output given the routing heads' clusters c [B, T, H_r]: softmax over each query's visible keys."""
    q = heads(linear(x, params["q_proj"]), num_heads)  # [B, T, H, d]
    k, v = unit(xp, q), heads(linear(x, params["v_proj"]), num_heads)
    rows = []
    for t in range(x.shape[1]):
        seen = visible_keys(t, c, num_heads=num_heads, local_heads=local_heads, window=window)
        scores = xp.einsum("bhd,bshd->bhs", q[:, t], k[:, : t + 1]) / math.sqrt(q.shape[-1])
        scores = xp.where(seen, scores, -xp.inf)
        e = xp.exp(scores - scores.max(axis=-1, keepdims=True))
        rows.append(xp.einsum("bhs,bshd->bhd", e / e.sum(axis=-1, keepdims=True), v[:, : t + 1]))
    return linear(merge(xp.stack(rows, axis=1)), params["o_proj"])


def routed_clusters(params, x, centroids, *, num_heads: int, local_heads: int):
    """The clusters [B, T, H_r] of the routing heads in float64 numpy (constant under differentiation)."""
    q = heads(linear(np.asarray(x, np.float64), f64(params)["q_proj"]), num_heads)
    return clusters_of(np, unit(np, q), np.asarray(centroids, np.float64), local_heads)


CASES = [  # num_heads, local_heads, num_clusters, window, T
    (4, 2, 3, 4, 13), (2, 0, 2, 64, 11), (4, 1, 5, 3, 17),
]


@pytest.mark.parametrize("num_heads, local_heads, num_clusters, window, T", CASES)
def test_routing_matches_its_definition(num_heads, local_heads, num_clusters, window, T):
    mixer = mixers.create("routing", d_model=D, num_heads=num_heads, local_heads=local_heads,
                          num_clusters=num_clusters, window=window, rngs=nnx.Rngs(0))
    c = routed_clusters(perturbed_params(mixer), inputs(0, (B, T, D))[0], mixer.centroids[...],
                        num_heads=num_heads, local_heads=local_heads)  # the parameters and input checked below
    assert all(len(np.unique(c[:, :, h])) >= 2 for h in range(num_heads - local_heads))  # not causal attention

    def formula(xp, params, x):
        return layer(xp, params, x, c, num_heads=num_heads, local_heads=local_heads, window=window)

    assert_layer_matches(mixer, formula, (B, T, D), param_grads=("q_proj", "v_proj", "o_proj"))


@pytest.mark.parametrize("impl", ["parallel", "auto"])
def test_other_forms_match_the_blockwise_form(impl):
    x, _ = inputs(3, (B, 21, D))
    make = lambda impl: mixers.create("routing", d_model=D, num_heads=4, local_heads=1, num_clusters=3,  # noqa: E731
                                      window=5, impl=impl, block_size=16, rngs=nnx.Rngs(0))
    assert rel_err(make(impl)(x), make("chunked")(x)) <= 1e-5


def test_bf16_matches_the_float32_definition():
    T = 15
    mixer = mixers.create("routing", d_model=D, num_heads=4, local_heads=2, num_clusters=3, window=4,
                          dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    params = perturbed_params(mixer)
    nnx.update(mixer, params)
    x, _ = inputs(0, (B, T, D))
    y = mixer(x.astype(jnp.bfloat16))
    c = routed_clusters(params, x, mixer.centroids[...], num_heads=4, local_heads=2)
    want = layer(np, f64(params), np.asarray(x, np.float64), c, num_heads=4, local_heads=2, window=4)
    assert y.dtype == jnp.bfloat16 and rel_err(y, want) <= 3e-2


def test_training_calls_take_one_online_k_means_step():
    """μ_c ← unit(λ μ_c + (1 − λ) unit(Σ members' keys)) for every cluster with members, the others unchanged;
    frozen while use_running_average (the default)."""
    decay, T, C = 0.5, 5, 8
    mixer = mixers.create("routing", d_model=D, num_heads=4, local_heads=2, num_clusters=C, centroid_decay=decay,
                          rngs=nnx.Rngs(0))
    x, _ = inputs(4, (B, T, D))
    old = np.asarray(mixer.centroids[...], np.float64)
    nnx.jit(lambda m, a: m(a))(mixer, x)
    np.testing.assert_array_equal(mixer.centroids[...], old)
    mixer.use_running_average = False
    nnx.jit(lambda m, a: m(a))(mixer, x)
    q = heads(linear(np.asarray(x, np.float64), f64(nnx.to_pure_dict(nnx.state(mixer, nnx.Param)))["q_proj"]), 4)
    k = unit(np, q)[:, :, 2:].reshape(B * T, 2, -1)
    c = clusters_of(np, k[None], old, 0)[0]  # [B·T, H_r]
    sizes = np.stack([np.bincount(c[:, h], minlength=C) for h in range(2)])
    assert (sizes == 0).any() and (sizes > 0).any()  # both kinds of cluster occur
    for h in range(2):
        for j in range(C):
            members = k[c[:, h] == j, h]
            want = unit(np, decay * old[h, j] + (1 - decay) * unit(np, members.sum(0))) if len(members) else old[h, j]
            np.testing.assert_allclose(mixer.centroids[...][h, j], want, atol=1e-5)


def test_train_mode_adds_the_commitment_loss():
    """β · mean (k − μ_c)² over the routing heads' keys and their centroids before the update, in value and in its
    gradient in W_q; nothing in eval mode, for β = 0 or outside a collect block."""
    beta, T = 0.3, 7
    mixer = mixers.create("routing", d_model=D, num_heads=4, local_heads=2, num_clusters=3, commitment=beta,
                          rngs=nnx.Rngs(0))
    x = np.asarray(inputs(6, (B, T, D))[0])
    centroids = np.asarray(mixer.centroids[...], np.float64)

    def routing_keys(xp, w_q):
        return unit(xp, heads(linear(x, {"kernel": w_q}), 4))[:, :, 2:]  # [B, T, H_r, d]

    w_q = mixer.q_proj.kernel[...]
    c = clusters_of(np, routing_keys(np, np.asarray(w_q, np.float64)), centroids, 0)
    routed_to = np.stack([centroids[h][c[..., h]] for h in range(2)], axis=2)  # [B, T, H_r, d]

    def commitment(xp, w_q):
        return beta * ((routing_keys(xp, w_q) - routed_to) ** 2).mean()

    assert aux_losses_of(mixer, x) == {}  # eval mode (use_running_average)
    mixer.use_running_average = False
    value, grads = nnx.jit(nnx.value_and_grad(lambda m, a: aux_losses_of(m, a)["routing_commitment"]))(mixer, x)
    want_value = commitment(np, np.asarray(w_q, np.float64))
    want_grad = jax.jit(jax.grad(lambda w: commitment(jnp, w)))(w_q)
    assert rel_err(value, want_value) <= 1e-5 and rel_err(grads["q_proj"]["kernel"][...], want_grad) <= 1e-4
    mixer.commitment = 0.0
    assert aux_losses_of(mixer, x) == {}
    mixer(x)  # outside a collect block the loss goes nowhere


def test_decode_from_a_prompt_matches_the_forward():
    T, prompt = 17, 6
    mixer = mixers.create("routing", d_model=D, num_heads=4, local_heads=2, num_clusters=3, window=4,
                          rngs=nnx.Rngs(0))
    x, _ = inputs(2, (B, T, D))
    y_decoded, y, cache = prompt_then_steps(mixer, x, prompt)
    assert rel_err(y_decoded, y) <= 1e-5
    k = unit(jnp, heads(mixer.q_proj(x), 4))
    np.testing.assert_array_equal(cache.clusters, mixer.route(k[:, :, 2:]))


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_clusters=0), "num_clusters"),
    (dict(local_heads=2), "local_heads must be an int in \\[0, num_heads=2\\)"),
    (dict(local_heads=-1), "local_heads"),
    (dict(window=0), "window"),
    (dict(centroid_decay=1.5), "centroid_decay"),
    (dict(commitment=-1.0), "^commitment must be a finite number >= 0"),
    (dict(impl="pallas"), "impl: 'pallas' is not available for routing"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mixers.create("routing", d_model=D, num_heads=2, **kwargs)


def test_routed_tokens_see_no_other_cluster():
    """Gradient support off the diagonal: y_t of a routing-only layer depends on x_s (s != t) iff s < t and
    c_s = c_t."""
    T = 12
    mixer = mixers.create("routing", d_model=D, num_heads=1, local_heads=0, num_clusters=3, rngs=nnx.Rngs(0))
    x, _ = inputs(5, (1, T, D))
    c = np.asarray(mixer.route(unit(jnp, heads(mixer.q_proj(x), 1))))[0, :, 0]
    jac = jax.jit(jax.jacobian(lambda a: mixer(a)[0].sum(-1)))(x)[:, 0]  # [T_out, T_in, D]
    reach = np.abs(np.asarray(jac)).sum(-1) > 0
    want = np.array([[s < t and c[s] == c[t] for s in range(T)] for t in range(T)])
    off_diagonal = ~np.eye(T, dtype=bool)
    assert len(np.unique(c)) >= 2
    np.testing.assert_array_equal(reach[off_diagonal], want[off_diagonal])
