"""ListOps (Long Range Arena), CPU-sized: sequences of 50–200 tokens, 10-way classification with a sequence
classifier (mean pooling). LRA's own setting (lengths 500–2000, 4 layers, d 512, 8 heads, MLP 1024, lr 0.05 with
1,000 warmup steps and inverse-sqrt decay, 5,000 steps) is ``:lra``.

    python -m seqlab.train --config=configs/listops.py:gla --workdir=/tmp/listops-gla
    python -m seqlab.train --config=configs/listops.py:linfusion --workdir=/tmp/listops-linfusion   # non-causal

Flowformer and InLine run their non-causal forms here; LinFusion is non-causal only.
"""

from __future__ import annotations

import ml_collections

from seqlab.config import base_config, parse_variant, shrink

VARIANTS = {name: name for name in ("softmax", "linear_attn", "gla", "deltanet", "gated_deltanet", "mamba2",
                                    "retnet", "lra", "linfusion", "flowformer", "inline")}
# Classification sees the whole sequence: the families with a non-causal form run it here.
NONCAUSAL = ("flowformer", "inline")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant, tiny = parse_variant(arg, VARIANTS, default="softmax")
    config = base_config()
    config.data.task = "listops"
    config.data.listops.update(min_length=50, max_length=200, num_train=20_000, num_eval=1_000)
    config.model.update(d_model=128, num_layers=2, num_heads=4, mlp="swiglu", mlp_ratio=2.0, pooling="mean",
                        mixers=("softmax",) if variant == "lra" else (variant,))
    for name in NONCAUSAL:
        config.model.mixer_args[name].causal = False
    config.optim.update(learning_rate=1e-3, warmup_steps=200, schedule="cosine", weight_decay=0.1)
    config.train.update(steps=3000, batch_size=32, eval_every=500, log_every=50, checkpoint_every=500)
    if variant == "lra":
        config.data.listops.update(min_length=500, max_length=2000, num_train=96_000, num_eval=2_000)
        config.model.update(d_model=512, num_layers=4, num_heads=8, mlp_ratio=2.0)
        config.optim.update(learning_rate=0.05, warmup_steps=1000, schedule="inverse_sqrt")
        config.train.update(steps=5000, batch_size=32)
    if tiny:
        shrink(config)
        config.data.listops.update(min_length=10, max_length=48)
    return config
