"""seqlab.plots: the last eval record per run, the best learning rate per point, and figures that draw one line
per mixer with the points it was given."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from seqlab import plots  # noqa: E402


def records():
    rows = []
    # (workdir, mixer, state bytes, lr, accuracy at steps 1 and 2)
    for workdir, mixer, state, lr, accs in [
        ("a", "gla", 4096, 1e-3, (0.1, 0.5)), ("b", "gla", 4096, 3e-3, (0.2, 0.9)),
        ("c", "deltanet", 8192, 1e-3, (0.3, 1.0)), ("d", "deltanet", 8192, 3e-3, (0.9, 0.2)),
    ]:
        for step, acc in zip((1, 2), accs):
            rows.append({"workdir": workdir, "model.mixers": mixer, "recurrent_state_bytes": state,
                         "optim.learning_rate": lr, "split": "eval", "step": step, "accuracy": acc})
            rows.append({"workdir": workdir, "model.mixers": mixer, "recurrent_state_bytes": state,
                         "optim.learning_rate": lr, "split": "train", "step": step, "accuracy": 0.0, "loss": 1.0 / step})
    return pd.DataFrame(rows)


def test_final_results_keep_the_last_eval_record_of_each_run():
    final = plots.final_results(records())
    assert sorted(zip(final["workdir"], final["step"], final["accuracy"])) == [
        ("a", 2, 0.5), ("b", 2, 0.9), ("c", 2, 1.0), ("d", 2, 0.2)]


def test_best_over_picks_the_best_learning_rate_by_its_final_accuracy():
    best = plots.best_over(plots.final_results(records()), ["model.mixers"])
    chosen = dict(zip(best["model.mixers"], best["optim.learning_rate"]))
    assert chosen == {"gla": 3e-3, "deltanet": 1e-3}  # deltanet's 3e-3 run peaked early, then fell


def test_missing_columns_and_splits_are_named():
    with pytest.raises(ValueError, match="no column 'model.d_model'"):
        plots.best_over(plots.final_results(records()), ["model.d_model"])
    with pytest.raises(ValueError, match="no 'test' records"):
        plots.final_results(records(), split="test")


def test_accuracy_vs_draws_one_line_per_mixer_with_its_best_points():
    ax = plots.accuracy_vs(plots.final_results(records()), "recurrent_state_bytes", colors={"gla": "red"})
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"gla", "deltanet"} and ax.get_xscale() == "log"
    assert list(lines["gla"].get_ydata()) == [0.9] and lines["gla"].get_color() == "red"
    assert list(lines["deltanet"].get_xdata()) == [8192]


def test_loss_curves_plot_every_train_record():
    ax = plots.loss_curves(records())
    assert len(ax.get_lines()) == 4 and all(list(line.get_xdata()) == [1, 2] for line in ax.get_lines())
