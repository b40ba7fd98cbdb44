"""The one progress line of long loops (preprocess, train, evaluate, reconstruct).

:class:`Progress` prints ``<label>: <done>/<total> <unit>, <rate>/s, ETA <time>`` (plus an
optional tail such as the loss) at most every ``every_s`` seconds, and always once at the
end. It prints with ``print``: in the terminal, and inside a Prefect flow run with
``log_prints`` (every wildface flow) in the flow run's logs too.

Example: ``preprocess: 120/480 images, 5.1/s, ETA 1m10s``.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable

#: Seconds between two lines unless a caller asks otherwise: often enough to see a long
#: step move, rarely enough not to flood a log.
EVERY_S = 10.0


def print_line(text: str) -> None:
    """``print`` looked up at each call, not bound at import: Prefect's ``log_prints``
    replaces the builtin while a flow runs (and Ray Train's in its workers); flushed at once,
    as a worker's output would otherwise wait in a buffer."""
    print(text, flush=True)


def format_duration(seconds: float) -> str:
    """``75`` -> ``1m15s``; ``3725`` -> ``1h02m05s``; ``9`` -> ``9s``."""
    s = max(0, int(round(seconds)))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    if h:
        return f"{h}h{m:02d}m{s:02d}s"
    return f"{m}m{s:02d}s" if m else f"{s}s"


def format_rate(per_s: float) -> str:
    """Items per second with about three significant figures (``0.043``, ``5.1``, ``120``)."""
    if per_s >= 100:
        return f"{per_s:.0f}"
    if per_s >= 1:
        return f"{per_s:.1f}"
    return f"{per_s:.2g}"


class Progress:
    """A throttled ``done/total`` line with rate and ETA.

    label: what runs (``"preprocess"``); total: items to do; unit: their name (``"images"``);
    every_s: at most one line per this many seconds (the final line excepted); start: items
    already done before this run (a resumed training counts its rate from there);
    emit: where a line goes (:func:`print_line`); clock: seconds, monotonic (tests hand in a
    fake); started_at: the start on that clock (default: now).
    The rate is the mean since the start (items of this run / seconds), the ETA the rest of
    the items at that rate.
    """

    def __init__(self, label: str, total: int, unit: str = "", *, every_s: float = EVERY_S,
                 start: int = 0, emit: Callable[[str], None] = print_line,
                 clock: Callable[[], float] = time.monotonic,
                 started_at: float | None = None) -> None:
        self.label, self.total, self.unit = label, int(total), unit
        self.every_s, self.start = float(every_s), int(start)
        self.emit, self.clock = emit, clock
        #: when the run began (default now): a caller that learns of its first item late
        #: (a training step reported after it ran) hands in its real start
        self.t0 = clock() if started_at is None else started_at
        self.last_line: float | None = None
        self.finished = False

    def line(self, done: int, now: float, extra: str = "") -> str:
        """The text for ``done`` items at time ``now`` (no throttling)."""
        unit = f" {self.unit}" if self.unit else ""
        text = f"{self.label}: {done}/{self.total}{unit}"
        elapsed = now - self.t0
        rate = (done - self.start) / elapsed if elapsed > 0 else math.nan
        if rate > 0:
            text += f", {format_rate(rate)}/s"
            if done < self.total:
                text += f", ETA {format_duration((self.total - done) / rate)}"
        if done >= self.total:
            text += f", done in {format_duration(elapsed)}"
        return text + (f", {extra}" if extra else "")

    def update(self, done: int, extra: str = "", *, force: bool = False) -> bool:
        """Record ``done`` items; print a line when ``every_s`` passed since the last one
        (or since the start), at the end (once), or when ``force``. Returns whether it
        printed."""
        now = self.clock()
        end = done >= self.total and not self.finished
        since = now - (self.t0 if self.last_line is None else self.last_line)
        if not (force or end or since >= self.every_s):
            return False
        self.finished = self.finished or done >= self.total
        self.last_line = now
        self.emit(self.line(done, now, extra))
        return True


__all__ = ["EVERY_S", "Progress", "format_duration", "format_rate", "print_line"]
