"""Progress of the long phases (MASK solves, AutoAttack, the top-k attack, detection): one plain line on stderr every
few seconds with done/total, the rate and an estimate of the time left, and a closing line with the phase's time.

Lines rather than a redrawn bar, so that a log file or a CI job shows them too; a heartbeat thread prints the line
even while one long unit of work (a batched solve) is running. Silent when progress is off: ``Progress(...,
enabled=False)``, or, for phases that take no flag, inside ``with progress_enabled(False):`` (``--no-progress``)::

    with Progress("AutoAttack", total=n, unit="input") as bar:
        for chunk in chunks:
            ...
            bar.update(len(chunk))

or, for a loop whose items are the units (``per`` units each), ``for eps in track(radii, "AutoAttack", per=n):``.
"""
from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Collection, Iterator
from contextvars import ContextVar
from typing import TextIO, TypeVar

__all__ = ["Progress", "progress_enabled", "track"]

T = TypeVar("T")

_ENABLED: ContextVar[bool] = ContextVar("defend_progress", default=True)


@contextlib.contextmanager
def progress_enabled(on: bool) -> Iterator[None]:
    """Turn the progress lines of the phases inside on or off (``--no-progress``)."""
    token = _ENABLED.set(bool(on))
    try:
        yield
    finally:
        _ENABLED.reset(token)


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s} s" if s < 120 else f"{s // 60} min {s % 60:02d} s"


class Progress:
    """Done/total of a phase on ``stream`` (stderr) at most every ``every`` seconds, and once at the end."""

    def __init__(self, desc: str, total: int, unit: str = "input", *, enabled: bool | None = None,
                 every: float = 5.0, stream: TextIO | None = None) -> None:
        self.desc, self.total, self.unit, self.every = desc, max(int(total), 0), unit, float(every)
        self.enabled = _ENABLED.get() if enabled is None else bool(enabled)
        self.stream = stream
        self.done, self.start, self.last = 0, time.perf_counter(), time.perf_counter()
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, daemon=True) if self.enabled and self.every > 0 else None

    def __enter__(self) -> Progress:
        if self._beat is not None:
            self._beat.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(ok=exc[0] is None)

    def line(self) -> str:
        """``desc: done/total unit (pct %), rate unit/s, about T left`` (elapsed time until the first unit is done)."""
        elapsed = time.perf_counter() - self.start
        head = f"[progress] {self.desc}: {self.done}/{self.total} {self.unit}s"
        if self.done == 0 or elapsed <= 0:
            return f"{head}, {_duration(elapsed)} elapsed"
        rate = self.done / elapsed
        left = max(self.total - self.done, 0) / rate
        return f"{head} ({100 * self.done / max(self.total, 1):.0f} %), {rate:.3g} {self.unit}s/s, about {_duration(left)} left"

    def update(self, n: int = 1) -> None:
        """``n`` more units done; prints the line when ``every`` seconds have passed since the last one."""
        with self._lock:
            self.done += int(n)
        if time.perf_counter() - self.last >= self.every:
            self._print(self.line())

    def close(self, ok: bool = True) -> None:
        """Stop the heartbeat and print the phase's time (when it finished)."""
        self._stop.set()
        if self._beat is not None and self._beat.is_alive():
            self._beat.join()
        if ok:
            self._print(f"[progress] {self.desc}: {self.done}/{self.total} {self.unit}s in "
                        f"{_duration(time.perf_counter() - self.start)}")

    def _heartbeat(self) -> None:
        while not self._stop.wait(max(self.every - (time.perf_counter() - self.last), 0.05)):
            if time.perf_counter() - self.last >= self.every:
                self._print(self.line())

    def _print(self, text: str) -> None:
        if not self.enabled:
            return
        with self._lock:
            self.last = time.perf_counter()
            print(text, file=self.stream or sys.stderr, flush=True)


def track(items: Collection[T], desc: str, *, per: int = 1, unit: str = "input", enabled: bool | None = None,
          every: float = 5.0, stream: TextIO | None = None) -> Iterator[T]:
    """Yield ``items``, counting ``per`` units done after each (a :class:`Progress` over ``len(items) * per``)."""
    bar = Progress(desc, len(items) * int(per), unit, enabled=enabled, every=every, stream=stream).__enter__()
    try:
        for item in items:
            yield item
            bar.update(per)
    except BaseException:  # an error in the loop (or a break): stop the heartbeat, no closing line
        bar.close(ok=False)
        raise
    bar.close()
