"""One progress reporter for every long step: the reference pass and each comparison.

``Progress(label)(done, total)`` hears tokens run so far (``(0, total)`` first). On a terminal
the line updates in place (``\\r``) twice a second; anywhere else (CI logs, files) a new line every
:data:`LOG_EVERY` seconds, so a log never fills with carriage returns and never goes quiet for
long. Each line says tokens done, the rate and the time left. A sensitivity run counts whole-model
tokens: a pass that replays the layers before its group counts its tokens by the share of the
model's weights it runs (:meth:`pytest_kld.sensitivity.Bench.work`), so the rate and the ETA
roughly hold (an estimate by weight elements: SmolLM2's run took ~15% less than first said).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable

LOG_EVERY = 15.0


def _stderr(line: str, end: str) -> None:
    sys.stderr.write(line + end)
    sys.stderr.flush()


class Progress:
    def __init__(
        self,
        label: str,
        write: Callable[[str, str], None] | None = None,
        *,
        tty: bool | None = None,
    ):
        self.label = label
        self.write = write or _stderr
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.t0: float | None = None
        self.last = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.time()
        if self.t0 is None or done == 0:
            self.t0 = self.last = now
            self.write(f"pytest-kld: {self.label}: {total} tokens to run", "\n")
            return
        if done < total and now - self.last < (0.5 if self.tty else LOG_EVERY):
            return
        self.last = now
        rate = done / max(now - self.t0, 1e-9)
        eta = (total - done) / rate if rate > 0 else math.inf
        line = f"pytest-kld: {self.label}: {done}/{total} tokens, {rate:,.0f} tok/s, ETA {eta:,.0f}s"
        self.write(line, "\n" if done >= total or not self.tty else "\r")

    def say(self, line: str) -> None:
        """One whole line (a notice: whose lock a build waits for, a cache reused)."""
        self.write(line, "\n")
