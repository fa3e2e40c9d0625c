"""The small generated recall and copying tasks: MAD's selective copying, in-context recall (noisy with
the variant noisy_in_context_recall), fuzzy recall, memorization and compression (all six MAD
synthetics), H3's associative recall and induction heads. The variant picks the task at its paper's size,
``--config.model.mixers`` the mixer pattern:

    python -m seqlab.train --config=configs/synthetic.py:selective_copy --workdir=/tmp/sc
    python -m seqlab.train --config=configs/synthetic.py:in_context_recall --config.model.mixers="('gla',)" ...
"""

from __future__ import annotations

import ml_collections

from seqlab.config import base_config, parse_variant, shrink

# variant -> task (noisy_in_context_recall is in_context_recall with MAD's noise settings, NOISY_RECALL)
VARIANTS = {name: name for name in ("selective_copy", "in_context_recall", "associative_recall", "induction_head",
                                    "fuzzy_recall", "memorization", "compression")}
VARIANTS["noisy_in_context_recall"] = "in_context_recall"
NOISY_RECALL = dict(vocab_size=32, noise_vocab_size=16, frac_noise=0.2)
# The tiny variants' task sizes (the tests train them for a few steps).
TINY_TASKS = {
    "selective_copy": dict(seq_len=48, num_tokens_to_copy=4),
    "in_context_recall": dict(seq_len=32),
    "fuzzy_recall": dict(seq_len=32),
    "memorization": dict(vocab_size=64, seq_len=16),
    "compression": dict(seq_len=16),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant, tiny = parse_variant(arg, VARIANTS, default="selective_copy")
    task = VARIANTS[variant]
    config = base_config()
    config.data.task = task
    if variant == "noisy_in_context_recall":
        config.data.in_context_recall.update(**NOISY_RECALL)
    config.model.update(d_model=128, num_layers=2, num_heads=2, mixers=("baseconv", "softmax"), mlp="swiglu")
    config.optim.update(learning_rate=1e-3, warmup_steps=200, schedule="cosine", weight_decay=0.1)
    config.train.update(steps=3000, batch_size=32, eval_every=1000, log_every=100, checkpoint_every=1000)
    if tiny:
        shrink(config)
        config.data[task].update(**TINY_TASKS.get(task, {}))
    return config
