"""KV-cache policies of softmax attention (`CompressedKVCache`): group quantisation of keys and values to 8 or 4
bits, and StreamingLLM's attention sinks plus a window of recent positions; H2O's heavy hitters
(`HeavyHitterCache`) and ZipVL's mixed precision (`MixedPrecisionKVCache`).

The references are written here in numpy: a quantiser (max |x| per group / qmax, round to nearest) and dense
attention of each decoded query over the positions the policy keeps, with the keys and values the policy stores.
The mixer's projections (q, k, v with RoPE, W_o) are shared with the reference; the attention and the cache are not.
H2O's kept positions come from a simulation of the eviction rule over sets of positions, ZipVL's important tokens
from the prompt's attention computed here; neither shares code with the module.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixer_references import steps
from seqlab import mixers
from seqlab.mixers.caches import dequantize, important_tokens, quantize

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
    if policy:
        assert cache.stored_bytes() == data


@pytest.mark.parametrize("policy,per_slot_head", [
    (dict(kv_heavy=4, kv_window=5, kv_sinks=2), 2 * 4 * 16 + 4 + 4),
    (dict(kv_heavy=4, kv_window=5, kv_bits=8), 2 * (16 + 4) + 4 + 4),
])
def test_heavy_hitter_cache_bytes(policy, per_slot_head):
    """Per slot and key/value head: the key and value (and scales), the slot's position and its float32 score."""
    cache = make(**policy).init_cache(B, T)
    slots = policy.get("kv_sinks", 0) + policy["kv_heavy"] + policy["kv_window"]
    assert cache.k.shape[1] == slots
    assert cache.stored_bytes() == B * slots * HKV * per_slot_head


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
    (lambda: make(kv_heavy=4), "kv_heavy: .* set kv_window"),
    (lambda: make(kv_heavy=-1, kv_window=4), r"kv_heavy must be an integer >= 0"),
    (lambda: make(kv_heavy=2.5, kv_window=4), r"kv_heavy must be an integer >= 0"),
    (lambda: make(kv_important=1.5), r"kv_important must be a number in \(0, 1\]"),
    (lambda: make(kv_important=-0.1), r"kv_important must be a number in \(0, 1\]"),
    (lambda: make(kv_important=True), r"kv_important must be a number in \(0, 1\]"),
    (lambda: make(kv_important=0.9, kv_window=8), "kv_important: .* eviction"),
    (lambda: make(kv_important=0.9, kv_heavy=2, kv_window=8), "kv_important: .* eviction"),
    (lambda: make(kv_important=0.9, kv_bits=4), "kv_bits: with kv_important"),
    (lambda: make(kv_important=0.9, kv_group=5), "kv_group must be even"),
    (lambda: mixers.create("sliding_window", d_model=D, num_heads=H, window=8, kv_important=0.9),
     "kv_important: the mixer attends to a window"),
    (lambda: mixers.create("sliding_window", d_model=D, num_heads=H, window=8, kv_heavy=2, kv_window=4),
     "kv_window: the mixer"),
    (lambda: mixers.create("mqsa", d_model=D, num_heads=H, kv_important=0.9),
     "kv_important: MultiQuerySelfAttention has a cache of its own"),
    (lambda: mixers.create("gpsa", d_model=D, num_heads=H, kv_heavy=2, kv_window=4),
     "kv_heavy: GatedPositionalAttention computes its own attention"),
    (lambda: mixers.create("softplus_attn", d_model=D, num_heads=H, kv_important=0.9),
     "kv_important: SoftplusAttention computes its own attention"),
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
    assert rows["H2O: 4 sinks + 124 heavy + window 128"][1:3] == ["1.000", "0.0e+00"]  # 18 tokens: nothing evicted
    share = float(rows["ZipVL τ=0.95: float32 / int4"][1])
    assert (32 + 2 * 4) / (64 * 4) < share < 1.0


# --- H2O: heavy hitters beside sinks and a window ---------------------------------------------------------------


def np_softmax(scores: np.ndarray) -> np.ndarray:
    p = np.exp(scores - scores.max())
    return p / p.sum()


def np_heavy_hitters(q, k, v, *, sinks, heavy, window):
    """H2O written per batch row b and key/value head g as sets of positions: every token t first pushes t - window
    out of the window (a non-sink joins the heavy hitters while there is room; else the lowest-scored of the heavy
    hitters and it is evicted), then its queries (the group's heads) attend over the kept positions and add their
    weights to the kept positions' scores. Returns (kept [T][B][HKV] sorted position lists after each token,
    o [B, T, H, d] each token's attention over what it kept, the smallest score gap an eviction decided on)."""
    group = H // HKV
    kept = [[[None] * HKV for _ in range(B)] for _ in range(T)]
    o, gaps = np.zeros(q.shape), [np.inf]
    for b in range(B):
        for g in range(HKV):
            hitters, score = set(), {}
            for t in range(T):
                leaving = t - window
                if leaving >= sinks and heavy:
                    hitters.add(leaving)
                    if len(hitters) > heavy:
                        lowest = min(hitters, key=lambda s: score[s])
                        others = [score[s] for s in hitters if s != lowest]
                        gaps.append(min(others) - score[lowest])
                        hitters.remove(lowest)
                now = sorted(set(range(min(sinks, t + 1))) | hitters | set(range(max(sinks, t - window + 1), t + 1)))
                kept[t][b][g] = now
                score[t] = 0.0
                for h in range(g * group, (g + 1) * group):
                    w = np_softmax(np.array([q[b, t, h] @ k[b, s, g] for s in now]) / np.sqrt(q.shape[-1]))
                    o[b, t, h] = w @ v[b, now, g]
                    for s, w_s in zip(now, w):
                        score[s] += w_s
    return kept, o, min(gaps)


def stepped(mixer, x, cache):
    """(y [B, T, D], the cache, slot positions [T, B, L, HKV] after each token) feeding x one token at a time."""

    def body(c, x_t):
        y_t, c = mixer.step(x_t, c)
        return c, (y_t, c.slot_positions)

    cache, (ys, positions) = jax.lax.scan(body, cache, jnp.swapaxes(x, 0, 1))
    return jnp.swapaxes(ys, 0, 1), cache, np.asarray(positions)


H2O_POLICIES = [dict(kv_heavy=4, kv_window=5, kv_sinks=2), dict(kv_heavy=3, kv_window=4),
                dict(kv_heavy=4, kv_window=5, kv_sinks=2, kv_bits=8)]


@pytest.mark.parametrize("policy", H2O_POLICIES, ids=[",".join(f"{k}={v}" for k, v in p.items()) for p in H2O_POLICIES])
def test_heavy_hitters_match_an_independent_simulation_of_the_eviction(policy):
    """Decoding equals dense attention over the positions the simulation keeps (with the stored keys and values);
    after every token the cache holds exactly the simulation's positions, the sinks in their slots, and never more
    than sinks + heavy + window; prefill of a prompt longer than the cache gives the token-by-token cache."""
    mixer = make(**policy)
    sinks, heavy, window = policy.get("kv_sinks", 0), policy["kv_heavy"], policy["kv_window"]
    bits = policy.get("kv_bits")
    x = jax.random.normal(jax.random.key(3), (B, T, D), jnp.float32)
    q, k = mixer.queries_keys(x, jnp.arange(T))
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, mixer.values(x)))
    if bits is not None:
        k, v = np_quantized(k, bits, 16), np_quantized(v, bits, 16)
    kept, o, gap = np_heavy_hitters(q, k, v, sinks=sinks, heavy=heavy, window=window)
    assert gap > 1e-4  # no eviction is decided by float rounding
    want = np.asarray(mixer.o_proj(jnp.asarray(o.reshape(B, T, -1), jnp.float32)))

    got = decoded(mixer, x)
    np.testing.assert_allclose(got[:, PROMPT:], want[:, PROMPT:], rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(got[:, :PROMPT], np.asarray(make()(x))[:, :PROMPT], rtol=2e-4, atol=2e-5)

    _, _, positions = stepped(mixer, x, mixer.init_cache(B, T))
    assert positions.shape[2] == sinks + heavy + window
    for t in range(T):
        for b in range(B):
            for g in range(HKV):
                slots = positions[t, b, :, g]
                assert sorted(slots[slots >= 0].tolist()) == kept[t][b][g], (t, b, g)
                assert len(kept[t][b][g]) == min(t + 1, sinks + heavy + window)
        pinned = min(sinks, t + 1)  # the sinks so far, each in its own slot
        np.testing.assert_array_equal(positions[t, :, :pinned],
                                      np.broadcast_to(np.arange(pinned)[:, None], (B, pinned, HKV)))

    _, prefilled = mixer.prefill(x[:, :PROMPT], mixer.init_cache(B, T))
    _, step_by_step, _ = stepped(mixer, x[:, :PROMPT], mixer.init_cache(B, T))
    np.testing.assert_array_equal(np.asarray(prefilled.slot_positions), np.asarray(step_by_step.slot_positions))
    np.testing.assert_allclose(np.asarray(prefilled.scores), np.asarray(step_by_step.scores), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(prefilled.k), np.asarray(step_by_step.k), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(prefilled.v), np.asarray(step_by_step.v), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("length", [11, 9])
def test_heavy_hitters_under_budget_keep_every_position(length):
    """max_len <= sinks + heavy + window = 11 evicts nothing (11: a heavy-hitter cache that never evicts; 9: the
    plain cache): decoding is exact attention."""
    mixer = make(kv_heavy=4, kv_window=5, kv_sinks=2)
    x = jax.random.normal(jax.random.key(4), (B, length, D), jnp.float32)
    cache = mixer.init_cache(B, length)
    assert type(cache).__name__ == ("HeavyHitterCache" if length == 11 else "CompressedKVCache")
    y_prompt, cache = mixer.prefill(x[:, :6], cache)
    y_steps, _ = steps(mixer, x[:, 6:], cache)
    got = np.concatenate([np.asarray(y_prompt), np.asarray(y_steps)], axis=1)
    np.testing.assert_allclose(got, np.asarray(make()(x)), rtol=2e-4, atol=2e-5)


# --- ZipVL: important tokens at high precision, the rest at int4 -------------------------------------------------


def np_important(mass: np.ndarray, count: np.ndarray, fraction: float) -> tuple[np.ndarray, float]:
    """ZipVL's rule on one row: p = the fewest tokens whose masses reach fraction · total, then the p tokens of
    highest mass / count. Returns (important [n] bool, the smallest gap a decision rested on: between the
    threshold and the prefix sums beside it, and between the last kept and first dropped normalised score)."""
    ordered = np.sort(mass)[::-1]
    cumulative = np.cumsum(ordered)
    target = fraction * mass.sum()
    p = int(np.argmax(cumulative >= target * (1 - 1e-12))) + 1
    gaps = [abs(cumulative[p - 1] - target)] + ([abs(target - cumulative[p - 2])] if p > 1 else [])
    normalised = np.where(count > 0, mass / np.maximum(count, 1), -np.inf)
    order = np.argsort(-normalised, kind="stable")
    if p < len(mass):
        gaps.append(normalised[order[p - 1]] - normalised[order[p]])
    important = np.zeros(len(mass), bool)
    important[order[:p]] = True
    return important, min(gaps)


def test_important_tokens_on_known_distributions():
    """The count is the size of the smallest set of tokens whose masses reach the fraction (brute force over every
    subset); the tokens are the highest normalised masses; a fraction of 1 keeps every token with mass."""
    mass = np.array([4.0, 1.0, 3.0, 2.0], np.float32)
    count = np.array([4, 1, 2, 1], np.int32)
    got = np.asarray(important_tokens(jnp.asarray(mass), jnp.asarray(count), 0.65))
    np.testing.assert_array_equal(got, [False, False, True, True])  # p = 2 (4 + 3 >= 6.5); normalised 1, 1, 1.5, 2
    got = np.asarray(important_tokens(jnp.asarray(mass), jnp.asarray(count), 0.75))
    np.testing.assert_array_equal(got, [True, False, True, True])  # p = 3 (4 + 3 < 7.5 <= 9)
    np.testing.assert_array_equal(np.asarray(important_tokens(jnp.asarray([2.0, 0.0, 1.0]), jnp.asarray([2, 2, 1]),
                                                              1.0)), [True, False, True])
    rng, checked = np.random.default_rng(0), 0
    masses = rng.dirichlet(np.full(6, 0.5), size=64).astype(np.float32)
    counts = rng.integers(1, 6, size=(64, 6)).astype(np.int32)
    for fraction in (0.5, 0.9, 0.95):
        got = np.asarray(important_tokens(jnp.asarray(masses), jnp.asarray(counts), fraction))
        for row in range(64):
            subsets = [s for r in range(1, 7) for s in itertools.combinations(range(6), r)]
            smallest = min(len(s) for s in subsets if masses[row, list(s)].sum() >= fraction * masses[row].sum())
            assert got[row].sum() == smallest
            want, gap = np_important(masses[row].astype(np.float64), counts[row], fraction)
            if gap > 1e-5:  # masses of 1 in total
                np.testing.assert_array_equal(got[row], want)
                checked += 1
    assert checked > 150


def np_prompt_mass(q: np.ndarray, k: np.ndarray) -> np.ndarray:
    """mass [B, HKV, PROMPT]: causal softmax weights of the prompt's queries summed over queries and each key/value
    head's query heads (float64)."""
    mass = np.zeros((B, HKV, PROMPT))
    for b in range(B):
        for h in range(H):
            for t in range(PROMPT):
                mass[b, h // (H // HKV), : t + 1] += np_softmax(q[b, t, h] @ k[b, : t + 1, h // (H // HKV)].T
                                                                / np.sqrt(q.shape[-1]))
    return mass


@pytest.mark.parametrize("fraction,bits", [(0.9, None), (0.95, 8), (0.6, None)])
def test_zipvl_marks_the_prompt_and_decodes_over_the_dequantised_cache(fraction, bits):
    """Prefill marks, per batch row and key/value head, the prompt tokens ZipVL's rule picks from the prompt's own
    attention (numpy); decoding is dense attention over every position with the keys and values stored at their
    precision (important and decoded tokens exact or int8, the others int4); the cache's bytes are each slot at its
    precision plus the mask, between the int4 and float32 sizes."""
    mixer = make(kv_important=fraction, kv_bits=bits)
    x = jax.random.normal(jax.random.key(5), (B, T, D), jnp.float32)
    q, k = mixer.queries_keys(x, jnp.arange(T))
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, mixer.values(x)))
    mass = np_prompt_mass(q, k)
    count = np.broadcast_to((H // HKV) * (PROMPT - np.arange(PROMPT)), mass.shape)
    got_mass, got_count = mixer.prompt_attention_mass(jnp.asarray(q[:, :PROMPT], jnp.float32),
                                                      jnp.asarray(k[:, :PROMPT], jnp.float32))
    np.testing.assert_allclose(np.asarray(got_mass), mass, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(got_count), count)

    _, cache = mixer.prefill(jnp.asarray(x[:, :PROMPT]), mixer.init_cache(B, T))
    important = np.ones((B, T, HKV), bool)
    for b in range(B):
        for g in range(HKV):
            important[b, :PROMPT, g], gap = np_important(mass[b, g], count[b, g], fraction)
            assert gap > 1e-5  # the rule's decisions are clear of float32 rounding (masses to ~1e-6)
    np.testing.assert_array_equal(np.asarray(cache.high), important)
    assert 0 < (~important).sum() and important[:, :PROMPT].sum() > 0

    high_k, high_v = (k, v) if bits is None else (np_quantized(k, 8, 16), np_quantized(v, 8, 16))
    stored_k = np.where(important[..., None], high_k, np_quantized(k, 4, 16))
    stored_v = np.where(important[..., None], high_v, np_quantized(v, 4, 16))
    o = np.zeros(q.shape)
    for t in range(PROMPT, T):
        for h in range(H):
            w = np.stack([np_softmax(q[b, t, h] @ stored_k[b, : t + 1, h // (H // HKV)].T / np.sqrt(q.shape[-1]))
                          for b in range(B)])
            o[:, t, h] = np.einsum("bs,bsd->bd", w, stored_v[:, : t + 1, h // (H // HKV)])
    want = np.asarray(mixer.o_proj(jnp.asarray(o.reshape(B, T, -1), jnp.float32)))
    got = decoded(mixer, x)
    np.testing.assert_allclose(got[:, PROMPT:], want[:, PROMPT:], rtol=2e-4, atol=2e-5)
    exact = np.asarray(make()(x))
    np.testing.assert_allclose(got[:, :PROMPT], exact[:, :PROMPT], rtol=2e-4, atol=2e-5)
    assert np.abs(got[:, PROMPT:] - exact[:, PROMPT:]).max() > 1e-4

    high = 2 * 16 * 4 if bits is None else 2 * (16 + 4)  # head_dim 16, one scale per group of 16
    low = 2 * (8 + 4)
    n_high = int(important.sum())
    assert cache.stored_bytes() == n_high * high + (important.size - n_high) * low + important.size
    assert B * T * HKV * low < cache.stored_bytes() < B * T * HKV * 2 * 16 * 4
