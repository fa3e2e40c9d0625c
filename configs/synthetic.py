"""The small generated recall and copying tasks: MAD's selective copying and in-context recall, H3's associative
recall and induction heads. The variant picks the task, ``--config.model.mixers`` the mixer pattern:

    python -m seqlab.train --config=configs/synthetic.py:selective_copy --workdir=/tmp/sc
    python -m seqlab.train --config=configs/synthetic.py:in_context_recall --config.model.mixers="('gla',)" ...
"""

from __future__ import annotations

import ml_collections

from seqlab.config import base_config, parse_variant, shrink

VARIANTS = {name: name for name in ("selective_copy", "in_context_recall", "associative_recall", "induction_head")}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    task, tiny = parse_variant(arg, VARIANTS, default="selective_copy")
    config = base_config()
    config.data.task = task
    config.model.update(d_model=128, num_layers=2, num_heads=2, mixers=("baseconv", "softmax"), mlp="swiglu")
    config.optim.update(learning_rate=1e-3, warmup_steps=200, schedule="cosine", weight_decay=0.1)
    config.train.update(steps=3000, batch_size=32, eval_every=1000, log_every=100, checkpoint_every=1000)
    if tiny:
        shrink(config)
        if task == "selective_copy":
            config.data.selective_copy.update(seq_len=48, num_tokens_to_copy=4)
        if task == "in_context_recall":
            config.data.in_context_recall.update(seq_len=32)
    return config
