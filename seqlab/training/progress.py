"""What a run shows while it works: the phase it is in (building, compiling, training, evaluating, saving) and how
far it is.

On a terminal, a rich progress bar (phase, steps done of the total, elapsed and remaining time) stays at the bottom
while the metrics lines print above it. Anywhere else (a log file, a test, a sweep's ``train.log``) each phase
change prints one plain line with the time it started, so no phase passes in silence. In a multi-process run only
process 0 shows anything.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class RunProgress:
    """`start()`, then `phase(name)` names what the run does now and `advance_to(step)` moves the bar; `stop()`
    (idempotent) ends the display. Also a context manager."""

    def __init__(self, total_steps: int, start_step: int = 0, *, enabled: bool = True, stream: Any = None):
        self.total_steps, self.enabled = total_steps, enabled
        self.stream = stream or sys.stdout
        self.console = Console(file=self.stream)
        self.live = enabled and self.console.is_terminal
        self._bar: Progress | None = None
        self._task: Any = None
        self._start_step = start_step
        self._phase = ""
        self._t0 = time.perf_counter()

    def start(self) -> "RunProgress":
        if self.live and self._bar is None:
            self._bar = Progress(
                TextColumn("[bold]{task.description:<24}"), BarColumn(), MofNCompleteColumn(), TextColumn("steps"),
                TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(), console=self.console,
                redirect_stdout=True, redirect_stderr=True,
            )  # fmt: skip
            self._bar.start()
            self._task = self._bar.add_task("starting", total=self.total_steps, completed=self._start_step)
        return self

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def __enter__(self) -> "RunProgress":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def phase(self, name: str) -> None:
        """Show that the run now does `name` (e.g. "compiling the train step")."""
        if not self.enabled or name == self._phase:
            return
        self._phase = name
        if self._bar is not None:
            self._bar.update(self._task, description=name)
        else:
            print(f"[{time.perf_counter() - self._t0:7.1f} s] {name}", file=self.stream, flush=True)

    def advance_to(self, step: int) -> None:
        """The run has finished `step` steps."""
        if self._bar is not None:
            self._bar.update(self._task, completed=step)
