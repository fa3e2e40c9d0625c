"""Argument validation shared by mixers, layers, models and training code. Each check raises ValueError with the
argument's name first in the message."""

from __future__ import annotations

import math
from typing import Any


def check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_optional_positive_int(name: str, value: Any) -> None:
    if value is not None:
        check_positive_int(name, value)


def check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")


def check_nonnegative(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def check_finite(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


def check_fraction(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")


def check_divisible(name: str, value: int, divisor: int, divisor_name: str) -> None:
    if value % divisor:
        raise ValueError(f"{name} ({value}) must be divisible by {divisor_name} ({divisor})")


def check_choice(name: str, value: Any, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}, got {value!r}")


def check_even(name: str, value: int) -> None:
    if value % 2:
        raise ValueError(f"{name} must be even for the rotary embedding, got {value}")


def check_input(x: Any, d_model: int, *, rank: int, name: str) -> None:
    """x must be an array of `rank` dims whose last dim is d_model."""
    shape = getattr(x, "shape", None)
    if shape is None:
        raise ValueError(f"{name} must be an array, got {type(x).__name__}")
    layout = "[B, T, d_model]" if rank == 3 else "[B, d_model]"
    if len(shape) != rank:
        raise ValueError(f"{name} must have shape {layout} (rank {rank}), got shape {tuple(shape)}")
    if shape[-1] != d_model:
        raise ValueError(f"{name} last dim must equal d_model={d_model}, got shape {tuple(shape)}")


def resolve_dim(name: str, value: int | None, total: int, total_name: str, parts: int, parts_name: str) -> int:
    """A per-head size: `value` if given, else total // parts (which must divide)."""
    if value is not None:
        check_positive_int(name, value)
        return value
    check_divisible(total_name, total, parts, parts_name)
    return total // parts


def expand_dim(name: str, base: int, ratio: float, num_heads: int, base_name: str = "d_model") -> int:
    """Per-head size base * ratio / num_heads (fla's expand_k / expand_v), checked to be an integer."""
    check_positive(name, ratio)
    total = base * ratio
    if total != int(total) or int(total) % num_heads:
        raise ValueError(
            f"{name}: {base_name} * {name} = {total} must be an integer divisible by num_heads ({num_heads})"
        )
    return int(total) // num_heads
