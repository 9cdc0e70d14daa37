"""Combine bench_compile CSVs (several runs, contestants) into one table and one plot.

Example:
    python -m benchmarks.plot_compile benchmarks/results/cpu-amd-epyc/2026-11-27_compile_t2_*.csv \\
        --out benchmarks/results/cpu-amd-epyc/2026-11-27_compile_t2_combined
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def load(paths: list[Path]) -> dict[str, dict[int, tuple[str, str]]]:
    """contestant -> tensor count -> (first step s, load average before)."""
    rows: dict[str, dict[int, tuple[str, str]]] = {}
    for path in paths:
        with path.open() as f:
            for row in csv.DictReader(f):
                rows.setdefault(row["contestant"], {})[int(row["n_tensors"])] = (
                    row["first_step_s"],
                    row["load_before"],
                )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csvs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="path without suffix")
    args = parser.parse_args(argv)
    rows = load(args.csvs)
    counts = sorted({n for by_count in rows.values() for n in by_count})
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
    for name, by_count in rows.items():
        cells = [
            f"{by_count[n][0]} ({by_count[n][1] or '?'})" if n in by_count else "-"
            for n in counts
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, by_count in rows.items():
        points = [
            (n, float(v[0])) for n, v in sorted(by_count.items()) if v[0][0].isdigit()
        ]
        ax.plot(*zip(*points), marker="o", label=name)
        timeouts = [n for n, v in by_count.items() if not v[0][0].isdigit()]
        for n in timeouts:
            ax.annotate("timeout", (n, ax.get_ylim()[1]), ha="center", va="top")
    ax.set_xscale("log")
    ax.set_xlabel("parameter tensors (64x64)")
    ax.set_ylabel("first step, s (compile included)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=120)
    print(f"wrote {args.out}.md and {args.out}.png")


if __name__ == "__main__":
    main()
