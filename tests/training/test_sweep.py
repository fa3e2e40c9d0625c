"""Sweeps: the grid's points and names, Zoology's best-of-learning-rate choice, a real sweep that a rerun skips,
errors before anything runs, and a failed point reported while the others finish."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from seqlab import sweep
from seqlab.training import load_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SPEC = "configs/mqar.py:gla,tiny"
TINY = {"train.steps": 3, "train.log_every": 1, "train.eval_every": 3, "train.checkpoint_every": 3}


def test_the_grid_is_the_product_of_its_axes_in_order():
    points = sweep.grid_points({"optim.learning_rate": (1e-3, 1e-2), "model.d_model": (64, 128)})
    assert points == [{"optim.learning_rate": 1e-3, "model.d_model": 64},
                      {"optim.learning_rate": 1e-3, "model.d_model": 128},
                      {"optim.learning_rate": 1e-2, "model.d_model": 64},
                      {"optim.learning_rate": 1e-2, "model.d_model": 128}]
    assert sweep.parse_grid(["model.d_model=(64,128)", "optim.learning_rate=3e-3"]) == {
        "model.d_model": (64, 128), "optim.learning_rate": (3e-3,)}


def test_point_names_are_sorted_readable_and_path_safe():
    name = sweep.point_name({"optim.learning_rate": 0.003, "model.mixers": ("baseconv", "gla"), "data.files": "a/b c"})
    assert name == "data.files=a_bc,model.mixers=baseconv+gla,optim.learning_rate=0.003"


def test_best_of_lr_picks_the_most_accurate_rate_per_setting():
    def row(lr, d, acc, loss, status="done"):
        return {"optim.learning_rate": lr, "model.d_model": d, "status": status, "eval_accuracy": acc,
                "eval_loss": loss}

    rows = [row(1e-3, 64, 0.50, 1.0), row(1e-2, 64, 0.70, 2.0), row(3e-2, 64, 0.70, 1.5),
            row(1e-3, 128, 0.90, 0.5), row(1e-2, 128, 0.99, 0.1, status="failed")]
    best = sweep.best_of_lr(rows, ["optim.learning_rate", "model.d_model"])
    assert [(r["model.d_model"], r["optim.learning_rate"]) for r in best] == [(64, 3e-2), (128, 1e-3)]


@pytest.mark.parametrize("grid, message", [
    (["optim.learning_rat=(1e-3,)"], "config key 'optim.learning_rat' does not exist; did you mean"),
    (["optim.learning_rate"], "--grid: expected key=value"),
    (["model.d_model=(33,)"], "must be divisible by model.num_heads"),
])
def test_a_bad_grid_fails_in_one_line_before_anything_runs(grid, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        sweep.run_sweep(SPEC, sweep.parse_grid(grid), str(tmp_path / "root"), sets=TINY)
    assert not os.path.exists(tmp_path / "root")


def test_a_sweep_runs_each_point_once_skips_them_on_a_rerun_and_reports_a_failed_one(tmp_path):
    root = tmp_path / "root"
    grid = ["--grid=optim.learning_rate=(1e-3,1e-2)", "--grid=model.d_model=(32,)"]
    sets = [f"--set={k}={v}" for k, v in TINY.items()]
    cmd = [sys.executable, "-m", "seqlab.sweep", f"--config={SPEC}", f"--root={root}", "--parallel=2", *grid, *sets]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    names = ["model.d_model=32,optim.learning_rate=0.001", "model.d_model=32,optim.learning_rate=0.01"]
    assert sorted(p for p in os.listdir(root) if os.path.isdir(root / p)) == names
    assert "Best optim.learning_rate" in proc.stdout
    rows = json.load(open(root / "sweep.json"))
    assert [r["status"] for r in rows] == ["done", "done"]
    assert rows[0]["params"] > 0 and rows[0]["model.mixers"] == "baseconv+gla" and rows[0]["data.seq_len"] == 32
    for name in names:
        evals = [r for r in load_metrics(str(root / name), split="eval") if r["step"] == 3]
        assert len(evals) == 1

    before = {name: open(root / name / "metrics.jsonl").read() for name in names}
    other = "model.d_model=32,optim.learning_rate=0.03"
    shutil.copytree(root / names[0], root / other)  # holds the lr=1e-3 run: the launcher must refuse it
    log = []
    rows = sweep.run_sweep(SPEC, {"optim.learning_rate": (1e-3, 1e-2, 3e-2), "model.d_model": (32,)}, str(root),
                           sets=TINY, log=log.append)
    assert {r["name"]: r["status"] for r in rows} == {names[0]: "skipped", names[1]: "skipped", other: "failed"}
    failed = [r for r in rows if r["status"] == "failed"][0]
    assert "holds a run with a different config" in failed["error"]
    assert "optim.learning_rate: 0.001 -> 0.03" in failed["error"]
    assert {name: open(root / name / "metrics.jsonl").read() for name in names} == before
    assert any(line.startswith(f"FAIL {other}") for line in log)
