"""Byte-level language modelling on local text files (default corpus: the running Python's standard-library
sources, so it runs offline). Sample from a trained run with ``python -m seqlab.sample --workdir=DIR --prompt=...``.

    python -m seqlab.train --config=configs/bytes.py --workdir=/tmp/bytes              # softmax attention
    python -m seqlab.train --config=configs/bytes.py:gated_deltanet --workdir=/tmp/b2
    python -m seqlab.train --config=configs/bytes.py:softmax --config.data.bytes.files='/data/*.txt' --workdir=...

The variant names the mixer of every layer; "based" is the Based pattern (BaseConv, Based linear attention,
sliding window).
"""

from __future__ import annotations

import ml_collections

from seqlab.config import base_config, parse_variant, shrink

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
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant, tiny = parse_variant(arg, VARIANTS, default="softmax")
    config = base_config()
    config.data.task = "bytes"
    config.data.bytes.update(seq_len=256)
    config.model.update(d_model=256, num_layers=4, num_heads=4, mixers=VARIANTS[variant], mlp="swiglu",
                        mlp_ratio=2.5, norm="rmsnorm")
    config.model.mixer_args.sliding_window.window = 64
    config.optim.update(learning_rate=2e-3, warmup_steps=200, schedule="cosine", weight_decay=0.1)
    config.train.update(steps=2000, batch_size=16, eval_batch_size=64, eval_every=500, log_every=50,
                        checkpoint_every=500)
    if tiny:
        shrink(config)
        config.data.bytes.update(seq_len=32, num_eval=64)
        config.model.mixer_args.sliding_window.window = 8
    return config
