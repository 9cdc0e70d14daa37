"""Benchmark harness: optimizer step time, state memory and achieved bandwidth.

Runs ``bench_step``'s contestants with its timer on one workload, adds per contestant
the optimizer-state bytes (and on CUDA the peak extra memory), the bytes an Adam step
moves / median step time as a share of this device's copy bandwidth (measured in the
same run), and writes a markdown table, a CSV, a JSON file and a PNG bar chart.

``--dtype bf16-fp32state`` runs the low-precision set instead: bf16 parameters with
float32 moments (umup compiled, with and without stochastic rounding) against torch
fused Adam on float32 parameters (the baseline) and on bf16 parameters (bf16 state),
plus HeavyBall's AdamW when ``heavyball`` is installed (else a row that says so).

Examples (from the repository root):
    python -m benchmarks --workload gpt --threads 2 --repeats 20
    python -m benchmarks --workload many-small
    python -m benchmarks --workload gpt --dtype bf16-fp32state --threads 2
    python -m benchmarks --smoke --out /tmp/bench
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks import bench_step

common = bench_step.common  # the module bench_step imported (one copy, one timer)
torch = bench_step.torch

WORKLOADS = {
    "gpt": "u-muP GPT-like shapes, 51 tensors, 33.6M elements (CPU and GPU)",
    "many-small": "256 weights of 64x64: launch/overhead-bound (CPU and GPU)",
    "gpt-124m": "GPT-2-small shapes, 12 x 768, vocab 50304: 162M elements (GPU only)",
    "gpt-1.2b": "20 x 2048, vocab 50304: 1.21B elements (GPU only)",
}
GPU_ONLY = {"gpt-124m", "gpt-1.2b"}
# Adam moves, per element: read param, grad, exp_avg, exp_avg_sq; write param,
# exp_avg, exp_avg_sq (28 B/element in float32). Each contestant's count is taken from
# its real tensors (``step_bytes``): bf16 params and grads with float32 moments move
# 2 + 2 + 4 + 4 (read) + 2 + 4 + 4 (write) = 22 B/element, bf16 everything 14.
ADAM_TENSOR_PASSES = 7
# The low-precision mode: not a torch dtype, a set of contestants (bench_step's
# LOWP_CONTESTANTS), each on its own parameter dtype.
LOWP = "bf16-fp32state"

JSON_FIELDS = [
    "contestant",
    "description",
    "param_dtype",
    "first_step_ms",
    "median_ms",
    "q1_ms",
    "q3_ms",
    "iqr_ms",
    "min_ms",
    "max_ms",
    "ratio_vs_torch_fused",
    "graphs_first_step",
    "graphs_later",
    "state_bytes",
    "state_over_params",
    "peak_extra_bytes",
    "bytes_per_step",
    "bytes_per_element",
    "achieved_gb_s",
    "pct_copy_bw",
    "pct_inplace_bw",
    "note",
]
CSV_COLUMNS = [
    "workload",
    "dtype",
    "n_tensors",
    "numel",
    *JSON_FIELDS,
    "state_MB",
    "peak_extra_MB",
    "repeats",
    "warmup",
    "window",
    *common.RUN_COLUMNS,
]
TABLE_COLUMNS = [
    "contestant",
    "param_dtype",
    "first_step_ms",
    "median_ms",
    "iqr_ms",
    "ratio_vs_torch_fused",
    "bytes_per_element",
    "achieved_gb_s",
    "pct_copy_bw",
    "pct_inplace_bw",
    "state_MB",
    "peak_extra_MB",
    "graphs_later",
    "note",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="workloads: " + "; ".join(f"{k}: {v}" for k, v in WORKLOADS.items()),
    )
    parser.add_argument("--workload", choices=list(WORKLOADS), default="gpt")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float64", LOWP],
        default="float32",
        help=f"parameter dtype of every contestant, or {LOWP}: bf16 params + float32 "
        "state (umup compiled, +stochastic rounding) vs torch fused on float32 and on "
        "bf16 params, and heavyball AdamW if installed",
    )
    parser.add_argument("--repeats", type=int, default=20, help="timed samples each")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps each")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads (default: keep)",
    )
    parser.add_argument(
        "--contestants",
        default=None,
        help="comma-separated (default: bench_step's list, or its low-precision list "
        f"with --dtype {LOWP}; with --smoke the smoke list); "
        f"from: {', '.join(bench_step.CONTESTANTS)}",
    )
    parser.add_argument(
        "--copy-mb",
        type=int,
        default=256,
        help="size of the tensor copied to measure the device's copy bandwidth",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default: benchmarks/results/<device>/; with --smoke, a "
        "temporary directory)",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny sizes, 3 repeats, eager contestants plus one tiny compiled one",
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bar on stderr"
    )
    args = parser.parse_args(argv)
    if args.workload in GPU_ONLY:
        cuda = args.device.startswith("cuda") and torch.cuda.is_available()
        if not cuda:
            parser.error(
                f"--workload {args.workload} needs a CUDA device "
                f"({WORKLOADS[args.workload]}); it is refused on CPU-only runs "
                "(got --device " + args.device + ", cuda available: "
                f"{torch.cuda.is_available()}). Use --workload gpt or many-small."
            )
        if args.smoke:
            parser.error("--smoke runs tiny sets: use --workload gpt or many-small")
    if args.smoke:
        args.copy_mb = min(args.copy_mb, 16)
    return args


def step_args(args: argparse.Namespace) -> argparse.Namespace:
    """The ``bench_step`` namespace for this run (its defaults for what we do not set)."""
    set_ = "gpt" if args.workload in GPU_ONLY else args.workload
    dtype = "bfloat16" if args.dtype == LOWP else args.dtype
    argv = ["--set", set_, "--device", args.device, "--dtype", dtype]
    argv += ["--repeats", str(args.repeats), "--warmup", str(args.warmup)]
    if args.threads is not None:
        argv += ["--threads", str(args.threads)]
    contestants = args.contestants
    if args.dtype == LOWP:
        argv += ["--baseline", bench_step.LOWP_BASELINE]
        if contestants is None:
            lowp = (
                bench_step.LOWP_SMOKE_CONTESTANTS
                if args.smoke
                else bench_step.LOWP_CONTESTANTS
            )
            contestants = ",".join(lowp)
    if contestants is not None:
        argv += ["--contestants", contestants]
    if args.smoke:
        argv.append("--smoke")
    ns = bench_step.parse_args(argv)
    ns.set = args.workload  # bench_step.param_specs knows the GPU-only sets too
    return ns


def _tensors(value: Any) -> list[Any]:
    """Tensors in a state entry, looking into dicts, lists and tuples (HeavyBall nests)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def step_bytes(optimizer: torch.optim.Optimizer) -> tuple[int, int]:
    """Bytes one Adam step moves, from the contestant's real tensors and dtypes.

    Per parameter: read + write the parameter, read the gradient, and
    read + write each state tensor of the parameter's shape (``exp_avg``,
    ``exp_avg_sq``; scalars such as ``step`` are left out). Returns (bytes, bytes of
    the parameters): float32 Adam gives 7 x 4 = 28 B per element, bf16 parameters
    and gradients with float32 moments 2 x 2 + 2 + 2 x (4 + 4) = 22 B.
    """
    moved = params = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            # Every parameter had a gradient when it stepped; a contestant may clear
            # it in its step (HeavyBall does), so a missing one counts as p's dtype.
            grad = p.grad if p.grad is not None else p
            p_bytes = p.numel() * p.element_size()
            params += p_bytes
            moved += 2 * p_bytes + grad.numel() * grad.element_size()
            for t in _tensors(optimizer.state.get(p, {})):
                if t.shape == p.shape:
                    moved += 2 * t.numel() * t.element_size()
    return moved, params


def add_figures(
    rows: list[dict[str, Any]],
    copy_bw: float,
    add_bw: float,
    optimizers: dict[str, torch.optim.Optimizer],
) -> list[dict[str, Any]]:
    """Per contestant: state size, bytes moved per step, achieved and % copy bandwidth."""
    for row in rows:
        if "_median" not in row:  # skipped (optional package missing)
            row["peak_extra_bytes"] = None
            continue
        numel = int(row["numel"])
        moved, param_bytes = step_bytes(optimizers[row["contestant"]])
        achieved = moved / row["_median"]
        row["bytes_per_step"] = moved
        row["bytes_per_element"] = round(moved / numel, 2)
        row["achieved_gb_s"] = round(achieved / 1e9, 2)
        row["pct_copy_bw"] = round(100 * achieved / copy_bw, 1)
        row["pct_inplace_bw"] = round(100 * achieved / add_bw, 1)
        row["state_over_params"] = round(row["state_bytes"] / param_bytes, 3)
        row["state_MB"] = f"{row['state_bytes'] / 2**20:.1f}"
        peak = row["peak_extra_bytes"]
        row["peak_extra_MB"] = "-" if peak is None else f"{peak / 2**20:.1f}"
    return rows


def write_png(
    path: Path, rows: list[dict[str, Any]], title: str, baseline: str
) -> None:
    """Horizontal bars of median step time (IQR whiskers), ratio to torch fused."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if "_median" in r]  # skipped contestants have no bar
    names = [r["contestant"] for r in rows]
    med = [float(r["median_ms"]) for r in rows]
    q1 = [float(r["q1_ms"]) for r in rows]
    q3 = [float(r["q3_ms"]) for r in rows]
    err = [[m - lo for m, lo in zip(med, q1)], [hi - m for m, hi in zip(med, q3)]]
    colors = [
        "tab:orange"
        if n == baseline
        else "tab:blue"
        if n.startswith("umup")
        else "tab:gray"
        for n in names
    ]
    fig, ax = plt.subplots(figsize=(9, 0.55 * len(rows) + 1.8))
    y = list(range(len(rows)))
    ax.barh(y, med, xerr=err, color=colors, capsize=3)
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xlabel("median step time, ms (whiskers: IQR)")
    ax.set_title(title, fontsize=9)
    right = max(q3) * 1.65
    ax.set_xlim(0, right)
    for yi, r in zip(y, rows):
        label = f"{float(r['median_ms']):.1f} ms"
        if r.get("ratio_vs_torch_fused", "") != "":
            label += f"  {float(r['ratio_vs_torch_fused']):.2f}x {baseline}"
        label += f"  {r['pct_copy_bw']:.0f}% copy bw"
        label += f" ({r['pct_inplace_bw']:.0f}% in-place)"
        ax.text(float(r["q3_ms"]) + right * 0.01, yi, label, va="center", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = " ".join(sys.argv[1:] if argv is None else argv)
    sargs = step_args(args)
    bar = common.ProgressBar(f"{args.workload}", enabled=not args.no_progress)
    device = torch.device(args.device)
    # A private Inductor cache (as bench_step does), so first_step_ms is a cold compile.
    with tempfile.TemporaryDirectory(prefix="bench_harness_inductor_") as cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        built: dict[str, bench_step.Contestant] = {}
        rows, head, targets = bench_step.run(
            sargs, progress=bar.update, contestants_out=built
        )
        copy_bw = common.copy_bandwidth(device, args.copy_mb * 2**20)
        add_bw = common.copy_bandwidth(device, args.copy_mb * 2**20, op="add")
    add_figures(rows, copy_bw, add_bw, {n: c.optimizer for n, c in built.items()})
    baseline = sargs.baseline
    timed = [r for r in rows if "_median" in r]
    ref = next((r for r in timed if r["contestant"] == baseline), timed[0])

    stem = f"{head['date']}_{args.workload}"
    if device.type == "cpu":
        stem += f"_t{head['threads']}"
    if args.dtype != "float32":
        stem += f"_{args.dtype}"
    if args.out is not None:
        out = args.out
    elif args.smoke:
        out = Path(tempfile.mkdtemp(prefix="bench_harness_smoke_"))
    else:
        out = common.RESULTS / head["device"]
    out.mkdir(parents=True, exist_ok=True)

    n_tensors, numel = rows[0]["n_tensors"], rows[0]["numel"]
    run_info = {
        "workload": args.workload,
        "n_tensors": n_tensors,
        "numel": numel,
        "dtype": args.dtype,
        "repeats": sargs.repeats,
        "warmup": sargs.warmup,
        "window": sargs.window,
        "smoke": args.smoke,
        "inductor_cache": "fresh",
        "copy_bandwidth_gb_s": round(copy_bw / 1e9, 2),
        "inplace_add_bandwidth_gb_s": round(add_bw / 1e9, 2),
        "copy_mb": args.copy_mb,
        "bytes_per_step": ref["bytes_per_step"],  # the baseline's; per contestant below
        "command": f"python -m benchmarks {command}".strip(),
    }
    doc = {
        "header": head,
        "run": run_info,
        "baseline": baseline,
        "contestants": [
            {k: common.as_number(r.get(k)) for k in JSON_FIELDS} for r in rows
        ],
        "targets": targets,
    }
    (out / f"{stem}.json").write_text(json.dumps(doc, indent=2) + "\n")
    csv_rows = [{"workload": args.workload, "dtype": args.dtype, **r} for r in rows]
    common.write_csv(out / f"{stem}.csv", csv_rows, CSV_COLUMNS)

    table = common.markdown_table(rows, TABLE_COLUMNS)
    smoke_note = "(smoke sizes: the numbers mean nothing)\n\n" if args.smoke else ""
    md = (
        f"# benchmarks: {args.workload}\n\n{smoke_note}"
        + "\n".join(f"- {k}: {v}" for k, v in head.items())
        + "\n"
        + "\n".join(f"- {k}: {v}" for k, v in run_info.items() if k != "command")
        + f"\n- command: `{run_info['command']}`\n\n"
        + "Times in ms per optimizer step (median, IQR over round-robin samples); "
        + f"ratio = median / median of {baseline}; achieved bandwidth = "
        + "bytes_per_element x numel / median, where bytes_per_element counts each "
        + "contestant's real dtypes (read + write param, read grad, read + write "
        + f"exp_avg and exp_avg_sq: {ADAM_TENSOR_PASSES} x 4 = 28 B in float32, "
        + "2 x 2 + 2 + 2 x (4 + 4) = 22 B for bf16 params with float32 state); "
        + "% of the copy "
        + "bandwidth measured in this run (dst.copy_(src), 2 x size; on a CPU the "
        + "write-allocate makes this understate the bus, so an in-place step can exceed "
        + "100 %); % in-place = of an in-place dst.add_(src) (3 x size); "
        + "state = tensors in optimizer.state; "
        + "peak extra = CUDA peak over the parameters during build + first step.\n\n"
        + table
        + "\n\nTargets:\n\n"
        + "\n".join(targets)
        + f"\n\n![step time]({stem}.png)\n"
    )
    (out / f"{stem}.md").write_text(md)
    title = (
        f"{args.workload} ({n_tensors} tensors, {numel:,} elements, {args.dtype}) on "
        f"{head['device_name']}, {head['threads']} threads\n"
        f"torch {head['torch']}, commit {head['commit']}, {head['date']}; "
        f"copy bw {copy_bw / 1e9:.1f} GB/s, in-place add bw {add_bw / 1e9:.1f} GB/s"
    )
    write_png(out / f"{stem}.png", rows, title, baseline)

    print()
    print(table)
    print()
    print("\n".join(targets))
    print(f"\nwrote {out / stem}.{{md,csv,json,png}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
