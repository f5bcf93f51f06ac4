"""Peak memory of a night, per stage: what the box holds while a stage runs (driver, Ray workers, services).

A background thread samples the machine's used memory (MemTotal - MemAvailable, Linux /proc/meminfo) once a
second; `stage(name)` records the peak seen while the block ran. A whole-box figure, because the work of a stage
runs in Ray worker processes, not in the driver: it is what decides whether a night fits the machine (Ray's memory
monitor kills workers at 95%). On a machine shared with other work it is an upper bound.
"""
from __future__ import annotations

import contextlib
import threading


def used_mb() -> float | None:
    """Used memory of the machine in MB, or None where /proc/meminfo is not readable."""
    try:
        info = {}
        with open("/proc/meminfo") as fh:
            for line in fh:
                key, value = line.split(":", 1)
                info[key] = int(value.split()[0])
        return (info["MemTotal"] - info["MemAvailable"]) / 1024
    except (OSError, KeyError, ValueError):
        return None


class MemoryWatch:
    """`with MemoryWatch() as watch: with watch.stage("prepare"): ...`; then `watch.peaks_mb` {stage: MB}."""

    def __init__(self, interval_s: float = 1.0) -> None:
        self.interval_s = interval_s
        self.peaks_mb: dict[str, float] = {}
        self.baseline_mb = used_mb()
        self._current: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-watch", daemon=True)

    def _sample(self) -> None:
        value, name = used_mb(), self._current
        if value is not None and name is not None:
            self.peaks_mb[name] = max(self.peaks_mb.get(name, 0.0), round(value, 1))

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> "MemoryWatch":
        if self.baseline_mb is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    @contextlib.contextmanager
    def stage(self, name: str):
        self._current = name
        self._sample()
        try:
            yield
        finally:
            self._sample()
            self._current = None

