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
import os
import sys
import tempfile
import time

import jax

from seqlab import config as config_lib, sweep
from seqlab.train import train_and_evaluate
from seqlab.training.summary import model_summary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "mqar.py")


def load_mqar_module():
    return config_lib.load_config_module(CONFIG)


def run_variant(variant: str, steps: int | None, overrides: list[str], workdir: str) -> dict:
    config = load_mqar_module().get_config(variant)
    sweep.apply_overrides(config, dict(sweep.parse_assignment(text, "set") for text in overrides))
    if steps is not None:
        config.train.steps = steps
        config.train.eval_every = config.train.checkpoint_every = steps
        config.optim.warmup_steps = min(config.optim.warmup_steps, steps // 10)
    start = time.perf_counter()
    result = train_and_evaluate(config, os.path.join(workdir, variant))
    return {"variant": variant, "mixers": "+".join(config.model.mixers), "state_bytes": model_summary(config).decode_state_bytes,
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
