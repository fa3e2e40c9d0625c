"""Linearize a small softmax model trained on the `bytes` task: the teacher's, the swapped (before any training)
and the linearized model's validation loss for each target family (see `seqlab.linearize`).

    python experiments/linearize_bytes.py                                  # train the teacher, then all targets
    python experiments/linearize_bytes.py --workdir=/tmp/teacher --targets=lolcats --transfer_steps=500
    python experiments/linearize_bytes.py --tiny                           # seconds; what the tests run

The teacher is configs/bytes.py:softmax shrunk to a CPU budget (--d_model, --num_layers, --seq_len,
--teacher_steps); an existing run in --workdir is reused. Prints a markdown table: target | teacher | swapped |
after transfer | after LoRA (validation cross-entropy, nats per byte) and the trainable parameter counts.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
from flax import nnx

from seqlab import config as config_lib, linearize
from seqlab.data import make_iterator
from seqlab.train import train_and_evaluate
from seqlab.training import restore_model
from seqlab.training.checkpoints import Checkpoints

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET_ARGS = {"hedgehog": {}, "lolcats": {"window": 32, "kind": "sw"}, "liger": {"window": 32}}


def teacher_config(args: argparse.Namespace):
    config = config_lib.load_config(os.path.join(ROOT, "configs", "bytes.py") + (":softmax,tiny" if args.tiny else ":softmax"))
    config.data.bytes.pack = False  # windows of the byte stream (the runs in BENCHMARKS.md)
    if not args.tiny:
        config.data.bytes.seq_len = args.seq_len
        config.model.update(d_model=args.d_model, num_layers=args.num_layers, num_heads=args.num_heads)
        config.train.update(steps=args.teacher_steps, eval_every=args.teacher_steps, checkpoint_every=args.teacher_steps)
        config.optim.warmup_steps = min(config.optim.warmup_steps, args.teacher_steps // 10)
    return config


def trained_teacher(args: argparse.Namespace):
    if Checkpoints(args.workdir, keep=1).latest_step() is None:
        train_and_evaluate(teacher_config(args), args.workdir)
    return restore_model(args.workdir)


def count(model: nnx.Module, wrt) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, wrt)))


def linearize_one(teacher, task, config, target: str, args: argparse.Namespace) -> dict:
    kwargs = dict(TARGET_ARGS[target])
    if args.tiny and "window" in kwargs:
        kwargs["window"] = 8
    student = nnx.clone(teacher)
    layers = linearize.swap_attention(student, target, rngs=nnx.Rngs(1), **kwargs)
    row = {"target": target, "swapped": linearize.evaluate_lm(student, task), "transfer_params": 0}
    batches = make_iterator(task, "train", batch_size=config.train.batch_size, seed=args.seed)
    start = time.perf_counter()
    if target in linearize.TRANSFER_TARGETS:
        row["transfer_params"] = count(student, linearize.transfer_parameters(target))
        linearize.attention_transfer(student, teacher, batches, target=target, steps=args.transfer_steps,
                                     learning_rate=args.transfer_lr)
        row["transferred"] = linearize.evaluate_lm(student, task)
    linearize.add_lora(student, layers, rngs=nnx.Rngs(2), rank=args.lora_rank, alpha=2.0 * args.lora_rank)
    row["lora_params"] = count(student, nnx.LoRAParam)
    linearize.finetune_lora(student, batches, steps=args.lora_steps, learning_rate=args.lora_lr)
    row["linearized"] = linearize.evaluate_lm(student, task)
    row["seconds"] = time.perf_counter() - start
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=None, help="teacher run directory (default: a temporary one)")
    parser.add_argument("--targets", default=",".join(linearize.TARGETS))
    parser.add_argument("--d_model", type=int, default=128)
    parser.add_argument("--num_layers", type=int, default=2)
    parser.add_argument("--num_heads", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--teacher_steps", type=int, default=1000)
    parser.add_argument("--transfer_steps", type=int, default=300)
    parser.add_argument("--transfer_lr", type=float, default=1e-2)
    parser.add_argument("--lora_steps", type=int, default=300)
    parser.add_argument("--lora_lr", type=float, default=1e-3)
    parser.add_argument("--lora_rank", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="tiny model and a few steps (a smoke run)")
    args = parser.parse_args()
    if args.tiny:
        args.transfer_steps, args.lora_steps = min(args.transfer_steps, 3), min(args.lora_steps, 3)
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="seqlab_teacher_")
    teacher, config, task = trained_teacher(args)
    teacher_loss = linearize.evaluate_lm(teacher, task)
    print(f"teacher: {args.workdir} ({config.model.num_layers} layers, d_model {config.model.d_model}, "
          f"seq_len {task.seq_len}); transfer {args.transfer_steps} steps, LoRA r={args.lora_rank} {args.lora_steps} steps")
    print("| target | teacher | swapped | after transfer | after LoRA | transfer params | LoRA params | s |")
    print("|---|---|---|---|---|---|---|---|")
    for target in args.targets.split(","):
        r = linearize_one(teacher, task, config, target, args)
        transferred = f"{r['transferred']:.3f}" if "transferred" in r else "—"
        print(f"| {target} | {teacher_loss:.3f} | {r['swapped']:.3f} | {transferred} | {r['linearized']:.3f} | "
              f"{r['transfer_params']:,} | {r['lora_params']:,} | {r['seconds']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
