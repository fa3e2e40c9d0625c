"""Runs each file of tests/multidevice/ in its own pytest process with 8 host devices (the flag must be set before
JAX starts, so it cannot be set for this process): sequence-parallel ops, softmax, collectives, models and
training. One process per file lets pytest-xdist spread them over its workers."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUITE = os.path.join(ROOT, "tests", "multidevice")
FILES = sorted(f for f in os.listdir(SUITE) if f.startswith("test_") and f.endswith(".py"))


def test_the_suite_has_files():
    assert len(FILES) >= 4, FILES


@pytest.mark.parametrize("name", FILES)
def test_multidevice_suite(name):
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.join(SUITE, name)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]
