"""The transfer workload's summary: points over seeds, optima, and what they say.

``points`` groups the runs' CSV rows by (parametrization, width, log2 lr); ``optima``
takes each curve's best lr and its neighbours; ``verdict`` and ``reading`` say how far
each parametrization's optimum moves across the widths (generated, not edited).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from benchmarks import common
from benchmarks.transfer_model import KINDS


@dataclass(frozen=True)
class Point:
    """Validation loss at one (parametrization, width, log2 lr), over its seeds."""

    kind: str
    width: int
    log2_lr: int
    losses: tuple[float, ...]  # one per seed; NaN for a diverged run

    @property
    def mean(self) -> float:
        """Mean over seeds; +inf if any seed diverged (worse than every finite loss)."""
        if any(not math.isfinite(x) for x in self.losses):
            return math.inf
        return statistics.fmean(self.losses)

    @property
    def std(self) -> float:
        ok = [x for x in self.losses if math.isfinite(x)]
        return statistics.stdev(ok) if len(ok) > 1 else 0.0


def points(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, int], list[Point]]:
    """(parametrization, width) -> its points, by increasing lr."""
    acc: dict[tuple[str, int, int], list[float]] = {}
    for r in rows:
        key = (r["parametrization"], int(r["width"]), int(r["log2_lr"]))
        acc.setdefault(key, []).append(float(r["val_loss"]))
    out: dict[tuple[str, int], list[Point]] = {}
    for (kind, width, k), losses in sorted(acc.items()):
        out.setdefault((kind, width), []).append(Point(kind, width, k, tuple(losses)))
    return out


def best(curve: Sequence[Point]) -> int:
    """Index of the lowest mean loss (the first of equals)."""
    return min(range(len(curve)), key=lambda i: curve[i].mean)


def flat_neighbours(curve: Sequence[Point], tol: float) -> list[int]:
    """Indices of the optimum's grid neighbours within ``tol`` nats of it."""
    i = best(curve)
    return [
        j
        for j in (i - 1, i + 1)
        if 0 <= j < len(curve) and curve[j].mean - curve[i].mean < tol
    ]


def optima(
    curves: dict[tuple[str, int], list[Point]], tol: float
) -> list[dict[str, Any]]:
    """One row per (parametrization, width): the best lr and its neighbours' losses."""

    def fmt(p: Point | None) -> str:
        if p is None:
            return "-"
        if not math.isfinite(p.mean):
            return "diverged"
        return f"{p.mean:.4f}" + (f" ± {p.std:.4f}" if len(p.losses) > 1 else "")

    rows = []
    for (kind, width), curve in curves.items():
        i = best(curve)
        p = curve[i]
        rows.append(
            {
                "parametrization": kind,
                "width": width,
                "log2_lr": p.log2_lr,
                "best_lr": f"2^{p.log2_lr}",
                "val_loss": fmt(p),
                "val_loss_mean": p.mean,
                "seeds": len(p.losses),
                "loss_at_lr/2": fmt(curve[i - 1] if i > 0 else None),
                "loss_at_2lr": fmt(curve[i + 1] if i + 1 < len(curve) else None),
                "flat": "yes" if flat_neighbours(curve, tol) else "no",
                "edge": i in (0, len(curve) - 1),
            }
        )
    return rows


def verdict(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per parametrization: optimum log2 lr per width and their spread in grid steps."""
    out: dict[str, dict[str, Any]] = {}
    for kind in KINDS:
        mine = sorted((r for r in rows if r["parametrization"] == kind), key=_width)
        if not mine:
            continue
        ks = [int(r["log2_lr"]) for r in mine]
        out[kind] = {
            "widths": [r["width"] for r in mine],
            "best_log2_lr": ks,
            "spread_grid_steps": max(ks) - min(ks),
            "within_one_step": max(ks) - min(ks) <= 1,
            "at_grid_edge": [r["width"] for r in mine if r["edge"]],
        }
    return out


def _width(row: dict[str, Any]) -> int:
    return int(row["width"])


def reading(v: dict[str, dict[str, Any]]) -> list[str]:
    """Plain sentences on what the optima do across width (generated, not edited)."""
    lines = []
    for kind, info in v.items():
        ks = ", ".join(
            f"2^{k} at {w}" for w, k in zip(info["widths"], info["best_log2_lr"])
        )
        moved = info["spread_grid_steps"]
        factor = 2**moved
        if moved == 0:
            what = "the same grid point at every width"
        elif info["within_one_step"]:
            what = "within one grid step (2x) across the widths"
        else:
            what = f"moved {moved} grid steps ({factor}x) across the widths"
        line = f"- {kind}: best lr {ks}: {what}."
        if info["at_grid_edge"]:
            line += (
                f" The optimum is at the edge of the grid for width(s) "
                f"{info['at_grid_edge']}: the true optimum may lie outside it."
            )
        lines.append(line)
    return lines


def loss_table(curves: dict[tuple[str, int], list[Point]]) -> str:
    """Markdown: one row per lr, one column per (parametrization, width)."""
    out = []
    for kind in KINDS:
        keys = sorted(k for k in curves if k[0] == kind)
        if not keys:
            continue
        cols = ["lr", *(f"width {w}" for _, w in keys)]
        grid = sorted({p.log2_lr for k in keys for p in curves[k]})
        rows = []
        for k in grid:
            row: dict[str, Any] = {"lr": f"2^{k}"}
            for key in keys:
                p = next((p for p in curves[key] if p.log2_lr == k), None)
                if p is None:
                    continue
                cell = "diverged" if not math.isfinite(p.mean) else f"{p.mean:.4f}"
                if len(p.losses) > 1 and math.isfinite(p.mean):
                    cell += f" ±{p.std:.3f} ({len(p.losses)} seeds)"
                if p is curves[key][best(curves[key])]:
                    cell = f"**{cell}**"
                row[f"width {key[1]}"] = cell
            rows.append(row)
        out.append(f"{kind}:\n\n" + common.markdown_table(rows, cols))
    return "\n\n".join(out)
