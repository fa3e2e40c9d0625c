"""A mixer defined outside seqlab works everywhere a built-in one does: the README's "Writing a new mixer" block,
saved as a module, is registered on import, decodes like its full forward, trains from the command line through
`config.imports` (the README's command as written), resumes, and is rebuilt by `restore_model`, `generate` and
`python -m seqlab.sample` in fresh processes. Everything runs in subprocesses, so the test session's registry never
holds the user's mixer."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def _readme_section() -> str:
    return README[README.index("## Writing a new mixer"):].split("\n## ", 1)[0]


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory) -> pathlib.Path:
    """A directory holding the README's module as user_mixers.py."""
    source = re.search(r"```python\n(.*?)```", _readme_section(), flags=re.S).group(1)
    directory = tmp_path_factory.mktemp("user_project")
    (directory / "user_mixers.py").write_text(source)
    return directory


def _run(args: list[str], user_dir: pathlib.Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(user_dir)}
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _python(code: str, user_dir: pathlib.Path) -> str:
    return _run([sys.executable, "-c", textwrap.dedent(code)], user_dir).stdout


def _readme_command(workdir: pathlib.Path) -> list[str]:
    """The README's training command, with this interpreter and `workdir`."""
    text = re.search(r"PYTHONPATH=\. \.venv/bin/python (-m seqlab\.train .*?--workdir=)\S+", _readme_section(),
                     flags=re.S).group(1)
    return [sys.executable, *shlex.split(text.replace("\\\n", " "))[:-1], f"--workdir={workdir}"]


def test_the_readme_module_registers_and_decodes_like_its_forward(user_dir):
    out = _python("""
        import jax, numpy as np
        from flax import nnx
        from seqlab import mixers
        assert "forgetful" not in mixers.available()
        import user_mixers
        assert "forgetful" in mixers.available() and mixers.info("forgetful").kind == "linear"
        mixer = mixers.create("forgetful", d_model=32, num_heads=4, chunk_size=16, rngs=nnx.Rngs(0))
        x = jax.random.normal(jax.random.key(0), (2, 37, 32))
        full = np.asarray(mixer(x))
        cache, step, steps = mixer.init_cache(2, 37), nnx.jit(lambda m, x_t, c: m.step(x_t, c)), []
        for t in range(37):
            y, cache = step(mixer, x[:, t], cache)
            steps.append(np.asarray(y))
        err = np.linalg.norm(np.stack(steps, 1) - full) / np.linalg.norm(full)
        print("decode error", err, "max", np.abs(full).max())
    """, user_dir)
    err, peak = (float(v) for v in re.search(r"decode error (\S+) max (\S+)", out).groups())
    assert err < 1e-4 and peak > 0


def test_the_readme_command_trains_resumes_and_restores_in_fresh_processes(user_dir, tmp_path):
    workdir = tmp_path / "forgetful"
    command = _readme_command(workdir)
    assert "--config.imports=('user_mixers',)" in command
    first = _run(command, user_dir)
    assert "test accuracy" in first.stdout
    recorded = json.loads((workdir / "config.json").read_text())
    assert recorded["imports"] == ["user_mixers"] and recorded["model"]["mixers"] == ["baseconv", "forgetful"]
    resumed = _run([*command, "--config.train.steps=25"], user_dir)
    assert "resumed from the checkpoint at step 20" in resumed.stdout
    out = _python(f"""
        import jax, numpy as np
        from seqlab.generate import generate
        from seqlab.training import restore_model
        model, config, task = restore_model({str(workdir)!r})
        print("mixer", type(model.backbone.blocks[1].mixer).__name__)
        prompt = jax.numpy.zeros((2, 5), jax.numpy.int32)
        tokens = generate(model, prompt, 4)
        print("generated", tokens.shape)
    """, user_dir)
    assert "mixer ForgetfulLinearAttention" in out and "generated (2, 9)" in out


def test_a_bytes_model_with_the_user_mixer_samples_from_the_command_line(user_dir, tmp_path):
    workdir = tmp_path / "bytes"
    _run([sys.executable, "-m", "seqlab.train", "--config=configs/bytes.py:tiny",
          "--config.imports=('user_mixers',)", "--config.model.mixers=('forgetful',)",
          "--config.model.mixer_args.forgetful.chunk_size=16", f"--workdir={workdir}"], user_dir)
    out = _run([sys.executable, "-m", "seqlab.sample", f"--workdir={workdir}", "--prompt=def ",
                "--max_new_tokens=8", "--temperature=0"], user_dir).stdout
    assert out.startswith("def ")


def test_a_missing_import_is_one_line(user_dir, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "seqlab.train", "--config=configs/mqar.py:tiny", "--config.imports=('no_such_mod',)",
         f"--workdir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip() == ("seqlab.train: imports: no module named 'no_such_mod' (is its directory on "
                                   "PYTHONPATH?)")


def test_a_module_whose_own_import_fails_keeps_its_traceback(tmp_path, monkeypatch):
    """Only a missing module named in `imports` is a one-line error; a missing import inside it is the user's bug
    and raises as such."""
    from seqlab import config as config_lib

    (tmp_path / "broken_user_mixers.py").write_text("import no_such_dependency_of_the_user\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="no_such_dependency_of_the_user"):
        config_lib.import_modules(("broken_user_mixers",))
    with pytest.raises(ValueError, match="^imports: no module named 'broken_user'"):
        config_lib.import_modules(("broken_user",))
    with pytest.raises(ValueError, match="^imports must be a tuple of module names"):
        config_lib.import_modules("broken_user_mixers")
