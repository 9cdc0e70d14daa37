"""The shared timer: round-robin windows, medians and IQR, graph counts, progress.

Every step benchmark times its contestants with ``time_interleaved`` (warm-up, then
round-robin windows, ``cuda.synchronize`` around each sample) and summarises them as
a :class:`Timing`. Kept free of ``test_`` names so that pytest never collects it.
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so wall-clock time covers the work (CUDA only)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Timing:
    """Summary of per-step wall-clock samples, in seconds."""

    samples: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def q1(self) -> float:
        return _quantile(self.samples, 0.25)

    @property
    def q3(self) -> float:
        return _quantile(self.samples, 0.75)

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    @property
    def min(self) -> float:
        return min(self.samples)

    @property
    def max(self) -> float:
        return max(self.samples)


def _quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default), without numpy."""
    xs = sorted(values)
    if len(xs) == 1:
        return xs[0]
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def time_once(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall-clock seconds of one call of ``fn``, synchronized on CUDA."""
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def time_window(
    fn: Callable[[], Any],
    device: torch.device,
    window: int,
    between: Callable[[], Any] | None = None,
) -> float:
    """Mean seconds per call over ``window`` calls; ``between`` runs untimed before each."""
    total = 0.0
    for _ in range(window):
        if between is not None:
            between()
        total += time_once(fn, device)
    return total / window


def time_interleaved(
    fns: dict[str, Callable[[], Any]],
    device: torch.device,
    *,
    warmup: int,
    repeats: int,
    window: int = 1,
    between: dict[str, Callable[[], Any]] | None = None,
    progress: Callable[[int, int], Any] | None = None,
) -> dict[str, Timing]:
    """Time several callables in round-robin windows; return a :class:`Timing` each.

    On a shared, noisy machine a burst of load then hits every contestant alike,
    instead of whichever one happened to be running. The order rotates every round,
    so no contestant always follows the same neighbour.

    Args:
        fns: name -> callable (one optimizer step).
        device: where the work runs (for ``cuda.synchronize``).
        warmup: untimed calls of each callable before timing.
        repeats: timed windows per callable (the number of samples).
        window: calls per sample; the sample is their mean.
        between: name -> callable run untimed before every call (e.g. a scheduler).
        progress: called as ``progress(done, total)`` after each warm-up call and
            each timed window (e.g. a :class:`ProgressBar`'s ``update``).
    """
    between = between or {}
    names = list(fns)
    total, done = len(names) * (warmup + repeats), 0
    for name in names:
        for _ in range(warmup):
            time_window(fns[name], device, 1, between.get(name))
            done += 1
            if progress is not None:
                progress(done, total)
    samples: dict[str, list[float]] = {name: [] for name in names}
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()  # as timeit does: a collection would land on one random sample
    try:
        for r in range(repeats):
            k = r % len(names)
            for name in names[k:] + names[:k]:
                t = time_window(fns[name], device, window, between.get(name))
                samples[name].append(t)
                done += 1
                if progress is not None:
                    progress(done, total)
    finally:
        if gc_was_enabled:
            gc.enable()
    return {name: Timing(tuple(s)) for name, s in samples.items()}


class ProgressBar:
    """A one-line text progress bar on stderr: ``label [#####-----] done/total``.

    On a terminal the line is redrawn in place; otherwise (CI logs, pipes) a new line
    is printed only every 10 %, so logs stay short.
    """

    def __init__(self, label: str, width: int = 30, enabled: bool = True) -> None:
        self.label, self.width, self.enabled = label, width, enabled
        self._stream = sys.stderr
        self._tty = self._stream.isatty()
        self._last_decile = -1

    def update(self, done: int, total: int) -> None:
        if not self.enabled or total <= 0:
            return
        frac = min(done / total, 1.0)
        decile = int(frac * 10)
        if not self._tty and decile == self._last_decile and done < total:
            return
        self._last_decile = decile
        fill = int(frac * self.width)
        bar = "#" * fill + "-" * (self.width - fill)
        line = f"{self.label} [{bar}] {done}/{total}"
        end = "" if self._tty and done < total else "\n"
        self._stream.write(("\r" if self._tty else "") + line + end)
        self._stream.flush()


class GraphTracker:
    """Attributes Dynamo's ``unique_graphs`` counter to whichever contestant ran last."""

    def __init__(self) -> None:
        self.graphs: dict[str, int] = {}
        self._last: str | None = None
        self._count = self.read()

    @staticmethod
    def read() -> int:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])

    def mark(self, name: str | None) -> None:
        now = self.read()
        if self._last is not None:
            self.graphs[self._last] = self.graphs.get(self._last, 0) + now - self._count
        self._last, self._count = name, now
