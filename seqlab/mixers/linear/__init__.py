"""Linear-state mixers: one family a module, each a recurrence run by a `seqlab.ops` op on the engine."""
