"""Batched serving throughput: many prompts of different lengths decoded together (`seqlab.generate.serve`)
against the same prompts generated one at a time (`seqlab.generate.generate`).

    python experiments/bench_serving.py                      # the BENCHMARKS.md table
    python experiments/bench_serving.py --prompts=4 --min_len=16 --max_len=32 --new_tokens=8 --mixers=gla   # smoke

For each mixer: a bytes DecoderLM (vocab 256, random weights, --layers layers, d_model --d_model, d_model / 64
heads, SwiGLU, RMSNorm), --prompts prompts with lengths drawn uniformly from [--min_len, --max_len] (seed 0) and
--new_tokens greedy tokens each. Columns:
  served tokens/s      prompts x new_tokens / the wall time of one `serve` call (compiled first; best of --repeats)
  one-by-one tokens/s  the same tokens / the wall time of `generate` on each prompt in turn (every prompt length
                       compiled first; best of --repeats)
  speed-up             served / one-by-one
  lockstep steps       the serve scan's length, max(L) - min(L) + new_tokens (its prompt tail is stepped, not
                       prefilled)
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from seqlab import generate
from seqlab.models import DecoderLM

from bench_ops import best_seconds

VOCAB = 256


def build(mixer: str, d_model: int, layers: int, max_len: int) -> DecoderLM:
    return DecoderLM(
        vocab_size=VOCAB, d_model=d_model, num_layers=layers, num_heads=max(1, d_model // 64), mixers=(mixer,),
        mixer_args={}, mlp="swiglu", mlp_ratio=2.0, norm="rmsnorm", position_embedding="none", max_len=max_len,
        embed_dropout=0.0, rngs=nnx.Rngs(0),
    )  # fmt: skip


def bench(mixer: str, prompts: list[np.ndarray], args: argparse.Namespace) -> dict[str, float]:
    model = build(mixer, args.d_model, args.layers, args.max_len + args.new_tokens)
    tokens = len(prompts) * args.new_tokens
    served = best_seconds(lambda: generate.serve(model, prompts, args.new_tokens), args.repeats)

    def one_by_one():
        for prompt in prompts:
            jax.block_until_ready(generate.generate(model, jnp.asarray(prompt)[None], args.new_tokens))

    alone = best_seconds(one_by_one, args.repeats)
    lengths = [len(p) for p in prompts]
    return {"served": tokens / served, "alone": tokens / alone,
            "steps": max(lengths) - min(lengths) + args.new_tokens}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mixers", default="softmax,sliding_window,gla,mamba2")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--min_len", type=int, default=128)
    parser.add_argument("--max_len", type=int, default=512)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--d_model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    if not 1 <= args.min_len <= args.max_len:
        parser.error("--min_len and --max_len: need 1 <= min_len <= max_len")
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, VOCAB, int(n)) for n in rng.integers(args.min_len, args.max_len + 1, args.prompts)]
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; {args.prompts} prompts of "
          f"{args.min_len}-{args.max_len} tokens, {args.new_tokens} new tokens each, d_model={args.d_model} "
          f"layers={args.layers}")
    print("| mixer | served tokens/s | one-by-one tokens/s | speed-up | lockstep steps |")
    print("|---|---|---|---|---|")
    for mixer in args.mixers.split(","):
        r = bench(mixer, prompts, args)
        print(f"| {mixer} | {r['served']:,.0f} | {r['alone']:,.0f} | {r['served'] / r['alone']:.1f}x | "
              f"{r['steps']} |", flush=True)


if __name__ == "__main__":
    main()
