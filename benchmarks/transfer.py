"""Learning-rate transfer across width: u-μP with this package's AdamW vs standard SP.

What u-μP is for: the learning rate that is best on a narrow model stays best on a
wide one. This trains ``unit_scaling.TransformerDecoder`` (unit_scaling's own u-μP
model: unit-scaled modules, residual tau rule, ``mup_type``/``mup_scaling_depth`` tags)
with ``umup_compile.optim.AdamW`` (compiled, independent weight decay), and the same
architecture in standard parametrization (plain torch modules, default init,
``torch.optim.AdamW``, coupled weight decay), at several widths over a learning-rate
grid in powers of two, and reports the final validation loss per width and lr.

Architecture (both sides): byte-level (vocab 256) causal decoder, pre-norm, RMSNorm
without affine weights, multi-head causal self-attention without positional
embeddings (NoPE, as unit_scaling's model has none), SwiGLU MLP with 4x expansion, no
biases, untied readout. Fixed depth, heads, sequence length, batch and steps, so every
width sees the same tokens. Schedule: linear warm-up then cosine decay to 0.

Data: the English documentation that ships with every CPython (``pydoc_data.topics``,
~466 KB of text), as UTF-8 bytes, cut into 4 KiB chunks of which every 10th is the
validation split (fixed); training batches are random windows of the training split,
the same windows for every run of one seed.

Seeds: one seed (0) everywhere; where a width's curve is flat at its optimum (a grid
neighbour within ``--flat-tol`` nats of the best), the optimum and those neighbours are
rerun with seeds 1 .. ``--seeds``-1 and the optimum is taken on the mean.

Writes ``<date>_transfer_t<threads>.{md,csv,json,png}`` into ``--out`` (default
``benchmarks/results/<device>/``; ``--smoke`` without ``--out``: a temporary folder).

Examples (from the repository root):
    python -m benchmarks.transfer --threads 1                 # the committed CPU run
    python -m benchmarks.transfer --widths 128,256,512 --steps 1000
    python -m benchmarks.transfer --smoke --out /tmp/transfer   # tiny: checks it runs
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import umup_compile.optim as uo
from benchmarks import common

UMUP, SP = "u-μP", "SP"
KINDS = (UMUP, SP)
VOCAB = 256  # bytes
CHUNK, VAL_EVERY = 4096, 10  # every 10th 4 KiB chunk of the corpus is validation
TAIL = 0.1  # train_loss: mean over the last 10 % of the steps
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


# -- models -------------------------------------------------------------------------


class SpAttention(nn.Module):
    """Causal multi-head self-attention: fused qkv, torch's 1/sqrt(d_head) scale."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.linear_qkv = nn.Linear(width, 3 * width, bias=False)
        self.linear_o = nn.Linear(width, width, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        b, s, d = x.shape
        qkv = self.linear_qkv(x).view(b, s, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # as unit_scaling: "b s (z h d)"
        out = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        o: Tensor = self.linear_o(out.transpose(1, 2).reshape(b, s, d))
        return o


class SpMLP(nn.Module):
    """SwiGLU MLP, 4x expansion: ``linear_2(linear_1(x) * silu(linear_gate(x)))``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(width, 4 * width, bias=False)
        self.linear_gate = nn.Linear(width, 4 * width, bias=False)
        self.linear_2 = nn.Linear(4 * width, width, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        y: Tensor = self.linear_2(
            self.linear_1(x) * nn.functional.silu(self.linear_gate(x))
        )
        return y


class SpLayer(nn.Module):
    """Pre-norm decoder layer with plain residual adds ``x + f(norm(x))``."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.mhsa_norm = nn.RMSNorm(width, eps=1e-5, elementwise_affine=False)
        self.mhsa = SpAttention(width, heads)
        self.mlp_norm = nn.RMSNorm(width, eps=1e-5, elementwise_affine=False)
        self.mlp = SpMLP(width)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.mhsa(self.mhsa_norm(x))
        y: Tensor = x + self.mlp(self.mlp_norm(x))
        return y


class SpTransformerDecoder(nn.Sequential):
    """``unit_scaling.TransformerDecoder``'s architecture in plain torch modules.

    Same module names and parameter shapes; torch's default init (embedding N(0, 1),
    linears U(±1/sqrt(fan_in))), no unit-scaling factors, no residual taus.
    """

    def __init__(self, width: int, vocab: int, layers: int, heads: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, width)
        self.layers = nn.Sequential(*(SpLayer(width, heads) for _ in range(layers)))
        self.final_norm = nn.RMSNorm(width, eps=1e-5, elementwise_affine=False)
        self.projection = nn.Linear(width, vocab, bias=False)


def build_model(kind: str, width: int, args: argparse.Namespace) -> nn.Module:
    if kind == SP:
        return SpTransformerDecoder(width, VOCAB, args.depth, args.heads)
    try:
        import unit_scaling as uu  # type: ignore[import-untyped]
    except ImportError as e:  # pragma: no cover - the bench extra installs it
        raise SystemExit(
            "benchmarks.transfer needs unit_scaling (its TransformerDecoder is the "
            "u-μP model): pip install -e '.[bench]'"
        ) from e
    model: nn.Module = uu.TransformerDecoder(width, VOCAB, args.depth, args.heads)
    return model


def build_optimizer(
    kind: str, model: nn.Module, lr: float, args: argparse.Namespace
) -> torch.optim.Optimizer:
    if kind == SP:
        return torch.optim.AdamW(
            model.parameters(), lr=lr, weight_decay=args.sp_weight_decay
        )
    return uo.AdamW(
        model.parameters(),
        lr=lr,
        weight_decay=args.weight_decay,
        independent_weight_decay=True,
        compile=False if args.eager else "strict",
    )


# -- data ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Corpus:
    """Byte tensors of the fixed train/validation split."""

    train: Tensor
    val: Tensor
    source: str


def load_corpus() -> Corpus:
    """``pydoc_data.topics`` (topics sorted by name) as bytes, split by 4 KiB chunks."""
    from pydoc_data.topics import topics

    text = "".join(topics[k] for k in sorted(topics)).encode("utf-8")
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    chunks = [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)]
    val = [c for i, c in enumerate(chunks) if i % VAL_EVERY == VAL_EVERY - 1]
    train = [c for i, c in enumerate(chunks) if i % VAL_EVERY != VAL_EVERY - 1]
    source = (
        f"pydoc_data.topics (Python {sys.version.split()[0]}): {len(topics)} topics, "
        f"{len(text):,} bytes; every {VAL_EVERY}th {CHUNK}-byte chunk is validation"
    )
    return Corpus(torch.cat(train), torch.cat(val), source)


def train_batches(corpus: Corpus, args: argparse.Namespace, seed: int) -> Tensor:
    """(steps, batch, seq + 1) random windows of the training split; fixed per seed."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    n = len(corpus.train) - args.seq - 1
    starts = torch.randint(0, n, (args.steps, args.batch), generator=gen)
    return corpus.train[starts[..., None] + torch.arange(args.seq + 1)]


def val_windows(corpus: Corpus, args: argparse.Namespace) -> tuple[Tensor, Tensor]:
    """Non-overlapping (inputs, targets) windows of ``seq`` bytes from the val split."""
    n = min(args.val_tokens, len(corpus.val) - 1) // args.seq
    flat = corpus.val[: n * args.seq + 1]
    return flat[:-1].view(n, args.seq), flat[1:].view(n, args.seq)


# -- training -----------------------------------------------------------------------


def warmup_cosine(step: int, steps: int, warmup: float) -> float:
    """Linear warm-up over ``warmup`` of the steps, then cosine decay to 0."""
    n_warm = max(1, round(warmup * steps))
    if step < n_warm:
        return (step + 1) / n_warm
    t = (step - n_warm) / max(1, steps - n_warm)
    return 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def lm_loss(model: nn.Module, tokens: Tensor) -> Tensor:
    """Next-byte cross entropy (mean, nats) of ``tokens`` (batch, seq + 1)."""
    loss_fn: Callable[[Tensor], Tensor] | None = getattr(model, "loss", None)
    if loss_fn is not None:  # unit_scaling's model: its unit-scaled cross entropy
        return loss_fn(tokens)
    logits = model(tokens)[:, :-1].float()
    return nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())


@torch.no_grad()
def evaluate(model: nn.Module, inputs: Tensor, targets: Tensor) -> float:
    """Mean next-byte cross entropy (nats) over the validation windows."""
    total = 0.0
    for i in range(0, len(inputs), 64):
        logits = model(inputs[i : i + 64]).float()
        total += nn.functional.cross_entropy(
            logits.flatten(0, 1), targets[i : i + 64].flatten(), reduction="sum"
        ).item()
    return total / targets.numel()


def train_run(
    kind: str,
    width: int,
    lr: float,
    seed: int,
    corpus: Corpus,
    val: tuple[Tensor, Tensor],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Train one model and return its CSV row (final validation loss and timings)."""
    torch.manual_seed(seed)
    model = build_model(kind, width, args)
    opt = build_optimizer(kind, model, lr, args)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, partial(warmup_cosine, steps=args.steps, warmup=args.warmup)
    )
    losses: list[float] = []
    first_step = 0.0
    t0 = time.perf_counter()
    for i, tokens in enumerate(train_batches(corpus, args, seed)):
        loss = lm_loss(model, tokens)
        opt.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        sched.step()
        losses.append(loss.item())
        if i == 0:
            first_step = time.perf_counter() - t0
        if not math.isfinite(losses[-1]):
            break  # diverged: the rest of the run would be NaN
    diverged = not math.isfinite(losses[-1])
    val_loss = math.nan if diverged else evaluate(model, *val)
    diverged = diverged or not math.isfinite(val_loss)
    tail = losses[-max(1, round(TAIL * len(losses))) :]
    return {
        "parametrization": kind,
        "width": width,
        "lr": f"{lr:.6g}",
        "log2_lr": round(math.log2(lr)),
        "seed": seed,
        "val_loss": f"{val_loss:.4f}",
        "train_loss": f"{statistics.fmean(tail):.4f}",
        "diverged": diverged,
        "n_params": sum(p.numel() for p in model.parameters()),
        "first_step_s": f"{first_step:.2f}",
        "run_s": f"{time.perf_counter() - t0:.2f}",
    }


# -- summary ------------------------------------------------------------------------


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


# -- output -------------------------------------------------------------------------


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


# -- main ---------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _grid(text: str) -> list[int]:
    """``"-4:4"`` -> [-4, ..., 4] (log2 of the lrs); ``"-2,0,2"`` as given."""
    if ":" in text:
        a, b = (int(x) for x in text.split(":"))
        return list(range(a, b + 1))
    return _ints(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.transfer",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--widths", type=_ints, default=[64, 128, 256])
    parser.add_argument("--depth", type=int, default=2, help="transformer layers")
    parser.add_argument("--heads", type=int, default=4, help="fixed at every width")
    parser.add_argument("--seq", type=int, default=64, help="bytes per sequence")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=160)
    parser.add_argument("--warmup", type=float, default=0.1, help="share of steps")
    parser.add_argument(
        "--umup-lrs",
        type=_grid,
        default=_grid("-3:3"),
        help="log2 lr grid: --umup-lrs=a:b or =a,b,c",
    )
    parser.add_argument(
        "--sp-lrs",
        type=_grid,
        default=_grid("-11:-5"),
        help="log2 lr grid: --sp-lrs=a:b",
    )
    parser.add_argument(
        "--weight-decay",
        type=float,
        default=2**-13,
        help="u-μP: independent weight decay (the per-step decay is this x the "
        "schedule factor, whatever the peak lr)",
    )
    parser.add_argument(
        "--sp-weight-decay",
        type=float,
        default=0.01,
        help="SP: torch.optim.AdamW's weight decay (torch's default; multiplied by lr)",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=3,
        help="seeds for the optimum and its flat neighbours (1: no reruns)",
    )
    parser.add_argument(
        "--flat-tol",
        type=float,
        default=0.05,
        help="a neighbour within this many nats of the optimum makes the curve flat "
        "(the seed-to-seed spread of one u-μP point was up to 0.07 in the committed run)",
    )
    parser.add_argument(
        "--val-tokens", type=int, default=16384, help="validation bytes evaluated"
    )
    parser.add_argument(
        "--eager",
        action="store_true",
        help="umup_compile AdamW with compile=False (default: compile='strict')",
    )
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--tag", default="", help="appended to the file names: <date>_transfer_t<n>_TAG"
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="widths 16,32, 1 layer, 8 steps, 3 lrs each, every optimum rerun with a "
        "2nd seed: checks it runs (~30 s)",
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bar on stderr"
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.widths, args.depth, args.heads = [16, 32], 1, 2
        args.seq, args.batch, args.steps, args.val_tokens = 16, 4, 8, 256
        args.umup_lrs, args.sp_lrs = [-1, 0, 1], [-8, -7, -6]
        args.seeds, args.flat_tol = 2, math.inf
    bad = [w for w in args.widths if w % args.heads]
    if bad:
        parser.error(f"widths {bad} are not divisible by --heads {args.heads}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = " ".join(sys.argv[1:] if argv is None else argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    # unit_scaling's modules go through torch.jit.script_method, deprecated in torch 2.13.
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    device = torch.device("cpu")
    head = common.header(device)
    corpus = load_corpus()
    val = val_windows(corpus, args)
    grids = {UMUP: args.umup_lrs, SP: args.sp_lrs}
    plan = [(w, kind, k) for w in args.widths for kind in KINDS for k in grids[kind]]
    bar = common.ProgressBar("transfer", enabled=not args.no_progress)
    rows: list[dict[str, Any]] = []
    total = len(plan)

    def run(width: int, kind: str, k: int, seed: int) -> None:
        row = train_run(kind, width, 2.0**k, seed, corpus, val, args)
        rows.append(row)
        print(
            f"  {kind:4s} width {width:4d} lr 2^{k:<3d} seed {seed}: val "
            f"{row['val_loss']} (train {row['train_loss']}, {row['run_s']} s)",
            flush=True,
        )
        bar.update(len(rows), total)

    print(
        f"# transfer: widths {args.widths}, depth {args.depth}, heads {args.heads}, "
        f"{args.steps} steps x {args.batch} x {args.seq} bytes; "
        f"{len(plan)} runs + reruns; {corpus.source}",
        flush=True,
    )
    load_start = os.getloadavg()
    t0 = time.perf_counter()
    # A private Inductor cache (as the harness does): the compile times are cold ones.
    with tempfile.TemporaryDirectory(prefix="bench_transfer_inductor_") as cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        for width, kind, k in plan:
            run(width, kind, k, 0)
        if args.seeds > 1:  # rerun the optimum and its flat neighbours, more seeds
            again = []
            for (kind, width), curve in points(rows).items():
                near = flat_neighbours(curve, args.flat_tol)
                if near:
                    again += [
                        (width, kind, curve[j].log2_lr) for j in [best(curve), *near]
                    ]
            total += len(again) * (args.seeds - 1)
            for seed in range(1, args.seeds):
                for width, kind, k in again:
                    run(width, kind, k, seed)
    wall = time.perf_counter() - t0
    load = (load_start, os.getloadavg())

    curves = points(rows)
    opt_rows = optima(curves, args.flat_tol)
    v = verdict(opt_rows)
    read = reading(v)
    for row in rows:
        row.update({c: head.get(c, "") for c in common.RUN_COLUMNS})

    if args.out is not None:
        out = args.out
    elif args.smoke:
        out = Path(tempfile.mkdtemp(prefix="bench_transfer_smoke_"))
    else:
        out = common.RESULTS / head["device"]
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{head['date']}_transfer_t{head['threads']}"
    if args.tag:
        stem += f"_{args.tag}"
    full_command = f"python -m benchmarks.transfer {command}".strip()
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
        f"{val[1].numel():,} bytes ({len(val[1])} windows of {args.seq})",
        "u-μP optimizer": "umup_compile.optim.AdamW(independent_weight_decay=True, "
        f"weight_decay={args.weight_decay:g}), "
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
            ", ".join(f"{x:.1f}" for x in la) for la in load
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
    smoke_note = "(smoke sizes: the numbers mean nothing)\n\n" if args.smoke else ""
    md = (
        f"# benchmarks.transfer: learning-rate transfer across width\n\n{smoke_note}"
        + "\n".join(f"- {k}: {x}" for k, x in head.items())
        + "\n"
        + "\n".join(f"- {k}: {x}" for k, x in run_info.items() if k != "command")
        + f"\n- command: `{full_command}`\n\n"
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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
