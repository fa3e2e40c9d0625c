"""Multi-query associative recall (Zoology), CPU-sized: V=256, L=64, 4 key-value pairs, 10k/1k examples.

    python -m seqlab.train --config=configs/mqar.py --workdir=/tmp/mqar            # softmax attention
    python -m seqlab.train --config=configs/mqar.py:gla --workdir=/tmp/mqar-gla
    python -m seqlab.train --config=configs/mqar.py:based,tiny --workdir=/tmp/t    # the tests' tiny size

The variant (before any ",tiny") names the mixer of the second layer; the first layer is BaseConv, as in
Zoology's sweeps, where every mixer is paired with a BaseConv layer. All variants share d_model 128, 2 heads,
a SwiGLU MLP and the optimizer, so their accuracies compare; configs/mqar_recall.py sizes them for the
recall-versus-state comparison (notebooks/zoology_recall_vs_state.ipynb).
"""

from __future__ import annotations

import ml_collections

from seqlab.config import base_config, parse_variant, shrink

# variant -> (mixer of layer 2, that mixer's arguments)
VARIANTS = {
    "softmax": ("softmax", {}),
    "sliding_window": ("sliding_window", {"window": 16}),
    "linear": ("linear_attn", {"feature_map": "elu1"}),
    "based": ("based", {"feature_dim": 16}),
    "gla": ("gla", {}),
    "deltanet": ("deltanet", {}),
    "gated_deltanet": ("gated_deltanet", {}),
    "retnet": ("retnet", {}),
    "mamba2": ("mamba2", {}),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant, tiny = parse_variant(arg, VARIANTS, default="softmax")
    mixer, mixer_args = VARIANTS[variant]
    config = base_config()
    config.data.task = "mqar"
    config.data.mqar.update(vocab_size=256, seq_len=64, num_kv_pairs=4, num_train=10_000, num_eval=1_000)
    config.model.update(d_model=128, num_layers=2, num_heads=2, mixers=("baseconv", mixer), mlp="swiglu")
    config.model.mixer_args[mixer].update(mixer_args)
    config.optim.update(learning_rate=1e-3, warmup_steps=200, schedule="cosine", weight_decay=0.1)
    config.train.update(steps=1500, batch_size=32, eval_every=500, log_every=100, checkpoint_every=500)
    if tiny:
        shrink(config)
        config.data.mqar.update(seq_len=32, num_kv_pairs=2)
    return config

