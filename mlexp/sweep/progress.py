"""The launcher's view of a sweep: one overall bar on a terminal (a line every
MLEXP_PROGRESS_S seconds in a log), with done / running / failed / remaining and an ETA
from the durations of the children that finished."""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field

from tqdm import tqdm


@dataclass
class SweepProgress:
    total: int
    skipped: int
    concurrency: int
    started: int = 0
    finished: int = 0
    failed: int = 0
    killed: int = 0
    durations: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        quiet = bool(os.environ.get("TQDM_DISABLE")) or not sys.stdout.isatty()
        self.bar = tqdm(total=self.total, initial=self.skipped, desc="sweep", unit="run", disable=quiet,
                        dynamic_ncols=True)
        self.every_s = float(os.environ.get("MLEXP_PROGRESS_S", "30"))
        self.last_line = time.monotonic()

    @property
    def ended(self) -> int:
        return self.finished + self.failed + self.killed

    def eta_s(self, running: int, remaining: int) -> float | None:
        if not self.durations:
            return None
        mean = sum(self.durations) / len(self.durations)
        return mean * (remaining + running / 2) / max(self.concurrency, 1)

    def counts(self, running: int, remaining: int) -> str:
        eta = self.eta_s(running, remaining)
        return (f"{self.finished + self.skipped} done, {running} running, {self.failed} failed, {remaining} remaining"
                + (f", ETA {clock(eta)}" if eta is not None and (running or remaining) else ""))

    def show(self, running: int, remaining: int) -> None:
        self.bar.n = self.skipped + self.ended
        self.bar.set_postfix_str(self.counts(running, remaining), refresh=True)
        if self.bar.disable and time.monotonic() - self.last_line >= self.every_s:
            self.last_line = time.monotonic()
            print(f"sweep: {self.counts(running, remaining)}", flush=True)

    def write(self, line: str) -> None:
        """A line above the bar (a child started or ended)."""
        if self.bar.disable:
            print(line, flush=True)
        else:
            self.bar.write(line)

    def close(self) -> None:
        self.bar.close()


def clock(seconds: float | None) -> str:
    if seconds is None or math.isnan(seconds):
        return "-"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"
