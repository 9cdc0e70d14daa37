"""Does the 8-bit update train like float32 state? ``adam8_step_`` itself, real training.

Trains ``unit_scaling.TransformerDecoder`` on text (``benchmarks.transfer``'s corpus,
batches and warm-up + cosine schedule, lr 2^0, independent weight decay, as
``benchmarks.quant_maps``) with ``umup_compile.optim.AdamW`` (float32 state, eager) and
with 8-bit moments updated by the core's ``_quant_step.adam8_step_`` (eager; the same
u-μP lr and weight-decay factors, read from an AdamW built on the same model). Where
``quant_maps`` emulates 8-bit state with exact block scales, this runs the update as
the optimizer will, in two variants:

- ``bound``: the update as it is: the second moment's scale is a power of two at least
  ``beta2 * s + (1 - beta2) * max(g**2)`` (Note [second-moment bound]);
- ``exact``: the same update with the second moment's scale the exact block max (the
  first formulation), by swapping ``encode_unsigned_below`` for ``encode_unsigned``.

Every tensor gets 8-bit state here (the optimizer keeps tensors under 4096 elements in
float32). Per step and moment: the quantization error ``|dequantized - exact| / block
max`` (max and RMS; "exact" is the float32 update from the previous codes), and for the
second moment the fraction of non-zero values stored as code 0. Writes
``<date>_quant8_train_t<threads>[_TAG].{md,csv}`` and ``..._errors.csv``. Examples:
    python -m benchmarks.quant8_train --width 128 --steps 200
    python -m benchmarks.quant8_train --smoke --out /tmp/q8t
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import umup_compile.optim as uo
from benchmarks import common
from benchmarks import transfer_model as transfer
from umup_compile import _quant_step
from umup_compile._functional import AdamConfig
from umup_compile._quant import (
    BLOCK,
    block_rows,
    dequantize,
    encode_unsigned,
    num_blocks,
)
from umup_compile._quant_step import adam8_step_

TAIL, LIMIT = 20, 1.5  # mean loss of the last 20 steps, per cent above float32's
VARIANTS = ("fp32", "bound", "exact")
COLUMNS = (
    "variant tail_loss vs_fp32_pct ok m_err_max m_err_rms v_err_max v_err_rms "
    "v_zeroed_max run_s"
).split() + common.RUN_COLUMNS
ERROR_COLUMNS = "variant step loss m_max m_rms v_max v_rms v_zeroed".split()


@contextmanager
def _exact_scale() -> Iterator[None]:
    """``adam8_step_`` with the second moment's exact block max as its scale."""
    original = _quant_step.encode_unsigned_below
    _quant_step.encode_unsigned_below = lambda v, bound: encode_unsigned(v)  # type: ignore[assignment]
    try:
        yield
    finally:
        _quant_step.encode_unsigned_below = original


class Adam8:
    """8-bit moments for ``opt``'s parameters, stepped by ``adam8_step_`` with
    ``opt``'s groups (lr, betas, eps, weight decay and their u-μP factors)."""

    def __init__(self, opt: torch.optim.Optimizer) -> None:
        self.opt = opt
        groups = opt.param_groups
        self.params = [p for g in groups for p in g["params"]]
        self.m = [torch.zeros_like(p, dtype=torch.int8) for p in self.params]
        self.v = [torch.zeros_like(p, dtype=torch.uint8) for p in self.params]
        self.s = [torch.zeros(num_blocks(p.numel()), 2) for p in self.params]
        self.steps = [torch.zeros(()) for _ in self.params]
        index = [k for k, g in enumerate(groups) for _ in g["params"]]
        self.index_t = torch.tensor(index, dtype=torch.int64)
        self.lr_scales_t = torch.tensor(
            [x for g in groups for x in g["lr_scales"]], dtype=torch.float64
        )
        self.wd_scales_t = torch.tensor(
            [x for g in groups for x in g["wd_scales"]], dtype=torch.float64
        )

    def step(self) -> tuple[float, ...]:
        """One update; returns (m max, m sum sq, v max, v sum sq, v zeroed, count)."""
        groups = self.opt.param_groups
        hyper_t = torch.tensor(
            [[g["lr"], *g["betas"], g["eps"], g["weight_decay"]] for g in groups],
            dtype=torch.float64,
        )
        grads = [p.grad for p in self.params]
        b1 = [groups[k]["betas"][0] for k in self.index_t.tolist()]
        b2 = [groups[k]["betas"][1] for k in self.index_t.tolist()]
        exact = []
        for k, g in enumerate(grads):  # the float32 update from the previous codes
            m = dequantize(self.m[k], self.s[k][:, :1], signed=True)
            v = dequantize(self.v[k], self.s[k][:, 1:], signed=False)
            exact.append((m + (1 - b1[k]) * (g - m), v + (1 - b2[k]) * (g * g - v)))
        with torch.no_grad():
            adam8_step_(
                self.params, grads, self.m, self.v, self.s, [s.view(1) for s in
                self.steps], hyper_t, self.index_t, self.lr_scales_t,
                self.wd_scales_t, config=AdamConfig(weight_decay="decoupled"),
            )  # fmt: skip
        stats = [0.0] * 6
        for k, (m, v) in enumerate(exact):
            got_m = dequantize(self.m[k], self.s[k][:, :1], signed=True)
            got_v = dequantize(self.v[k], self.s[k][:, 1:], signed=False)
            for j, (got, want) in enumerate(((got_m, m), (got_v, v))):
                for g_rows, w_rows in zip(block_rows(got), block_rows(want)):
                    top = w_rows.abs().amax(-1, keepdim=True)
                    err = ((g_rows - w_rows).abs() / top).where(top > 0, 0.0)
                    stats[2 * j] = max(stats[2 * j], err.max().item())
                    stats[2 * j + 1] += err.square().sum().item()
            stats[4] += ((got_v == 0) & (v > 0)).sum().item()
            stats[5] += v.numel()
        return tuple(stats)


def run(variant: str, args: argparse.Namespace, corpus: Any) -> tuple[list[float], list[tuple[float, ...]]]:  # fmt: skip
    """Losses and, for 8-bit variants, (m max, m rms, v max, v rms, v zeroed) per step."""
    torch.manual_seed(args.seed)
    model = transfer.build_model(transfer.UMUP, args.width, args)
    opt = uo.AdamW(
        model.parameters(),
        lr=args.lr,
        weight_decay=args.weight_decay,
        independent_weight_decay=True,
        compile=False,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, partial(transfer.warmup_cosine, steps=args.steps, warmup=args.warmup)
    )
    adam8 = None if variant == "fp32" else Adam8(opt)
    losses: list[float] = []
    errors: list[tuple[float, ...]] = []
    scope = _exact_scale() if variant == "exact" else nullcontext()
    with scope:
        for tokens in transfer.train_batches(corpus, args, args.seed):
            loss = transfer.lm_loss(model, tokens)
            opt.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            if adam8 is None:
                opt.step()
            else:
                mx, msq, vx, vsq, zeroed, n = adam8.step()
                rms = (math.sqrt(msq / n), math.sqrt(vsq / n))
                errors.append((mx, rms[0], vx, rms[1], zeroed / n))
            sched.step()
            losses.append(loss.item())
            if not math.isfinite(losses[-1]):
                break
    return losses, errors


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.quant8_train",
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--variants", type=lambda s: s.split(","), default=VARIANTS)
    for name, default in (("width", 128), ("depth", 2), ("heads", 4), ("seq", 64)):
        parser.add_argument(f"--{name}", type=int, default=default)
    for name, default in (("batch", 16), ("steps", 200), ("seed", 0)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--warmup", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=1.0, help="u-μP optimum: 2^0")
    parser.add_argument("--weight-decay", type=float, default=2**-13)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--tag", default="")
    parser.add_argument("--smoke", action="store_true", help="tiny model, 12 steps")
    args = parser.parse_args(argv)
    if args.variants[0] != "fp32" or not set(args.variants) <= set(VARIANTS):
        parser.error(f"--variants: fp32 first, then any of {VARIANTS[1:]}")
    if args.smoke:
        args.width, args.depth, args.heads, args.seq, args.batch = 32, 1, 2, 16, 4
        args.steps = 12
    return args


def summarize(variant: str, losses: list[float], errs: list[Any], base: float | None) -> dict[str, Any]:  # fmt: skip
    tail = statistics.fmean(losses[-TAIL:]) if losses else math.nan
    finite = math.isfinite(tail)
    pct = 100 * (tail / base - 1) if base is not None and finite else 0.0
    row: dict[str, Any] = {
        "variant": variant,
        "tail_loss": f"{tail:.4f}" if finite else "diverged",
        "vs_fp32_pct": f"{pct:+.2f}" if finite else "diverged",
        "ok": finite and pct <= LIMIT,
    }
    for k, col in enumerate(COLUMNS[4:9]):  # max over the steps; rms: their mean
        vals = [e[k] for e in errs]
        agg = max if col.endswith("max") else statistics.fmean
        row[col] = f"{agg(vals):.2e}" if vals else "-"
    return row


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    # The 8-bit runs step the AdamW's scheduler without its step(): torch warns.
    warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step()`")
    head = common.header(torch.device("cpu"))
    corpus = transfer.load_corpus()
    rows: list[dict[str, Any]] = []
    error_rows: list[dict[str, Any]] = []
    base: float | None = None
    t0 = time.perf_counter()
    for variant in args.variants:
        t1 = time.perf_counter()
        losses, errs = run(variant, args, corpus)
        row = summarize(variant, losses, errs, base)
        row["run_s"] = f"{time.perf_counter() - t1:.1f}"
        if base is None:
            base = statistics.fmean(losses[-TAIL:])
        rows.append(row | {c: head.get(c, "") for c in common.RUN_COLUMNS})
        for i, loss in enumerate(losses):
            e: tuple[Any, ...] = errs[i] if i < len(errs) else ("",) * 5
            error_rows.append(dict(zip(ERROR_COLUMNS, (variant, i + 1, loss, *e))))
        print(
            f"{variant:6s} tail {row['tail_loss']:>8s} ({row['vs_fp32_pct']}%) m err "
            f"{row['m_err_max']}/{row['m_err_rms']} v err {row['v_err_max']}/"
            f"{row['v_err_rms']} v zeroed {row['v_zeroed_max']} {row['run_s']} s",
            flush=True,
        )
    out = args.out or (
        Path(tempfile.mkdtemp(prefix="q8t_"))
        if args.smoke
        else common.RESULTS / head["device"]
    )
    stem = f"{head['date']}_quant8_train_t{head['threads']}" + (
        f"_{args.tag}" if args.tag else ""
    )
    common.write_csv(out / f"{stem}.csv", rows, COLUMNS)
    common.write_csv(out / f"{stem}_errors.csv", error_rows, ERROR_COLUMNS)
    command = " ".join(sys.argv[1:] if argv is None else argv)
    setup = [
        f"TransformerDecoder({args.width}, 256, layers={args.depth}, heads="
        f"{args.heads}), {args.steps} steps x {args.batch} x {args.seq} bytes, lr "
        f"{args.lr:g} (warm-up {args.warmup:.0%}, cosine to 0), independent weight "
        f"decay {args.weight_decay:g}, seed {args.seed}",
        f"fp32: AdamW(compile=False); bound / exact: adam8_step_ (eager), blocks of "
        f"{BLOCK}, every tensor 8-bit; ok: tail loss <= {LIMIT} % above fp32's",
        "errors: |dequantized - exact float32 update| / block max: max over the "
        "steps, mean of the per-step rms; v_zeroed: non-zero v stored as code 0 "
        "(fraction, max over the steps)",
        f"load average at end: {os.getloadavg()}; wall {time.perf_counter() - t0:.0f} s",
        f"command: `python -m benchmarks.quant8_train {command}`",
    ]
    md = "# benchmarks.quant8_train: the 8-bit update's second-moment scale\n\n"
    md += "(smoke sizes: the numbers mean nothing)\n\n" if args.smoke else ""
    md += "\n".join(f"- {x}" for x in [*(f"{k}: {x}" for k, x in head.items()), *setup])
    md += "\n\n" + common.markdown_table(rows, COLUMNS[:10]) + "\n"
    (out / f"{stem}.md").write_text(md)
    print(f"wrote {out / stem}.{{md,csv}} and {stem}_errors.csv")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
