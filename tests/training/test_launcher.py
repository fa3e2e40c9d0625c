"""The launcher around a run: one writer per workdir, a workdir that holds another run is refused before anything
is written, reruns and resumes add no duplicate rows, SIGTERM's summary, eval-only, listing, dry runs, progress
phases, the compilation cache, and sampling refuses non-text runs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from seqlab import catalog, config as config_lib, mixers
from seqlab.generate import check_byte_level
from seqlab.train import evaluate_workdir, train_and_evaluate
from seqlab.training import load_metrics
from seqlab.training import workdir as workdir_lib
from seqlab.training.workdir import WorkdirError, WorkdirLock

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_config(steps: int = 4, **train):
    config = config_lib.load_config(os.path.join(ROOT, "configs/mqar.py:gla,tiny"))
    config.train.update({"steps": steps, "log_every": 1, "eval_every": 2, "checkpoint_every": 2, **train})
    return config


def launcher(*args: str, timeout: int = 180, **kwargs) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, **kwargs)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> str:
    """A finished 4-step MQAR run (checkpoints at 2 and 4)."""
    workdir = str(tmp_path_factory.mktemp("finished"))
    train_and_evaluate(tiny_config(), workdir)
    return workdir


def copy_of(workdir: str, tmp_path) -> str:
    target = str(tmp_path / "run")
    shutil.copytree(workdir, target)
    os.remove(os.path.join(target, ".lock"))  # a copied lock file holds no lock anyway; start like a fresh copy
    return target


# ---- one writer per workdir ----------------------------------------------------------------------------------------


def test_a_second_writer_is_refused_and_names_the_holder(tmp_path):
    with WorkdirLock(str(tmp_path)):
        with pytest.raises(WorkdirError, match=f"in use by process {os.getpid()}"):
            WorkdirLock(str(tmp_path)).acquire()
        with pytest.raises(WorkdirError, match="in use"):
            train_and_evaluate(tiny_config(), str(tmp_path))
    assert not os.path.exists(tmp_path / "config.json")
    WorkdirLock(str(tmp_path)).acquire().release()  # released with the first


def test_a_lock_left_by_a_killed_process_does_not_block(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from seqlab.training.workdir import WorkdirLock; "
         f"WorkdirLock({str(tmp_path)!r}).acquire(); print('locked', flush=True); time.sleep(600)"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(WorkdirError, match=f"process {holder.pid}"):
        WorkdirLock(str(tmp_path)).acquire()
    holder.kill()
    holder.wait()
    assert json.load(open(tmp_path / ".lock"))["pid"] == holder.pid  # the stale file is still there
    WorkdirLock(str(tmp_path)).acquire().release()


# ---- a workdir holding another run ---------------------------------------------------------------------------------


def test_a_different_model_is_refused_before_anything_is_written(finished_run, tmp_path):
    workdir = copy_of(finished_run, tmp_path)
    before = {name: open(os.path.join(workdir, name)).read() for name in ("config.json", "metrics.jsonl")}
    config = tiny_config()
    config.model.d_model = 64
    config.optim.learning_rate = 3e-3
    with pytest.raises(WorkdirError) as error:
        train_and_evaluate(config, workdir)
    message = str(error.value)
    assert "\n" not in message
    assert "model.d_model: 32 -> 64" in message and "optim.learning_rate: 0.01 -> 0.003" in message
    assert "--overwrite" in message
    assert {name: open(os.path.join(workdir, name)).read() for name in before} == before


def test_resume_may_change_the_length_and_cadence(finished_run, tmp_path):
    workdir = copy_of(finished_run, tmp_path)
    result = train_and_evaluate(tiny_config(steps=6, log_every=2, eval_every=3), workdir)
    assert result["step"] == 6
    assert [r["step"] for r in load_metrics(workdir, split="train")] == [1, 2, 3, 4, 6]


def _drop_stored_key(workdir: str, section: tuple[str, ...], key: str) -> None:
    """Make the run's config.json look as if it was written before `key` existed in `section`."""
    path = os.path.join(workdir, "config.json")
    stored = json.load(open(path))
    node = stored
    for name in section:
        node = node[name]
    del node[key]
    json.dump(stored, open(path, "w"))


def test_a_key_added_after_the_run_started_resumes_at_its_default_and_is_refused_otherwise(finished_run, tmp_path):
    workdir = copy_of(finished_run, tmp_path)
    _drop_stored_key(workdir, ("model", "mixer_args", "gla"), "expand_k")
    config = tiny_config(steps=6)
    config.model.mixer_args.gla.expand_k = 1.0
    with pytest.raises(WorkdirError, match=r"model.mixer_args.gla.expand_k: None -> 1.0"):
        train_and_evaluate(config, workdir)
    before = open(os.path.join(workdir, "metrics.jsonl")).read()
    result = train_and_evaluate(tiny_config(steps=6), workdir)  # expand_k at its default: the same run
    assert result["step"] == 6
    assert open(os.path.join(workdir, "metrics.jsonl")).read().startswith(before)
    assert json.load(open(os.path.join(workdir, "config.json")))["model"]["mixer_args"]["gla"]["expand_k"] == 0.5


def test_a_key_the_new_config_lacks_is_a_difference(finished_run, tmp_path):
    """The reverse (a stored key the code no longer has) cannot be shown to be a default, so it is refused."""
    stored = json.load(open(os.path.join(finished_run, "config.json")))
    new = json.loads(json.dumps(stored))
    del new["model"]["mixer_args"]["gla"]["expand_k"]
    differences = workdir_lib.config_differences(stored, new, config_lib.default_dict())
    assert differences == {"model.mixer_args.gla.expand_k": (0.5, None)}


def test_a_bytes_run_stored_without_pack_trained_on_windows(finished_run):
    """data.bytes.pack defaults to True, but a stored config without it ran unpacked: only pack=False resumes it."""
    stored = json.load(open(os.path.join(finished_run, "config.json")))
    stored["data"]["task"] = "bytes"
    del stored["data"]["bytes"]["pack"]
    new = json.loads(json.dumps(stored))
    for value, expected in ((True, {"data.bytes.pack": (None, True)}), (False, {})):
        new["data"]["bytes"]["pack"] = value
        assert workdir_lib.config_differences(stored, new, config_lib.default_dict()) == expected


def test_overwrite_starts_over(finished_run, tmp_path):
    workdir = copy_of(finished_run, tmp_path)
    config = tiny_config(steps=2)
    config.model.d_model = 64
    result = train_and_evaluate(config, workdir, overwrite=True)
    assert result["step"] == 2
    assert json.load(open(os.path.join(workdir, "config.json")))["model"]["d_model"] == 64
    assert [r["step"] for r in load_metrics(workdir, split="train")] == [1, 2]


# ---- records: no duplicates ----------------------------------------------------------------------------------------


def test_rerunning_a_finished_run_adds_no_row(finished_run, tmp_path):
    workdir = copy_of(finished_run, tmp_path)
    before = open(os.path.join(workdir, "metrics.jsonl")).read()
    first = [r for r in load_metrics(workdir, split="eval") if r["step"] == 4][0]
    result = train_and_evaluate(tiny_config(), workdir)
    assert open(os.path.join(workdir, "metrics.jsonl")).read() == before
    assert (result["eval_loss"], result["eval_accuracy"]) == (first["loss"], first["accuracy"])


def test_resuming_before_the_last_records_rewrites_them_once(finished_run, tmp_path):
    """A run killed after logging step 4 but before checkpointing it resumes at 2; steps 3-4 appear once."""
    workdir = copy_of(finished_run, tmp_path)
    expected = load_metrics(workdir)
    shutil.rmtree(os.path.join(workdir, "checkpoints", "4"))
    train_and_evaluate(tiny_config(), workdir)
    got = load_metrics(workdir)
    assert [(r["step"], r["split"]) for r in got] == [(r["step"], r["split"]) for r in expected]
    assert [r["loss"] for r in got] == [r["loss"] for r in expected]  # resume is exact


def test_eval_only_matches_the_final_evaluation_and_writes_nothing(finished_run):
    listing = sorted(os.listdir(finished_run))
    metrics = open(os.path.join(finished_run, "metrics.jsonl")).read()
    result = evaluate_workdir(finished_run)
    final = [r for r in load_metrics(finished_run, split="eval") if r["step"] == 4][0]
    assert result["step"] == 4
    assert (result["loss"], result["accuracy"]) == (final["loss"], final["accuracy"])
    assert sorted(os.listdir(finished_run)) == listing
    assert open(os.path.join(finished_run, "metrics.jsonl")).read() == metrics


# ---- sampling ------------------------------------------------------------------------------------------------------


def test_sampling_refuses_a_run_whose_tokens_are_not_bytes(finished_run):
    with pytest.raises(ValueError, match="task 'mqar', whose tokens are not bytes"):
        check_byte_level(finished_run)
    proc = launcher("seqlab.sample", f"--workdir={finished_run}", "--prompt=hi", timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().count("\n") == 0 and "not bytes" in proc.stderr and "Traceback" not in proc.stderr


# ---- listing, dry run ----------------------------------------------------------------------------------------------


def test_the_listing_names_every_mixer_with_its_paper_every_task_and_every_config_variant():
    text = catalog.listing()
    for name in mixers.available():
        assert name in text
    assert "Gated Linear Attention Transformers with Hardware-Efficient Training" in text
    assert "mqar" in text and "listops" in text and "bytes" in text
    mqar = config_lib.load_config_module(os.path.join(ROOT, "configs", "mqar.py"))
    assert "variants: " + ", ".join(mqar.VARIANTS) in text


def test_python_dash_m_seqlab_lists_and_train_list_does_too():
    for args in (("seqlab",), ("seqlab.train", "--list")):
        proc = launcher(*args, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert "Gated Linear Attention" in proc.stdout and "configs/mqar.py" in proc.stdout


def test_dry_run_prints_the_config_the_layers_and_the_state_size_and_trains_nothing(tmp_path):
    proc = launcher("seqlab.train", "--config=configs/mqar.py:gla,tiny", "--config.model.d_model=64",
                    "--dry_run", timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "model.d_model = 64" in out and "model.mixer_args.gla." in out
    assert "model.mixer_args.deltanet." not in out  # only the sections the run reads
    assert "baseconv" in out and "decode state" in out.lower()
    assert "[train]" not in out


# ---- a launched run: progress, summary line, SIGTERM, cache ---------------------------------------------------------


def test_a_launched_run_shows_its_phases_and_after_sigterm_says_what_it_saved(tmp_path):
    workdir, cache = tmp_path / "run", tmp_path / "cache"
    cmd = [sys.executable, "-m", "seqlab.train", "--config=configs/mqar.py:gla,tiny", f"--workdir={workdir}",
           "--config.train.steps=100000", "--config.train.log_every=1", f"--compilation_cache_dir={cache}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        lines.append(line)
        if line.startswith("[train] step 3/"):
            break
    proc.send_signal(signal.SIGTERM)
    rest, err = proc.communicate(timeout=120)
    out = "".join(lines) + rest
    assert proc.returncode == 0, err
    for phase in ("building the model", "compiling the train step", "training", "saving the checkpoint"):
        assert phase in out, phase
    assert f"workdir: {workdir}" in out and "baseconv" in out
    summary = out.strip().splitlines()[-1]
    assert summary.startswith("stopped by SIGTERM after step") and "rerun the same command" in summary
    assert "nan" not in summary
    step = int(summary.split()[5])
    assert os.path.isdir(workdir / "checkpoints" / str(step))
    assert os.listdir(cache), "the compilation cache stayed empty"


def test_the_launcher_keeps_freed_host_memory_by_default():
    proc = launcher("seqlab.train", "--helpfull", timeout=120)
    text = proc.stdout + proc.stderr
    block = text[text.index("--[no]retain_host_memory"):]
    assert "(default: 'true')" in block[: block.index("--", 3)]


def test_a_corrupt_latest_checkpoint_is_moved_aside_and_the_run_resumes_from_the_previous(finished_run, tmp_path,
                                                                                           capsys):
    workdir = copy_of(finished_run, tmp_path)
    state_dir = os.path.join(workdir, "checkpoints", "4", "state")
    for folder, _, files in os.walk(state_dir):
        for name in files:
            with open(os.path.join(folder, name), "r+b") as f:
                size = f.seek(0, 2)
                f.seek(0)
                f.write(os.urandom(max(size, 1)))
    expected = load_metrics(workdir)
    result = train_and_evaluate(tiny_config(), workdir)
    assert result["step"] == 4
    assert "skipped the checkpoint at step 4" in capsys.readouterr().err
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4", "4.corrupt"]
    assert [r["loss"] for r in load_metrics(workdir)] == [r["loss"] for r in expected]


@pytest.mark.parametrize("override, expected", [
    ("--config.train.stepz=3", "did you mean 'train.steps'?"),
    ("--config.model.mixer_args.gla.expand_kk=1", "'model.mixer_args.gla.expand_kk' does not exist; did you mean "
                                                  "'model.mixer_args.gla.expand_k'"),
    ("--config.train.steps=abc", "train.steps takes an integer"),
    ("--config=configs/mqar.py:glaa", "config variant 'glaa' does not exist; did you mean 'gla'?"),
    ("--config.model.mixers=gla", "model.mixers takes a tuple"),
    ("--config.model.mixers=('baseconv','based','sliding_window')", "would never be built"),
])
def test_config_errors_through_the_launcher_are_one_short_message(override, expected, tmp_path):
    proc = launcher("seqlab.train", "--config=configs/mqar.py:tiny", f"--workdir={tmp_path}", override, timeout=120)
    # (a second --config= flag replaces the first)
    assert proc.returncode != 0
    assert expected in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 3, proc.stderr
    assert os.listdir(tmp_path) == []


def test_metric_rows_carry_the_runs_config_as_columns(finished_run):
    from seqlab.training.summary import model_summary

    summary = model_summary(tiny_config())
    for row in load_metrics(finished_run):
        assert (row["model.mixers"], row["model.d_model"], row["model.num_layers"]) == ("baseconv+gla", 32, 2)
        assert (row["data.task"], row["data.seq_len"], row["data.num_kv_pairs"]) == ("mqar", 32, 2)
        assert row["optim.learning_rate"] == 0.01
        assert (row["params"], row["decode_state_bytes"]) == (summary.total_params, summary.decode_state_bytes)


def test_metrics_table_is_a_dataframe_with_the_config_columns(finished_run):
    pandas = pytest.importorskip("pandas")
    from seqlab.training import metrics_table

    table = metrics_table(finished_run, split="eval")
    assert isinstance(table, pandas.DataFrame) and list(table["step"]) == [2, 4]
    assert set(table["model.mixers"]) == {"baseconv+gla"}
