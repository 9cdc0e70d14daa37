"""One point of the compile workload (``python -m benchmarks compile``), in this process.

The driver (``bench_compile``) runs each point in a fresh interpreter as
``python -m benchmarks.bench_compile --worker ...``, which calls ``worker_main``:
build the contestant's tagged 64x64 weights and optimizer, time the first
``step()`` (state creation + cold compile), then the steady steps, and print the
result as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from benchmarks import timer

LR = 1e-3
SHAPE = (64, 64)


def build_params(contestant: str, n: int, seed: int = 0) -> list[nn.Parameter]:
    """``n`` tagged 64x64 weights with random gradients, tagged by the contestant's lib."""
    # The optimizer modules are imported here too, so build_s times no imports.
    if contestant == "umup":
        import umup_compile as uc
        import umup_compile.optim  # noqa: F401

        make: Callable[..., nn.Parameter] = uc.Parameter
    else:
        import unit_scaling.optim  # type: ignore[import-untyped]  # noqa: F401
        import unit_scaling.parameter as usp  # type: ignore[import-untyped]

        make = usp.Parameter
    gen = torch.Generator().manual_seed(seed)
    params = []
    for _ in range(n):
        p = make(torch.randn(SHAPE, generator=gen), mup_type="weight")
        p.grad = torch.randn(SHAPE, generator=gen)
        params.append(p)
    return params


def build_step(
    contestant: str, params: list[nn.Parameter], backend: str
) -> tuple[torch.optim.Optimizer, Callable[[], Any]]:
    """The optimizer and the callable whose first call is timed."""
    if contestant == "umup":
        import umup_compile.optim as uo

        opt: torch.optim.Optimizer = uo.Adam(params, lr=LR)
        if backend != "inductor":
            # As tests/helpers.py's use_backend does: the public API has no backend
            # switch, so swap the engine (only for --backend, never in real runs).
            from umup_compile._engine import CompiledEngine

            opt._engine = CompiledEngine(strict=True, backend=backend)  # type: ignore[attr-defined]
        return opt, opt.step

    import unit_scaling.optim as uso

    us_opt = uso.Adam(params, lr=LR)

    # As the torch docs show for compiling an optimizer step (and the step workloads'
    # torch-compiled contestant): Optimizer.step graph-breaks, hence fullgraph=False.
    @torch.compile(fullgraph=False, backend=backend)
    def compiled_step() -> None:
        us_opt.step()

    return us_opt, compiled_step


def _unique_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def run_point(
    contestant: str, n: int, *, backend: str, steady_steps: int
) -> dict[str, Any]:
    """Build, time the first step, then ``steady_steps`` more; return the result dict."""
    device = torch.device("cpu")
    load_before = os.getloadavg()[0]
    params = build_params(contestant, n)
    t0 = time.perf_counter()
    opt, step = build_step(contestant, params, backend)
    build_s = time.perf_counter() - t0
    graphs0 = _unique_graphs()
    note = ""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = timer.time_once(step, device)
    for w in caught:
        if "umup_compile" in str(w.message):  # e.g. a fallback to the eager engine
            note = "WARNING: " + str(w.message).splitlines()[0][:80]
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    graphs1 = _unique_graphs()
    steady = timer.Timing(
        tuple(timer.time_once(step, device) for _ in range(steady_steps))
    )
    engine = getattr(opt, "_engine", None)
    if getattr(engine, "failed", None):
        note = f"FELL BACK TO EAGER: {engine.failed}"[:100]  # type: ignore[union-attr]
    return {
        "contestant": contestant,
        "n_tensors": n,
        "numel": sum(p.numel() for p in params),
        "backend": backend,
        "threads": torch.get_num_threads(),
        "build_s": round(build_s, 4),
        "first_step_s": round(first, 4),
        "steady_ms": round(steady.median * 1e3, 3),
        "steady_min_ms": round(steady.min * 1e3, 3),
        "steady_max_ms": round(steady.max * 1e3, 3),
        "steady_steps": steady_steps,
        "steady_samples_ms": [round(t * 1e3, 3) for t in steady.samples],
        "graphs_first_step": graphs1 - graphs0,
        "graphs_later": _unique_graphs() - graphs1,
        # ru_maxrss is in KiB on Linux.
        "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        # 1-minute load average before and after: other jobs on a shared machine
        # inflate both the compile and the steady steps.
        "load_before": round(load_before, 2),
        "load_after": round(os.getloadavg()[0], 2),
        "inductor_cache_dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR", ""),
        "status": "ok",
        "note": note,
    }


def worker_main(args: argparse.Namespace) -> int:
    """``--worker``: one point; prints its result as one JSON line on stdout."""
    torch.set_num_threads(args.threads)  # before any compile: Inductor bakes it in
    (n,) = args.counts
    (contestant,) = args.contestants
    result = run_point(
        contestant, n, backend=args.backend, steady_steps=args.steady_steps
    )
    print(json.dumps(result), flush=True)
    return 0
