"""HyperZ·Z·W (non-causal): a slow network's hyper-kernel W, made context-dependent by the fast activations Z, then
convolving Z with a kernel as large as the token grid. Per kernel position p and token i (c: the kernel's centre):

    κ_p ∈ [-1, 1]^d                                kernel coordinates: linspace(-1, 1, n) per axis (d = 1 or 2)
    h⁰_p = sin(κ_p A_0 + a_0)
    hˡ_p = sin(κ_p A_l + a_l) ⊙ (hˡ⁻¹_p M_l + m_l),  l = 1..L         the slow network (MAGNet, an implicit MLP)
    W_p = N^-1/2 (hᴸ_p W_k + b_k)                  the hyper-kernel [N, C]: one channel per feature, N = Π n
    z_i = x_i W_z + b_z                            the fast activations Z [B, N, C]
    Ŵ_p = W_p ⊙ z_p                                HyperZ·Z·W: the context-dependent kernel [B, N, C]
    o_i = Σ_p Ŵ_p ⊙ z_{i + p - c}                  its depthwise convolution of Z (zero outside the grid)
    y_i = o_i W_o + b_o

x, y [B, T, D] (C = D); on a ``grid`` (rows, cols) the tokens are a raster-order grid [B, rows, cols, C] (T = N =
rows·cols) and the kernel is rows × cols with centre c = ((rows - 1) // 2, (cols - 1) // 2) (PyTorch's "same"
cross-correlation); with grid None it is a 1-D kernel of the sequence's length T, generated at call time from
linspace(-1, 1, T) (the slow network is a function of coordinates, so one mixer serves any length; this module's
extension of the 2-D layer). The kernel is global: W ⊙ Z needs W as large as Z, so output i reads z on the window
of the grid's size centred on it (clipped by the zero padding) with every kernel weight modulated by the token at
that kernel position. On a sequence every token reaches every output (as a weight or as the convolved input); on a
grid the two ways hold per rectangle, not per axis, so a token off the centre misses some outputs (a corner token:
the two off-diagonal quadrants, outside the centre row and column). The convolution is an FFT over a zero-padded 2n
per axis, in float32, as is the slow network.

Paper: "HyperZ·Z·W Operator Connects Slow-Fast Networks for Full Context Interaction" (Harvie Zhang, 2024; the
Terminator). Read from hyperevolnet/Terminator: `models/modules/magnet.py` (`MAGNetLayer`, `MAGNetBase`, `MAGNet_G`),
`slow_net.py` (`linspace_grid`, the Chang et al. initialisation), `hyperzzw.py` and `fast_multi_branch.py`. Followed
there: the coordinates linspace(-1, 1) of a kernel the size of the image; the filters sin(κ A + a) with A at
init U(±1/√d) · 2π ω_0 γ, γ ~ Gamma(α / (l + 1), β) per feature and coordinate (α = 6, β = 1), a = 0; the hidden
linears kaiming-uniform (gain 1) with bias 1, the output linear kaiming-uniform with bias 0; L + 1 filters for L
hidden linears; Ŵ = Z ⊙ W elementwise (the code's ``global_ctx_hk = x.mul(global_hk)``); the input and output
maps kaiming-normal with bias 0, like its channel mixer and bottleneck.
Deviations from the code (the paper's body could not be read here, only its abstract and summaries of it, so its
own equations are unverified): the official global
branch applies Ŵ with ``torch.matmul`` over the last two axes (a per-channel H × W matrix product, square images
only); this module applies it as the abstract states, a convolution of Z (centred, zero-padded), which also exists
on 1-D sequences and non-square grids. MAGNet_G's learnt per-position bias ``bias_p`` (zero at init) is left out,
so the kernel needs no fixed size; Chang et al.'s initialisation (the output weight scaled by N^-1/2 at init) is
the fixed factor N^-1/2 on the generated kernel instead (the same kernel at init; it also scales b_k). ω_0 (no
value in the repository's config) defaults to 1: first-filter frequencies of order 2π·6/√d rad per unit of κ. As
in the code, the kernel is zero at the centre coordinate κ = 0 at init (sin(0), zero biases). One branch only: the
SFNE block's other branches (RGU, local hyper-kernels, hyper-channel and hyper interaction), its instance
standardisation, bottleneck, G-IBS, and the slow neural loss are not part of the mixer.

Causality: none (no decode cache, no packed rows). On a sequence split over devices (`sequence_axis`) the operator
all-gathers Z.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from seqlab.checks import check_positive, check_positive_int
from seqlab.layers.grid_conv import check_grid, spatial_shape
from seqlab.mixers.base import Mixer
from seqlab.mixers.registry import register


@register(
    "hyperzzw",
    kind="conv",
    paper="HyperZ·Z·W Operator Connects Slow-Fast Networks for Full Context Interaction",
    examples={"default": dict(num_heads=1, slow_hidden=16, slow_layers=2),
              "deep": dict(num_heads=1, slow_hidden=8, slow_layers=3, omega_0=0.5)},
)  # 2-d (whole grids only): tests/mixers/test_hyperzzw.py
class HyperZZW(Mixer):
    """The global HyperZ·Z·W operator between an input and an output projection (non-causal), x [B, T, D] ->
    [B, T, D]; grid: (rows, cols) of 2-D tokens (None: a 1-D sequence); slow_hidden / slow_layers: the slow
    network's width and hidden linears L; omega_0, gamma_alpha, gamma_beta: its filters' initial frequencies.
    num_heads is accepted for the uniform mixer constructor (unused), like `impl` (no op)."""

    causal = False

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        *,
        grid: tuple[int, int] | None = None,
        slow_hidden: int = 64,
        slow_layers: int = 2,
        omega_0: float = 1.0,
        gamma_alpha: float = 6.0,
        gamma_beta: float = 1.0,
        use_bias: bool = True,
        impl: str = "auto",
        rngs: nnx.Rngs | None = None,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
    ):
        super().__init__(d_model, num_heads, impl=impl, chunk_size=None, dtype=dtype, param_dtype=param_dtype)
        rngs = self._rngs(rngs)
        self.grid = check_grid(grid)
        check_positive_int("slow_hidden", slow_hidden)
        check_positive_int("slow_layers", slow_layers)
        check_positive("omega_0", omega_0)
        check_positive("gamma_alpha", gamma_alpha)
        check_positive("gamma_beta", gamma_beta)
        if not isinstance(use_bias, bool):
            raise ValueError(f"use_bias must be a bool, got {use_bias!r}")
        axes, hidden = (1 if self.grid is None else 2), slow_hidden
        alphas = gamma_alpha / jnp.arange(1, slow_layers + 2, dtype=jnp.float32)[:, None, None]  # α / (l + 1)
        gamma = jax.random.gamma(rngs.params(), alphas, (slow_layers + 1, axes, hidden)) / gamma_beta
        directions = jax.random.uniform(rngs.params(), gamma.shape, jnp.float32, -(axes**-0.5), axes**-0.5)
        self.filter_weight = nnx.Param((2 * math.pi * omega_0 * gamma * directions).astype(param_dtype))  # A_l
        self.filter_bias = nnx.Param(jnp.zeros((slow_layers + 1, hidden), param_dtype))  # a_l
        self.hidden_weight = nnx.Param(jax.random.uniform(rngs.params(), (slow_layers, hidden, hidden), param_dtype,
                                                          -(3 / hidden) ** 0.5, (3 / hidden) ** 0.5))  # M_l
        self.hidden_bias = nnx.Param(jnp.ones((slow_layers, hidden), param_dtype))  # m_l
        kaiming_uniform = jax.nn.initializers.variance_scaling(1.0, "fan_in", "uniform")
        self.kernel_proj = nnx.Linear(hidden, d_model, kernel_init=kaiming_uniform, param_dtype=param_dtype,
                                      rngs=rngs)  # W_k, b_k (float32 compute)
        kaiming_normal = jax.nn.initializers.variance_scaling(2.0, "fan_in", "normal")
        self.z_proj = self._linear(d_model, d_model, rngs, use_bias=use_bias, kernel_init=kaiming_normal)
        self.o_proj = self._linear(d_model, d_model, rngs, use_bias=use_bias, kernel_init=kaiming_normal)

    def _forward(self, x: jax.Array, cache: Any):
        o = self._on_whole_sequence(self.operator, self.z_proj(x))
        return self.o_proj(o), cache

    def hyper_kernel(self, shape: tuple[int, ...]) -> jax.Array:
        """W [*shape, C] float32: the slow network at the coordinates of a kernel of `shape` (N^-1/2 included)."""
        axes = [np.linspace(-1.0, 1.0, n) for n in shape]
        coords = jnp.asarray(np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1), jnp.float32)  # [*shape, d]
        a, a_bias = self.filter_weight[...].astype(jnp.float32), self.filter_bias[...].astype(jnp.float32)
        m, m_bias = self.hidden_weight[...].astype(jnp.float32), self.hidden_bias[...].astype(jnp.float32)
        h = jnp.sin(coords @ a[0] + a_bias[0])
        for layer in range(m.shape[0]):
            h = jnp.sin(coords @ a[layer + 1] + a_bias[layer + 1]) * (h @ m[layer] + m_bias[layer])
        kernel = h @ self.kernel_proj.kernel[...].astype(jnp.float32) + self.kernel_proj.bias[...].astype(jnp.float32)
        return kernel / math.sqrt(math.prod(shape))

    def operator(self, z: jax.Array) -> jax.Array:
        """o [B, T, C] (z's dtype) from the whole sequence z [B, T, C]: the context-dependent kernel W ⊙ z
        convolving z."""
        batch, length, channels = z.shape
        shape = spatial_shape(length, self.grid)
        image = z.astype(jnp.float32).reshape(batch, *shape, channels)
        context = self.hyper_kernel(shape) * image  # Ŵ [B, *shape, C]
        axes = tuple(range(1, len(shape) + 1))
        padded = tuple(2 * n for n in shape)
        # o_i = Σ_p Ŵ_p z_{i+p-c} is the linear convolution of z with the flipped Ŵ, read from n - 1 - c on
        spectrum = jnp.fft.rfftn(image, padded, axes) * jnp.fft.rfftn(jnp.flip(context, axes), padded, axes)
        full = jnp.fft.irfftn(spectrum, padded, axes)
        for axis, n in zip(axes, shape):
            full = jax.lax.slice_in_dim(full, n - 1 - (n - 1) // 2, 2 * n - 1 - (n - 1) // 2, axis=axis)
        return full.reshape(batch, length, channels).astype(z.dtype)
