"""Shared test configuration for the seqlab op tests."""

import atexit
import os
import shutil
import sys
import tempfile
import zlib

_flags = os.environ.get("XLA_FLAGS", "")
# Workaround for a jaxlib 0.10.2 CPU runtime bug (not in seqlab): a segfault in
# slinky::fuse_contiguous_dims inside xla::cpu::YnnFusionThunk (run from a
# WhileThunk) was seen on the jitted gradient of an earlier softmax_attn(impl=
# "chunked"); the YNNPACK library fusions stay off as a safeguard. No numerics
# the tests rely on change.
if "xla_cpu_experimental_ynn_fusion_type" not in _flags:
    _flags += " --xla_cpu_experimental_ynn_fusion_type="
# Compile-time budget: these tests compile a few thousand small XLA programs and run each once or twice, so
# compile time dominates: LLVM optimisation is off, and XLA CPU's classic elemental emitter replaces its newer
# fusion emitters (about half the compile time on these programs; the suite passes under either). Set
# SEQLAB_TEST_XLA_OPT=1 to keep XLA's defaults for both.
if os.environ.get("SEQLAB_TEST_XLA_OPT", "0") != "1":
    for _flag, _value in (("xla_backend_optimization_level", "0"), ("xla_cpu_use_fusion_emitters", "false")):
        if _flag not in _flags:
            _flags += f" --{_flag}={_value}"
# Must be in the environment before the XLA backend starts.
os.environ["XLA_FLAGS"] = _flags.strip()
# One persistent compilation cache per test run, shared by the xdist workers and the subprocesses they start
# (training runs that resume, CLI runs, the 8-device suite): a program compiled once is not compiled again in a
# later process. It starts empty, so no run depends on another's cache. (The workers inherit the variable from
# the pytest process that imports this file first.)
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="seqlab-test-jax-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

# tests/reference.py is imported as a plain module (`import reference`),
# whichever pytest import mode is in use.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# Full float32 matmuls everywhere (on GPU/TPU the default would be TF32/bf16
# passes, which would swamp the 1e-5 forward tolerance). On CPU this is a no-op.
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture
def rng(request):
    """A numpy Generator seeded from the test id, so every test is reproducible
    and independent of test ordering."""
    seed = zlib.crc32(request.node.nodeid.encode())
    return np.random.default_rng(seed)


# tests/multidevice/ needs 8 host devices, which must be configured before JAX starts: it runs in its own pytest
# process, started by tests/test_multidevice.py with XLA_FLAGS=--xla_force_host_platform_device_count=8.
if "xla_force_host_platform_device_count=8" not in os.environ.get("XLA_FLAGS", ""):
    collect_ignore = ["multidevice"]


def pytest_collection_modifyitems(items):
    """Start the 8-device subprocess suite (the longest single test) first, so that under `pytest -n 2` one worker
    runs it while the other works through everything else."""
    items.sort(key=lambda item: "test_multidevice.py" not in item.nodeid)
