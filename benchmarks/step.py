"""Optimizer step time, state memory and achieved bandwidth on one parameter set.

The step workloads of ``python -m benchmarks``: ``gpt``, ``many-small``, ``gpt-124m``
and ``gpt-1.2b`` (the parameter sets of ``sets.param_specs``). All contestants
(``contestants.CONTESTANTS``) run in one process, on copies of the same parameters
and gradients, with the gradients set once and reused. Every contestant gets a
``LambdaLR`` that changes lr on every step (untimed unless ``--time-scheduler``), so
a recompile on a new lr shows up in the ``graphs_later`` column and in the step
time. Steady-state samples are taken in round-robin windows
(``timer.time_interleaved``). Per contestant it adds the optimizer-state bytes (and
on CUDA the peak extra memory), the bytes an Adam step moves / median step time as a
share of this device's copy bandwidth (measured in the same run), and writes a
markdown table, a CSV, a JSON file and a PNG bar chart (``step_report``).

``--dtype bf16-fp32state`` runs the low-precision set instead: bf16 parameters with
float32 moments (umup compiled, with and without stochastic rounding) against torch
fused Adam on float32 parameters (the baseline) and on bf16 parameters (bf16 state),
plus HeavyBall's AdamW when ``heavyball`` is installed (else a row that says so).
``--dtype int8-state`` runs the 8-bit state set: umup with ``state_dtype=torch.int8``
(and with float32 state), torch fused Adam on float32 state (the baseline), torchao's
and bitsandbytes' ``AdamW8bit`` when installed (else a row that says so), and bf16
parameters with 8-bit state and stochastic rounding.

Examples (from the repository root):
    python -m benchmarks gpt --threads 2 --repeats 20
    python -m benchmarks many-small --n-small 2000 --contestants umup-compiled,torch-fused
    python -m benchmarks gpt --dtype bf16-fp32state --threads 2
    python -m benchmarks gpt --dtype int8-state --threads 1
    python -m benchmarks gpt --smoke --out /tmp/bench
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

from benchmarks import common, sets, step_report, timer
from benchmarks.bandwidth import add_figures, copy_bandwidth, state_bytes
from benchmarks.contestants import (
    BASELINE,
    CONTESTANTS,
    DEFAULT_CONTESTANTS,
    INT8_CONTESTANTS,
    INT8_SMOKE_CONTESTANTS,
    LOWP_BASELINE,
    LOWP_CONTESTANTS,
    LOWP_SMOKE_CONTESTANTS,
    SMOKE_CONTESTANTS,
    Contestant,
    build_contestant,
    skip_reason,
)

WORKLOADS = {
    "gpt": "u-muP GPT-like shapes, 51 tensors, 33.6M elements (CPU and GPU)",
    "many-small": f"{sets.N_SMALL} (--n-small) weights of 64x64: launch/overhead-bound "
    "(CPU and GPU)",
    "gpt-124m": "GPT-2-small shapes, 12 x 768, vocab 50304: 162M elements (GPU only)",
    "gpt-1.2b": "20 x 2048, vocab 50304: 1.21B elements (GPU only)",
}
GPU_ONLY = {"gpt-124m", "gpt-1.2b"}
# The low-precision mode: not a torch dtype, a set of contestants (LOWP_CONTESTANTS),
# each on its own parameter dtype.
LOWP = "bf16-fp32state"
# The 8-bit state mode: float32 parameters, INT8_CONTESTANTS.
INT8_STATE = "int8-state"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``<workload> [options]`` (the workload first, as the front door passes it)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    workload = argv[0] if argv else ""
    parser = argparse.ArgumentParser(
        prog=f"python -m benchmarks {workload if workload in WORKLOADS else '<set>'}",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="sets: " + "; ".join(f"{k}: {v}" for k, v in WORKLOADS.items()),
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float64", LOWP, INT8_STATE],
        default="float32",
        help=f"parameter dtype of every contestant, or {LOWP}: bf16 params + float32 "
        "state (umup compiled, +stochastic rounding) vs torch fused on float32 and on "
        f"bf16 params, and heavyball AdamW if installed, or {INT8_STATE}: float32 "
        "params, umup with 8-bit moments vs torch fused, torchao's and bitsandbytes' "
        "AdamW8bit if installed",
    )
    parser.add_argument("--repeats", type=int, default=20, help="timed samples each")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps each")
    parser.add_argument("--window", type=int, default=1, help="steps per sample")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads (default: keep)",
    )
    parser.add_argument(
        "--contestants",
        default=None,
        help="comma-separated (default: the default list, or the low-precision list "
        f"with --dtype {LOWP}; with --smoke the smoke list); "
        f"from: {', '.join(CONTESTANTS)}",
    )
    parser.add_argument(
        "--baseline",
        default=None,
        help=f"contestant whose median is the denominator of every ratio (default "
        f"{BASELINE}; {LOWP_BASELINE} with --dtype {LOWP})",
    )
    parser.add_argument(
        "--n-small",
        type=int,
        default=sets.N_SMALL,
        help="tensors in many-small (a compile takes about 1 s per tensor on CPU)",
    )
    parser.add_argument(
        "--time-scheduler",
        action="store_true",
        help="time LambdaLR.step() together with step() (default: untimed)",
    )
    parser.add_argument(
        "--warm-cache",
        action="store_true",
        help="reuse the Inductor on-disk cache (default: a fresh one, so the first step "
        "includes a cold compile)",
    )
    parser.add_argument(
        "--copy-mb",
        type=int,
        default=256,
        help="size of the tensor copied to measure the device's copy bandwidth",
    )
    common.add_out_argument(parser)
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny sizes, 3 repeats, eager contestants plus one tiny compiled one",
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bar on stderr"
    )
    known = workload in WORKLOADS
    if not known and not workload.startswith("-"):  # (-h/--help works without a set)
        parser.error(f"the first argument is the set, one of {list(WORKLOADS)}")
    args = parser.parse_args(argv[1:] if known else argv)
    if not known:
        parser.error(f"the first argument is the set, one of {list(WORKLOADS)}")
    args.workload = workload
    if args.workload in GPU_ONLY:
        cuda = args.device.startswith("cuda") and torch.cuda.is_available()
        if not cuda:
            parser.error(
                f"workload {args.workload} needs a CUDA device "
                f"({WORKLOADS[args.workload]}); it is refused on CPU-only runs "
                "(got --device " + args.device + ", cuda available: "
                f"{torch.cuda.is_available()}). Use gpt or many-small."
            )
        if args.smoke:
            parser.error("--smoke runs tiny sets: use gpt or many-small")
    lowp = args.dtype == LOWP
    if args.baseline is None:
        args.baseline = LOWP_BASELINE if lowp else BASELINE
    if args.smoke:
        args.copy_mb = min(args.copy_mb, 16)
        args.repeats = min(args.repeats, 3)
        args.warmup = min(args.warmup, 1)
    if args.contestants is None:
        lists = {
            ("float", False): DEFAULT_CONTESTANTS,
            ("float", True): SMOKE_CONTESTANTS,
            (LOWP, False): LOWP_CONTESTANTS,
            (LOWP, True): LOWP_SMOKE_CONTESTANTS,
            (INT8_STATE, False): INT8_CONTESTANTS,
            (INT8_STATE, True): INT8_SMOKE_CONTESTANTS,
        }
        mode = args.dtype if args.dtype in (LOWP, INT8_STATE) else "float"
        args.contestants = ",".join(lists[mode, args.smoke])
    names = [n.strip() for n in args.contestants.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONTESTANTS]
    if unknown:
        parser.error(
            f"unknown contestant(s) {unknown}; choose from {list(CONTESTANTS)}"
        )
    args.contestants = names
    return args


def run(
    args: argparse.Namespace,
    *,
    progress: Callable[[int, int], Any] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, str], dict[str, Contestant]]:
    """Build, first-step and time every contestant; return rows, header, contestants.

    ``progress(done, total)`` is called after every build and every timed window.
    Each row also carries ``state_bytes`` (tensors in ``optimizer.state``) and, on
    CUDA, ``peak_extra_bytes``: peak allocated memory during build + first step,
    over what was allocated before (the parameters and gradients).
    """
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    # The low-precision set is bf16 unless a contestant says otherwise.
    modes = {LOWP: torch.bfloat16, INT8_STATE: torch.float32}
    dtype = modes.get(args.dtype) or getattr(torch, args.dtype)
    head = common.header(device)
    specs = sets.param_specs(args.workload, args.smoke, args.n_small)
    if args.smoke and args.dtype == INT8_STATE:  # tensors of 4096+ elements quantize
        specs = sets.gpt_like_specs(d_model=64, n_layers=1, vocab=64)
    master = sets.build_params(specs, device=device, dtype=dtype)
    n_tensors, numel = len(master), sets.count_numel(master)
    print(
        f"# benchmarks {args.workload}: tensors={n_tensors} numel={numel:,} "
        f"dtype={args.dtype}"
    )
    print("# " + ", ".join(f"{k}={v}" for k, v in head.items()), flush=True)

    contestants: dict[str, Contestant] = {}
    first: dict[str, float] = {}
    first_graphs: dict[str, int] = {}
    n_names = len(args.contestants)
    total = n_names * (1 + args.warmup + args.repeats)
    peak_extra: dict[str, int | None] = {}
    skipped = {
        n: why for n in args.contestants if (why := skip_reason(n, device)) is not None
    }
    for i, name in enumerate(args.contestants):
        if name in skipped:
            print(f"  skipped {name}: {skipped[name]}", flush=True)
            continue
        gc.collect()
        dtype_ = _param_dtype(name, dtype)
        params = (
            sets.copy_params(master)
            if dtype_ == dtype
            else sets.cast_params(master, dtype_)
        )
        if device.type == "cuda":
            timer.synchronize(device)
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        c = build_contestant(name, params)
        graphs_before = timer.GraphTracker.read()
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            first[name] = timer.time_once(c.step, device)
        first_graphs[name] = timer.GraphTracker.read() - graphs_before
        peak_extra[name] = (
            torch.cuda.max_memory_allocated(device) - before
            if device.type == "cuda"
            else None
        )
        for w in caught:
            if "umup_compile" in str(w.message):  # e.g. a fallback to the eager engine
                c.note = "WARNING: " + str(w.message).splitlines()[0][:80]
            # Re-issue under the normal filters (recording bypassed them).
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        c.scheduler.step()
        contestants[name] = c
        print(
            f"  built {name:15s} first step {first[name] * 1e3:10.1f} ms "
            f"({time.perf_counter() - t0:.1f} s wall)",
            flush=True,
        )
        if progress is not None:
            progress(i + 1, total)

    tracker = timer.GraphTracker()

    def between_for(c: Contestant) -> Callable[[], None]:
        def between() -> None:
            tracker.mark(c.name)
            c.scheduler.step()

        return between

    if args.time_scheduler:
        fns = {n: _with_scheduler(c) for n, c in contestants.items()}
        between = {n: (lambda n=n: tracker.mark(n)) for n in contestants}
    else:
        fns = {n: c.step for n, c in contestants.items()}
        between = {n: between_for(c) for n, c in contestants.items()}
    timings = timer.time_interleaved(
        fns,
        device,
        warmup=args.warmup,
        repeats=args.repeats,
        window=args.window,
        between=between,
        progress=(
            None
            if progress is None
            else lambda done, _total: progress(n_names + done, total)
        ),
    )
    tracker.mark(None)

    rows: dict[str, dict[str, Any]] = {}
    for name in args.contestants:
        size = {"set": args.workload, "n_tensors": n_tensors, "numel": numel}
        if name in skipped:
            rows[name] = {**size, **_skipped_row(name, skipped[name]), **head}
            continue
        c = contestants[name]
        t = timings[name]
        note = c.note
        engine = getattr(c.optimizer, "_engine", None)
        if getattr(engine, "failed", None):
            note = f"FELL BACK TO EAGER: {engine.failed}"[:100]
        rows[name] = {
            **size,
            "contestant": name,
            "description": CONTESTANTS[name].description,
            "first_step_ms": f"{first[name] * 1e3:.1f}",
            "median_ms": f"{t.median * 1e3:.2f}",
            "q1_ms": f"{t.q1 * 1e3:.2f}",
            "q3_ms": f"{t.q3 * 1e3:.2f}",
            "iqr_ms": f"{t.iqr * 1e3:.2f}",
            "min_ms": f"{t.min * 1e3:.2f}",
            "max_ms": f"{t.max * 1e3:.2f}",
            "graphs_first_step": first_graphs[name],
            "graphs_later": tracker.graphs.get(name, 0),
            "repeats": args.repeats,
            "warmup": args.warmup,
            "window": args.window,
            "time_scheduler": args.time_scheduler,
            "note": note,
            "param_dtype": str(_param_dtype(name, dtype)).replace("torch.", ""),
            "state_bytes": state_bytes(c.optimizer),
            "peak_extra_bytes": peak_extra[name],
            "_median": t.median,
            **head,
        }
    if args.baseline in contestants:
        base = rows[args.baseline]["_median"]
        for row in rows.values():
            if "_median" in row:
                row["ratio_vs_torch_fused"] = f"{row['_median'] / base:.2f}"
    return list(rows.values()), head, contestants


def _param_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    own = CONTESTANTS[name].dtype
    return dtype if own is None else own


def _skipped_row(name: str, reason: str) -> dict[str, Any]:
    """A table row for a contestant that cannot run here (see ``skip_reason``)."""
    return {
        "contestant": name,
        "description": CONTESTANTS[name].description,
        "note": f"skipped: {reason}",
        "skipped": True,
    }


def _with_scheduler(c: Contestant) -> Callable[[], None]:
    def step_and_schedule() -> None:
        c.step()
        c.scheduler.step()

    return step_and_schedule


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = " ".join(sys.argv[1:] if argv is None else argv)
    bar = timer.ProgressBar(args.workload, enabled=not args.no_progress)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="bench_step_inductor_") as cache:
        if not args.warm_cache:
            # A private Inductor cache (read lazily by Inductor), so first_step_ms is
            # a cold compile rather than a disk-cache hit from an earlier run.
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        rows, head, built = run(args, progress=bar.update)
        copy_bw = copy_bandwidth(device, args.copy_mb * 2**20)
        add_bw = copy_bandwidth(device, args.copy_mb * 2**20, op="add")
    add_figures(rows, copy_bw, add_bw, {n: c.optimizer for n, c in built.items()})
    out = common.output_dir(args.out, args.smoke, head, "step")
    bandwidth = {"copy": copy_bw, "add": add_bw}
    step_report.write(
        out, args, head, rows, bandwidth, f"python -m benchmarks {command}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
