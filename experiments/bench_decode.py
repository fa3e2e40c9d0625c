"""Generation throughput and decode-cache memory of softmax attention against linear mixers, after a long prompt.

The Based paper ("Simple linear attention language models balance the recall-throughput tradeoff", Arora et al.,
2024) claims much higher generation throughput than softmax attention because a linear layer's decode state has a
fixed size while a KV cache grows with the context. This measures it for seqlab's mixers.

    python experiments/bench_decode.py      # the full table: 9 mixers x contexts 1k .. 16k (for BENCHMARKS.md)
    python experiments/bench_decode.py --contexts=256 --new_tokens=8 --mixers=softmax,gla     # a smoke run (seconds)

For each mixer and context (the prompt length): a bytes DecoderLM (vocab 256, random weights, --layers layers of
that mixer; `based` is the pattern baseconv + based, as in the Based paper; in `block_transformer` every layer
is Block Transformer's global block decoder and local token decoder, L = 4 tokens per block), d_model --d_model,
d_model / 64 heads, SwiGLU MLP, RMSNorm, caches for context + new_tokens positions. Columns:
  prefill ms       `seqlab.generate.prefill` of a [batch, context] prompt (compiled first; best of --repeats)
  decode tokens/s  batch x new_tokens greedy tokens through `seqlab.generate.decode` after that prefill
                   (compiled first; best of --repeats)
  cache bytes      the decode caches' arrays after the prefill, per sequence (total / batch)
"""

from __future__ import annotations

import argparse
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from seqlab import generate
from seqlab.models import DecoderLM

from bench_ops import _time  # the sibling script's timer: one warm-up (compile) call, then the best of `repeats`

VOCAB = 256
MIXERS: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "softmax": (("softmax",), {}),
    "sliding_window": (("sliding_window",), {}),
    "linear_attn": (("linear_attn",), {"linear_attn": {"feature_map": "elu1"}}),
    "based": (("baseconv", "based"), {}),
    "gla": (("gla",), {}),
    "deltanet": (("deltanet",), {}),
    "mamba2": (("mamba2",), {}),
    "longvq": (("longvq",), {}),
    "block_transformer": (("block_transformer",), {"block_transformer": {"block": 4}}),
}


def build(mixer: str, d_model: int, layers: int, max_len: int) -> DecoderLM:
    """A random-weight bytes LM whose layers follow MIXERS[mixer]."""
    pattern, mixer_args = MIXERS[mixer]
    return DecoderLM(
        vocab_size=VOCAB, d_model=d_model, num_layers=layers, num_heads=max(1, d_model // 64), mixers=pattern,
        mixer_args=mixer_args, mlp="swiglu", mlp_ratio=2.0, norm="rmsnorm", position_embedding="none",
        max_len=max_len, embed_dropout=0.0, rngs=nnx.Rngs(0),
    )  # fmt: skip


def bench(mixer: str, context: int, args: argparse.Namespace) -> dict[str, float]:
    """Prefill seconds, decode tokens/s and cache bytes per sequence of one mixer at one context."""
    max_len = context + args.new_tokens
    model = build(mixer, args.d_model, args.layers, max_len)
    prompt = jax.random.randint(jax.random.key(0), (args.batch, context), 0, VOCAB, jnp.int32)
    prefill_s = _time(generate.prefill, (model, prompt, max_len), args.repeats)
    logits, cache = generate.prefill(model, prompt, max_len)
    decode_s = _time(generate.decode, (model, logits, cache, args.new_tokens), args.repeats)
    return {
        "prefill_ms": 1e3 * prefill_s,
        "tokens_per_s": args.batch * args.new_tokens / decode_s,
        "cache_bytes": generate.cache_nbytes(cache) / args.batch,
    }


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The flags (sys.argv when argv is None); unknown mixer names are a usage error."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mixers", default=",".join(MIXERS))
    parser.add_argument("--contexts", default="1024,2048,4096,8192,16384")
    parser.add_argument("--d_model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    unknown = sorted(set(args.mixers.split(",")) - set(MIXERS))
    if unknown:
        parser.error(f"--mixers: unknown {', '.join(unknown)}; known: {', '.join(MIXERS)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, {jax.device_count()} device(s)")
    print(f"d_model={args.d_model} layers={args.layers} batch={args.batch} new_tokens={args.new_tokens} vocab={VOCAB}")
    print("| mixer | context | prefill ms | decode tokens/s | cache bytes |")
    print("|---|---|---|---|---|")
    for mixer in args.mixers.split(","):
        for context in map(int, args.contexts.split(",")):
            r = bench(mixer, context, args)
            print(f"| {mixer} | {context} | {r['prefill_ms']:.1f} | {r['tokens_per_s']:,.0f} | "
                  f"{r['cache_bytes']:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
