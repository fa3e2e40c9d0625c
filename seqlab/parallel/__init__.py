"""Running on a mesh: the mesh of a run and batch placement (``mesh``), ``shard_sequence`` (every layer of a model
on a sequence split along a mesh axis), multi-host start (``distributed``) and the collective bytes of compiled HLO
(``hlo``). The sequence-parallel forms themselves are part of the engine: ``seqlab.core.recurrence`` (LASP-2 for
the linear families), ``seqlab.core.softmax_parallel`` (all-gather, ring, halo) and ``seqlab.core.halo``."""

from seqlab.parallel.hlo import collective_bytes

__all__ = ["collective_bytes"]
