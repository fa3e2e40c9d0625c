"""Byte-level language modelling on local text files (default corpus: the running Python's standard-library
sources, so it runs offline). Sample from a trained run with ``python -m seqlab.sample --workdir=DIR --prompt=...``.

    python -m seqlab.train --config=configs/bytes.py --workdir=/tmp/bytes              # softmax attention
    python -m seqlab.train --config=configs/bytes.py:gated_deltanet --workdir=/tmp/b2
    python -m seqlab.train --config=configs/bytes.py:softmax --config.data.bytes.files='/data/*.txt' --workdir=...

The variant names the mixer of every layer; "based" is the Based pattern (BaseConv, Based linear attention,
sliding window), "hedgehog" is linear attention with Hedgehog feature maps, and "transnormer_t1" / "transnormer_t2"
are TransNormer's layouts (the first half of the layers block-diagonal DiagAttention, the second half
NormAttention; T1: ReLU local weights and plain-ELU linear layers, T2: softmax local weights and 1+ELU).
Rows pack whole files (data.bytes.pack) when every mixer of the variant takes packed documents.
"""

from __future__ import annotations

import ml_collections

from seqlab import mixers
from seqlab.config import base_config, parse_variant, shrink
from seqlab.mixers.linear.transnormer import transnormer_layout

VARIANTS = {
    "softmax": ("softmax",),
    "sliding_window": ("sliding_window",),
    "gla": ("gla",),
    "deltanet": ("deltanet",),
    "gated_deltanet": ("gated_deltanet",),
    "mamba2": ("mamba2",),
    "retnet": ("retnet",),
    "based": ("baseconv", "based", "sliding_window"),
    "deltanet_hybrid": ("deltanet", "deltanet", "sliding_window"),
    "tnl": ("tnl",),
    "lolcats": ("lolcats",),
    "liger": ("liger",),
    "lightnet": ("lightnet",),
    "flowformer": ("flowformer",),
    "inline": ("inline",),
    "slab": ("slab",),
    "dsf": ("dsf",),
    "hedgehog": ("linear_attn",),
    "transnormer_t1": None,  # TransNormer's layout: the first half of the layers DiagAttention, then NormAttention
    "transnormer_t2": None,
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant, tiny = parse_variant(arg, VARIANTS, default="softmax")
    config = base_config()
    config.data.task = "bytes"
    config.data.bytes.update(seq_len=256)
    config.model.update(d_model=256, num_layers=4, num_heads=4, mixers=VARIANTS[variant] or ("softmax",),
                        mlp="swiglu", mlp_ratio=2.5, norm="rmsnorm")
    config.model.mixer_args.sliding_window.window = 64
    if variant == "hedgehog":  # other patterns that use linear_attn pick their own feature map
        config.model.mixer_args.linear_attn.update(feature_map="hedgehog", num_features=32)
    config.model.mixer_args.slab.max_len = config.data.bytes.seq_len
    if variant.startswith("transnormer_"):
        pattern, mixer_args = transnormer_layout(config.model.num_layers, variant.removeprefix("transnormer_"))
        config.model.mixers = pattern
        for name, args in mixer_args.items():
            config.model.mixer_args[name].update(args)
    # packed documents (a row holds several files, each mixed alone) where every mixer of the pattern takes them;
    # the other patterns train on windows that run across file boundaries
    config.data.bytes.pack = all(mixers.get(name).takes_documents for name in config.model.mixers)
    config.optim.update(learning_rate=2e-3, warmup_steps=200, schedule="cosine", weight_decay=0.1)
    config.train.update(steps=2000, batch_size=16, eval_batch_size=64, eval_every=500, log_every=50,
                        checkpoint_every=500)
    if tiny:
        shrink(config)
        config.data.bytes.update(seq_len=32, num_eval=64)
        config.model.mixer_args.sliding_window.window = 8
        config.model.mixer_args.slab.max_len = 32
        for name in ("lolcats", "liger"):
            config.model.mixer_args[name].window = 8
        config.model.mixer_args.transnormer_diag.block_size = 8
    return config
