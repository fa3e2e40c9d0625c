"""Sequence parallelism: softmax attention over a sequence split along a mesh axis (``attention``; the linear
families' LASP-2 path is ``seqlab.core.recurrence.sequence_parallel``) and the collective bytes of compiled HLO
(``hlo``)."""

from seqlab.parallel.attention import MODES, sequence_parallel_attention
from seqlab.parallel.hlo import collective_bytes

__all__ = ["MODES", "collective_bytes", "sequence_parallel_attention"]
