"""First-step (compile) time versus tensor count: umup_compile vs compiled unit_scaling.

Each point (tensor count x contestant) runs in a fresh subprocess with its own empty
Inductor cache directory and the FX graph cache off, so the first ``step()`` is a cold
compile, and nothing (Dynamo caches, loaded kernels, warmed compile workers) leaks from
one point into the next. A point that runs past ``--timeout`` is killed and recorded as
``timeout (> N s)``. The parameters are tagged 64x64 weights with random gradients.

Contestants:
    umup                   umup_compile.optim.Adam(params, lr=1e-3), default engine
    unit_scaling_compiled  unit_scaling.optim.Adam(params, lr=1e-3) (one group per
                           parameter) with ``@torch.compile(fullgraph=False)`` around
                           ``opt.step()``, as the step workloads' ``torch-compiled``
                           and the torch docs do

Examples (from the repository root):
    python -m benchmarks compile --help
    python -m benchmarks compile                     # 50 200 500 2000, both
    python -m benchmarks compile --contestants unit_scaling_compiled --counts 50 200
    python -m benchmarks compile --smoke --out /tmp/bench_compile
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch

from benchmarks import common
from benchmarks.compile_worker import SHAPE, run_point, worker_main
from benchmarks.plot_compile import timeout_label, write_png

CONTESTANTS = {
    "umup": "umup_compile.optim.Adam(params, lr=1e-3), default compile=True engine",
    "unit_scaling_compiled": (
        "unit_scaling.optim.Adam(params, lr=1e-3) (one group per parameter), step "
        "wrapped in torch.compile(fullgraph=False)"
    ),
}
DEFAULT_COUNTS = [50, 200, 500, 2000]
SMOKE_COUNTS = [4, 8]
SMOKE_BACKEND = "aot_eager"  # traces like Inductor, but generates no code: seconds

COLUMNS = [
    "n_tensors",
    "contestant",
    "first_step_s",
    "steady_ms",
    "steady_min_ms",
    "steady_max_ms",
    "graphs_first_step",
    "graphs_later",
    "build_s",
    "worker_wall_s",
    "max_rss_mb",
    "load_before",
    "load_after",
    "status",
    "note",
    "numel",
    "backend",
    "steady_steps",
    "timeout_s",
    "description",
]
TABLE_COLUMNS = [
    "n_tensors",
    "contestant",
    "first_step_s",
    "steady_ms",
    "graphs_first_step",
    "graphs_later",
    "max_rss_mb",
    "note",
]


# -- driver ------------------------------------------------------------------------


def point_env(cache_dir: str) -> dict[str, str]:
    """The environment of one worker: a private, empty Inductor cache, no FX cache."""
    env = dict(os.environ)
    env["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
    env["TORCHINDUCTOR_FX_GRAPH_CACHE"] = "0"
    env["TORCHINDUCTOR_AUTOGRAD_CACHE"] = "0"
    env["TRITON_CACHE_DIR"] = os.path.join(cache_dir, "triton")
    repo = str(common.REPO)
    env["PYTHONPATH"] = os.pathsep.join(
        [repo, *filter(None, [env.get("PYTHONPATH", "")])]
    )
    return env


def _failed(
    contestant: str, n: int, args: argparse.Namespace, status: str, note: str
) -> dict[str, Any]:
    return {
        "contestant": contestant,
        "n_tensors": n,
        "numel": n * SHAPE[0] * SHAPE[1],
        "backend": args.backend,
        "threads": args.threads,
        "first_step_s": None,
        "steady_ms": None,
        "status": status,
        "note": note,
    }


def run_subprocess(contestant: str, n: int, args: argparse.Namespace) -> dict[str, Any]:
    """One point in a fresh interpreter; timeouts and crashes become result rows."""
    cmd = [sys.executable, "-m", "benchmarks.bench_compile", "--worker"]
    cmd += ["--counts", str(n), "--contestants", contestant]
    cmd += ["--threads", str(args.threads), "--backend", args.backend]
    cmd += ["--steady-steps", str(args.steady_steps)]
    with tempfile.TemporaryDirectory(prefix="bench_compile_inductor_") as cache:
        t0 = time.perf_counter()
        # A new session, so a timeout kills Inductor's compile workers too.
        proc = subprocess.Popen(
            cmd,
            cwd=common.REPO,
            env=point_env(cache),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            out, err = proc.communicate(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            label = timeout_label(args.timeout)
            return _failed(contestant, n, args, "timeout", label)
        wall = time.perf_counter() - t0
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (err.strip().splitlines() or ["no output"])[-1][:120]
        return _failed(contestant, n, args, "error", f"rc {proc.returncode}: {tail}")
    result: dict[str, Any] = json.loads(lines[-1])
    result["worker_wall_s"] = round(wall, 2)
    return result


def run_in_process(contestant: str, n: int, args: argparse.Namespace) -> dict[str, Any]:
    """One point in this process (``--in-process``: no isolation; for the CI smoke)."""
    t0 = time.perf_counter()
    result = run_point(
        contestant, n, backend=args.backend, steady_steps=args.steady_steps
    )
    result["worker_wall_s"] = round(time.perf_counter() - t0, 2)
    return result


def run_all(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every (count, contestant) point, count-major so noise hits contestants alike."""
    rows = []
    point = run_in_process if args.in_process else run_subprocess
    for n in args.counts:
        for contestant in args.contestants:
            print(f"  {contestant:22s} {n:5d} tensors ...", end="", flush=True)
            row = point(contestant, n, args)
            row["description"] = CONTESTANTS[contestant]
            row["timeout_s"] = args.timeout
            row.setdefault("steady_steps", args.steady_steps)
            if row["status"] == "ok":
                row["first_step_s"] = f"{row['first_step_s']:.2f}"
                row["steady_ms"] = f"{row['steady_ms']:.2f}"
                print(
                    f" first step {row['first_step_s']} s, "
                    f"steady {row['steady_ms']} ms",
                    flush=True,
                )
            else:
                row["first_step_s"] = row["note"] if row["status"] == "timeout" else "-"
                row["steady_ms"] = "-"
                print(f" {row['status']}: {row['note']}", flush=True)
            rows.append(row)
    return rows


def output_stem(args: argparse.Namespace, head: dict[str, str]) -> str:
    """``<date>_compile_t<threads>[_<contestants>][_<backend>]``."""
    stem = f"{head['date']}_compile_t{args.threads}"
    if args.contestants != list(CONTESTANTS):
        stem += "_" + "-".join(args.contestants)
    if args.backend != "inductor":
        stem += f"_{args.backend}"
    return stem


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks compile",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="contestants: " + "; ".join(f"{k}: {v}" for k, v in CONTESTANTS.items()),
    )
    parser.add_argument(
        "--counts", type=int, nargs="+", default=None, help=f"default {DEFAULT_COUNTS}"
    )
    parser.add_argument(
        "--contestants",
        nargs="+",
        choices=list(CONTESTANTS),
        default=list(CONTESTANTS),
    )
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument(
        "--timeout",
        type=float,
        default=900.0,
        help="seconds per point (fresh process, whole run); past it the point is "
        "recorded as 'timeout (> N s)'",
    )
    parser.add_argument(
        "--steady-steps", type=int, default=5, help="steps after the first (median)"
    )
    parser.add_argument(
        "--backend",
        default=None,
        help="torch.compile backend for both contestants (default inductor; "
        f"{SMOKE_BACKEND} with --smoke). Not inductor: umup's engine is swapped as "
        "tests/helpers.py's use_backend does",
    )
    common.add_out_argument(parser)
    parser.add_argument(
        "--smoke",
        action="store_true",
        help=f"counts {SMOKE_COUNTS}, backend {SMOKE_BACKEND}: checks that it runs",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run every point in this process (no fresh interpreter or cache per "
        "point, no timeout): only for quick checks",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.counts is None:
        args.counts = SMOKE_COUNTS if args.smoke else DEFAULT_COUNTS
    if args.backend is None:
        args.backend = SMOKE_BACKEND if args.smoke else "inductor"
    if args.worker and (len(args.counts) != 1 or len(args.contestants) != 1):
        parser.error("--worker runs one point: one --counts and one --contestants")
    if any(n < 1 for n in args.counts):
        parser.error(f"--counts must be positive, got {args.counts}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args)
    command = " ".join(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)  # so the header records the workers' threads
    head = common.header(torch.device("cpu"))
    print(
        f"# bench_compile: counts={args.counts} contestants={args.contestants} "
        f"backend={args.backend} timeout={args.timeout:g}s"
    )
    print("# " + ", ".join(f"{k}={v}" for k, v in head.items()), flush=True)
    rows = run_all(args)

    out = common.output_dir(args.out, args.smoke, head, "compile")
    stem = output_stem(args, head)

    run_info = {
        "counts": args.counts,
        "contestants": args.contestants,
        "shape": list(SHAPE),
        "backend": args.backend,
        "threads": args.threads,
        "timeout_s": args.timeout,
        "steady_steps": args.steady_steps,
        "smoke": args.smoke,
        "isolation": "in-process" if args.in_process else "fresh process per point",
        "inductor_cache": "shared" if args.in_process else "fresh per point",
        "fx_graph_cache": "on" if args.in_process else "off",
        "command": f"python -m benchmarks compile {command}".strip(),
    }
    doc = {
        "header": head,
        "run": run_info,
        "points": [
            {
                k: common.as_number(r.get(k), text_as_none=True)
                if k in ("first_step_s", "steady_ms")
                else r.get(k)
                for k in [*COLUMNS, "steady_samples_ms"]
            }
            for r in rows
        ],
    }
    (out / f"{stem}.json").write_text(json.dumps(doc, indent=2) + "\n")
    common.write_csv(out / f"{stem}.csv", rows, COLUMNS)

    table = common.markdown_table(rows, TABLE_COLUMNS)
    heading = "bench_compile: first step vs tensor count"
    md = (
        common.md_head(heading, head, run_info, run_info["command"], args.smoke)
        + "first_step_s: wall clock of the first step() of a fresh optimizer (state "
        + "creation + cold compile), one fresh process and Inductor cache per point; "
        + f"steady_ms: median of the next {args.steady_steps} steps; graphs: Dynamo "
        + "graphs compiled in the first step / later steps (0 = no recompiles); "
        + "max_rss_mb: the worker's peak resident memory.\n\n"
        + "Contestants:\n\n"
        + "\n".join(f"- `{n}`: {CONTESTANTS[n]}" for n in args.contestants)
        + "\n\n"
        + table
        + f"\n\n![first step]({stem}.png)\n"
    )
    (out / f"{stem}.md").write_text(md)
    title = (
        f"first step (compile) vs tensor count, 64x64 weights, backend {args.backend}\n"
        f"{head['device_name']}, {args.threads} threads, torch {head['torch']}, "
        f"commit {head['commit']}, {head['date']}"
    )
    write_png(out / f"{stem}.png", rows, title, args.timeout)

    print()
    print(table)
    print(f"\nwrote {out / stem}.{{md,csv,json,png}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
