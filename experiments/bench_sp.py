"""Sequence parallelism at long context: per-device memory and collective bytes of one layer's op, compiled only.

    python experiments/bench_sp.py                                   # T = 8k .. 1M tokens over 8 simulated devices
    python experiments/bench_sp.py --lengths=8192,32768 --ops=softmax_ring

Each op runs on a sequence split over a mesh axis of --devices host devices (the script sets
XLA_FLAGS=--xla_force_host_platform_device_count itself), B=1, H=8, D=64, float32: LASP-2 ("LASP-2: Rethinking
Sequence Parallelism for Linear Attention and Its Hybrid") for ops.simple_gla and ops.gla (chunked), and causal
softmax attention exchanging K/V by all-gather (LASP-2H) or around a ring ("Ring Attention with Blockwise
Transformers for Near-Infinite Context"). The forward+backward program (jax.grad) is lowered and compiled, never
run: memory is XLA's per-device buffer assignment (compiled.memory_analysis(): temp + arguments + outputs) and
communication is seqlab.parallel.collective_bytes of the optimized HLO (per-device result bytes of every
collective, loops counted per iteration). FLOPs follow experiments/bench_ops.py (fwd+bwd = 3x fwd), per device.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="8192,32768,131072,524288,1048576")
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--ops", default="lasp2_simple_gla,lasp2_gla,softmax_allgather,softmax_ring")
    return parser


# The device count must be in the environment before jax starts its CPU backend. Compiling without LLVM
# optimisation is much faster and does not change XLA's buffer assignment or its collectives.
os.environ["XLA_FLAGS"] = (
    f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count="
    f"{_parser().parse_known_args(sys.argv[1:])[0].devices} --xla_backend_optimization_level=0"
).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from bench_ops import forward_flops  # noqa: E402
from jax.sharding import Mesh, PartitionSpec  # noqa: E402

from seqlab import ops  # noqa: E402
from seqlab.parallel import collective_bytes  # noqa: E402

HEADS, DIM = 8, 64
NVLINK_GBS, INTER_NODE_GBS = 450.0, 25.0  # NVLink 4 per direction per GPU; one 200 Gb/s inter-node link
ASSUMED_TFLOPS = 400.0  # sustained per GPU (H100 SXM dense bf16 peak: 989)

OPS = {  # name: (op on one device's segment, gate shape, the FLOP formula's op in bench_ops)
    "lasp2_simple_gla": (lambda q, k, v, g: ops.simple_gla(q, k, v, g, sequence_axis="seq")[0], "BTH", "simple_gla"),
    "lasp2_gla": (lambda q, k, v, g: ops.gla(q, k, v, g, sequence_axis="seq")[0], "BTHD", "gla"),
    "softmax_allgather": (lambda q, k, v: ops.softmax_attn(q, k, v, sequence_axis="seq"), None, "softmax_attn"),
    "softmax_ring": (
        lambda q, k, v: ops.softmax_attn(q, k, v, sequence_axis="seq", sequence_parallel="ring"), None,
        "softmax_attn",
    ),
}


def compile_step(name: str, length: int, devices: int):
    """The compiled forward+backward of op ``name`` on inputs [1, length, HEADS, DIM] split over ``devices``."""
    fn, gate, _ = OPS[name]
    shapes = [(1, length, HEADS, DIM)] * 3 + ([] if gate is None else [(1, length, HEADS, DIM)[: len(gate)]])
    seq = PartitionSpec(None, "seq")
    mesh = Mesh(np.array(jax.devices()[:devices]), ("seq",))
    sharded = jax.shard_map(fn, mesh=mesh, in_specs=(seq,) * len(shapes), out_specs=seq)
    step = jax.grad(lambda *a: jnp.sum(sharded(*a)), argnums=tuple(range(len(shapes))))
    return jax.jit(step).lower(*(jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes)).compile()


def measure(name: str, length: int, devices: int) -> dict:
    start = time.perf_counter()
    compiled = compile_step(name, length, devices)
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    traffic = {kind: n for kind, n in collective_bytes(compiled.as_text()).items() if n}
    return {
        "temp": memory.temp_size_in_bytes, "io": memory.argument_size_in_bytes + memory.output_size_in_bytes,
        "traffic": traffic, "bytes": sum(traffic.values()), "compile_s": seconds,
        "flops": 3 * forward_flops(OPS[name][2], length, HEADS, DIM) / devices,
    }


GIB, MIB = 2.0**30, 2.0**20


def print_table(rows: list[tuple[str, int, dict]], devices: int) -> None:
    print("| op | T | T/device | temp GiB | args+outputs GiB | total GiB/device | collective MiB/layer step "
          "| kinds (MiB) | compile s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, length, r in rows:
        kinds = ", ".join(f"{kind} {n / MIB:,.1f}" for kind, n in r["traffic"].items())
        print(f"| {name} | {length:,} | {length // devices:,} | {r['temp'] / GIB:,.2f} | {r['io'] / GIB:,.2f} | "
              f"{(r['temp'] + r['io']) / GIB:,.2f} | {r['bytes'] / MIB:,.1f} | {kinds} | {r['compile_s']:.1f} |")


def print_implication(rows: list[tuple[str, int, dict]]) -> None:
    print(f"\nMulti-GPU implication, per layer per training step (forward+backward) and per device: the collective "
          f"bytes at NVLink 4 ({NVLINK_GBS:.0f} GB/s per direction) and at an inter-node link ({INTER_NODE_GBS:.0f} "
          f"GB/s), next to the layer's FLOPs at an assumed {ASSUMED_TFLOPS:.0f} TFLOP/s sustained. Bytes are float32 "
          f"(bf16 activations halve them) and count each collective's whole result, own shard included. FLOPs are "
          f"the per-device average: with contiguous segments the causal mask gives the last device about "
          f"2P/(P+1) times the average in both softmax modes.\n")
    print("| op | T | collective MiB | ms @ NVLink | ms @ inter-node | GFLOP/device | compute ms |")
    print("|---|---|---|---|---|---|---|")
    for name, length, r in rows:
        print(f"| {name} | {length:,} | {r['bytes'] / MIB:,.1f} | {1e3 * r['bytes'] / (NVLINK_GBS * 1e9):,.3f} | "
              f"{1e3 * r['bytes'] / (INTER_NODE_GBS * 1e9):,.2f} | {r['flops'] / 1e9:,.1f} | "
              f"{1e3 * r['flops'] / (ASSUMED_TFLOPS * 1e12):,.3f} |")


def main() -> None:
    args = _parser().parse_args()
    names = args.ops.split(",")
    unknown = sorted(set(names) - set(OPS))
    if unknown:
        raise SystemExit(f"--ops: unknown {unknown}; allowed: {sorted(OPS)}")
    print(f"jax {jax.__version__}, {args.devices} simulated {jax.devices()[0].platform} devices on one mesh axis; "
          f"B=1 H={HEADS} D={DIM} float32; compiled, not run")
    rows = []
    for name in names:
        for length in map(int, args.lengths.split(",")):
            rows.append((name, length, measure(name, length, args.devices)))
            print(f"compiled {name} T={length:,} in {rows[-1][2]['compile_s']:.1f} s", file=sys.stderr, flush=True)
    print_table(rows, args.devices)
    print_implication(rows)


if __name__ == "__main__":
    main()
