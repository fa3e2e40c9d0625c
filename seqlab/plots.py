"""The usual figures of the paper-ablation notebooks, drawn from `seqlab.training.metrics_table` DataFrames:
accuracy against state bytes, d_model or length (best over learning rates, as Zoology reports), loss curves, and
time against sequence length. matplotlib and pandas come with the notebooks extra.

    table = metrics_table("/tmp/recall/*/*")
    final = plots.final_results(table)                  # one row per run: its last eval record
    plots.accuracy_vs(final, "decode_state_bytes")      # best lr per (mixer, state size), one line per mixer
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

LEARNING_RATE = "optim.learning_rate"
MIXERS = "model.mixers"


def _pyplot():
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError('seqlab.plots needs matplotlib: pip install -e ".[notebooks]"') from None
    return plt


def _axes(ax):
    return ax if ax is not None else _pyplot().subplots(figsize=(5.5, 3.8))[1]


def final_results(table, *, split: str = "eval"):
    """The last `split` record of every run (workdir) in `table`: one row per run, its config columns kept."""
    rows = table[table["split"] == split]
    if rows.empty:
        raise ValueError(f"table: no {split!r} records (splits present: {sorted(set(table['split']))})")
    return rows.sort_values("step").groupby("workdir", as_index=False).tail(1).reset_index(drop=True)


def best_over(final, keys: Sequence[str], *, over: str = LEARNING_RATE, metric: str = "accuracy",
              maximize: bool = True):
    """Of the runs in `final` that share `keys` and differ in `over` (the learning rate), the one with the best
    `metric`: one row per distinct `keys`, with `over` the winning value."""
    missing = [k for k in (*keys, over, metric) if k not in final.columns]
    if missing:
        raise ValueError(f"best_over: no column {missing[0]!r} (columns: {', '.join(map(str, final.columns))})")
    ordered = final.sort_values(metric, ascending=not maximize)
    return ordered.groupby(list(keys), as_index=False).head(1).sort_values(list(keys)).reset_index(drop=True)


def lines(frame, x: str, y: str, *, hue: str | None = MIXERS, ax=None, logx: bool = False, logy: bool = False,
          marker: str = "o", xlabel: str | None = None, ylabel: str | None = None, title: str | None = None,
          labels: dict[Any, str] | None = None, colors: dict[Any, Any] | None = None):
    """One line of `y` against `x` per value of `hue` (points sorted by x), coloured by `colors[value]` when given
    (so two panels of the same mixers match); returns the Axes."""
    ax = _axes(ax)
    groups = [(None, frame)] if hue is None else frame.groupby(hue, sort=True)
    for name, group in groups:
        group = group.sort_values(x)
        label = None if hue is None else (labels or {}).get(name, str(name))
        color = (colors or {}).get(name)
        ax.plot(group[x], group[y], marker=marker, label=label, color=color)
    ax.set(xlabel=xlabel or x, ylabel=ylabel or y, title=title)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    if hue is not None:
        ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return ax


def accuracy_vs(final, x: str, *, hue: str = MIXERS, metric: str = "accuracy", ax=None, logx: bool | None = None,
                **kwargs):
    """Test `metric` against `x` ("decode_state_bytes", "model.d_model", "data.seq_len", ...), best over the
    learning rates of each (hue, x) point, one line per `hue`; state bytes on a log axis by default."""
    best = best_over(final, [hue, x], metric=metric)
    logx = x.endswith("state_bytes") if logx is None else logx
    ax = lines(best, x, metric, hue=hue, ax=ax, logx=logx, ylabel=f"test {metric}", **kwargs)
    ax.set_ylim(-0.03, 1.03)
    return ax


def loss_curves(table, *, hue: str = "workdir", split: str = "train", y: str = "loss", ax=None,
                logy: bool = True, **kwargs):
    """`y` against step of every run's `split` records, one line per `hue` value."""
    rows = table[table["split"] == split]
    return lines(rows, "step", y, hue=hue, ax=ax, logy=logy, marker="", ylabel=f"{split} {y}", **kwargs)


def time_vs_length(frame, *, x: str = "seq_len", y: str = "ms_per_token", hue: str = "impl", ax=None,
                   logx: bool = True, **kwargs):
    """Per-token (or total) time against sequence length, one line per implementation; log-2 x axis."""
    ax = lines(frame, x, y, hue=hue, ax=ax, logx=False, **kwargs)
    if logx:
        ax.set_xscale("log", base=2)
    return ax
