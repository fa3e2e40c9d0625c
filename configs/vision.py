"""Image classification on the patch backbone (`seqlab.models.vision`) at equal width: one variant per mixer, on
scikit-learn's 8 × 8 digits (2 × 2 patches: a 4 × 4 grid) or, prefixed ``shapes_``, on 16 × 16 generated shapes
(an 8 × 8 grid). Every mixer that takes a grid gets the patch grid; the causal 1-D scans (gla, mamba2) read the
patches in raster order.

    python -m seqlab.train --config=configs/vision.py:vig --workdir=/tmp/digits-vig
    python -m seqlab.train --config=configs/vision.py:shapes_lamamba --workdir=/tmp/shapes-lamamba

Variants: vit (full non-causal softmax attention: a neighbourhood as large as the grid), natten (3 × 3
neighbourhoods), vig (bidirectional GLA + locality injection), vig4 (ViG over four orders), lamamba (local
attention + 2-D SSD), rala, gla and mamba2 (causal raster scans), van_lka, ulsam, hyperzzw, activator (per-patch
GLU, no token mixing).
"""

from __future__ import annotations

import ml_collections

from seqlab.config import base_config, parse_variant, shrink

GRID_SIDE = {"digits": 4, "shapes": 8}  # the patch grid's side at patch_size 2


def mixer_settings(name: str, side: int) -> tuple[str, dict]:
    """(registered mixer, its arguments) of variant `name` on a side × side patch grid."""
    four_way = ("raster", "raster_reversed", "column", "column_reversed")
    return {
        "vit": ("natten", dict(kernel=side, causal=False)),
        "natten": ("natten", dict(kernel=3, causal=False)),
        "vig": ("vig", {}),
        "vig4": ("vig", dict(orders=four_way)),
        "lamamba": ("lamamba", dict(window=3, d_state=16)),
        "rala": ("rala", dict(conv_size=3)),
        "gla": ("gla", {}),
        "mamba2": ("mamba2", dict(d_state=16)),
        "van_lka": ("van_lka", {}),
        "ulsam": ("ulsam", {}),
        "hyperzzw": ("hyperzzw", {}),
        "activator": ("activator", {}),
    }[name]


MIXER_VARIANTS = ("vit", "natten", "vig", "vig4", "lamamba", "rala", "gla", "mamba2", "van_lka", "ulsam",
                  "hyperzzw", "activator")
VARIANTS = {**{name: ("digits", name) for name in MIXER_VARIANTS},
            **{f"shapes_{name}": ("shapes", name) for name in MIXER_VARIANTS}}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant, tiny = parse_variant(arg, VARIANTS, default="vig")
    task, name = VARIANTS[variant]
    mixer, args = mixer_settings(name, GRID_SIDE[task])
    config = base_config()
    config.data.task = task
    config.model.update(d_model=64, num_layers=2, num_heads=2, mlp="swiglu", mlp_ratio=2.0, norm="layernorm",
                        patch_size=2, mixers=(mixer,))
    config.model.mixer_args[mixer].update(**args)
    config.optim.update(learning_rate=2e-3, warmup_steps=100, schedule="cosine", weight_decay=0.05)
    config.train.update(steps=1500, batch_size=64, eval_batch_size=360, eval_every=500, log_every=50,
                        checkpoint_every=500)
    if task == "shapes":
        config.data.shapes.update(num_train=8_000, num_eval=1_000)
        config.train.update(eval_batch_size=500)
    if tiny:
        shrink(config)
        config.data[task].update(num_train=256, num_eval=64)
    return config
