"""Combine bench_compile CSVs (several runs, contestants) into one table and one plot.

Example:
    python -m benchmarks.plot_compile benchmarks/results/cpu-amd-epyc/2026-11-27_compile_t2_*.csv \\
        --out benchmarks/results/cpu-amd-epyc/2026-11-27_compile_t2_combined
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path
from typing import Any

from benchmarks.bench_compile import write_png


def load(paths: list[Path]) -> list[dict[str, Any]]:
    """The rows of every CSV, later files overriding a (contestant, count) point."""
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    for path in paths:
        with path.open() as f:
            for row in csv.DictReader(f):
                n = int(row["n_tensors"])
                rows[(row["contestant"], n)] = {**row, "n_tensors": n}
    return list(rows.values())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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


if __name__ == "__main__":
    main()
