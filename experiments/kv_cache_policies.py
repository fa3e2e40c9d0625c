"""Softmax attention's KV-cache policies: cache bytes per token and how far decoding moves from the exact cache.

    python experiments/kv_cache_policies.py
    python experiments/kv_cache_policies.py --d_model=512 --num_heads=8 --num_kv_heads=2 --prompt=512 --decode=512

One softmax layer (random weights, RoPE, GQA) reads a random prompt and decodes `--decode` more tokens of random
input under each policy (`seqlab.mixers.softmax.softmax_attention`: kv_bits, kv_group, kv_sinks, kv_window). For
each policy the table gives the cache's bytes for the whole sequence (keys, values, scales), and their share of
the exact float32 cache's; the relative error of the decoded outputs against decoding with the exact cache,
‖y − y_exact‖ / ‖y_exact‖ over the decoded tokens; and the decode time per token (a jitted scan, best of 3).
Random weights attend almost uniformly, so the eviction rows' errors say how much of the keys' mass is dropped,
not how a trained model (whose attention StreamingLLM finds concentrated on sinks and recent tokens) would fare.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from seqlab import host_memory, mixers

POLICIES = {
    "exact (float32)": {},
    "int8, groups of 32": dict(kv_bits=8, kv_group=32),
    "int4, groups of 32": dict(kv_bits=4, kv_group=32),
    "int4, groups of 16": dict(kv_bits=4, kv_group=16),
    "4 sinks + window 256": dict(kv_sinks=4, kv_window=256),
    "4 sinks + window 256, int8": dict(kv_sinks=4, kv_window=256, kv_bits=8),
}


def decode(mixer: mixers.Mixer, x: jax.Array, prompt: int) -> tuple[jax.Array, object, float]:
    """(decoded outputs [B, T - prompt, D], the cache after the prompt, seconds per decoded token)."""
    _, cache = mixer.prefill(x[:, :prompt], mixer.init_cache(x.shape[0], x.shape[1]))

    @jax.jit
    def run(cache, xs):
        def body(c, x_t):
            y_t, c = mixer.step(x_t, c)
            return c, y_t

        return jax.lax.scan(body, cache, jnp.swapaxes(xs, 0, 1))[1]

    tail = x[:, prompt:]
    ys = jax.block_until_ready(run(cache, tail))
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        jax.block_until_ready(run(cache, tail))
        best = min(best, time.perf_counter() - start)
    return jnp.swapaxes(ys, 0, 1), cache, best / tail.shape[1]


def cache_bytes(cache) -> int:
    """Bytes of the keys, values and scales (the per-slot arrays; positions and counters left out)."""
    return sum(leaf.nbytes for leaf in jax.tree.leaves(cache) if leaf.ndim == 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d_model", type=int, default=512)
    parser.add_argument("--num_heads", type=int, default=8)
    parser.add_argument("--num_kv_heads", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--decode", type=int, default=512)
    a = parser.parse_args()
    host_memory.retain_freed_memory()
    x = jax.random.normal(jax.random.key(0), (1, a.prompt + a.decode, a.d_model), jnp.float32)
    head_dim = a.d_model // a.num_heads
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; d_model {a.d_model}, {a.num_heads} heads, "
          f"{a.num_kv_heads} key/value heads of {head_dim}; prompt {a.prompt}, {a.decode} decoded tokens")
    print("| policy | cache bytes | share of exact | decoded-output error | decode ms/token |")
    print("|---|---|---|---|---|")
    exact = None
    for name, policy in POLICIES.items():
        mixer = mixers.create("softmax", d_model=a.d_model, num_heads=a.num_heads, num_kv_heads=a.num_kv_heads,
                              **policy)
        ys, cache, seconds = decode(mixer, x, a.prompt)
        size = cache_bytes(cache)
        if exact is None:
            exact, exact_size = ys, size
        error = float(jnp.linalg.norm(ys - exact) / jnp.linalg.norm(exact))
        print(f"| {name} | {size:,} | {size / exact_size:.3f} | {error:.1e} | {1e3 * seconds:.3f} |", flush=True)


if __name__ == "__main__":
    main()
