"""S_t = diag(f_t) S_{t-1} + (1 - f_t) i_tᵀ,  o_t = S_tᵀ (q_t K^-1/2),  f_t = lb + (1 - lb) sigmoid(x W_f).

Paper: "HGRN2: Gated Linear RNNs with State Expansion" (Qin et al., 2024); read from fla's `fla/layers/hgrn2.py`.

Per head, K = expand_ratio forget (state) rows and V = d_model / H input columns; forget_dim = H K (fla).
q = swish(x W_q) (fla's query activation; the paper's output gate), f = lb + (1 - lb) sigmoid(x W_f) with the
layer's lower bound lb = forget_lower_bound (0 by default; in fla the model passes each layer its bound, 0 for the
first), the input i = x W_i (no activation) and the input gate tied to the forget gate (1 - f). Op `hgrn2` with its
default scale K^-1/2 (fla's GLA default). Output: RMSNorm over all H V = d_model features (affine, eps 1e-5),
then W_o. No bias, no short convolution (fla's default).

Decode cache: `RecurrentCache` with state [B, H, K, V] float32.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from seqlab import ops
from seqlab.checks import check_fraction, check_optional_positive_int, resolve_dim
from seqlab.core.documents import Documents
from seqlab.layers.norms import RMSNorm
from seqlab.mixers.base import Mixer
from seqlab.mixers.caches import RecurrentCache
from seqlab.mixers.registry import register


@register(
    "hgrn2",
    kind="linear",
    paper="HGRN2: Gated Linear RNNs with State Expansion",
    examples={
        "default": dict(num_heads=4),
        "lower_bound": dict(num_heads=2, expand_ratio=8, forget_lower_bound=0.5),
    },
)
class HGRN2(Mixer):
    takes_documents = True

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        *,
        expand_ratio: int | None = None,
        forget_lower_bound: float = 0.0,
        norm_eps: float = 1e-5,
        impl: str = "auto",
        chunk_size: int = 64,
        rngs: nnx.Rngs | None = None,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
    ):
        """expand_ratio: forget (state) rows per head, fla's head_f_dim (None: d_model / num_heads);
        forget_lower_bound: the least forget gate, in [0, 1)."""
        super().__init__(d_model, num_heads, impl=impl, chunk_size=chunk_size, dtype=dtype, param_dtype=param_dtype)
        rngs = self._rngs(rngs)
        check_optional_positive_int("expand_ratio", expand_ratio)
        check_fraction("forget_lower_bound", forget_lower_bound)
        if forget_lower_bound == 1:
            raise ValueError("forget_lower_bound must be below 1 (a forget gate of 1 never writes), got 1")
        self.head_dim = resolve_dim("head_dim", None, d_model, "d_model", num_heads, "num_heads")
        self.expand_ratio = self.head_dim if expand_ratio is None else expand_ratio
        self.forget_dim = num_heads * self.expand_ratio
        self.forget_lower_bound = float(forget_lower_bound)
        self.q_proj = self._linear(d_model, self.forget_dim, rngs)
        self.f_proj = self._linear(d_model, self.forget_dim, rngs)
        self.i_proj = self._linear(d_model, d_model, rngs)
        self.norm = RMSNorm(d_model, eps=norm_eps, param_dtype=param_dtype)
        self.o_proj = self._linear(d_model, d_model, rngs)

    def init_cache(self, batch: int, max_len: int) -> RecurrentCache:
        self._check_cache_args(batch, max_len)
        return RecurrentCache.empty((batch, self.num_heads, self.expand_ratio, self.head_dim))

    def _log_forget(self, logits: jax.Array) -> jax.Array:
        """log f = log(lb + (1 - lb) sigmoid(logits)), float32 (as a logaddexp, so no gate rounds to log 0)."""
        log_sigmoid = jax.nn.log_sigmoid(logits.astype(jnp.float32))
        lower = self.forget_lower_bound
        if lower == 0:
            return log_sigmoid
        return jnp.logaddexp(math.log(lower), math.log1p(-lower) + log_sigmoid)

    def _forward(self, x: jax.Array, cache: RecurrentCache | None, documents: Documents | None = None):
        q = self._heads(jax.nn.silu(self.q_proj(x)), self.expand_ratio)
        g = self._heads(self._log_forget(self.f_proj(x)), self.expand_ratio)
        i = self._heads(self.i_proj(x), self.head_dim)
        o, state = ops.hgrn2(q, i, g, **self._op_kwargs(None if cache is None else cache.state, documents))
        if cache is not None:
            cache = cache.replace(state=state, pos=cache.pos + x.shape[1])
        return self.o_proj(self.norm(self._merge_heads(o.astype(x.dtype)))), cache
