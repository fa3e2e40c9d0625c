"""Pallas kernels (forward and backward under jax.custom_vjp) for the engine's hot loops; they arrive with the kernel issue.

The ops dispatch to them through `impl="pallas"`; until then every op runs on the XLA chunked path.
"""
