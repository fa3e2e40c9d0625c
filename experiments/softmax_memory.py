"""Long-context softmax attention memory: chunked softmax_attn against jax.nn.dot_product_attention, fwd+bwd.

    python experiments/softmax_memory.py                    # T = 32k, B = 1, H = 8, D = 64 (issue 2's target)
    python experiments/softmax_memory.py --length=8192 --skip_run

Both gradients are compiled and XLA's buffer assignment is read (compiled.memory_analysis(): temporary bytes);
then the chunked one is run once and the process's peak resident memory is reported. The XLA path is only
compiled: at 32k its T x T score matrices alone need far more memory than this machine has.
"""

from __future__ import annotations

import argparse
import resource
import time

import jax
import jax.numpy as jnp

from bench_ops import make_inputs
from seqlab import host_memory, ops


def gradient(attention):
    return jax.jit(jax.grad(lambda q, k, v: jnp.sum(attention(q, k, v) * v), argnums=(0, 1, 2)))


def main() -> None:
    host_memory.retain_freed_memory()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=32768)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--skip_run", action="store_true", help="only compile")
    args = parser.parse_args()
    q, k, v = make_inputs("softmax_attn", args.length, args.heads, args.dim)[:3]
    chunked = gradient(lambda q, k, v: ops.softmax_attn(q, k, v))
    xla = gradient(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True))
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; T={args.length} B=1 H={args.heads} D={args.dim}")
    for name, fn in (("chunked softmax_attn", chunked), ("jax.nn.dot_product_attention", xla)):
        temp = fn.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes
        print(f"{name}: fwd+bwd compiled temporary memory {temp / 2**30:.2f} GiB", flush=True)
    if args.skip_run:
        return
    start = time.perf_counter()
    jax.block_until_ready(chunked(q, k, v))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"chunked softmax_attn fwd+bwd ran in {time.perf_counter() - start:.0f} s (incl. compile); "
          f"peak resident memory of the process {peak:.2f} GiB")


if __name__ == "__main__":
    main()
