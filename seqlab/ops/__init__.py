"""Functional token-mixing ops: pure jnp, differentiable, [batch, time, heads, dim] layout.

Every linear-state op returns ``(o, final_state)``; ``impl`` picks the form ("chunked", "recurrent", "parallel"),
all built by ``seqlab.core.recurrence`` from one ``chunk_terms`` function per family, or "pallas" (the kernels of
``pallas_kernels``, for linear_attn, simple_gla, gla, the delta rules and softmax_attn); the default "auto" is
"pallas" on a GPU or TPU where the op has a kernel and "chunked" otherwise. Ops that combine a local
softmax or block window with a linear state (``lolcats_attn``) or prefix sums (``flow_attn``) run their linear part
through those ops; ``block_local_attn`` is dense within blocks.
"""

from seqlab.ops.based import based_attn
from seqlab.ops.block_local_attn import block_local_attn
from seqlab.ops.delta_rule import delta_rule, gated_delta_rule
from seqlab.ops.flow_attn import flow_attn
from seqlab.ops.gla import gla
from seqlab.ops.linear_attn import linear_attn
from seqlab.ops.simple_gla import simple_gla
from seqlab.ops.softmax_attn import softmax_attn, softmax_decode_step
from seqlab.ops.window_hybrid import lolcats_attn

__all__ = [
    "based_attn",
    "block_local_attn",
    "delta_rule",
    "flow_attn",
    "gated_delta_rule",
    "gla",
    "linear_attn",
    "lolcats_attn",
    "simple_gla",
    "softmax_attn",
    "softmax_decode_step",
]
