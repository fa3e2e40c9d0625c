"""The Block Transformer layer ("Block Transformer: Global-to-Local Language Modeling for Fast Inference") against
a per-block and per-token loop of its definition, written here with the layer's own parameters: each block's
embedding is its inputs concatenated (the partial last block zero-padded) through W_e; the block decoder is
causal attention over the embeddings with RoPE at block indices; block i's context is the block decoder's output
at i − 1 (the learnt start vector for block 0), made a prefix token by W_p; each token attends to its block's
prefix and its block's tokens up to itself, RoPE at the extended positions (prefix at i·(L + 1), token r at
i·(L + 1) + 1 + r). Forward in float64 (1e-5), gradients in jnp (1e-4); bf16; the decode cache's size.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mixer_references import (assert_layer_matches, f64, heads, inputs, linear, merge, perturbed_params,
                              prompt_then_steps, rope)
from reference import rel_err
from seqlab import mixers

B, D = 2, 16


def attend(xp, q, keys, values):
    """softmax(q·k/√d) over keys: q [B, H, d], keys, values [B, n, H_kv, d] (query head h reads h // G)."""
    group = q.shape[1] // keys.shape[2]
    keys, values = (xp.repeat(a, group, axis=2) for a in (keys, values))
    scores = xp.einsum("bhd,bnhd->bhn", q, keys) / math.sqrt(q.shape[-1])
    e = xp.exp(scores - scores.max(axis=-1, keepdims=True))
    return xp.einsum("bhn,bnhd->bhd", e / e.sum(axis=-1, keepdims=True), values)


def causal_attention(xp, p, x, positions, num_heads, num_kv_heads, visible):
    """Row by row: o_t = W_o softmax attention of query t over the keys s with visible(t, s), RoPE at positions."""
    q = rope(xp, heads(linear(x, p["q_proj"]), num_heads), positions)
    k = rope(xp, heads(linear(x, p["k_proj"]), num_kv_heads), positions)
    v = heads(linear(x, p["v_proj"]), num_kv_heads)
    rows = []
    for t in range(x.shape[1]):
        seen = [s for s in range(x.shape[1]) if visible(t, s)]
        rows.append(attend(xp, q[:, t], k[:, seen], v[:, seen]))
    return linear(merge(xp.stack(rows, axis=1)), p["o_proj"])


def layer(xp, params, x, *, num_heads: int, num_kv_heads: int, block: int):
    T, L = x.shape[1], block
    n = -(-T // L)
    padded = xp.concatenate([x, xp.zeros((x.shape[0], n * L - T, x.shape[2]))], axis=1)
    e = xp.stack([linear(padded[:, j * L:(j + 1) * L].reshape(x.shape[0], -1), params["embed"]) for j in range(n)],
                 axis=1)
    g = causal_attention(xp, params["blocks"], e, np.arange(n), num_heads, num_kv_heads, lambda t, s: s <= t)
    contexts = [xp.broadcast_to(params["start"], (x.shape[0], x.shape[2]))] + [g[:, i - 1] for i in range(1, n)]
    z, positions, token_rows = [], [], []  # the extended sequence of every block: its prefix, then its tokens
    for i in range(n):
        z.append(linear(contexts[i], params["prefix"]))
        positions.append(i * (L + 1))
        for r in range(min(L, T - i * L)):
            token_rows.append(len(z))
            z.append(x[:, i * L + r])
            positions.append(i * (L + 1) + 1 + r)
    positions = np.asarray(positions)
    same_block = lambda t, s: positions[t] // (L + 1) == positions[s] // (L + 1) and s <= t  # noqa: E731
    y = causal_attention(xp, params["tokens"], xp.stack(z, axis=1), positions, num_heads, num_kv_heads, same_block)
    return y[:, token_rows]


CASES = [(4, 2, 4, 13), (2, 2, 1, 7), (2, 1, 3, 12)]  # num_heads, num_kv_heads, block, T


@pytest.mark.parametrize("num_heads, num_kv_heads, block, T", CASES)
def test_block_transformer_matches_its_definition(num_heads, num_kv_heads, block, T):
    mixer = mixers.create("block_transformer", d_model=D, num_heads=num_heads, num_kv_heads=num_kv_heads,
                          block=block, rngs=nnx.Rngs(0))

    def formula(xp, params, x):
        return layer(xp, params, x, num_heads=num_heads, num_kv_heads=num_kv_heads, block=block)

    assert_layer_matches(mixer, formula, (B, T, D), param_grads=("embed", "blocks", "start", "prefix", "tokens"))


def test_bf16_matches_the_float32_definition():
    mixer = mixers.create("block_transformer", d_model=D, num_heads=4, num_kv_heads=2, block=4, dtype=jnp.bfloat16,
                          rngs=nnx.Rngs(0))
    params = perturbed_params(mixer)
    nnx.update(mixer, params)
    x, _ = inputs(0, (B, 15, D))
    want = layer(np, f64(params), np.asarray(x, np.float64), num_heads=4, num_kv_heads=2, block=4)
    y = mixer(x.astype(jnp.bfloat16))
    assert y.dtype == jnp.bfloat16 and rel_err(y, want) <= 3e-2


def test_decode_reads_one_block_of_keys_and_matches_the_forward():
    T, prompt, block = 23, 6, 4
    mixer = mixers.create("block_transformer", d_model=D, num_heads=2, block=block, rngs=nnx.Rngs(0))
    x, _ = inputs(2, (B, T, D))
    y_decoded, y, cache = prompt_then_steps(mixer, x, prompt)
    assert rel_err(y_decoded, y) <= 1e-5
    assert cache.local.k.shape[1] == block + 1 and cache.blocks.k.shape[1] == math.ceil(T / block)


def test_bad_block_is_refused():
    with pytest.raises(ValueError, match="block"):
        mixers.create("block_transformer", d_model=D, num_heads=2, block=0)
