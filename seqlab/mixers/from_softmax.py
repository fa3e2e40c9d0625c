"""Building a mixer from a trained softmax-attention layer (the `from_softmax` constructors of LoLCATs, Liger and
LinFusion, and `seqlab.linearize`): the layer's check, its head / RoPE / projection layout, and its weights.

The families built from softmax attention import `SoftmaxAttention` from here, the one shared module that depends
on the softmax family, so that no family module imports another."""

from __future__ import annotations

from flax import nnx

from seqlab.mixers.softmax.softmax_attention import SoftmaxAttention

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def check_softmax(attn: object, name: str, *, full: bool) -> None:
    """ValueError (naming the argument `name`) unless attn is a `SoftmaxAttention` (with full=True: without a
    window, i.e. full causal attention)."""
    if not isinstance(attn, SoftmaxAttention):
        raise ValueError(f"{name} must be a seqlab.mixers.SoftmaxAttention, got {type(attn).__name__}")
    if full and attn.window is not None:
        raise ValueError(
            f"{name} must be full causal attention (window=None) to be linearised, got window={attn.window}"
        )


def softmax_layout(attn: SoftmaxAttention) -> dict:
    """The constructor arguments that give a mixer the heads, RoPE and projection layout of a trained full-attention
    `SoftmaxAttention` (its weights are then copied with `copy_projections`)."""
    check_softmax(attn, "attn", full=True)
    rope = attn.rope
    return dict(
        num_kv_heads=attn.num_kv_heads,
        head_dim=attn.head_dim,
        rope=rope is not None,
        rope_base=10000.0 if rope is None else rope.base,
        rope_interleaved=False if rope is None else rope.interleaved,
        use_bias=attn.q_proj.bias is not None,
        dtype=attn.dtype,
        param_dtype=attn.param_dtype,
    )


def copy_projections(source: nnx.Module, target: nnx.Module) -> None:
    """Copy the q, k, v and o projections (kernels and biases) of `source` into `target`."""
    for name in PROJECTIONS:
        nnx.update(getattr(target, name), nnx.state(getattr(source, name)))
