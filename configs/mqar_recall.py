"""MQAR recall versus state size, sized for a 2-core CPU: L = 64 with D = 16 key-value pairs, V = 256, d_model 64.

    python -m seqlab.train --config=configs/mqar_recall.py:deltanet --workdir=/tmp/recall-deltanet
    python -m seqlab.sweep --config=configs/mqar_recall.py:gla --grid="optim.learning_rate=(3e-3,1e-2)" \\
        --root=/tmp/recall/gla

The variants are configs/mqar.py's (layer 1 BaseConv, layer 2 the named mixer, SwiGLU MLP, 2 heads). Sixteen
pairs (the most 64 tokens hold: 4 D <= L) with d_model 64 put the small recurrent states at their capacity (GLA's
state is 2 heads of 16 x 32 floats for 16 pairs, so its keys cannot all be orthogonal), so recall separates the
families by state size as in the Based paper's figure, while a run takes about three minutes here; at D = 8 GLA
already recalls 0.97. 3,000 steps of batch 32 over 20k examples is about 5 epochs; the learning rate
is swept, as Zoology picks the best of four per model.
"""

from __future__ import annotations

import os

import ml_collections

from seqlab.config import load_config_module, parse_variant

MQAR = load_config_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "mqar.py"))
VARIANTS = MQAR.VARIANTS


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = MQAR.get_config(arg)
    _, tiny = parse_variant(arg, VARIANTS, default="softmax")
    if tiny:
        return config
    config.data.mqar.update(vocab_size=256, seq_len=64, num_kv_pairs=16, num_train=20_000, num_eval=1_000)
    config.model.d_model = 64
    config.optim.update(learning_rate=3e-3, warmup_steps=0.05)
    config.train.update(steps=3000, eval_every=1000, checkpoint_every=1000)
    return config
