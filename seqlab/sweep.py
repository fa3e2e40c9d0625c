"""Grid sweeps over a config: one run per grid point, resumable, N at a time, and Zoology's best-of-learning-rate
selection.

    python -m seqlab.sweep --config=configs/mqar.py:gla --grid="optim.learning_rate=(1e-3,3e-3,1e-2)" \\
        --grid="model.d_model=(64,128)" --root=DIR [--set=train.steps=300 ...] [--parallel=2]

Each ``--grid=key=(v1,v2,...)`` is an axis (a Python literal; a single value is a one-point axis) and the points
are their product. Every point runs ``python -m seqlab.train`` in its own process and workdir under ``--root``,
named by its overrides (``model.d_model=64,optim.learning_rate=0.003``); ``--set=key=value`` applies to every
point and is not part of the name. Every point's config is validated before the first run starts, so a mistyped
key fails in one line with nothing run. A point whose workdir holds its run with the final evaluation in
metrics.jsonl is skipped, and an unfinished one resumes from its checkpoint, so rerunning a sweep finishes it. A failed point (its log is
``<workdir>/train.log``) is reported and the others go on; the sweep then exits non-zero.

At the end: a markdown table of every point (overrides, parameters, decode-state bytes, final test accuracy and
loss, training seconds), written also to ``<root>/sweep.json``, and the best learning rate of each group of points
that differ only in ``optim.learning_rate`` (highest final accuracy, then lowest loss), as Zoology reports its
sweeps. `run_sweep`, `grid_points`, `point_name` and `best_of_lr` are the same steps for a notebook.
"""

from __future__ import annotations

import ast
import concurrent.futures
import functools
import itertools
import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
from absl import app, flags

from seqlab import config as config_lib
from seqlab.training import workdir as workdir_lib
from seqlab.training.metrics import load_metrics, run_columns

LEARNING_RATE = "optim.learning_rate"
SWEEP_FILE = "sweep.json"
LOG_FILE = "train.log"


def parse_assignment(text: str, flag: str) -> tuple[str, Any]:
    """``"a.b=literal"`` -> ("a.b", the Python literal, or the text itself when it is not one)."""
    key, sep, value = text.partition("=")
    if not sep or not key or not value:
        raise ValueError(f"--{flag}: expected key=value, e.g. --{flag}=optim.learning_rate=(1e-3,3e-3), got {text!r}")
    try:
        return key.strip(), ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key.strip(), value


def parse_grid(texts: Sequence[str]) -> dict[str, tuple]:
    """``--grid`` flags -> {key: the axis' values}; a single value is a one-point axis."""
    grid: dict[str, tuple] = {}
    for text in texts:
        key, values = parse_assignment(text, "grid")
        if key in grid:
            raise ValueError(f"--grid: {key} is given twice")
        grid[key] = tuple(values) if isinstance(values, (tuple, list)) else (values,)
        if not grid[key]:
            raise ValueError(f"--grid: {key} has no values")
    return grid


def grid_points(grid: dict[str, Sequence]) -> list[dict[str, Any]]:
    """Every combination of the axes' values, as {key: value} in the grid's key order (the last key varies
    fastest)."""
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def point_name(overrides: dict[str, Any]) -> str:
    """The workdir name of a point: its overrides sorted by key, ``key=value`` joined by commas (tuples joined by
    '+'; no '/' or whitespace)."""
    parts = []
    for key in sorted(overrides):
        value = overrides[key]
        text = "+".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)
        parts.append(f"{key}={text}")
    return ",".join(parts).replace("/", "_").replace(" ", "")


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, Any]) -> None:
    """Set each dotted key of `overrides` in `config` (a key that does not exist raises ValueError, in one line, with
    the close matches)."""
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        section = config
        for depth, name in enumerate(parents):
            if not isinstance(section, ml_collections.ConfigDict) or name not in section:
                raise ValueError(_unknown(".".join(parents[: depth + 1]), section))
            section = section[name]
        if not isinstance(section, ml_collections.ConfigDict) or leaf not in section:
            raise ValueError(_unknown(key, section))
        section[leaf] = value


def _unknown(key: str, section: Any) -> str:
    choices = list(section.keys()) if isinstance(section, ml_collections.ConfigDict) else []
    return f"config key '{key}' does not exist{config_lib.did_you_mean(key.rpartition('.')[2], choices)}"


def point_config(spec: str, overrides: dict[str, Any]) -> ml_collections.ConfigDict:
    """The validated config of ``--config=spec`` with `overrides` set."""
    config = config_lib.load_config(spec)
    apply_overrides(config, overrides)
    config_lib.validate(config)
    return config


def flag_text(value: Any) -> str:
    """`value` as a ``--config.key=`` flag takes it (tuples as a Python literal)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (tuple, list)):
        return repr(tuple(value))
    return str(value)


def train_command(spec: str, workdir: str, overrides: dict[str, Any]) -> list[str]:
    return [sys.executable, "-m", "seqlab.train", f"--config={spec}", f"--workdir={workdir}",
            *(f"--config.{key}={flag_text(value)}" for key, value in overrides.items())]


def final_evaluation(workdir: str, steps: int) -> dict[str, Any] | None:
    """The eval record at `steps` (the run's final evaluation) in the workdir's metrics, if it is there."""
    try:
        records = load_metrics(workdir, split="eval")
    except ValueError:
        return None
    finals = [r for r in records if r["step"] == steps]
    return finals[-1] if finals else None


def _holds_this_run(workdir: str, config: ml_collections.ConfigDict) -> bool:
    """Whether `workdir` holds a run of `config` (its config.json differs at most in what resume may change)."""
    stored = workdir_lib.read_stored_config(workdir)
    if stored is None:
        return False
    new = json.loads(config.to_json_best_effort())
    return not workdir_lib.config_differences(stored, new, config_lib.default_dict())


def run_sweep(
    spec: str, grid: dict[str, Sequence], root: str, *, sets: dict[str, Any] | None = None, parallel: int = 1,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:  # fmt: skip
    """Run every grid point not yet finished (`parallel` at a time) and return one row per point: its overrides,
    "name", "workdir", "status" ("done", "skipped" or "failed"), the run's config columns, "eval_accuracy",
    "eval_loss", "train_s" (and "error", the last line of its log, for a failed point). Writes <root>/sweep.json."""
    if parallel < 1:
        raise ValueError(f"parallel must be a positive integer, got {parallel}")
    sets = dict(sets or {})
    points = grid_points(grid)
    configs = {point_name(p): point_config(spec, {**sets, **p}) for p in points}  # validate all first
    os.makedirs(root, exist_ok=True)
    jobs = [(p, point_name(p)) for p in points]

    def run(point: dict[str, Any], name: str) -> dict[str, Any]:
        workdir, steps = os.path.join(root, name), configs[name].train.steps
        if _holds_this_run(workdir, configs[name]) and final_evaluation(workdir, steps) is not None:
            log(f"skip {name}: finished")
            return _row(point, name, workdir, steps, "skipped")
        log(f"run  {name}")
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, LOG_FILE), "a") as out:
            proc = subprocess.run(train_command(spec, workdir, {**sets, **point}), stdout=out,
                                  stderr=subprocess.STDOUT)  # fmt: skip
        if proc.returncode != 0 or final_evaluation(workdir, steps) is None:
            row = _row(point, name, workdir, steps, "failed")
            log(f"FAIL {name} (exit {proc.returncode}): {row['error']}")
            return row
        log(f"done {name}")
        return _row(point, name, workdir, steps, "done")

    with concurrent.futures.ThreadPoolExecutor(max_workers=parallel) as pool:
        rows = list(pool.map(lambda job: run(*job), jobs))
    with open(os.path.join(root, SWEEP_FILE), "w") as f:
        json.dump(rows, f, indent=1)
    return rows


def _row(point: dict[str, Any], name: str, workdir: str, steps: int, status: str) -> dict[str, Any]:
    row: dict[str, Any] = {**point, "name": name, "workdir": workdir, "status": status}
    if status == "failed":
        row["error"] = _last_line(os.path.join(workdir, LOG_FILE))
        return row
    final = final_evaluation(workdir, steps)
    train = [r for r in load_metrics(workdir, split="train") if r["step"] <= steps]
    row.update(run_columns(workdir))
    row.update(eval_accuracy=final["accuracy"], eval_loss=final["loss"],
               train_s=train[-1].get("elapsed_s") if train else None)
    return row


def _last_line(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError:
        return "no log"
    return lines[-1] if lines else "empty log"


def best_of_lr(rows: Sequence[dict[str, Any]], grid_keys: Sequence[str]) -> list[dict[str, Any]]:
    """For each group of finished rows that agree on every key of `grid_keys` except optim.learning_rate, the row
    with the highest eval_accuracy (ties: the lower eval_loss). Groups come in the order of their first row."""
    group_keys = [k for k in grid_keys if k != LEARNING_RATE]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        if row["status"] != "failed":
            groups.setdefault(tuple(_hashable(row[k]) for k in group_keys), []).append(row)
    return [max(group, key=lambda r: (r["eval_accuracy"], -r["eval_loss"])) for group in groups.values()]


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def markdown(rows: Sequence[dict[str, Any]], grid_keys: Sequence[str]) -> str:
    """The rows as a markdown table: the grid keys, then params, decode-state bytes, accuracy, loss, seconds."""
    header = [*grid_keys, "params", "decode state bytes", "test accuracy", "test loss", "train s", "status"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [flag_text(row[k]) for k in grid_keys]
        if row["status"] == "failed":
            cells += ["", "", "", "", "", f"failed: {row['error']}"]
        else:
            state = row.get("decode_state_bytes")
            cells += [f"{row.get('params', 0):,}", "-" if state is None else f"{state:,}",
                      f"{row['eval_accuracy']:.4f}", f"{row['eval_loss']:.4f}",
                      "-" if row["train_s"] is None else f"{row['train_s']:.0f}", row["status"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------------------------


def define_flags() -> None:
    flags.DEFINE_string("config", None, "Config file and variant, as seqlab.train takes it (file.py[:variant]).")
    flags.DEFINE_multi_string("grid", [], "An axis: key=(v1,v2,...) (repeatable; the points are the product).")
    flags.DEFINE_multi_string("set", [], "key=value applied to every point (repeatable).")
    flags.DEFINE_string("root", None, "Directory that holds one workdir per point, and sweep.json.")
    flags.DEFINE_integer("parallel", 1, "How many points run at a time.")
    flags.mark_flags_as_required(["config", "root"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    try:
        grid = parse_grid(f.grid)
        sets = dict(parse_assignment(text, "set") for text in f.set)
        rows = run_sweep(f.config, grid, f.root, sets=sets, parallel=f.parallel,
                         log=functools.partial(print, flush=True))  # fmt: skip
    except ValueError as error:
        sys.exit(f"seqlab.sweep: {error}")
    keys = list(grid)
    print(markdown(rows, keys))
    if LEARNING_RATE in grid:
        print(f"\nBest {LEARNING_RATE} per setting of the other grid keys:")
        print(markdown(best_of_lr(rows, keys), keys))
    failed = [r["name"] for r in rows if r["status"] == "failed"]
    if failed:
        sys.exit(f"seqlab.sweep: {len(failed)} of {len(rows)} points failed: {', '.join(failed)}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
