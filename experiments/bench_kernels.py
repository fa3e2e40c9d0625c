"""Time the Pallas kernels against the XLA chunked path, cuDNN attention and flash-linear-attention.

    python experiments/bench_kernels.py                   # on a GPU: B=4, H=16, D=128 and 64, bf16, T = 1k .. 32k
    python experiments/bench_kernels.py --tiny            # any machine: a tiny size (CPU runs the kernels interpreted)

First, on the device itself, each op's Pallas kernels are checked against its XLA chunked path in float32 (B=1,
H=2, T=300, D=64 (16 with --tiny): relative error of o and of every gradient). Then, for each op and
implementation, forward and forward+backward milliseconds (best of --repeats) and tokens/s:
  pallas      seqlab.ops.<op>(impl="pallas")
  chunked     seqlab.ops.<op>(impl="chunked") (the XLA path)
  cudnn       jax.nn.dot_product_attention(implementation="cudnn") (softmax only; GPU only)
  fla         flash-linear-attention's chunk kernels (PyTorch/Triton), when ``fla`` and a CUDA torch import
Inputs come from bench_ops.make_inputs (float32; q, k, v cast to --dtype). Linear ops use K = V = D; softmax is
causal. The loss is sum(o ⊙ v), so fwd+bwd includes every input's gradient. A last table gives the targets: fwd+bwd time of flash-linear-attention (linear ops) or cuDNN (softmax) over the
Pallas kernels' (issue 6: >= 1 for gla, simple_gla, delta_rule; >= 0.8 for softmax_attn).
"""

from __future__ import annotations

import argparse
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from bench_ops import best_seconds, make_inputs
from seqlab import ops

OPS = ("simple_gla", "gla", "delta_rule", "softmax_attn")
IMPLS = ("pallas", "chunked", "cudnn", "fla")
FLA_FUNCTIONS = {"simple_gla": "fla.ops.simple_gla.chunk_simple_gla", "gla": "fla.ops.gla.chunk_gla",
                 "delta_rule": "fla.ops.delta_rule.chunk_delta_rule"}


def jax_fn(op: str, impl: str) -> Callable | None:
    """o = f(q, k, v, *gates) for a JAX implementation, or None where it does not apply."""
    if impl == "cudnn":
        if op != "softmax_attn" or jax.default_backend() != "gpu":
            return None
        return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    if op == "softmax_attn":
        return lambda q, k, v: ops.softmax_attn(q, k, v, impl=impl)
    fn = getattr(ops, op)
    return lambda *args: fn(*args, impl=impl)[0]


def time_jax(fn: Callable, inputs: tuple[jax.Array, ...], dtype, repeats: int) -> tuple[float, float]:
    """Best forward and forward+backward seconds; q, k, v in ``dtype``, gates float32."""
    args = tuple(jnp.asarray(x, dtype if i < 3 else jnp.float32) for i, x in enumerate(inputs))
    forward = jax.jit(fn)
    loss = lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * a[2].astype(jnp.float32))  # noqa: E731
    backward = jax.jit(jax.grad(loss, argnums=tuple(range(len(args)))))
    return best_seconds(lambda: jax.block_until_ready(forward(*args)), repeats), \
        best_seconds(lambda: jax.block_until_ready(backward(*args)), repeats)


def time_fla(op: str, inputs: tuple[jax.Array, ...], repeats: int) -> tuple[float, float] | None:
    """flash-linear-attention's chunk kernel for ``op`` on CUDA in bf16, or None when it cannot run here."""
    if op not in FLA_FUNCTIONS:
        return None
    try:
        import importlib

        import torch

        module, name = FLA_FUNCTIONS[op].rsplit(".", 1)
        kernel = getattr(importlib.import_module(module), name)
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    tensors = [torch.tensor(np.asarray(x), device="cuda", dtype=torch.bfloat16 if i < 3 else torch.float32) for i, x in enumerate(inputs)]
    for t in tensors:
        t.requires_grad_(True)

    def forward():
        with torch.no_grad():
            kernel(*tensors)
        torch.cuda.synchronize()

    def forward_backward():
        o = kernel(*tensors)[0]
        (o.float() * tensors[2].float()).sum().backward()
        torch.cuda.synchronize()

    return best_seconds(forward, repeats), best_seconds(forward_backward, repeats)


TARGETS = {"simple_gla": ("fla", 1.0), "gla": ("fla", 1.0), "delta_rule": ("fla", 1.0), "softmax_attn": ("cudnn", 0.8)}


def relative_error(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def check_against_xla(op: str, dim: int, length: int = 300) -> list[float]:
    """Relative errors of the Pallas kernels against the XLA chunked path, float32: [o, d input 1, ...]."""
    inputs = make_inputs(op, length, 2, dim)
    results = []
    for impl in ("pallas", "chunked"):
        fn = jax_fn(op, impl)
        loss = lambda *a: jnp.sum(fn(*a) * a[2])  # noqa: E731
        with jax.default_matmul_precision("highest"):  # no TF32 on either side
            grads = jax.jit(jax.grad(loss, argnums=tuple(range(len(inputs)))))(*inputs)
            results.append((jax.jit(fn)(*inputs),) + tuple(grads))
    return [relative_error(p, x) for p, x in zip(*results)]


def target_ratios(table: list[tuple]) -> list[tuple[str, int, int, str, float, float]]:
    """(op, D, T, reference impl, reference fwd+bwd / Pallas fwd+bwd, target) where both were measured."""
    times = {(op, impl, dim, length): fwdbwd for op, impl, dim, length, _, fwdbwd in table}
    ratios = []
    for (op, impl, dim, length), pallas in times.items():
        reference, target = TARGETS[op]
        if impl == "pallas" and (op, reference, dim, length) in times:
            ratios.append((op, dim, length, reference, times[(op, reference, dim, length)] / pallas, target))
    return ratios


def rows(ops_: list[str], impls: list[str], dims: list[int], lengths: list[int], batch: int, heads: int,
         dtype, repeats: int):
    """Yields (op, impl, D, T, fwd s, fwd+bwd s) for every combination that runs here."""
    for dim in dims:
        for op in ops_:
            for length in lengths:
                inputs = make_inputs(op, length, heads, dim, batch)
                for impl in impls:
                    if impl == "fla":
                        times = time_fla(op, inputs, repeats)
                    else:
                        fn = jax_fn(op, impl)
                        times = None if fn is None else time_jax(fn, inputs, dtype, repeats)
                    if times is not None:
                        yield op, impl, dim, length, *times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", default=",".join(OPS))
    parser.add_argument("--impls", default=",".join(IMPLS))
    parser.add_argument("--dims", default="128,64")
    parser.add_argument("--lengths", default="1024,2048,4096,8192,16384,32768")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tiny", action="store_true", help="B=1, H=2, D=16, T=64, 1 repeat: checks the script anywhere")
    args = parser.parse_args(argv)
    if args.tiny:
        args.batch, args.heads, args.dims, args.lengths, args.repeats = 1, 2, "16", "64", 1
    for name in args.ops.split(","):
        if name not in OPS:
            raise ValueError(f"--ops: unknown op {name!r}; known: {OPS}")
    for name in args.impls.split(","):
        if name not in IMPLS:
            raise ValueError(f"--impls: unknown implementation {name!r}; known: {IMPLS}")
    device = jax.devices()[0]
    dims = [int(d) for d in args.dims.split(",")]
    print(f"jax {jax.__version__} on {device.platform}: {device.device_kind}; B={args.batch} H={args.heads} {args.dtype}")
    print("| check: Pallas vs XLA chunked, float32 | relative error of o, then of each input's gradient |")
    print("|---|---|")
    for op in args.ops.split(","):
        errors = check_against_xla(op, 16 if args.tiny else 64, 40 if args.tiny else 300)
        print(f"| {op} | {', '.join(f'{e:.1e}' for e in errors)} |", flush=True)
    print("\n| op | impl | D | T | fwd ms | fwd+bwd ms | tokens/s (fwd+bwd) |")
    print("|---|---|---|---|---|---|---|")
    table = []
    for row in rows(args.ops.split(","), args.impls.split(","), dims, [int(t) for t in args.lengths.split(",")],
                    args.batch, args.heads, jnp.dtype(args.dtype), args.repeats):
        op, impl, dim, length, fwd, fwdbwd = row
        table.append(row)
        tokens = args.batch * length / fwdbwd
        print(f"| {op} | {impl} | {dim} | {length} | {1e3 * fwd:.2f} | {1e3 * fwdbwd:.2f} | {tokens:,.0f} |", flush=True)
    print("\n| op | D | T | reference | reference / Pallas (fwd+bwd) | target | met |")
    print("|---|---|---|---|---|---|---|")
    for op, dim, length, reference, ratio, target in target_ratios(table):
        print(f"| {op} | {dim} | {length} | {reference} | {ratio:.2f} | >= {target} | {'yes' if ratio >= target else 'no'} |")


if __name__ == "__main__":
    main()
