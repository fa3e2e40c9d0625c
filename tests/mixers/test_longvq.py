"""LongVQ ("LongVQ: Long Sequence Modeling with Vector Quantization on Structured Memory") and its attention over
vector-quantised keys (`ops.vq_attn`, Transformer-VQ's linear-time form).

The op against the quadratic form written here: every key replaced by its nearest code (found here in float64),
causal softmax pair by pair (a dense [T, T] formula); q and v get the quadratic form's gradients, and a key the
straight-through gradient from the queries of its own and the next block only (the op's stated estimator). Odd
lengths, several block sizes and codebook sizes (codes no key picks among them), large logits, bf16, one token.
The layer against its formula (a per-token damped EMA, Mega's gates, the dense quantised attention), forward and
gradients; the codebook's k-means step and the commitment loss against their formulas; a prompt longer than two
blocks decoded; bad arguments (the op's shapes and a sequence shard that is not whole blocks).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P

from mixer_references import (assert_layer_matches, aux_losses_of, f64, heads, inputs, linear, merge, over_tokens,
                              perturbed_params, prompt_then_steps, sigmoid, silu)
from reference import rel_err
from seqlab import mixers, ops

B, D = 2, 16


def sg(xp, a):
    return a if xp is np else jax.lax.stop_gradient(a)


def nearest(k, codebook):
    """z [B, T, H]: each key's nearest code by Euclidean distance, in float64 numpy (constant)."""
    k, e = np.asarray(k, np.float64), np.asarray(codebook, np.float64)
    return np.linalg.norm(k[:, :, :, None] - e[None, None], axis=-1).argmin(axis=-1)


def quantised_attention(xp, q, k, v, codebook, codes, block: int):
    """o [B, T, H, V], pair by pair: softmax over j <= t of q_t·k̂_j / √d, k̂_j = e_{z_j}; k̂_j = k_j + sg(e_{z_j} −
    k_j) carries a gradient to k_j only from the queries t with block(j) >= block(t) − 1."""
    e = xp.asarray(codebook)
    chosen = xp.stack([e[h][codes[:, :, h]] for h in range(e.shape[0])], axis=2)  # [B, T, H, d]
    k_hat = k + sg(xp, chosen - k)
    t, j = np.arange(q.shape[1])[:, None], np.arange(q.shape[1])[None, :]
    near = j // block >= t // block - 1  # [T, T]: pairs whose score differentiates the key
    scores = xp.where(near, xp.einsum("bthd,bjhd->bhtj", q, k_hat), xp.einsum("bthd,bjhd->bhtj", q, sg(xp, k_hat)))
    scores = xp.where(j <= t, scores / math.sqrt(q.shape[-1]), -xp.inf)
    p = xp.exp(scores - scores.max(axis=-1, keepdims=True))
    return xp.einsum("bhtj,bjhv->bthv", p / p.sum(axis=-1, keepdims=True), v)


@functools.partial(jax.jit, static_argnums=4)
def op(q, k, v, codebook, block: int):
    codes = ops.nearest_codes(k, codebook)
    return ops.vq_attn(q, ops.quantize(k, codebook, codes), codes, v, codebook, block_size=block)


OP_CASES = [  # T, block, codes, query scale
    (1, 4, 3, 1.0), (13, 4, 5, 1.0), (37, 8, 6, 1.0), (29, 5, 9, 1.0), (20, 32, 7, 1.0), (23, 3, 4, 12.0),
]


@pytest.mark.parametrize("T, block, num_codes, q_scale", OP_CASES)
def test_op_is_the_quadratic_form_over_quantised_keys(T, block, num_codes, q_scale):
    ks = jax.random.split(jax.random.key(T * block), 5)
    h, d = 3, 4
    q = q_scale * jax.random.normal(ks[0], (B, T, h, d))
    k, v = jax.random.normal(ks[1], (B, T, h, d)), jax.random.normal(ks[2], (B, T, h, 5))
    codebook, w = jax.random.normal(ks[3], (h, num_codes, d)), jax.random.normal(ks[4], (B, T, h, 5))
    codes = nearest(k, codebook)
    np.testing.assert_array_equal(ops.nearest_codes(k, codebook), codes)
    want = quantised_attention(np, *f64((q, k, v, codebook)), codes, block)
    assert rel_err(op(q, k, v, codebook, block), want) <= 1e-5
    got = jax.jit(jax.grad(lambda *a: jnp.sum(op(*a, codebook, block) * w), argnums=(0, 1, 2)))(q, k, v)
    with jax.default_matmul_precision("highest"):
        ref = jax.jit(jax.grad(lambda *a: jnp.sum(quantised_attention(jnp, *a, codebook, codes, block) * w),
                               argnums=(0, 1, 2)))(q, k, v)
    for name, a, b in zip("qkv", got, ref):
        if T == 1 and name != "v":  # one key: its weight is 1 whatever the score
            assert not np.any(a) and not np.any(b)
        else:
            assert rel_err(a, b) <= 1e-4, name


def test_keys_get_gradients_from_their_own_and_the_next_block_only():
    T, block = 14, 4
    q, k, v = (jax.random.normal(key, (1, T, 1, 4)) for key in jax.random.split(jax.random.key(1), 3))
    codebook = jax.random.normal(jax.random.key(2), (1, 3, 4))
    jac = jax.jacobian(lambda a: op(q, a, v, codebook, block)[0, :, 0].sum(-1))(k)  # [T_out, 1, T, 1, 4]
    reach = np.abs(np.asarray(jac)[:, 0, :, 0]).sum(-1) > 0
    t, j = np.arange(T)[:, None], np.arange(T)[None, :]
    np.testing.assert_array_equal(reach & (j != t), (j <= t) & (j // block >= t // block - 1) & (j != t))


def test_op_in_bf16_matches_the_float32_form():
    T, block = 27, 4
    q, k, v = (jax.random.normal(key, (B, T, 2, 8)) for key in jax.random.split(jax.random.key(3), 3))
    codebook = jax.random.normal(jax.random.key(4), (2, 6, 8))
    y = op(*(a.astype(jnp.bfloat16) for a in (q, k, v)), codebook, block)
    codes = nearest(np.asarray(k.astype(jnp.bfloat16), np.float64), codebook)
    want = quantised_attention(np, *f64((q, k, v, codebook)), codes, block)
    assert y.dtype == jnp.bfloat16 and rel_err(y, want) <= 2e-2


def test_op_bad_arguments_name_the_argument():
    q = jnp.zeros((1, 8, 2, 4))
    codes, e = jnp.zeros((1, 8, 2), jnp.int32), jnp.zeros((2, 3, 4))
    with pytest.raises(ValueError, match=r"^codes must be \[batch, time, heads\]"):
        ops.vq_attn(q, q, codes[:, :5], q, e)
    with pytest.raises(ValueError, match=r"^codebook must be \[heads, codes, key_dim\]"):
        ops.vq_attn(q, q, codes, q, e[:1])
    with pytest.raises(ValueError, match=r"^block_size must be a positive int"):
        ops.vq_attn(q, q, codes, q, e, block_size=0)
    mesh = Mesh(np.array(jax.devices()[:1]), ("seq",))
    split = jax.shard_map(lambda *a: ops.vq_attn(*a, block_size=3, sequence_axis="seq"), mesh=mesh,
                          in_specs=(P(None, "seq"),) * 4 + (P(),), out_specs=P(None, "seq"))
    with pytest.raises(ValueError, match=r"^block_size: a sequence shard of 8 tokens must be a multiple of block_size"):
        split(q, q, codes, q, e)


def ema_then_gates(xp, params, x, codebook, codes, *, num_heads: int, block: int):
    """The layer's formula (module docstring) with the keys' codes given."""
    p = params
    alpha, delta = sigmoid(xp, p["ema_alpha"]), sigmoid(xp, p["ema_delta"])

    def ema_step(h, x_t):  # h [B, D, n]
        h = alpha * p["ema_beta"] * x_t[..., None] + (1 - alpha * delta) * h
        return h, (h * p["ema_eta"]).sum(-1)

    ema = over_tokens(xp, ema_step, xp.zeros((x.shape[0], *alpha.shape)), x)
    smoothed = silu(xp, ema + p["ema_omega"] * x)
    z = silu(xp, linear(smoothed, p["z_proj"]))

    def standardised(a):
        a = heads(a, num_heads)
        c = a - a.mean(-1, keepdims=True)
        return c / xp.sqrt((c * c).mean(-1, keepdims=True) + 1e-5)

    q, k = (standardised(z * p["qk_scale"][i] + p["qk_offset"][i]) for i in range(2))
    v = heads(silu(xp, linear(x, p["v_proj"])), num_heads)
    o = merge(quantised_attention(xp, q, k, v, codebook, codes, block))
    hidden = silu(xp, linear(smoothed, p["h_proj"]) + linear(silu(xp, linear(smoothed, p["reset_proj"])) * o,
                                                               p["u_proj"]))
    return sigmoid(xp, linear(smoothed, p["update_proj"])) * hidden


def layer_keys(params, x, *, num_heads: int):
    """The layer's keys k [B, T, H, d] in float64 numpy, from the formula's first half."""
    p, x = f64(params), np.asarray(x, np.float64)
    alpha, delta = sigmoid(np, p["ema_alpha"]), sigmoid(np, p["ema_delta"])
    h, ema = np.zeros((x.shape[0], *alpha.shape)), []
    for t in range(x.shape[1]):
        h = alpha * p["ema_beta"] * x[:, t, :, None] + (1 - alpha * delta) * h
        ema.append((h * p["ema_eta"]).sum(-1))
    z = silu(np, linear(silu(np, np.stack(ema, 1) + p["ema_omega"] * x), p["z_proj"]))
    k = heads(z * p["qk_scale"][1] + p["qk_offset"][1], num_heads)
    c = k - k.mean(-1, keepdims=True)
    return c / np.sqrt((c * c).mean(-1, keepdims=True) + 1e-5)


@pytest.mark.parametrize("num_heads, num_codes, block, T", [(2, 5, 4, 13), (1, 3, 5, 17)])
def test_longvq_matches_its_formula(num_heads, num_codes, block, T):
    mixer = mixers.create("longvq", d_model=D, num_heads=num_heads, num_codes=num_codes, block_size=block,
                          ema_dim=3, rngs=nnx.Rngs(0))
    codebook = np.asarray(mixer.codebook, np.float64)
    codes = nearest(layer_keys(perturbed_params(mixer), inputs(0, (B, T, D))[0], num_heads=num_heads), codebook)
    assert all(len(np.unique(codes[..., h])) >= 2 for h in range(num_heads))  # the keys really are quantised

    def formula(xp, params, x):
        return ema_then_gates(xp, params, x, codebook, codes, num_heads=num_heads, block=block)

    assert_layer_matches(mixer, formula, (B, T, D), param_grads=("ema_alpha", "ema_delta", "ema_eta", "z_proj",
                                                                 "qk_scale", "v_proj", "u_proj", "update_proj"))


def test_training_calls_take_one_k_means_step():
    """counts ← γ counts + (1 − γ) n_s and sums ← γ sums + (1 − γ) Σ_{z_t = s} k_t; frozen while
    use_running_average (the default)."""
    decay, T, S, H = 0.5, 9, 16, 2
    mixer = mixers.create("longvq", d_model=D, num_heads=H, num_codes=S, block_size=4, ema_dim=3,
                          codebook_decay=decay, rngs=nnx.Rngs(0))
    x, _ = inputs(4, (B, T, D))
    old_sums, old_counts = (np.asarray(a[...], np.float64) for a in (mixer.codebook_sums, mixer.codebook_counts))
    nnx.jit(lambda m, a: m(a))(mixer, x)
    np.testing.assert_array_equal(mixer.codebook_sums[...], old_sums)
    mixer.use_running_average = False
    nnx.jit(lambda m, a: m(a))(mixer, x)
    k = layer_keys(nnx.to_pure_dict(nnx.state(mixer, nnx.Param)), x, num_heads=H)
    codes = nearest(k, old_sums / old_counts[..., None])
    for h in range(H):
        members = [codes[..., h] == s for s in range(S)]
        assert any(m.any() for m in members) and not all(m.any() for m in members)  # used and unused codes
        for s in range(S):
            want_count = decay * old_counts[h, s] + (1 - decay) * members[s].sum()
            want_sum = decay * old_sums[h, s] + (1 - decay) * k[..., h, :][members[s]].sum(axis=0)
            np.testing.assert_allclose(mixer.codebook_counts[...][h, s], want_count, rtol=1e-6)
            np.testing.assert_allclose(mixer.codebook_sums[...][h, s], want_sum, atol=1e-5)


def test_train_mode_adds_the_commitment_loss():
    """β · mean (k − e_z)² against the formula's keys and their codes; its gradient reaches the key parameters
    (qk_offset's key row) and not the query row; nothing in eval mode."""
    beta, T, H = 0.25, 9, 2
    mixer = mixers.create("longvq", d_model=D, num_heads=H, num_codes=6, block_size=4, ema_dim=3, commitment=beta,
                          rngs=nnx.Rngs(0))
    x, _ = inputs(7, (B, T, D))

    assert aux_losses_of(mixer, x) == {}  # eval mode (use_running_average)
    codebook = np.asarray(mixer.codebook, np.float64)
    k = layer_keys(nnx.to_pure_dict(nnx.state(mixer, nnx.Param)), x, num_heads=H)
    codes = nearest(k, codebook)
    quantised = np.stack([codebook[h][codes[..., h]] for h in range(H)], axis=2)
    mixer.use_running_average = False
    value, grads = nnx.jit(nnx.value_and_grad(lambda m, a: aux_losses_of(m, a)["longvq_commitment"]))(mixer, x)
    assert rel_err(value, beta * ((k - quantised) ** 2).mean()) <= 1e-5
    offset = np.asarray(grads["qk_offset"][...])
    assert not offset[0].any() and np.abs(offset[1]).max() > 0


def test_decode_from_a_prompt_longer_than_two_blocks_matches_the_forward():
    T, prompt = 23, 10
    mixer = mixers.create("longvq", d_model=D, num_heads=2, num_codes=4, block_size=3, ema_dim=2, rngs=nnx.Rngs(0))
    nnx.update(mixer, perturbed_params(mixer))
    x, _ = inputs(2, (B, T, D))
    y_decoded, y, cache = prompt_then_steps(mixer, x, prompt)
    assert rel_err(y_decoded, y) <= 1e-5
    counts = cache.before[..., -1] + cache.previous[..., -1] + cache.current[..., -1]  # [B, H, S]
    np.testing.assert_array_equal(counts.sum(-1), T)
    np.testing.assert_array_equal(cache.current[..., -1].sum(-1), T - (T - 1) // 3 * 3)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_codes=0), "^num_codes"),
    (dict(block_size=0), "^block_size"),
    (dict(ema_dim=0), "^ema_dim"),
    (dict(codebook_decay=1.5), "^codebook_decay"),
    (dict(commitment=float("nan")), "^commitment must be a finite number >= 0"),
    (dict(impl="pallas"), "^impl: 'pallas' is not available for longvq"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mixers.create("longvq", d_model=D, num_heads=2, **kwargs)
