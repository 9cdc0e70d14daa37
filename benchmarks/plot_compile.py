"""Compile-time plots: one run's PNG, and several runs' CSVs combined into one table.

``python -m benchmarks compile`` draws its run with ``write_png``;
``python -m benchmarks compile-plot`` combines runs (several runs, contestants).

Example:
    python -m benchmarks compile-plot benchmarks/results/cpu-amd-epyc/2026-11-27_compile_t2_*.csv \\
        --out benchmarks/results/cpu-amd-epyc/2026-11-27_compile_t2_combined
"""

from __future__ import annotations

import argparse
import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def timeout_label(timeout: float) -> str:
    """How a point that ran past ``--timeout`` reads in tables and the plot legend."""
    return f"timeout (> {timeout:g} s)"


def write_png(
    path: Path, rows: Sequence[dict[str, Any]], title: str, timeout: float
) -> None:
    """First-step seconds vs tensor count (log x), one line per contestant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    names = list(dict.fromkeys(r["contestant"] for r in rows))
    for i, name in enumerate(names):
        color = f"C{i}"
        mine = [r for r in rows if r["contestant"] == name]
        ok = [
            (r["n_tensors"], float(r["first_step_s"]))
            for r in mine
            if r["status"] == "ok"
        ]
        if ok:
            xs, ys = zip(*ok)
            ax.plot(xs, ys, marker="o", color=color, label=name)
            for x, y in ok:
                ax.annotate(
                    f"{y:.1f} s",
                    (x, y),
                    textcoords="offset points",
                    xytext=(4, 4),
                    fontsize=7,
                    color=color,
                )
        slow = [r["n_tensors"] for r in mine if r["status"] == "timeout"]
        if slow:
            ax.scatter(
                slow,
                [timeout] * len(slow),
                marker="^",
                facecolors="none",
                edgecolors=color,
                label=f"{name}: {timeout_label(timeout)}",
            )
    ax.set_xscale("log")
    counts = sorted({r["n_tensors"] for r in rows})
    ax.set_xticks(counts, [str(c) for c in counts])
    ax.minorticks_off()
    ax.set_xlabel("tensors (64x64 weights)")
    ax.set_ylabel("first step() incl. compile, s (cold Inductor cache)")
    tops = [float(r["first_step_s"]) for r in rows if r["status"] == "ok"]
    tops += [timeout for r in rows if r["status"] == "timeout"]
    ax.set_ylim(0, 1.15 * max(tops, default=1.0))  # room for the labels
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def load(paths: list[Path]) -> list[dict[str, Any]]:
    """The rows of every CSV, later files overriding a (contestant, count) point."""
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    for path in paths:
        with path.open() as f:
            for row in csv.DictReader(f):
                n = int(row["n_tensors"])
                rows[(row["contestant"], n)] = {**row, "n_tensors": n}
    return list(rows.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks compile-plot", description=__doc__.splitlines()[0]
    )
    parser.add_argument("csvs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="path without suffix")
    args = parser.parse_args(argv)
    rows = load(args.csvs)
    counts = sorted({r["n_tensors"] for r in rows})
    lines = [
        "# First optimizer step (compile included) vs tensor count",
        "",
        "Seconds; 64x64 tagged weights, fresh process and Inductor cache, 2 threads; "
        "(load average before the point). Sources: "
        + ", ".join(f"`{p.name}`" for p in args.csvs),
        "",
        "| contestant | " + " | ".join(str(n) for n in counts) + " |",
        "|---|" + "---|" * len(counts),
    ]
    for name in dict.fromkeys(r["contestant"] for r in rows):
        by_count = {r["n_tensors"]: r for r in rows if r["contestant"] == name}
        cells = [
            f"{by_count[n]['first_step_s']} ({by_count[n]['load_before'] or '?'})"
            if n in by_count
            else "-"
            for n in counts
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    # the timeout marker sits at the limit of the points that hit it
    timed_out = [r for r in rows if r["status"] == "timeout"] or rows
    timeout = max(float(r["timeout_s"]) for r in timed_out)
    write_png(args.out.with_suffix(".png"), rows, args.out.name, timeout)
    print(f"wrote {args.out}.md and {args.out}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
