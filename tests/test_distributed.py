"""Two processes on this machine joined with jax.distributed (CPU collectives, 2 devices each) train on a mesh
whose sequence axis spans both processes; their losses equal a single-process run's. Also: which environments
start a distributed runtime."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np

from seqlab import config as config_lib
from seqlab.parallel.distributed import cluster_environment
from seqlab.train import train_and_evaluate
from seqlab.training import load_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_train_like_one(tmp_path):
    port = free_port()
    procs = []
    for pid in range(2):
        xla_flags = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()
        env = {**os.environ, "JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": "2",
               "JAX_PROCESS_ID": str(pid), "XLA_FLAGS": xla_flags, "JAX_PLATFORMS": "cpu"}
        cmd = [sys.executable, os.path.join(ROOT, "tests", "distributed_worker.py"), str(tmp_path / "two"), ROOT]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outputs)

    config = config_lib.load_config(os.path.join(ROOT, "configs/mqar.py:gla,tiny"))
    config.train.update(steps=6, log_every=1, eval_every=3, checkpoint_every=3)
    train_and_evaluate(config, str(tmp_path / "one"))
    two = load_metrics(str(tmp_path / "two"))
    one = load_metrics(str(tmp_path / "one"))
    assert [(r["step"], r["split"]) for r in two] == [(r["step"], r["split"]) for r in one]
    np.testing.assert_allclose([r["loss"] for r in two], [r["loss"] for r in one], rtol=1e-4)


def test_cluster_environment_detection():
    assert cluster_environment({}) is None
    assert cluster_environment({"JAX_COORDINATOR_ADDRESS": "h:1"}) == "explicit"
    assert cluster_environment({"SLURM_NTASKS": "1"}) is None
    assert cluster_environment({"SLURM_NTASKS": "4"}) == "slurm"
    assert cluster_environment({"OMPI_COMM_WORLD_SIZE": "2"}) == "mpi"
    assert cluster_environment({"TPU_WORKER_HOSTNAMES": "a,b"}) == "tpu"
    assert cluster_environment({"TPU_WORKER_HOSTNAMES": "a"}) is None
