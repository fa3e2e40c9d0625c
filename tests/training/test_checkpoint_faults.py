"""Checkpoint faults end in one clear line: a corrupt newest checkpoint is moved aside to ``<step>.corrupt`` and the
previous one restores (``Checkpoints.restore_latest``, ``restore_model``); when none restores, CheckpointError; a
save on a full disk raises a one-line CheckpointSaveError, leaves no partial checkpoint and keeps every earlier one
(injected in orbax's save path, and for real on a small tmpfs where this machine may mount one)."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from seqlab.training.checkpoints import CheckpointError, Checkpoints, CheckpointSaveError, write_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SAVE_ERROR = re.compile(
    r"checkpoint at step (\d+): no space left on device writing (\S+) \(needs about [\d.,]+ MB; [\d.,]+ MB free\)"
)


def train_state(n: int) -> dict:
    return {
        "step": jnp.int32(n),
        "params": {"w": jnp.full((4, 3), float(n), jnp.float32), "b": jnp.arange(3, dtype=jnp.float32) + n},
        "opt_state": {"count": jnp.int32(10 * n), "mu": jnp.full((4, 3), n / 7, jnp.float32)},
    }


ABSTRACT = jax.eval_shape(lambda: train_state(0))


def saved(workdir, steps=(1, 2, 3)) -> Checkpoints:
    checkpoints = Checkpoints(str(workdir), keep=3)
    for step in steps:
        checkpoints.save(step, train_state(step), {"position": step})
    return checkpoints


def assert_restores(checkpoints: Checkpoints, step: int) -> None:
    state, data_state = checkpoints.restore(step, ABSTRACT)
    jax.tree.map(np.testing.assert_array_equal, state, train_state(step))
    assert data_state == {"position": step}


def listing(workdir) -> list[str]:
    return sorted(os.listdir(os.path.join(workdir, "checkpoints")))


def files_under(directory) -> list[str]:
    return [os.path.join(root, name) for root, _, names in os.walk(directory) for name in names]


def overwrite_with_garbage(directory) -> None:
    rng = np.random.default_rng(0)
    for path in files_under(directory):
        with open(path, "wb") as f:
            f.write(rng.bytes(max(os.path.getsize(path), 64)))


def truncate_to_half(directory) -> None:
    for path in files_under(directory):
        os.truncate(path, os.path.getsize(path) // 2)


CORRUPTIONS = {
    "state files garbage": lambda step_dir: overwrite_with_garbage(os.path.join(step_dir, "state")),
    "state files truncated": lambda step_dir: truncate_to_half(os.path.join(step_dir, "state")),
    "state manifest deleted": lambda step_dir: os.remove(os.path.join(step_dir, "state", "manifest.ocdbt")),
    "data state truncated": lambda step_dir: truncate_to_half(os.path.join(step_dir, "data")),
}


def warnings_in(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "skipped the checkpoint" in line]


@pytest.mark.parametrize("corrupt", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_a_corrupt_newest_checkpoint_is_moved_aside_and_the_previous_one_restores(tmp_path, capsys, corrupt):
    saved(tmp_path).close()
    corrupt(os.path.join(tmp_path, "checkpoints", "3"))
    capsys.readouterr()
    checkpoints = Checkpoints(str(tmp_path), keep=3)
    step, state, data_state = checkpoints.restore_latest(ABSTRACT)
    assert step == 2 and data_state == {"position": 2}
    jax.tree.map(np.testing.assert_array_equal, state, train_state(2))
    assert listing(tmp_path) == ["1", "2", "3.corrupt"]
    moved_to = os.path.join(tmp_path, "checkpoints", "3.corrupt")
    [warning] = warnings_in(capsys.readouterr().err)
    assert "step 3" in warning and moved_to in warning and "Error" in warning, warning
    assert checkpoints.latest_step() == 2 and sorted(checkpoints.manager.all_steps()) == [1, 2]
    checkpoints.close()
    reopened = Checkpoints(str(tmp_path), keep=3)
    assert sorted(reopened.manager.all_steps()) == [1, 2]
    reopened.close()


def test_the_moved_aside_checkpoint_is_no_step_and_outlives_garbage_collection(tmp_path):
    checkpoints = saved(tmp_path)
    overwrite_with_garbage(os.path.join(tmp_path, "checkpoints", "3", "state"))
    assert checkpoints.restore_latest(ABSTRACT)[0] == 2
    checkpoints.save(3, train_state(3), {"position": 3})  # the resumed run reaches step 3 again
    assert listing(tmp_path) == ["1", "2", "3", "3.corrupt"]
    overwrite_with_garbage(os.path.join(tmp_path, "checkpoints", "3", "state"))
    assert checkpoints.restore_latest(ABSTRACT)[0] == 2
    for step in (3, 4, 5):
        checkpoints.save(step, train_state(step), {"position": step})
    assert listing(tmp_path) == ["3", "3.corrupt", "3.corrupt.1", "4", "5"]
    assert checkpoints.restore_latest(ABSTRACT)[0] == 5
    checkpoints.close()


def test_a_checkpoint_of_another_shape_is_moved_aside(tmp_path):
    checkpoints = saved(tmp_path, steps=(1, 2))
    wider = {**train_state(3), "params": {"w": jnp.zeros((4, 5)), "b": jnp.zeros(3)}}
    checkpoints.save(3, wider, {"position": 3})
    assert checkpoints.restore_latest(ABSTRACT)[0] == 2
    assert listing(tmp_path) == ["1", "2", "3.corrupt"]
    checkpoints.close()


def test_a_restored_tree_unlike_the_train_state_is_moved_aside(tmp_path, monkeypatch, capsys):
    checkpoints = saved(tmp_path)
    restore = Checkpoints.restore

    def restore_step_3_as_bfloat16(self, step, abstract):
        state, data_state = restore(self, step, abstract)
        return (jax.tree.map(lambda x: x.astype(jnp.bfloat16), state) if step == 3 else state), data_state

    monkeypatch.setattr(Checkpoints, "restore", restore_step_3_as_bfloat16)
    assert checkpoints.restore_latest(ABSTRACT)[0] == 2
    [warning] = warnings_in(capsys.readouterr().err)
    assert "['opt_state']['count'] restored as bfloat16[], the train state holds int32[]" in warning, warning
    checkpoints.close()


def test_when_no_checkpoint_restores_a_one_line_error_says_where_they_went(tmp_path, capsys):
    checkpoints = saved(tmp_path)
    for step in (1, 2, 3):
        overwrite_with_garbage(os.path.join(tmp_path, "checkpoints", str(step), "state"))
    with pytest.raises(CheckpointError) as raised:
        checkpoints.restore_latest(ABSTRACT)
    message = str(raised.value)
    assert "\n" not in message
    for step in (3, 2, 1):
        assert f"step {step} -> {os.path.join(tmp_path, 'checkpoints', f'{step}.corrupt')}" in message, message
    assert listing(tmp_path) == ["1.corrupt", "2.corrupt", "3.corrupt"]
    assert len(warnings_in(capsys.readouterr().err)) == 3
    assert checkpoints.restore_latest(ABSTRACT) is None and checkpoints.latest_step() is None
    checkpoints.close()


def test_restore_latest_without_checkpoints_is_none(tmp_path):
    checkpoints = Checkpoints(str(tmp_path), keep=3)
    assert checkpoints.restore_latest(ABSTRACT) is None
    checkpoints.close()


def test_restore_model_falls_back_to_the_previous_checkpoint(tmp_path):
    from flax import nnx

    from seqlab import config as config_lib, models
    from seqlab.training import optim, restore_model

    config = config_lib.load_config(os.path.join(ROOT, "configs/mqar.py:softmax,tiny"))
    task = config_lib.validate(config)
    write_config(str(tmp_path), config)
    _, params, batch_stats, _ = nnx.split(models.build_model(config, task, nnx.Rngs(config.seed)),
                                          nnx.Param, nnx.BatchStat, ...)
    tx = optim.make_optimizer(config.optim, config.train.steps)
    state = {"step": jnp.int32(1), "params": params, "opt_state": tx.init(params)}
    if jax.tree.leaves(batch_stats):
        state["batch_stats"] = batch_stats
    checkpoints = Checkpoints(str(tmp_path), keep=3)
    checkpoints.save(1, state, {"position": 1})
    checkpoints.save(2, jax.tree.map(lambda x: x + 1, state), {"position": 2})
    checkpoints.close()
    truncate_to_half(os.path.join(tmp_path, "checkpoints", "2", "state"))
    model, _, _ = restore_model(str(tmp_path))
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model, nnx.Param), params)
    assert listing(tmp_path) == ["1", "2.corrupt"]


def tensorstore_enospc(path: str) -> ValueError:
    """The error orbax 0.12.8 raised when a tmpfs filled up (a ValueError carrying tensorstore's text)."""
    return ValueError(
        f'RESOURCE_EXHAUSTED: Error writing "params.w/0" in OCDBT database at local file "{path}": Failed to write '
        "82507 bytes to file 7: No space left on device [os_error_code='28']"
    )


def chained_enospc(path: str) -> RuntimeError:
    try:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    except OSError as cause:
        try:
            raise RuntimeError("commit failed") from cause
        except RuntimeError as wrapped:
            return wrapped


ENOSPC_ERRORS = {
    "OSError": lambda path: OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path),
    "tensorstore text": tensorstore_enospc,
    "chained": chained_enospc,
}


def failing_json_write(error):
    """A replacement for orbax's JSON item writer: it writes part of its file into orbax's temporary step
    directory, then raises `error(that directory)`."""

    async def write(handler, item, directory):
        (directory / "metadata").write_text(json.dumps(item)[:3])
        raise error(str(directory))

    return write


@pytest.mark.parametrize("error", ENOSPC_ERRORS.values(), ids=ENOSPC_ERRORS.keys())
def test_a_save_on_a_full_disk_raises_one_line_and_keeps_the_earlier_checkpoints(
    tmp_path, monkeypatch, capfd, caplog, error
):
    checkpoints = saved(tmp_path)  # keep=3: a save that went on to garbage-collect would delete step 1
    capfd.readouterr()
    caplog.clear()
    with monkeypatch.context() as patch:
        patch.setattr(ocp.handlers.JsonCheckpointHandler, "_save_fn", failing_json_write(error))
        with pytest.raises(CheckpointSaveError) as raised:
            checkpoints.save(4, train_state(4), {"position": 4})
    message = str(raised.value)
    match = SAVE_ERROR.fullmatch(message)
    assert match and match[1] == "4" and match[2] == os.path.join(tmp_path, "checkpoints", "4"), message
    assert raised.value.__cause__ is None and raised.value.__suppress_context__
    assert [r for r in caplog.records if r.levelname == "ERROR"] == []
    assert "Traceback" not in capfd.readouterr().err
    assert listing(tmp_path) == ["1", "2", "3"]
    for step in (1, 2, 3):
        assert_restores(checkpoints, step)
    assert checkpoints.latest_step() == 3
    denied = PermissionError(errno.EACCES, os.strerror(errno.EACCES))
    monkeypatch.setattr(ocp.handlers.JsonCheckpointHandler, "_save_fn", failing_json_write(lambda path: denied))
    with pytest.raises(PermissionError) as raised:  # any other error propagates as it came
        checkpoints.save(4, train_state(4), {"position": 4})
    assert raised.value is denied
    monkeypatch.undo()
    checkpoints.save(4, train_state(4), {"position": 4})
    assert listing(tmp_path) == ["2", "3", "4"]
    checkpoints.close()


FILL_A_SMALL_DISK = textwrap.dedent("""
    import json, os, sys

    import jax, jax.numpy as jnp

    from seqlab.training.checkpoints import Checkpoints, CheckpointSaveError

    workdir = sys.argv[1]

    def state(n):  # about 120 kB that do not compress
        return {"step": jnp.int32(n), "w": jax.random.normal(jax.random.key(n), (30_000,))}

    checkpoints = Checkpoints(workdir, keep=10)
    saved, error = [], None
    for step in range(1, 10):
        try:
            checkpoints.save(step, state(step), {"position": step})
        except CheckpointSaveError as e:
            error = str(e)
            break
        saved.append(step)
    intact = []
    for step in checkpoints.manager.all_steps():
        restored, data_state = checkpoints.restore(step, jax.eval_shape(lambda: state(0)))
        if bool((restored["w"] == state(step)["w"]).all()) and data_state == {"position": step}:
            intact.append(step)
    entries = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
    print(json.dumps({"saved": saved, "error": error, "intact": sorted(intact), "entries": entries}))
""")


def run_on_private_tmpfs(mountpoint, size: str, *command: str) -> subprocess.CompletedProcess:
    """`command` (from the repository root), in a private mount namespace in which a tmpfs of `size` is mounted at
    `mountpoint` (gone with the namespace when the command exits)."""
    mount_then_run = 'mount -t tmpfs -o size="$1" tmpfs "$2" && shift 2 && exec "$@"'
    return subprocess.run(
        ["unshare", "--mount", "--map-root-user", "sh", "-c", mount_then_run, "sh", size, str(mountpoint), *command],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"},
    )


def test_a_save_that_fills_a_real_disk_raises_one_line_and_keeps_the_earlier_checkpoints(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if shutil.which("unshare") is None:
        pytest.skip("needs util-linux's unshare to mount a small tmpfs in a private mount namespace")
    probe = run_on_private_tmpfs(disk, "64k", "true")
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a private mount namespace here: {probe.stderr.strip()}")
    script = tmp_path / "fill.py"
    script.write_text(FILL_A_SMALL_DISK)
    done = run_on_private_tmpfs(disk, "400k", sys.executable, str(script), str(disk / "run"))
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.splitlines()[-1])
    saved = result["saved"]
    assert saved and result["error"] is not None, result
    match = SAVE_ERROR.fullmatch(result["error"])
    assert match and int(match[1]) == saved[-1] + 1, result["error"]
    assert match[2] == os.path.join(disk, "run", "checkpoints", match[1])
    assert result["intact"] == saved and result["entries"] == [str(step) for step in saved], result
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
