"""seqlab's engine: one chunked scan/recurrence abstraction for every token mixer.

Contract for a linear-state family (linear attention, scalar decay, vector gate, delta rule, ...)
-------------------------------------------------------------------------------------------------
Every such mixer is a recurrence S_t = A_t ∘ S_{t-1} + B_t, o_t = read(q_t, S_t) over a float32 state [K, V] per
head. A family provides exactly one function::

    chunk_terms(x: Mapping[str, Array]) -> ChunkTerms

``x`` maps input names to one chunk of C tokens, each [..., C, feature] (leading axes N, B, H are batch axes;
q is already scaled, everything is float32). It returns the chunk as an affine map of its incoming state S_in:

    o     = o_local + q_read @ S_in                      o_local [..., C, V], q_read [..., C, K]
    S_out = transition.apply(S_in) + s_local             s_local [..., K, V]
    transition = exp(log_decay) ⊙ · - leftᵀ (right @ ·)  log_decay [..., K] or [..., 1]; left, right [..., R, K]

It must be valid for any C >= 1 (C = 1 is a single token) and treat all-zero inputs as the identity (no write,
no decay), because the engine zero-pads T up to a multiple of the chunk size. Gates arrive in natural-log space;
take within-chunk cumulative sums in float32 and exponentiate only non-positive differences (mask, then exp).

What a family gets, with no code of its own (``seqlab.core.recurrence``):
- ``recurrent``: a scan over tokens with chunks of one token — constant memory, the decode path;
- ``chunked``: all chunks' terms at once (masked matmuls), a scan over chunk states, then the read-out — the
  default training path; a diagonal-gated family that declares ``DiagonalGate(name)`` gets the engine's own
  backward pass, which takes the gate's gradient from q·dq - k·dk instead of differentiating the chunk math,
  and ``seqlab.ops`` runs it as the Pallas kernels of ``pallas_kernels.linear_attention`` with impl="pallas"
  (the default "auto" on GPU/TPU);
- ``parallel``: the whole sequence as one chunk (the quadratic, materialised form);
- ``segment_summary`` / ``combine_summaries``: what a segment does to the state, (transition, state), with an
  associative combine (P_b P_a, P_b S_a + S_b) — the object sequence parallelism plugs into.

Softmax attention (``seqlab.core.masks``, ``seqlab.core.online_softmax``)
--------------------------------------------------------------------------
One mask algebra serves the XLA forms and the Pallas kernels (``pallas_kernels.flash_attention``): a mask
(``Causal``, ``Bidirectional``, ``BlockDiagonal``, ``Strided``, ``BlockSparse``, ``Terraced``, ``Document``, their
compositions ``And`` / ``Or`` and ``PerHead``) gives an element predicate ``visible(q_pos, k_pos)`` on absolute
positions (segment ids for a ``Document`` term) and, statically, a tile map; ``visit_lists`` turns the map into the
ordered key tiles each query tile visits, and ``is_span`` tells the fast path (one contiguous span per row). The
blockwise form walks those visit lists from a static ``BlockPlan`` — span rows with one slice of front-padded keys,
other rows by gathering their tiles — so unvisited tiles cost nothing; an exact softmax per row, an optional
``score_mod(scores, q_idx, k_idx, head)`` on the scaled float32 scores before masking, and a flash-attention
backward (``jax.custom_vjp``) that recomputes scores from the log-normaliser. An online-softmax ``Partial``
(running max, normaliser, output) with ``merge`` as its associative combine is the chunk summary the decode step and
sequence parallelism use.

Packed documents (``seqlab.core.documents``)
--------------------------------------------
A packed row holds several documents, given as ``segment_ids`` [B, T] (or fla's ``cu_seqlens`` for one row). The
linear-state engine turns them into document starts: a start zeroes the incoming state (its transition decays by
-inf and reads nothing from before), in every form and in the summary combine of sequence parallelism, where a
document crossing a device border continues and a start stops the combine. Softmax attention composes the mask
with ``Document()``; under sequence parallelism the key segments' ids travel with the keys. Short convolutions
and positions restart at each start (``Documents`` carries ids and positions to the mixers).
"""

from seqlab.core.online_softmax import Partial, merge
from seqlab.core.recurrence import ChunkTerms, DiagonalGate, Summary, Transition, combine_summaries, segment_summary

__all__ = [
    "ChunkTerms", "DiagonalGate", "Partial", "Summary", "Transition", "combine_summaries", "merge", "segment_summary",
]
