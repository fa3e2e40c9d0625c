"""Test cases of the linear-state ops, from their declarations (``seqlab.ops.linear_ops()``).

A case is an op with one of its flag variants (linear_attn and linear_attn with normalize=True). From the
declaration come inputs of the right shapes and ranges, and calls of the op and of its references in
tests/reference.py (``np_<op>``: float64 per-token loop, ``jnp_<op>``: float32 ``lax.scan``) with the same
arguments, so a newly declared op is tested with no table to edit.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import reference
from seqlab import ops
from seqlab.ops._common import LinearOpSpec, Variant

LOG_GATE_MODES = ("default", "extreme", "near_zero", "loguniform", "gentle")


class Case(NamedTuple):
    """One declared op with one of its variants ("" = no flags)."""

    spec: LinearOpSpec
    variant_name: str

    @property
    def id(self) -> str:
        return f"{self.spec.name}_{self.variant_name}" if self.variant_name else self.spec.name

    @property
    def variant(self) -> Variant:
        return self.spec.variants[self.variant_name]

    def state_columns(self, value_dim: int) -> int:
        """Columns of the op's state for values of ``value_dim`` features."""
        return value_dim + self.variant.state_columns


def cases(where: Callable[[LinearOpSpec], bool] = lambda spec: True) -> list[Case]:
    """Every (declared op, variant) whose declaration satisfies ``where``, by op name."""
    return [Case(spec, name) for spec in ops.linear_ops() if where(spec) for name in spec.variants]


def case(case_id: str) -> Case:
    """The case of id ``case_id`` (an op name, or op_variant)."""
    return next(c for c in cases() if c.id == case_id)


def has_log_gate(spec: LinearOpSpec) -> bool:
    return any(gate.range == "log" for gate in spec.gates.values())


def diagonal_gated(spec: LinearOpSpec) -> bool:
    """A decaying diagonal-gated op: a log gate and the linear-attention kernels, which are exactly the
    ``DiagonalGate`` families' (whose chunked backward takes the gate's gradient from the engine's identity)."""
    return spec.kernel == "linear_attention" and has_log_gate(spec)


def log_gates(rng: np.random.Generator, shape: tuple[int, ...], mode: str) -> np.ndarray:
    """Natural-log gates (<= 0), float32, of one of ``LOG_GATE_MODES``."""
    if mode == "default":
        # magnitudes spread log-normally around 0.37 (decays ~0.07 .. 0.95)
        g = -np.exp(rng.normal(-1.0, 1.0, shape))
    elif mode == "extreme":
        g = rng.uniform(-20.0, 0.0, shape)
    elif mode == "near_zero":
        g = -rng.uniform(0.0, 1e-3, shape)
        g[rng.uniform(size=shape) < 0.25] = 0.0  # some gates exactly 0 (no decay)
    elif mode == "loguniform":
        # |g| log-uniform in [1e-4, 20]: from near-perfect memory to instant forgetting
        g = -np.exp(rng.uniform(np.log(1e-4), np.log(20.0), shape))
    elif mode == "gentle":
        # decays in [0.74, 1]: the state carries over hundreds of tokens (sequence-parallel tests)
        g = -rng.uniform(0.0, 0.3, shape)
    else:
        raise AssertionError(mode)
    return g.astype(np.float32)


def softplus(x: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, x).astype(np.float32)


def make_inputs(rng: np.random.Generator, case: Case, *, B: int = 2, T: int = 50, H: int = 2, K: int = 16,
                V: int = 24, gates: str = "default", initial_state: bool = True) -> dict[str, np.ndarray]:
    """The case's positional inputs by name (q, k [B, T, H, K], v [B, T, H, V], gates [B, T, H] or [B, T, H, K])
    and, with ``initial_state``, a state [B, H, K, state_columns(V)]; float32 numpy.

    Log gates follow ``gates`` (a mode of ``log_gates``), unit gates (beta) are uniform in (0.05, 0.95); keys are
    L2-normalised when the op expects it, and q, k positive (softplus) when the variant divides by q · z."""
    spec, variant = case.spec, case.variant
    normal = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    features = {"q": (B, T, H, K), "k": (B, T, H, K), "v": (B, T, H, V)}
    gate_shapes = {"head": (B, T, H), "key": (B, T, H, K)}
    args = {}
    for name in spec.inputs:
        if name in features:
            args[name] = normal(*features[name])
        elif spec.gates[name].range == "log":
            args[name] = log_gates(rng, gate_shapes[spec.gates[name].shape], gates)
        else:
            args[name] = rng.uniform(0.05, 0.95, gate_shapes[spec.gates[name].shape]).astype(np.float32)
    if variant.positive_features:
        args.update({n: softplus(args[n]) for n in ("q", "k") if n in args})
    if spec.normalized_keys:
        args["k"] = (args["k"] / np.linalg.norm(args["k"], axis=-1, keepdims=True)).astype(np.float32)
    if initial_state:
        h0 = 0.5 * normal(B, H, K, case.state_columns(V))
        h0[..., V:] = np.abs(h0[..., V:]) + 1.0  # extra columns are key sums: positive
        args["initial_state"] = h0
    return args


def positional(case: Case, args: dict[str, Any]) -> list[Any]:
    return [args[name] for name in case.spec.inputs]


def call_op(case: Case, args: dict[str, Any], **kw):
    """The op on ``args`` (positional inputs and, if present, initial_state) with its variant's flags and ``kw``."""
    if "initial_state" in args:
        kw["initial_state"] = args["initial_state"]
    return case.spec.fn(*positional(case, args), **case.variant.kwargs, **kw)


def reference_fn(case: Case, kind: str) -> Callable[..., Any]:
    """tests/reference.py's ``<kind>_<op>`` (kind "np" or "jnp")."""
    return getattr(reference, f"{kind}_{case.spec.name}")


def call_reference(case: Case, kind: str, args: dict[str, Any], **kw):
    """The ``kind`` reference on the same arguments as ``call_op`` (``kw``: scale)."""
    return reference_fn(case, kind)(*positional(case, args), initial_state=args.get("initial_state"),
                                     **case.variant.kwargs, **kw)


def value_and_grads(fn: Callable[[dict], tuple[Any, Any]], args: dict[str, Any], Wo: np.ndarray, Ws: np.ndarray):
    """(o, final state, d(<Wo, o> + <Ws, S>)/d args) for fn(args) -> (o, S), jitted; numpy, o in float32."""

    def loss(a):
        o, S = fn(a)
        return jnp.sum(o.astype(jnp.float32) * Wo) + jnp.sum(S * Ws), (o, S)

    (_, (o, S)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(args)
    return np.asarray(o, np.float32), np.asarray(S), {n: np.asarray(g) for n, g in grads.items()}
