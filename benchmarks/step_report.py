"""The step workloads' report: md table, CSV, JSON and a PNG bar chart per run.

Files are ``<date>_<workload>[_t<threads>][_<dtype>].{md,csv,json,png}`` in the
output folder; the CSV has one row per contestant (the JSON fields plus the run
header), the JSON the header, the run settings, the baseline, one object per
contestant and the target checks.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import common, sets
from benchmarks.contestants import BASELINE, LOWP_BASELINE

# Adam moves, per element: read param, grad, exp_avg, exp_avg_sq; write param,
# exp_avg, exp_avg_sq (28 B/element in float32). Each contestant's count is taken from
# its real tensors (``bandwidth.step_bytes``): bf16 params and grads with float32
# moments move 2 + 2 + 4 + 4 (read) + 2 + 4 + 4 (write) = 22 B/element, bf16
# everything 14.
ADAM_TENSOR_PASSES = 7

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


def target_lines(rows: dict[str, dict[str, Any]]) -> list[str]:
    """The issue's targets, checked against this run's medians."""

    def med(name: str) -> float | None:
        return rows[name].get("_median") if name in rows else None

    checks = _lowp_lines(med) + _int8_lines(med)
    ours, fused = med("umup-compiled"), med(BASELINE)
    eager, us = med("umup-eager"), med("us-default")
    if ours is not None and fused is not None:
        r = ours / fused
        checks.append(
            f"- compiled / torch fused = {r:.3f}x (target <= 1.10x): "
            + ("PASS" if r <= 1.10 else "FAIL")
        )
    if ours is not None and us is not None:
        r = us / ours
        checks.append(
            f"- unit_scaling default / compiled = {r:.3f}x (target >= 3x): "
            + ("PASS" if r >= 3.0 else "FAIL")
        )
    if eager is not None and us is not None:
        r = eager / us
        checks.append(
            f"- eager / unit_scaling default = {r:.3f}x (target <= 1.00x): "
            + ("PASS" if r <= 1.0 else "FAIL")
        )
    return checks


def _lowp_lines(med: Callable[[str], float | None]) -> list[str]:
    """bf16 + float32 state vs torch fused on float32 (informative, no target)."""
    lines = []
    ref = med(LOWP_BASELINE)
    for name in ("umup-fp32state", "umup-fp32state-sr", "torch-fused-bf16"):
        t = med(name)
        if t is not None and ref is not None:
            lines.append(f"- {name} / {LOWP_BASELINE} = {t / ref:.3f}x")
    return lines


def _int8_lines(med: Callable[[str], float | None]) -> list[str]:
    """8-bit state (issue 26): <= 0.75x torch fused on float32 state, faster than
    torchao's AdamW8bit; bitsandbytes' and bf16 + SR informative."""
    ours, fused = med("umup-int8"), med(BASELINE)
    if ours is None:
        return []
    lines = []
    if fused is not None:
        r = ours / fused
        lines.append(
            f"- umup-int8 / {BASELINE} = {r:.3f}x (target <= 0.75x): "
            + ("PASS" if r <= 0.75 else "FAIL")
        )
    ao = med("torchao-adamw8bit")
    if ao is not None:
        lines.append(
            f"- umup-int8 / torchao-adamw8bit = {ours / ao:.3f}x (target < 1x): "
            + ("PASS" if ours < ao else "FAIL")
        )
    for name in ("bnb-adamw8bit", "umup-compiled", "umup-bf16-int8-sr"):
        t = med(name)
        if t is not None:
            lines.append(f"- umup-int8 / {name} = {ours / t:.3f}x")
    return lines


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


def stem(args: argparse.Namespace, head: dict[str, str]) -> str:
    """``<date>_<workload>[_t<threads>][_<dtype>]``; many-small names a non-default count."""
    name = args.workload
    if name == "many-small" and args.n_small != sets.N_SMALL:
        name += str(args.n_small)
    out = f"{head['date']}_{name}"
    if args.device.startswith("cpu"):
        out += f"_t{head['threads']}"
    if args.dtype != "float32":
        out += f"_{args.dtype}"
    return out


def write(
    out: Path,
    args: argparse.Namespace,
    head: dict[str, str],
    rows: list[dict[str, Any]],
    bandwidth: dict[str, float],
    command: str,
) -> None:
    """Write the run's md, CSV, JSON and PNG into ``out`` and print its table."""
    baseline = args.baseline
    timed = [r for r in rows if "_median" in r]
    ref = next((r for r in timed if r["contestant"] == baseline), timed[0])
    targets = target_lines({r["contestant"]: r for r in rows})
    name = stem(args, head)
    copy_bw, add_bw = bandwidth["copy"], bandwidth["add"]
    n_tensors, numel = rows[0]["n_tensors"], rows[0]["numel"]
    run_info = {
        "workload": args.workload,
        "n_tensors": n_tensors,
        "numel": numel,
        "dtype": args.dtype,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "window": args.window,
        "smoke": args.smoke,
        "inductor_cache": "warm" if args.warm_cache else "fresh",
        "copy_bandwidth_gb_s": round(copy_bw / 1e9, 2),
        "inplace_add_bandwidth_gb_s": round(add_bw / 1e9, 2),
        "copy_mb": args.copy_mb,
        "bytes_per_step": ref["bytes_per_step"],  # the baseline's; per contestant below
        "command": command.strip(),
    }
    if args.time_scheduler:  # only when set: the default files keep their fields
        run_info["time_scheduler"] = True
    doc = {
        "header": head,
        "run": run_info,
        "baseline": baseline,
        "contestants": [
            {k: common.as_number(r.get(k)) for k in JSON_FIELDS} for r in rows
        ],
        "targets": targets,
    }
    (out / f"{name}.json").write_text(json.dumps(doc, indent=2) + "\n")
    csv_rows = [{"workload": args.workload, "dtype": args.dtype, **r} for r in rows]
    common.write_csv(out / f"{name}.csv", csv_rows, CSV_COLUMNS)

    table = common.markdown_table(rows, TABLE_COLUMNS)
    md = (
        common.md_head(
            f"benchmarks: {args.workload}",
            head,
            run_info,
            run_info["command"],
            args.smoke,
        )
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
        + f"\n\n![step time]({name}.png)\n"
    )
    (out / f"{name}.md").write_text(md)
    title = (
        f"{args.workload} ({n_tensors} tensors, {numel:,} elements, {args.dtype}) on "
        f"{head['device_name']}, {head['threads']} threads\n"
        f"torch {head['torch']}, commit {head['commit']}, {head['date']}; "
        f"copy bw {copy_bw / 1e9:.1f} GB/s, in-place add bw {add_bw / 1e9:.1f} GB/s"
    )
    write_png(out / f"{name}.png", rows, title, baseline)

    print()
    print(table)
    print()
    print("\n".join(targets))
    print(f"\nwrote {out / name}.{{md,csv,json,png}}")
