"""MQAR accuracy of every mixer on one shared CPU-sized config (configs/mqar.py), with each model's decode-state
size in bytes (the Zoology / Based recall-versus-state plot, on a CPU budget).

    python experiments/mqar_sweep.py                                   # all variants, configs/mqar.py's steps
    python experiments/mqar_sweep.py --variants=softmax,gla --steps=300 --workdir=/tmp/sweep
    python experiments/mqar_sweep.py --set=data.mqar.seq_len=128 --set=data.mqar.num_kv_pairs=16 --set=model.d_model=64

State bytes = every array of the model's decode cache for one sequence of the task's length (float32 states, the
KV cache of softmax layers, the ring buffer of sliding windows, short-conv buffers), position counters excluded.
Prints a markdown table: variant | layer mixers | state bytes | test accuracy | test loss | train s.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
import tempfile
import time

import jax
from flax import nnx

from seqlab import config as config_lib, models
from seqlab.train import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "mqar.py")


def load_mqar_module():
    return config_lib.load_config_module(CONFIG)


def state_bytes(config) -> int:
    """Bytes of the decode cache of one sequence of the task's length (position counters excluded)."""
    task = config_lib.validate(config)
    model = nnx.eval_shape(lambda: models.build_model(config, task, nnx.Rngs(0)))
    cache = jax.eval_shape(lambda: model.init_cache(1, task.seq_len))
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache) if x.ndim > 0)


def apply_overrides(config, overrides: list[str]) -> None:
    """Each "a.b.c=value" sets config.a.b.c to the Python literal value (or the string if it is not one)."""
    for item in overrides:
        path, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"--set: expected key=value, got {item!r}")
        *parents, key = path.split(".")
        section = config
        for name in parents:
            section = section[name]
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        section[key] = value


def run_variant(variant: str, steps: int | None, overrides: list[str], workdir: str) -> dict:
    config = load_mqar_module().get_config(variant)
    apply_overrides(config, overrides)
    if steps is not None:
        config.train.steps = steps
        config.train.eval_every = config.train.checkpoint_every = steps
        config.optim.warmup_steps = min(config.optim.warmup_steps, steps // 10)
    start = time.perf_counter()
    result = train_and_evaluate(config, os.path.join(workdir, variant))
    return {"variant": variant, "mixers": "+".join(config.model.mixers), "state_bytes": state_bytes(config),
            "seconds": time.perf_counter() - start, **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(load_mqar_module().VARIANTS))
    parser.add_argument("--steps", type=int, default=None, help="override train.steps (default: the config's)")
    parser.add_argument("--set", action="append", default=[], help="a config override key=value (repeatable)")
    parser.add_argument("--workdir", default=None, help="where the runs go (default: a temporary directory)")
    args = parser.parse_args()
    workdir = args.workdir or tempfile.mkdtemp(prefix="mqar_sweep_")
    rows = [run_variant(v, args.steps, args.set, workdir) for v in args.variants.split(",")]
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; workdirs under {workdir}", file=sys.stderr)
    print(f"overrides: {' '.join(args.set) or 'none'}; steps: {args.steps or 'the config default'}")
    print("| variant | layer mixers | state bytes | test accuracy | test loss | train s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['mixers']} | {r['state_bytes']:,} | {r['eval_accuracy']:.3f} | "
              f"{r['eval_loss']:.3f} | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
