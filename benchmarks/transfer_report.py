"""The transfer workload's report: md, CSV, JSON and the u-μP paper's figure-1 plot.

Files are ``<date>_transfer_t<threads>[_<tag>].{md,csv,json,png}``: the CSV has one
row per run, the md the header, the settings, the optima, a generated reading, every
point and the plot; the JSON all of it with numbers as numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks import common
from benchmarks.transfer_model import KINDS, UMUP, VOCAB, Corpus
from benchmarks.transfer_summary import (
    Point,
    best,
    loss_table,
    optima,
    points,
    reading,
    verdict,
)

CSV_COLUMNS = [
    "parametrization",
    "width",
    "lr",
    "log2_lr",
    "seed",
    "val_loss",
    "train_loss",
    "diverged",
    "n_params",
    "first_step_s",
    "run_s",
    *common.RUN_COLUMNS,
]
OPTIMA_COLUMNS = [
    "parametrization",
    "width",
    "best_lr",
    "val_loss",
    "seeds",
    "loss_at_lr/2",
    "loss_at_2lr",
    "flat",
]


def write_png(
    path: Path,
    curves: dict[tuple[str, int], list[Point]],
    opt_rows: Sequence[dict[str, Any]],
    title: str,
) -> None:
    """Final validation loss vs lr, one curve per width, u-μP | SP (the paper's fig. 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    widths = sorted({w for _, w in curves})
    cmap = plt.get_cmap("viridis")
    color = {
        w: cmap(0.15 + 0.7 * i / max(1, len(widths) - 1)) for i, w in enumerate(widths)
    }
    finite = [p.mean for c in curves.values() for p in c if math.isfinite(p.mean)]
    panel_best = [
        min(p.mean for (k, _), c in curves.items() if k == kind for p in c)
        for kind in KINDS
        if any(k == kind for k, _ in curves)
    ]
    if not finite:  # every run diverged: nothing to scale the axis on
        finite = panel_best = [0.0, 1.0]
    lo = min(finite) - 0.05
    hi = min(max(finite) + 0.05, max(panel_best) + 0.8)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), sharey=True)
    for ax, kind in zip(axes, KINDS):
        for w in widths:
            curve = curves.get((kind, w))
            if not curve:
                continue
            xs = [p.log2_lr for p in curve]
            ys = [min(p.mean, hi) for p in curve]
            errs = [p.std for p in curve]
            ax.errorbar(
                xs,
                ys,
                yerr=errs,
                color=color[w],
                marker="o",
                ms=4,
                lw=1.5,
                capsize=3,
                label=f"width {w}",
            )
            over = [(x, p) for x, p in zip(xs, curve) if p.mean > hi]
            if over:  # above the axis (or diverged): drawn on its top edge
                ax.plot(
                    [x for x, _ in over],
                    [hi] * len(over),
                    "^",
                    color=color[w],
                    ms=7,
                    clip_on=False,
                )
            i = best(curve)
            ax.plot(
                curve[i].log2_lr,
                min(curve[i].mean, hi),
                "*",
                color=color[w],
                ms=16,
                mec="k",
                mew=0.8,
                zorder=5,
            )
        ks = [int(r["log2_lr"]) for r in opt_rows if r["parametrization"] == kind]
        if ks:
            ax.axvspan(min(ks) - 0.1, max(ks) + 0.1, color="0.92", zorder=0)
        grid = sorted(
            {p.log2_lr for (k, _), c in curves.items() if k == kind for p in c}
        )
        ax.set_xticks(grid, [f"$2^{{{k}}}$" for k in grid])
        ax.set_title(
            f"{kind}: "
            + (
                "umup_compile AdamW (compiled)"
                if kind == UMUP
                else "torch.optim.AdamW, default init"
            ),
            fontsize=10,
        )
        ax.set_xlabel("peak learning rate")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    axes[0].set_ylabel("final validation loss (nats/byte)")
    axes[0].set_ylim(lo, hi)
    fig.suptitle(title, fontsize=9)
    fig.text(
        0.5,
        0.005,
        "★ = best lr per width; shaded = span of the optima; ▲ = above the axis or "
        "diverged; whiskers = std over seeds where rerun",
        ha="center",
        fontsize=8,
    )
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(
    out: Path,
    args: argparse.Namespace,
    head: dict[str, str],
    rows: list[dict[str, Any]],
    corpus: Corpus,
    val_targets: Any,
    run: dict[str, Any],
) -> None:
    """Summarise the runs, write the files into ``out`` and print the optima.

    ``run``: ``wall`` (seconds), ``load`` (the load averages at start and end) and
    ``command`` (the command line that reproduces the run).
    """
    curves = points(rows)
    opt_rows = optima(curves, args.flat_tol)
    v = verdict(opt_rows)
    read = reading(v)
    for row in rows:
        row.update({c: head.get(c, "") for c in common.RUN_COLUMNS})
    stem = f"{head['date']}_transfer_t{head['threads']}"
    if args.tag:
        stem += f"_{args.tag}"
    full_command = run["command"].strip()
    wall = run["wall"]
    n_params = {
        f"{r['parametrization']} {r['width']}": r["n_params"]
        for r in rows
        if r["seed"] == 0
    }
    first_steps = [
        float(r["first_step_s"]) for r in rows if r["parametrization"] == UMUP
    ]
    run_info = {
        "model": f"u-μP: unit_scaling.TransformerDecoder(width, {VOCAB}, "
        f"layers={args.depth}, heads={args.heads}); SP: the same architecture in "
        "torch modules (SpTransformerDecoder), default init; parameters per model: "
        + ", ".join(f"{k}: {v:,}" for k, v in n_params.items()),
        "data": corpus.source,
        "tokens": f"{args.steps} steps x batch {args.batch} x {args.seq} bytes = "
        f"{args.steps * args.batch * args.seq:,} training bytes per run; validation: "
        f"{val_targets.numel():,} bytes ({len(val_targets)} windows of {args.seq})",
        "u-μP optimizer": "umup_compile.optim.AdamW(independent_weight_decay=True, "
        f"weight_decay={args.weight_decay:g}, "
        f"state_dtype=torch.{getattr(args, 'state_dtype', 'float32')}), "
        + ("eager (compile=False)" if args.eager else "compiled (compile='strict')"),
        "SP optimizer": f"torch.optim.AdamW(weight_decay={args.sp_weight_decay:g}) "
        "(coupled: decay = lr x wd per step), foreach",
        "schedule": f"LambdaLR: linear warm-up over {args.warmup:.0%} of the steps, "
        "cosine decay to 0",
        "grids": f"u-μP 2^{args.umup_lrs[0]}..2^{args.umup_lrs[-1]}, "
        f"SP 2^{args.sp_lrs[0]}..2^{args.sp_lrs[-1]} (log2 grid {args.umup_lrs} / "
        f"{args.sp_lrs})",
        "seeds": f"seed 0 for every point; the optimum and neighbours within "
        f"{args.flat_tol:g} nats of it rerun with seeds 1..{args.seeds - 1}",
        "runs": len(rows),
        "u-μP first step, s (incl. compile), max / median": f"{max(first_steps):.1f} / "
        f"{statistics.median(first_steps):.2f}",
        "model forward/backward": "eager (not compiled) on both sides",
        "inductor cache": "fresh (a private temporary folder): the first u-μP run "
        "at each width pays a cold compile, later runs of that width reuse it",
        "wall_s": f"{wall:.0f}",
        "load average (1/5/15 min) at start / end": " / ".join(
            ", ".join(f"{x:.1f}" for x in la) for la in run["load"]
        )
        + f" on {os.cpu_count()} CPUs (other jobs share this machine)",
        "smoke": args.smoke,
        "command": full_command,
    }
    doc = {
        "header": head,
        "run": run_info,
        "args": {
            k: (str(x) if isinstance(x, Path) else x) for k, x in vars(args).items()
        },
        "runs": [{k: common.as_number(r.get(k)) for k in CSV_COLUMNS} for r in rows],
        "points": [
            {
                "parametrization": p.kind,
                "width": p.width,
                "log2_lr": p.log2_lr,
                "val_losses": [x if math.isfinite(x) else None for x in p.losses],
                "mean": p.mean if math.isfinite(p.mean) else None,
                "std": p.std,
            }
            for c in curves.values()
            for p in c
        ],
        "optima": [
            {k: r[k] for k in ("parametrization", "width", "log2_lr", "seeds", "flat")}
            | {"val_loss": r["val_loss_mean"], "at_grid_edge": r["edge"]}
            for r in opt_rows
        ],
        "verdict": v,
        "reading": read,
    }
    (out / f"{stem}.json").write_text(
        json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
    )
    common.write_csv(out / f"{stem}.csv", rows, CSV_COLUMNS)

    table = common.markdown_table(opt_rows, OPTIMA_COLUMNS)
    heading = "benchmarks.transfer: learning-rate transfer across width"
    md = (
        common.md_head(heading, head, run_info, full_command, args.smoke)
        + "Final validation loss (mean next-byte cross entropy, nats) per width at each "
        + "peak lr; optimum = lowest mean over the seeds run at that lr; flat = a grid "
        + f"neighbour within {args.flat_tol:g} nats of it (those points were rerun "
        + "with more seeds).\n\n## Optima\n\n"
        + table
        + "\n\n## Reading\n\n"
        + "\n".join(read)
        + "\n\n## All points\n\n"
        + loss_table(curves)
        + f"\n\n![lr transfer]({stem}.png)\n"
    )
    (out / f"{stem}.md").write_text(md)
    title = (
        f"validation loss vs peak lr, widths {args.widths}, depth {args.depth}, "
        f"{args.heads} heads, {args.steps} steps x {args.batch} x {args.seq} bytes of "
        f"pydoc_data.topics\n{head['device_name']}, {head['threads']} threads, "
        f"torch {head['torch']}, commit {head['commit']}, {head['date']}"
    )
    write_png(out / f"{stem}.png", curves, opt_rows, title)

    print()
    print(table)
    print()
    print("\n".join(read))
    print(f"\nwall {wall:.0f} s; wrote {out / stem}.{{md,csv,json,png}}")
