"""KV-cache policies of softmax attention (`CompressedKVCache`): group quantisation of keys and values to 8 or 4
bits, and StreamingLLM's attention sinks plus a window of recent positions.

The references are written here in numpy: a quantiser (max |x| per group / qmax, round to nearest) and dense
attention of each decoded query over the positions the policy keeps, with the keys and values the policy stores.
The mixer's projections (q, k, v with RoPE, W_o) are shared with the reference; the attention and the cache are not.
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixer_references import steps
from seqlab import mixers
from seqlab.mixers.caches import dequantize, quantize

B, T, PROMPT, D, H, HKV = 2, 31, 17, 64, 4, 2


def np_quantized(x: np.ndarray, bits: int, group: int) -> np.ndarray:
    qmax = 2 ** (bits - 1) - 1
    g = x.reshape(*x.shape[:-1], -1, group)
    scale = np.abs(g).max(-1, keepdims=True) / qmax
    return (np.round(g / np.where(scale > 0, scale, 1.0)) * scale).reshape(x.shape)


@pytest.mark.parametrize("bits,group", [(8, 32), (8, 16), (4, 32), (4, 8)])
def test_quantize_is_within_half_a_scale_and_packs_4_bits(bits, group):
    x = np.array(jax.random.normal(jax.random.key(bits + group), (3, 5, 64)) * 3.0, np.float32)
    x[0, 0, :group] = 0.0  # an all-zero group dequantises to zeros
    codes, scales = quantize(jnp.asarray(x), bits, group)
    assert codes.shape == (3, 5, 64 * bits // 8) and scales.shape == (3, 5, 64 // group)
    got = np.asarray(dequantize(codes, scales, bits, group))
    np.testing.assert_allclose(got, np_quantized(x, bits, group), rtol=1e-6, atol=1e-6)
    half_scale = np.repeat(np.abs(x).reshape(3, 5, -1, group).max(-1) / (2 ** (bits - 1) - 1) / 2, group, -1)
    assert np.all(np.abs(got - x) <= half_scale * (1 + 1e-5) + 1e-7)
    np.testing.assert_array_equal(got[0, 0, :group], 0.0)


def test_4_bit_codes_round_trip_every_value():
    levels = np.arange(-7, 8, dtype=np.float32)
    x = np.tile(levels, 4)[None, :32]  # codes -7..7 at scale 1 (the group's max is 7)
    codes, scales = quantize(jnp.asarray(x), 4, 32)
    np.testing.assert_array_equal(np.asarray(dequantize(codes, scales, 4, 32)), x)


def make(**policy) -> mixers.Mixer:
    return mixers.create("softmax", d_model=D, num_heads=H, num_kv_heads=HKV, **policy)


def decoded(mixer, x):
    """y [B, T, D]: the prompt through prefill, the rest one token at a time."""
    y_prompt, cache = mixer.prefill(x[:, :PROMPT], mixer.init_cache(B, T))
    y_steps, _ = steps(mixer, x[:, PROMPT:], cache)
    return np.concatenate([np.asarray(y_prompt), np.asarray(y_steps)], axis=1)


def reference(mixer, x, *, bits=None, group=None, sinks=0, window=None):
    """Dense attention of each decoded query t >= PROMPT over the positions the policy keeps (k < sinks or
    t - window < k <= t; every k <= t without a window), with keys and values quantised as the policy stores them;
    the prompt's own outputs are exact causal attention."""
    q, k = mixer.queries_keys(x, jnp.arange(T))
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, mixer.values(x)))
    stored_k, stored_v = (k, v) if bits is None else (np_quantized(k, bits, group), np_quantized(v, bits, group))
    o = np.zeros(q.shape)
    for t in range(T):
        keys = [s for s in range(t + 1) if t < PROMPT or window is None or s < sinks or s > t - window]
        kk, vv = (k, v) if t < PROMPT else (stored_k, stored_v)
        for h in range(H):
            g = h // (H // HKV)
            scores = np.stack([np.einsum("bd,bd->b", q[:, t, h], kk[:, s, g]) for s in keys], -1)
            scores /= np.sqrt(q.shape[-1])  # [B, keys]
            p = np.exp(scores - scores.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            o[:, t, h] = np.einsum("bs,sbd->bd", p, np.stack([vv[:, s, g] for s in keys]))
    return np.asarray(mixer.o_proj(jnp.asarray(o.reshape(B, T, -1), jnp.float32)))


POLICIES = [dict(kv_bits=8), dict(kv_bits=4), dict(kv_bits=4, kv_group=16), dict(kv_window=6, kv_sinks=3),
            dict(kv_window=5), dict(kv_window=6, kv_sinks=2, kv_bits=8)]


@pytest.mark.parametrize("policy", POLICIES, ids=[",".join(f"{k}={v}" for k, v in p.items()) for p in POLICIES])
def test_decoding_under_a_policy_matches_dense_attention_over_what_it_keeps(policy):
    """The prompt (17 tokens) is longer than the sink + window caches (so prefill evicts within one write)."""
    mixer = make(**policy)
    x = jax.random.normal(jax.random.key(1), (B, T, D), jnp.float32)
    want = reference(mixer, x, bits=policy.get("kv_bits"), group=policy.get("kv_group", 16),  # 16: the head
                     sinks=policy.get("kv_sinks", 0), window=policy.get("kv_window"))
    got = decoded(mixer, x)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)
    exact = np.asarray(make()(x))
    np.testing.assert_allclose(got[:, :PROMPT], exact[:, :PROMPT], rtol=2e-4, atol=2e-5)
    assert np.abs(got[:, PROMPT:] - exact[:, PROMPT:]).max() > 1e-4  # the policy does change decoding


@pytest.mark.parametrize("policy,per_slot_head", [
    (dict(), 2 * 4 * 16), (dict(kv_bits=8), 2 * (16 + 4)), (dict(kv_bits=4), 2 * (8 + 4)),
    (dict(kv_bits=4, kv_group=8), 2 * (8 + 4 * 2)),
])
def test_cache_bytes(policy, per_slot_head):
    """Bytes per slot and key/value head: keys and values at 4 bytes per channel, or the codes (1 or 1/2 byte per
    channel) plus one float32 scale per group (head_dim 16 here)."""
    mixer = make(**policy)
    cache = mixer.init_cache(B, T)
    data = sum(leaf.nbytes for leaf in jax.tree.leaves(cache) if leaf.ndim == 4)
    assert data == B * T * HKV * per_slot_head


def test_the_window_policy_holds_sinks_and_recent_slots():
    mixer = make(kv_window=6, kv_sinks=3)
    cache = mixer.init_cache(B, T)
    assert cache.k.shape == (B, 9, HKV, D // H)
    _, cache = mixer.prefill(jax.random.normal(jax.random.key(2), (B, PROMPT, D)), cache)
    assert sorted(np.asarray(cache.key_positions).tolist()) == [0, 1, 2] + list(range(PROMPT - 6, PROMPT))


@pytest.mark.parametrize("build, message", [
    (lambda: make(kv_bits=3), "kv_bits"),
    (lambda: make(kv_bits=8, kv_group=5), r"head_dim \(16\) must be divisible by kv_group \(5\)"),
    (lambda: make(kv_sinks=4), "kv_sinks: .* set kv_window"),
    (lambda: make(kv_window=0), "kv_window"),
    (lambda: mixers.create("sliding_window", d_model=D, num_heads=H, window=8, kv_window=4), "kv_window: the mixer"),
    (lambda: mixers.create("mqsa", d_model=D, num_heads=H, kv_bits=8),
     "MultiQuerySelfAttention has a cache of its own"),
])
def test_bad_policies_are_refused(build, message):
    with pytest.raises(ValueError, match=message):
        build()


@pytest.mark.slow  # a benchmark script's smoke run
def test_kv_cache_policies_script_runs():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = subprocess.run(
        [sys.executable, "experiments/kv_cache_policies.py", "--d_model=128", "--num_heads=2", "--num_kv_heads=1",
         "--prompt=12", "--decode=6"], cwd=root, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = {row.split(" | ")[0][2:]: row.split(" | ")[1:] for row in result.stdout.splitlines()
            if row.startswith("| ") and not row.startswith("| policy")}
    assert rows["exact (float32)"][1:3] == ["1.000", "0.0e+00"]
    assert rows["int8, groups of 32"][1] == f"{(64 + 2 * 4) / (64 * 4):.3f}"  # head_dim 64: codes + 2 scales
