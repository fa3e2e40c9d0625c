"""Functional token-mixing ops: pure jnp, differentiable, [batch, time, heads, dim] layout.

Every linear-state op returns ``(o, final_state)``; ``impl`` picks the form ("chunked", "recurrent", "parallel"),
all built by ``seqlab.core.recurrence`` from one ``chunk_terms`` function per family.
"""

from seqlab.ops.delta_rule import delta_rule, gated_delta_rule
from seqlab.ops.gla import gla
from seqlab.ops.linear_attn import linear_attn
from seqlab.ops.simple_gla import simple_gla
from seqlab.ops.softmax_attn import softmax_attn, softmax_decode_step

__all__ = ["delta_rule", "gated_delta_rule", "gla", "linear_attn", "simple_gla", "softmax_attn", "softmax_decode_step"]
