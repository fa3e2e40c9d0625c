"""Seconds from launching ``python -m seqlab.train`` to its first finished training step, with the persistent
compilation cache cold (an empty directory) and warm (the same directory, a second launch of the same config).

    python experiments/first_step_latency.py                                   # configs/mqar.py softmax and gla
    python experiments/first_step_latency.py --configs=configs/bytes.py:gla --repeats=3

Each launch is a fresh process with a fresh workdir, logging every step; the time is taken when its first
``[train] step 1/`` line arrives, and the phase lines before it (``[  t s] phase``, seconds since the run
started building) show where the time went. Prints a markdown table: config | cache | first step s | phases.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHASE = re.compile(r"^\[\s*([0-9.]+) s\] (.+)$")


def first_step_seconds(spec: str, cache_dir: str, workdir: str) -> tuple[float, list[tuple[float, str]]]:
    """(seconds from launch to the first train record, [(phase start s, phase)]) of one launch."""
    cmd = [sys.executable, "-m", "seqlab.train", f"--config={spec}", f"--workdir={workdir}",
           "--config.train.log_every=1", f"--compilation_cache_dir={cache_dir}"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    phases = []
    try:
        for line in proc.stdout:
            if line.startswith("[train] step 1/"):
                return time.perf_counter() - start, phases
            match = PHASE.match(line.strip())
            if match:
                phases.append((float(match.group(1)), match.group(2)))
        raise RuntimeError(f"{spec}: the run ended before its first step (exit {proc.wait()})")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default="configs/mqar.py,configs/mqar.py:gla",
                        help="comma-separated config specs")
    parser.add_argument("--repeats", type=int, default=2, help="warm launches per config")
    args = parser.parse_args()
    print("| config | cache | first step s | phases (start s) |")
    print("|---|---|---|---|")
    for spec in args.configs.split(","):
        with tempfile.TemporaryDirectory() as scratch:
            cache = os.path.join(scratch, "cache")
            for i in range(1 + args.repeats):
                seconds, phases = first_step_seconds(spec, cache, os.path.join(scratch, f"run{i}"))
                shown = "; ".join(f"{name} {t:.1f}" for t, name in phases)
                print(f"| {spec} | {'cold' if i == 0 else 'warm'} | {seconds:.1f} | {shown} |", flush=True)


if __name__ == "__main__":
    main()
