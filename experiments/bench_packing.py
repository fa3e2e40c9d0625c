"""Training throughput on packed rows (whole files, each document mixed alone) against unpacked windows, same T.

Packing adds a document mask to softmax attention, state restarts to the linear-state engine and segment-aware
short convolutions; this measures what that costs in a real bytes run, and how much of a packed row is padding.

    python experiments/bench_packing.py                              # the table in BENCHMARKS.md
    python experiments/bench_packing.py --mixers=gla --steps=20      # a smoke run

For each mixer: `configs/bytes.py:<mixer>` (d_model 256, 4 layers, T = 256, batch 16, the stdlib corpus) trained
for --steps steps with data.bytes.pack=False and True. Columns:
  tokens/s         batch x T per second of the steps' own time (seqlab.train's "tokens_per_s"), the median of the
                   logged windows after the first (which holds the compilation)
  real tokens/s    tokens/s times the fraction of non-padding tokens of the packed rows (1 when unpacked)
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile

import numpy as np

from seqlab import config as config_lib, data
from seqlab.train import train_and_evaluate
from seqlab.training import load_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def filled_fraction(config, batches: int = 200) -> float:
    """The fraction of a packed training row's tokens that are not padding, over `batches` batches."""
    task = config_lib.make_task(config)
    iterator = data.make_iterator(task, "train", batch_size=config.train.batch_size, seed=config.seed)
    return float(np.mean([np.mean(next(iterator)["segment_ids"] != 0) for _ in range(batches)]))


def tokens_per_s(config, workdir: str) -> float:
    train_and_evaluate(config, workdir)
    records = [r["tokens_per_s"] for r in load_metrics(workdir, split="train") if "tokens_per_s" in r]
    return statistics.median(records[1:] or records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mixers", default="softmax,gla,deltanet,mamba2")
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    rows = [f"{'mixer':<10} {'pack':<6} {'tokens/s':>10} {'filled':>7} {'real tokens/s':>14}"]
    for mixer in args.mixers.split(","):
        for pack in (False, True):
            config = config_lib.load_config(os.path.join(ROOT, "configs", "bytes.py") + f":{mixer}")
            config.data.bytes.pack = pack
            config.train.update(steps=args.steps, log_every=10, eval_every=args.steps, checkpoint_every=args.steps)
            config.data.bytes.num_eval = 16
            with tempfile.TemporaryDirectory() as workdir:
                speed = tokens_per_s(config, workdir)
            filled = filled_fraction(config) if pack else 1.0
            rows.append(f"{mixer:<10} {str(pack):<6} {speed:>10,.0f} {filled:>7.3f} {speed * filled:>14,.0f}")
    print("\n".join(rows))  # after the runs' own logs


if __name__ == "__main__":
    main()
