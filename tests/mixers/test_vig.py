"""ViG ("ViG: Linear-complexity Visual Sequence Learning with Gated Linear Attention") against its equations written
here with the layer's own parameters.

Reference, token by token: l = SiLU(DWConv(x)) (a loop over the taps of a zero-padded depthwise convolution, no
bias), q, k, v = l W, per direction its own gate log α = logsigmoid(l W_1 W_2 + b) / 16 and the recurrence
S = diag(α) S + k vᵀ, o = Sᵀ q / √d_k run over the tokens in that direction's order (the orders enumerated here
from rows and columns), the mean over directions, g = σ(l W_g + b), y = W_o[g ⊙ RMSNorm(o) + (1 − g) ⊙ RMSNorm(l)].
Forward in numpy float64 at rel err <= 1e-5 for every engine form; gradients of every parameter and the input
against jax.grad of the same formula in jnp at <= 1e-4; T = 37, a 5 × 7 grid with ViG's two directions and with
four (raster, column and both reversed), and a 4 × 6 grid in snake orders; bf16 within 3e-2; extreme gates.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from mixer_references import (
    ReferenceCases,
    check_non_causal_has_no_cache,
    depthwise_same,
    f64,
    heads,
    inputs,
    linear,
    merge,
    over_tokens,
    perturbed_params,
    raises_naming,
    sigmoid,
    silu,
)
from reference import rel_err

from seqlab.mixers.linear.vig import ViG

B, T, D, H = 2, 37, 32, 2
GRID, SNAKE_GRID = (5, 7), (4, 6)
FOUR_WAY = ("raster", "raster_reversed", "column", "column_reversed")
SNAKES = ("snake", "column_snake_reversed")


def order_positions(order: str, rows: int, cols: int) -> np.ndarray:
    """The raster position of each token of `order`, enumerated from its rows and columns."""
    base = order.removesuffix("_reversed")
    if base in ("raster", "snake"):
        lines = [[r * cols + c for c in range(cols)] for r in range(rows)]
    else:
        lines = [[r * cols + c for r in range(rows)] for c in range(cols)]
    if base.endswith("snake"):
        lines = [line[::-1] if i % 2 else line for i, line in enumerate(lines)]
    positions = np.array([p for line in lines for p in line])
    return positions[::-1] if order.endswith("_reversed") else positions


def rms(xp, a, weight, eps=1e-5):
    return a / xp.sqrt((a * a).mean(-1, keepdims=True) + eps) * weight


def vig_reference(xp, p, x, *, grid=None, orders=("raster", "raster_reversed"), expand_k=0.5):
    n, dk = x.shape[1], int(D * expand_k) // H
    local = silu(xp, depthwise_same(xp, x, {**p["local"]["conv"], "bias": 0.0}, grid))
    q = heads(linear(local, p["q_proj"]), H) / np.sqrt(dk)
    k, v = heads(linear(local, p["k_proj"]), H), heads(linear(local, p["v_proj"]), H)
    gate_logits = linear(linear(local, p["gk_down"]), p["gk_up"]).reshape(B, n, len(orders), H, dk)
    log_gates = -xp.logaddexp(0.0, -gate_logits) / 16.0

    def step(state, q_t, k_t, v_t, g_t):  # state [B, H, d_k, d_v]
        state = xp.exp(g_t)[..., None] * state + k_t[..., :, None] * v_t[..., None, :]
        return state, xp.einsum("bhk,bhkv->bhv", q_t, state)

    o = 0.0
    for i, order in enumerate(orders):
        at = order_positions(order, *(grid or (1, n)))
        o_order = over_tokens(xp, step, xp.zeros((B, H, dk, D // H)), (q[:, at], k[:, at], v[:, at],
                                                                         log_gates[:, at, i]))
        o = o + o_order[:, np.argsort(at)] / len(orders)
    g = sigmoid(xp, heads(linear(local, p["g_proj"]), H))
    mixed = g * rms(xp, o, p["o_norm"]["weight"]) + (1 - g) * rms(xp, heads(local, H), p["l_norm"]["weight"])
    return linear(merge(mixed), p["o_proj"])


SEQUENCE = ReferenceCases(
    {
        "vig-1d": (lambda **kw: ViG(D, H, **kw), vig_reference),
        "vig-1d-wide": (lambda **kw: ViG(D, H, expand_k=1.0, conv_size=5, **kw),
                        lambda xp, p, x: vig_reference(xp, p, x, expand_k=1.0)),
    },
    shape=(B, T, D),
)
ON_GRID = ReferenceCases(
    {
        "vig-grid": (lambda **kw: ViG(D, H, grid=GRID, **kw), lambda xp, p, x: vig_reference(xp, p, x, grid=GRID)),
        "vig-grid-four-way": (lambda **kw: ViG(D, H, grid=GRID, orders=FOUR_WAY, **kw),
                              lambda xp, p, x: vig_reference(xp, p, x, grid=GRID, orders=FOUR_WAY)),
    },
    shape=(B, GRID[0] * GRID[1], D),
)
SNAKE = ReferenceCases(
    {"vig-snake": (lambda **kw: ViG(D, H, grid=SNAKE_GRID, orders=SNAKES, **kw),
                   lambda xp, p, x: vig_reference(xp, p, x, grid=SNAKE_GRID, orders=SNAKES))},
    shape=(B, SNAKE_GRID[0] * SNAKE_GRID[1], D),
)


@pytest.mark.parametrize("case, form", SEQUENCE.forms())
def test_forward_and_gradients_match_reference(case, form):
    SEQUENCE.check_forward_and_gradients(case, *form)


@pytest.mark.parametrize("case, form", ON_GRID.forms())
def test_grid_forward_and_gradients_match_reference(case, form):
    ON_GRID.check_forward_and_gradients(case, *form)


def test_snake_orders_match_reference():
    SNAKE.check_forward_and_gradients("vig-snake", "chunked", 8)


def test_extreme_gates_stay_finite_and_match_reference():
    """Gate logits pushed to ±30 (α ≈ 1 and α = e^{-30/16}·...) through the gate bias."""
    mixer = ViG(D, H, grid=GRID, chunk_size=8, rngs=nnx.Rngs(0))
    params = perturbed_params(mixer)
    bias = params["gk_up"]["bias"]
    params["gk_up"]["bias"] = jnp.where(jnp.arange(bias.shape[0]) % 2 == 0, 30.0, -30.0)
    nnx.update(mixer, params)
    x, _ = inputs(0, (B, GRID[0] * GRID[1], D))
    y = nnx.jit(lambda m, a: m(a))(mixer, x)
    assert bool(jnp.all(jnp.isfinite(y)))
    assert rel_err(y, vig_reference(np, f64(params), np.asarray(x, np.float64), grid=GRID)) <= 1e-5


@pytest.mark.parametrize("closed, sees", [((), "both"), ((1,), "forward"), ((0,), "backward"), ((0, 1), "none")])
def test_each_direction_reads_its_own_side(closed, sees):
    """A direction whose gate is closed (bias -1e4: α = 0, its state holds only the current token) carries nothing
    along the sequence: with the backward gate closed a change to the first token reaches later tokens and a change
    to the last token reaches no earlier one; with the forward gate closed the other way round. conv_size 1 keeps
    the local branch per token."""
    mixer = ViG(D, H, conv_size=1, rngs=nnx.Rngs(0))
    bias = mixer.gk_up.bias[...].reshape(2, -1)
    for direction in closed:
        bias = bias.at[direction].set(-1e4)
    mixer.gk_up.bias[...] = bias.reshape(-1)
    x, _ = inputs(3, (B, T, D))
    y = mixer(x)
    later_moved = rel_err(mixer(x.at[:, 0].add(1.0))[:, 1:], y[:, 1:]) > 1e-4
    earlier_moved = rel_err(mixer(x.at[:, -1].add(1.0))[:, :-1], y[:, :-1]) > 1e-4
    assert (later_moved, earlier_moved) == {"both": (True, True), "forward": (True, False),
                                            "backward": (False, True), "none": (False, False)}[sees]


def test_bf16_compute_stays_close_to_the_reference():
    ON_GRID.check_bf16("vig-grid")


def test_vig_has_no_cache():
    check_non_causal_has_no_cache(SEQUENCE.make("vig-1d"), B)


@pytest.mark.parametrize(
    "build, arg",
    [
        (lambda: ViG(D, H, grid=(5,)), "grid"),
        (lambda: ViG(D, H, orders=("diagonal",)), "orders"),
        (lambda: ViG(D, H, orders=()), "orders"),
        (lambda: ViG(D, H, orders=("column",)), "orders"),  # a 1-D sequence has no columns
        (lambda: ViG(D, H, expand_k=0.3), "expand_k"),
        (lambda: ViG(D, 3, expand_k=0.75), "d_model"),
        (lambda: ViG(D, H, conv_size=4), "conv_size"),
        (lambda: ViG(D, H, gate_logit_normalizer=0.0), "gate_logit_normalizer"),
        (lambda: ViG(D, H, grid=GRID)(jnp.zeros((B, T, D))), "x"),
    ],
)
def test_bad_arguments_name_the_argument(build, arg):
    raises_naming(build, arg)


def test_orders_are_stacked_into_one_op_call(monkeypatch):
    """scan_orders runs the directions as one batched op: the GLA op is called once per forward."""
    from seqlab import ops

    calls = []
    real = ops.gla
    monkeypatch.setattr(ops, "gla", lambda *a, **kw: calls.append(a[0].shape) or real(*a, **kw))
    jax.eval_shape(lambda m, a: m(a), ViG(D, H, grid=GRID, orders=FOUR_WAY, rngs=nnx.Rngs(0)),
                   jnp.zeros((B, 35, D)))
    assert calls == [(4 * B, 35, H, D // 4)]
