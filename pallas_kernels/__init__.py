"""Pallas kernels for the engine's hot loops, forward and backward under ``jax.custom_vjp``.

- ``linear_attention``: chunked linear attention with no, scalar or per-key gates (linear_attn, simple_gla, gla, and
  any family declared with ``seqlab.core.DiagonalGate``);
- ``delta_rule``: chunked delta rule and gated delta rule (WY/UT form);
- ``flash_attention``: blockwise softmax attention over a block-mask description, with GQA.

Each kernel has one frozen dataclass of block sizes (forward and backward). The ops in ``seqlab.ops`` run them with
``impl="pallas"``, and by default (``impl="auto"``) on GPU and TPU; on CPU the kernels run with ``interpret=True``.
See docs/architecture.md, "Pallas kernels".
"""
