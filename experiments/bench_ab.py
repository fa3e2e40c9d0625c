"""Forward+backward time of chunked ops at two git revisions, alternating fresh processes.

    python experiments/bench_ab.py --base=776b3b9 --ops=gla,delta_rule --lengths=8192 --rounds=2

This machine's speed drifts by 10-40% over minutes, so a table from one run cannot be compared with one from
another. Here the base revision (checked out into a temporary git worktree) and the working tree run one after the
other, ``rounds`` times per (op, T); each process reports the best of 5 timed calls of the jitted gradient, as
``bench_ops.py`` does. Prints one line per (op, T) with every process's milliseconds.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_ONE_TIMING = r"""
import sys
import jax, jax.numpy as jnp
sys.path.insert(0, "experiments")
import bench_ops
from seqlab import host_memory
host_memory.retain_freed_memory()
op, length = sys.argv[1], int(sys.argv[2])
args = bench_ops.make_inputs(op, length, 8, 64)
fn = bench_ops.op_fn(op, "chunked")
grad = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a) * a[2]), argnums=tuple(range(len(args)))))
print(bench_ops._time(grad, args, 5) * 1e3)
"""


def _time_in(root: str, op: str, length: int) -> float:
    env = {**os.environ, "PYTHONPATH": root}
    out = subprocess.run([sys.executable, "-c", _ONE_TIMING, op, str(length)], cwd=root, env=env,
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="git revision to compare the working tree with")
    parser.add_argument("--ops", default="simple_gla,gla")
    parser.add_argument("--lengths", default="8192")
    parser.add_argument("--rounds", type=int, default=2)
    flags = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        base = os.path.join(scratch, "base")
        subprocess.run(["git", "worktree", "add", "--detach", "-q", base, flags.base], cwd=ROOT, check=True)
        try:
            for op in flags.ops.split(","):
                for length in (int(t) for t in flags.lengths.split(",")):
                    times = {"base": [], "working tree": []}
                    for _ in range(flags.rounds):
                        times["base"].append(_time_in(base, op, length))
                        times["working tree"].append(_time_in(ROOT, op, length))
                    shown = "; ".join(f"{name} {', '.join(f'{t:,.0f}' for t in ts)} ms" for name, ts in times.items())
                    print(f"{op} T={length}: {shown}", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", base], cwd=ROOT, check=True)


if __name__ == "__main__":
    main()
