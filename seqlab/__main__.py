"""``python -m seqlab``: list the mixers, tasks and config files (`seqlab.catalog`), and how to run one."""

from __future__ import annotations

import sys

from seqlab import catalog

USAGE = """Run one:    python -m seqlab.train --config=configs/mqar.py:gla --workdir=/tmp/mqar-gla
Inspect:    python -m seqlab.train --config=configs/mqar.py:gla --dry_run
Sweep:      python -m seqlab.sweep --config=configs/mqar.py:gla --grid="optim.learning_rate=(1e-3,3e-3)" --root=DIR
Sample:     python -m seqlab.sample --workdir=DIR --prompt="def main("   (a configs/bytes.py run)"""


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        print(f"python -m seqlab takes no arguments (got {' '.join(argv[1:])}); it lists what seqlab can run",
              file=sys.stderr)
        return 2
    print(catalog.listing())
    print()
    print(USAGE)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
