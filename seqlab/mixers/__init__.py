"""Token mixers: thin Flax NNX layers (projections, feature maps / gates, one `seqlab.ops` op, norm, output gate,
output projection) sharing one decode API (`init_cache`, `prefill`, `step`). Build them by name:

    mixer = seqlab.mixers.create("gla", d_model=512, num_heads=4, rngs=nnx.Rngs(0))

Importing this package imports every module below it (the family subpackages), so every built-in mixer is
registered (`register`) and its class is an attribute of this package (``seqlab.mixers.GLA``).
"""

from __future__ import annotations

import importlib
import pkgutil

from seqlab.mixers.base import Mixer
from seqlab.mixers.registry import (
    KINDS,
    MixerInfo,
    UnknownArgumentError,
    available,
    create,
    get,
    info,
    keyword_arguments,
    register,
    takes_depth,
)


def _import_all_modules() -> None:
    """Import every module of this package and its subpackages (registration happens on import)."""
    for module in pkgutil.walk_packages(__path__, prefix=f"{__name__}."):
        importlib.import_module(module.name)


_import_all_modules()
globals().update({get(name).__name__: get(name) for name in available()})
