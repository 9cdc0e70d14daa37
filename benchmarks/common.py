"""Shared benchmark machinery: timer, parameter-set builders, run header, CSV/markdown.

Kept free of ``test_`` names so that pytest never collects it.
"""

from __future__ import annotations

import copy
import csv
import datetime as _dt
import gc
import os
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import umup_compile as uc

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"


# -- timing -----------------------------------------------------------------------


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
        import sys

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


# -- memory and bandwidth -------------------------------------------------------------


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors in ``optimizer.state`` (each storage counted once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if not isinstance(value, Tensor):
                continue
            storage = value.untyped_storage()
            key = (storage.data_ptr(), storage.nbytes())
            if key in seen:
                continue
            seen.add(key)
            total += storage.nbytes()
    return total


def copy_bandwidth(
    device: torch.device,
    nbytes: int = 256 * 2**20,
    repeats: int = 10,
    op: str = "copy",
) -> float:
    """Device memory bandwidth in bytes/s, median over ``repeats`` of one large op.

    ``op="copy"``: ``dst.copy_(src)``, counted as ``2 * nbytes`` (one read, one write).
    On a CPU the write to ``dst`` also reads it first (write-allocate), so the real
    traffic is nearer ``3 * nbytes`` and this figure understates the bus.
    ``op="add"``: in place ``dst.add_(src)``, counted as ``3 * nbytes`` (two reads, one
    write to a line already read): no write-allocate, like an in-place Adam step.
    """
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.ones_like(src)
    if op == "copy":
        fn, moved = (lambda: dst.copy_(src)), 2 * nbytes
    elif op == "add":
        fn, moved = (lambda: dst.add_(src)), 3 * nbytes
    else:
        raise ValueError(f"op must be 'copy' or 'add', not {op!r}")
    fn()  # warm-up: page faults, first touch
    times = [time_once(fn, device) for _ in range(repeats)]
    return moved / statistics.median(times)


# -- parameter sets -----------------------------------------------------------------


@dataclass(frozen=True)
class ParamSpec:
    """One tagged parameter: name, shape and u-μP tags."""

    name: str
    shape: tuple[int, ...]
    mup_type: str
    depth: int | None


def gpt_like_specs(
    d_model: int = 512, n_layers: int = 8, vocab: int = 8192, mlp_ratio: int = 4
) -> list[ParamSpec]:
    """u-μP GPT-like shapes: embedding, per layer qkv/proj/up/down + 2 norms, head.

    Defaults give 51 tensors, 33,563,136 elements (≈33.6M).
    """
    d, h = d_model, mlp_ratio * d_model
    specs = [ParamSpec("embed.weight", (vocab, d), "weight", None)]
    for i in range(n_layers):
        p = f"layers.{i}."
        specs += [
            ParamSpec(p + "attn_norm.weight", (d,), "norm", None),
            ParamSpec(p + "attn.qkv.weight", (3 * d, d), "weight", n_layers),
            ParamSpec(p + "attn.proj.weight", (d, d), "weight", n_layers),
            ParamSpec(p + "mlp_norm.weight", (d,), "norm", None),
            ParamSpec(p + "mlp.up.weight", (h, d), "weight", n_layers),
            ParamSpec(p + "mlp.down.weight", (d, h), "weight", n_layers),
        ]
    specs += [
        ParamSpec("final_norm.weight", (d,), "norm", None),
        ParamSpec("readout.weight", (vocab, d), "output", None),
    ]
    return specs


def many_small_specs(n: int = 256, numel: int = 4096) -> list[ParamSpec]:
    """``n`` weights of ``numel`` elements each (square when possible): launch-bound."""
    side = int(numel**0.5)
    shape = (side, side) if side * side == numel else (numel // 64, 64)
    return [ParamSpec(f"small.{i}.weight", shape, "weight", None) for i in range(n)]


def build_params(
    specs: Sequence[ParamSpec],
    *,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> list[nn.Parameter]:
    """Tagged parameters with random values and random (fixed) gradients."""
    gen = torch.Generator().manual_seed(seed)
    params = []
    for spec in specs:
        data = torch.randn(spec.shape, generator=gen, dtype=dtype).to(device)
        p = uc.Parameter(data, spec.mup_type, spec.depth)  # type: ignore[arg-type]
        p.grad = torch.randn(spec.shape, generator=gen, dtype=dtype).to(device)
        params.append(p)
    return params


def copy_params(params: Sequence[nn.Parameter]) -> list[nn.Parameter]:
    """Independent copies of tagged parameters and their gradients."""
    out = []
    for p in params:
        q = copy.deepcopy(p)
        q.grad = None if p.grad is None else p.grad.detach().clone()
        out.append(q)
    return out


def count_numel(params: Sequence[Tensor]) -> int:
    return sum(p.numel() for p in params)


# -- header -------------------------------------------------------------------------


def cpu_name() -> str:
    """The CPU model name, from /proc/cpuinfo where there is one."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _slug(text: str) -> str:
    text = re.sub(r"\((r|tm)\)|\bcpu\b|processor|\d+-core|@.*$", "", text, flags=re.I)
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def device_slug(device: torch.device) -> str:
    """Short device name for file names: ``cpu-amd-epyc``, ``cuda-nvidia-h100-...``."""
    if device.type == "cuda":
        return "cuda-" + _slug(torch.cuda.get_device_name(device))
    return f"{device.type}-" + _slug(cpu_name())


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()


def git_commit() -> str:
    """Commit of the ``umup_compile`` that was imported.

    ``<sha>`` when it is this repository's package at HEAD, ``<sha>-dirty`` when
    ``umup_compile/`` has local edits, and ``<path> (repo HEAD <sha>)`` when the package was
    imported from elsewhere (e.g. a ``git archive`` snapshot on ``PYTHONPATH``).
    """
    package = Path(uc.__file__).resolve().parent
    try:
        commit = _git("rev-parse", "--short", "HEAD")
        if package != REPO / "umup_compile":
            return f"{package} (repo HEAD {commit})"
        dirty = _git("status", "--porcelain", "--", "umup_compile")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


# The header facts (see ``header``) that every CSV row repeats, in column order.
RUN_COLUMNS = [
    "date",
    "device",
    "device_name",
    "threads",
    "torch",
    "triton",
    "python",
    "commit",
]


def header(device: torch.device) -> dict[str, str]:
    """Facts every result carries: device, software versions, threads, commit, date."""
    info = {
        "date": _dt.date.today().isoformat(),
        "device": device_slug(device),
        "device_name": (
            torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
        ),
        "cpu": cpu_name(),
        "cpu_count": str(os.cpu_count()),
        "threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "commit": git_commit(),
    }
    try:
        import triton  # type: ignore[import-not-found]

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = "-"
    return info


# -- output -------------------------------------------------------------------------


def as_number(value: Any, *, text_as_none: bool = False) -> Any:
    """A number kept as a formatted string (for a table) back to a number (for JSON).

    Other strings (a note such as "timeout") stay as they are, or become ``None`` with
    ``text_as_none``.
    """
    if not isinstance(value, str):
        return value
    try:
        return float(value)
    except ValueError:
        return None if text_as_none else value


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A GitHub markdown table of ``rows`` restricted to ``columns``."""
    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def write_csv(
    path: Path, rows: Sequence[dict[str, Any]], columns: Sequence[str]
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
