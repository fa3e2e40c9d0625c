"""One process of a two-process run joined with jax.distributed (CPU collectives), started by
tests/test_distributed.py: trains configs/mqar.py:gla,tiny on a mesh whose seq axis spans both processes."""

from __future__ import annotations

import os
import sys

from seqlab.parallel.distributed import maybe_initialize

assert maybe_initialize(), "the test sets JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID"

import jax  # noqa: E402

from seqlab import config as config_lib  # noqa: E402
from seqlab.train import train_and_evaluate  # noqa: E402


def main(workdir: str, root: str) -> None:
    assert jax.process_count() == 2 and jax.device_count() == 4, (jax.process_count(), jax.device_count())
    config = config_lib.load_config(os.path.join(root, "configs/mqar.py:gla,tiny"))
    config.train.update(steps=6, log_every=1, eval_every=3, checkpoint_every=3)
    config.mesh.update(data=1, seq=4)
    train_and_evaluate(config, workdir)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
