"""Where the first compiled step's time goes: GPT-like set, cold, warm and from artifacts.

Each mode runs in a fresh interpreter (nothing leaks between them) and reports the
first ``step()``'s wall time, its phases from Dynamo's compile-time metrics
(``torch._dynamo.utils.compile_times``: Dynamo tracing, AOT, Inductor lowering and
code generation, the C++ compile and module load), the graphs compiled and the FX
graph cache's hits and misses, then the steady step's median:

    cold       an empty Inductor cache directory
    warm       a new process on the cache directory the cold run filled
    artifacts  an empty cache directory, after ``torch.compiler.load_cache_artifacts``
               of what the cold run saved (torch's portable cache: copy one blob to
               another machine instead of a directory)

Examples (from the repository root):
    python -m benchmarks first-step                  # 1 thread, all modes
    python -m benchmarks first-step --threads 2
    python -m benchmarks first-step --state-dtype int8   # 8-bit moments
    python -m benchmarks first-step --smoke --out /tmp/first_step.csv
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import common, sets

MODES = ("cold", "warm", "artifacts")
# torch's portable cache (save/load_cache_artifacts) came with torch 2.7.
PORTABLE = hasattr(torch.compiler, "save_cache_artifacts")
# compile_times keys worth a column (the others are summed into "other_s"): each is
# one nested phase of the first step; absent keys (torch versions differ) read 0.
PHASES = {
    "dynamo_s": "_compile.compile_inner",
    "aot_s": "create_aot_dispatcher_function",
    "inductor_s": "compile_fx_inner",
    "codegen_s": "GraphLowering.codegen",
    "cpp_compile_s": "compile_file",
    "load_s": "PyCodeCache.load_by_key_path",  # warm: includes its compile_file
}
COLUMNS = [
    "mode",
    "first_step_s",
    *PHASES,
    "graphs",
    "fx_cache_hits",
    "fx_cache_misses",
    "steady_ms",
    "note",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks first-step",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steady-steps", type=int, default=10)
    parser.add_argument(
        "--state-dtype",
        choices=["float32", "int8"],
        default="float32",
        help="Adam's state_dtype (int8: 8-bit moments)",
    )
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="CSV path (default: benchmarks/results/<device>/<date>_first_step_t<threads>"
        ".csv)",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny set, CI check")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--artifacts", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in args.modes if m not in MODES]
    if bad:
        parser.error(f"unknown mode(s) {bad}; choose from {list(MODES)}")
    return args


def _specs(smoke: bool) -> list[sets.ParamSpec]:
    if smoke:
        return sets.gpt_like_specs(d_model=32, n_layers=1, vocab=64)
    return sets.gpt_like_specs()


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """One mode in this (fresh) process."""
    from torch._dynamo.utils import compile_times, counters

    from umup_compile.optim import Adam

    torch.set_num_threads(args.threads)  # before any compile: Inductor bakes it in
    if args.worker == "artifacts":
        blob = Path(args.artifacts).read_bytes()
        torch.compiler.load_cache_artifacts(blob)
    params = sets.build_params(_specs(args.smoke), device=torch.device("cpu"))
    opt = Adam(params, lr=1e-3, state_dtype=getattr(torch, args.state_dtype))
    t0 = time.perf_counter()
    opt.step()
    first = time.perf_counter() - t0
    if args.worker == "cold" and args.artifacts and PORTABLE:
        saved = torch.compiler.save_cache_artifacts()
        if saved is not None:
            Path(args.artifacts).write_bytes(saved[0])
    steady = []
    for _ in range(args.steady_steps):
        t = time.perf_counter()
        opt.step()
        steady.append(time.perf_counter() - t)
    names, values = compile_times(repr="csv", aggregate=True)
    times = {n: float(str(v)) for n, v in zip(names, values)}
    row: dict[str, Any] = {"mode": args.worker, "first_step_s": round(first, 2)}
    for column, key in PHASES.items():
        row[column] = round(times.get(key, 0.0), 2)
    row["graphs"] = counters["stats"]["unique_graphs"]
    row["fx_cache_hits"] = counters["inductor"]["fxgraph_cache_hit"]
    row["fx_cache_misses"] = counters["inductor"]["fxgraph_cache_miss"]
    row["steady_ms"] = round(statistics.median(steady) * 1e3, 2)
    row["all_phases"] = {k: round(v, 3) for k, v in times.items() if v >= 0.05}
    return row


def run_mode(
    mode: str, cache: str, blob: str, args: argparse.Namespace
) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.bench_first_step", "--worker", mode]
    cmd += ["--threads", str(args.threads), "--steady-steps", str(args.steady_steps)]
    cmd += ["--state-dtype", args.state_dtype]
    cmd += ["--artifacts", blob] + (["--smoke"] if args.smoke else [])
    env = dict(os.environ)
    # artifacts: an empty cache beside the shared one (inside the run's temporary
    # folder, removed with it)
    env["TORCHINDUCTOR_CACHE_DIR"] = cache if mode != "artifacts" else cache + "_empty"
    env["PYTHONPATH"] = os.pathsep.join(
        [str(common.REPO), *filter(None, [env.get("PYTHONPATH", "")])]
    )
    t0 = time.perf_counter()
    proc = subprocess.run(
        cmd, cwd=common.REPO, env=env, capture_output=True, text=True, check=False
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:160]
        return {"mode": mode, "note": f"rc {proc.returncode}: {tail}"}
    row: dict[str, Any] = json.loads(lines[-1])
    row["note"] = f"process {time.perf_counter() - t0:.1f} s"
    return row


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)), flush=True)
        return 0
    head = common.header(torch.device("cpu"))
    head["threads"] = str(args.threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="first_step_") as tmp:
        cache, blob = os.path.join(tmp, "inductor"), os.path.join(tmp, "artifacts.bin")
        for mode in args.modes:
            if mode == "artifacts" and not PORTABLE:
                row = {
                    "mode": mode,
                    "note": f"needs torch >= 2.7 ({torch.__version__})",
                }
                rows.append(row)
                continue
            row = run_mode(mode, cache, blob, args)
            print(f"  {mode:9s} {row}", flush=True)
            rows.append(row)
    table = common.markdown_table(rows, COLUMNS)
    print()
    print(table)
    state = "" if args.state_dtype == "float32" else f"_{args.state_dtype}"
    name = f"{head['date']}_first_step_t{args.threads}{state}.csv"
    out = args.out or common.RESULTS / head["device"] / name
    common.write_csv(out, [{**r, **head} for r in rows], COLUMNS + common.RUN_COLUMNS)
    phases = "\n".join(
        f"- {r['mode']}: "
        + ", ".join(f"{k} {v}" for k, v in r.get("all_phases", {}).items())
        for r in rows
    )
    out.with_suffix(".md").write_text(
        "# bench_first_step: the first compiled step, GPT-like set, "
        f"state_dtype={args.state_dtype}\n\n"
        + "\n".join(f"- {k}: {v}" for k, v in head.items())
        + "\n- command: `python -m benchmarks first-step "
        + " ".join(sys.argv[1:] if argv is None else argv)
        + "`\n\nSeconds of the first `step()`; phases are Dynamo's compile-time "
        "metrics, nested (dynamo_s contains the rest); steady_ms is the median of "
        f"{args.steady_steps} later steps.\n\n"
        + table
        + "\n\nEvery metric of 0.05 s or more:\n\n"
        + phases
        + "\n"
    )
    print(f"\nwrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
