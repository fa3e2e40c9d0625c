"""S2-Attention — "S2-Attention: Hardware-Aware Context Sharding Among Attention Heads" (Lin et al., 2024).

    o_t^h = Σ_{s ∈ A_h(t)} softmax_s(q_t^h·k_s^h / √d) v_s^h

In blocks of B tokens (query block I = t // B, key block J = s // B), head h sees, with s <= t, the local blocks
0 <= I − J < n_local and the vertical stripes (J + h·σ + o) % v == 0 (absolute positions, so a key's visibility
does not depend on the query and the KV cache needs no per-query bookkeeping); σ = max(1, v // H) by default,
so the heads take different residues and together cover the whole context (heterogeneous context sharding);
``dense_heads`` of the heads attend densely. The masks are ``seqlab.core.masks.s2_heads`` (one
``VerticalStride`` per head): the op's per-head tile maps skip the blocks no head sees. Phi-3-small's setting:
B = 64, n_local = 16, v = 8 (with dense layers every other layer: a hybrid pattern of ``s2`` and ``softmax``).
"""

from __future__ import annotations

from typing import Any

from seqlab.core import masks
from seqlab.mixers.registry import register
from seqlab.mixers.softmax.softmax_attention import MaskedAttention


@register(
    "s2",
    kind="softmax",
    paper="S2-Attention: Hardware-Aware Context Sharding Among Attention Heads",
    examples={"sharded": dict(num_heads=4, num_kv_heads=2, block=4, local_blocks=2, vertical_stride=3,
                              dense_heads=1)},
)
class S2Attention(MaskedAttention):
    """block, local_blocks, vertical_stride: B, n_local, v; head_step σ (None: max(1, v // H)); offset o;
    dense_heads: how many heads (the last ones) attend densely. Other arguments: `SoftmaxAttention`'s."""

    def __init__(self, d_model: int, num_heads: int, *, block: int = 64, local_blocks: int = 16,
                 vertical_stride: int = 8, head_step: int | None = None, offset: int = 0, dense_heads: int = 0,
                 causal: bool = True, **kwargs: Any):
        super().__init__(d_model, num_heads, causal=causal, **kwargs)
        self.mask = masks.s2_heads(num_heads, block, local_blocks, vertical_stride, head_step=head_step,
                                   offset=offset, dense_heads=dense_heads, causal=causal)

    def attention_mask(self) -> masks.Mask:
        return self.mask
