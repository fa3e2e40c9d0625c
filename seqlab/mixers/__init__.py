"""Token mixers: thin Flax NNX layers (projections, feature maps / gates, one `seqlab.ops` op, norm, output gate,
output projection) sharing one decode API (`init_cache`, `step`). Build them by name:

    mixer = seqlab.mixers.create("gla", d_model=512, num_heads=4, rngs=nnx.Rngs(0))
"""

from __future__ import annotations

import inspect

from seqlab.mixers.base import Mixer, RecurrentCache, RMSNorm, RoPE, ShortConv
from seqlab.mixers.based import Based
from seqlab.mixers.baseconv import BaseConv, ConvCache
from seqlab.mixers.deltanet import DeltaNet
from seqlab.mixers.dsf import DSFAttention
from seqlab.mixers.flowformer import FlowAttention
from seqlab.mixers.gated_deltanet import GatedDeltaNet
from seqlab.mixers.gla import GLA
from seqlab.mixers.inline import InLineAttention
from seqlab.mixers.liger import LigerAttention
from seqlab.mixers.lightnet import LightNet
from seqlab.mixers.linear_attention import LinearAttention
from seqlab.mixers.linfusion import LinFusionAttention
from seqlab.mixers.lolcats import LoLCATsAttention
from seqlab.mixers.mamba2 import Mamba2
from seqlab.mixers.retnet import RetNet
from seqlab.mixers.slab import SLAB
from seqlab.mixers.softmax_attention import KVCache, SlidingWindowAttention, SoftmaxAttention
from seqlab.mixers.tnl import TNLAttention
from seqlab.mixers.transnormer import DiagAttention, NormAttention

_REGISTRY: dict[str, type[Mixer]] = {
    "softmax": SoftmaxAttention,
    "baseconv": BaseConv,
    "based": Based,
    "sliding_window": SlidingWindowAttention,
    "linear_attn": LinearAttention,
    "retnet": RetNet,
    "gla": GLA,
    "deltanet": DeltaNet,
    "gated_deltanet": GatedDeltaNet,
    "mamba2": Mamba2,
    "transnormer_norm": NormAttention,
    "transnormer_diag": DiagAttention,
    "tnl": TNLAttention,
    "lightnet": LightNet,
    "flowformer": FlowAttention,
    "dsf": DSFAttention,
    "inline": InLineAttention,
    "slab": SLAB,
    "linfusion": LinFusionAttention,
    "lolcats": LoLCATsAttention,
    "liger": LigerAttention,
}


class UnknownArgumentError(TypeError, ValueError):
    """A keyword argument the mixer's constructor does not take (both a TypeError and a ValueError)."""


def available() -> list[str]:
    """Registered mixer names, sorted."""
    return sorted(_REGISTRY)


def get(name: str) -> type[Mixer]:
    """The mixer class registered under `name`."""
    if name not in _REGISTRY:
        raise ValueError(f"name: unknown mixer {name!r}; known mixers: {', '.join(available())}")
    return _REGISTRY[name]


def create(name: str, *, d_model: int, num_heads: int, **kwargs) -> Mixer:
    """Build the mixer `name`; kwargs are its constructor's keyword arguments (rngs, impl, chunk_size, ...)."""
    cls = get(name)
    accepted = _keyword_args(cls)
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise UnknownArgumentError(
            f"{', '.join(unknown)}: not an argument of mixer {name!r}; it accepts {', '.join(sorted(accepted))}"
        )
    return cls(d_model, num_heads, **kwargs)


def takes_depth(name: str) -> bool:
    """Whether mixer `name` takes its layer's depth (``layer_index``, ``num_layers``) from the model."""
    return "layer_index" in _keyword_args(get(name))


def _keyword_args(cls: type) -> set[str]:
    """Keyword arguments of cls.__init__, following **kwargs up the class hierarchy."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        names |= {p.name for p in params if p.kind is p.KEYWORD_ONLY}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return names


__all__ = [
    "BaseConv",
    "Based",
    "ConvCache",
    "DSFAttention",
    "DeltaNet",
    "DiagAttention",
    "FlowAttention",
    "GLA",
    "GatedDeltaNet",
    "InLineAttention",
    "KVCache",
    "LightNet",
    "LigerAttention",
    "LinFusionAttention",
    "LinearAttention",
    "LoLCATsAttention",
    "Mamba2",
    "Mixer",
    "NormAttention",
    "RMSNorm",
    "RecurrentCache",
    "RetNet",
    "RoPE",
    "SLAB",
    "ShortConv",
    "SlidingWindowAttention",
    "SoftmaxAttention",
    "TNLAttention",
    "UnknownArgumentError",
    "available",
    "create",
    "get",
    "takes_depth",
]
