"""Does 8-bit state train? ``AdamW(state_dtype=torch.int8)`` against float32 state.

The integrated optimizer, not an emulation (``benchmarks.quant_maps`` chose the code
maps by emulating them): ``umup_compile.optim.AdamW`` with 8-bit moments (Note [8-bit
state]) and with float32 moments, the same seeds and batches, trains

- ``unit_scaling.TransformerDecoder`` on text (``transfer_model``'s corpus, random
  windows, linear warm-up then cosine to 0, independent weight decay), and
- the demo's ``TinyUmupLM`` (its corpus and schedule).

The verdict (issue 26): the mean loss of the last 20 steps with 8-bit state is at
most 1.5 % above float32 state's. Per step it also measures each moment's
quantization error: before the step the optimizer's codes are decoded (``m0``,
``v0``), the step's exact moments are ``m0 + (1 - beta1) (g - m0)`` and ``v0 + (1 -
beta2) (g^2 - v0)`` (float64, from the gradient the step reads), and after it the new
codes are decoded; the error is ``|decoded - exact| / the block's absmax`` (of the
exact moment), max and RMS over every 8-bit element, and ``v_zeroed`` the fraction of
non-zero exact ``v`` stored as code 0. After training, ``v_slack_oct``: how many
octaves each block's second-moment scale lies above its largest decoded value (median
and max over the blocks; 0 while the scale is the exact max, Note [second-moment
scale]: the codes span 32 octaves below it). The compiled engine by default (``--eager``:
the eager engine, the same codes).

Writes ``<date>_quant8_train_t<threads>[_TAG].{md,csv}`` and ``..._errors.csv`` (per
step) under ``--out`` (default ``benchmarks/results/<device>/``). Examples:
    python -m benchmarks quant8-train --threads 1
    python -m benchmarks quant8-train --smoke --out /tmp/q8train
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
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import umup_compile.optim as uo
from benchmarks import common
from benchmarks import transfer_model as transfer
from benchmarks.quant_maps import LIMIT, TAIL, demo_loss
from umup_compile import demo
from umup_compile._quant import BLOCK, dequantize

STATES = {"float32": torch.float32, "int8": torch.int8}
COLUMNS = (
    "model state tail_loss vs_fp32_pct ok m_err_max m_err_rms v_err_max v_err_rms "
    "v_zeroed_max v_slack_oct state_B_per_param run_s"
).split() + common.RUN_COLUMNS
ERROR_COLUMNS = "model state step loss m_max m_rms v_max v_rms v_zeroed".split()
Errors = tuple[float, float, float, float, float]


def _decode(state: dict[str, Any]) -> tuple[Tensor, Tensor]:
    scales = state["exp_avg_scales"].reshape(-1, 2)
    m = dequantize(state["exp_avg"], scales[:, :1], signed=True)
    v = dequantize(state["exp_avg_sq"], scales[:, 1:], signed=False)
    return m.double().reshape(-1), v.double().reshape(-1)


def _block_max(x: Tensor) -> Tensor:
    """Each element's block absmax (blocks of ``BLOCK`` consecutive elements)."""
    rows = torch.nn.functional.pad(x.abs(), (0, -x.numel() % BLOCK)).view(-1, BLOCK)
    return rows.amax(1).repeat_interleave(BLOCK)[: x.numel()]


class ErrorMeter:
    """Per step, each 8-bit moment's error relative to its block's absmax."""

    def __init__(self, opt: torch.optim.Optimizer) -> None:
        self.opt = opt
        self.before: dict[Tensor, tuple[Tensor, Tensor]] = {}

    def quantized(self) -> list[Tensor]:
        return [p for p, s in self.opt.state.items() if "exp_avg_scales" in s]

    def start(self) -> None:
        self.before = {p: _decode(self.opt.state[p]) for p in self.quantized()}

    def finish(self) -> Errors | None:
        b1, b2 = self.opt.param_groups[0]["betas"]
        stats: dict[str, list[Tensor]] = {"m": [], "v": []}
        zeroed, live = 0, 0
        for p in self.quantized():
            g = p.grad.double().reshape(-1)  # type: ignore[union-attr]
            m0, v0 = self.before.get(p, (torch.zeros_like(g), torch.zeros_like(g)))
            got_m, got_v = _decode(self.opt.state[p])
            for key, exact, got in (
                ("m", m0 + (1 - b1) * (g - m0), got_m),
                ("v", v0 + (1 - b2) * (g * g - v0), got_v),
            ):
                scale = _block_max(exact)
                err = ((got - exact).abs() / scale).where(scale > 0, 0.0)
                stats[key].append(err)
            exact_v = v0 + (1 - b2) * (g * g - v0)
            zeroed += int(((got_v == 0) & (exact_v > 0)).sum())
            live += int((exact_v > 0).sum())
        if not stats["m"]:
            return None
        out: list[float] = []
        for key in ("m", "v"):
            err = torch.cat(stats[key])
            out += [err.max().item(), err.square().mean().sqrt().item()]
        return out[0], out[1], out[2], out[3], zeroed / max(live, 1)

    def v_slack(self) -> str:
        """Octaves of each block's second-moment scale above its largest decoded
        value: median / max over the blocks holding a non-zero value."""
        slack: list[Tensor] = []
        for p in self.quantized():
            scale = self.opt.state[p]["exp_avg_scales"].reshape(-1, 2)[:, 1]
            _, v = _decode(self.opt.state[p])
            top = torch.nn.functional.pad(v, (0, -v.numel() % BLOCK))
            top = top.view(-1, BLOCK).amax(1)
            live = top > 0
            slack.append(torch.log2(scale.double()[live] / top[live]))
        if not slack:
            return "-"
        octaves = torch.cat(slack)
        return f"{octaves.median().item():.2f} / {octaves.max().item():.2f}"


def train(
    model: torch.nn.Module,
    batches: list[Tensor],
    loss_fn: Callable[[torch.nn.Module, Tensor], Tensor],
    opt: torch.optim.Optimizer,
    lr_lambda: Callable[[int], float],
) -> tuple[list[float], list[Errors], str]:
    """Per step: the loss, and the quantization errors (8-bit state only); the
    second moment's scale slack at the end."""
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    meter = ErrorMeter(opt)
    losses: list[float] = []
    errors: list[Errors] = []
    for tokens in batches:
        loss = loss_fn(model, tokens)
        opt.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        meter.start()
        opt.step()
        found = meter.finish()
        if found is not None:
            errors.append(found)
        sched.step()
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            break
    return losses, errors, meter.v_slack()


def _adamw(params: Any, state: str, args: argparse.Namespace, **kw: Any) -> Any:
    return uo.AdamW(
        params,
        state_dtype=STATES[state],
        compile=False if args.eager else "strict",
        **kw,
    )


def transformer_run(
    state: str, args: argparse.Namespace, corpus: transfer.Corpus
) -> tuple[list[float], list[Errors], str, torch.optim.Optimizer]:
    torch.manual_seed(args.seed)
    model = transfer.build_model(transfer.UMUP, args.width, args)
    opt = _adamw(
        model.parameters(),
        state,
        args,
        lr=args.lr,
        weight_decay=args.weight_decay,
        independent_weight_decay=True,
    )
    batches = list(transfer.train_batches(corpus, args, args.seed))
    sched = partial(transfer.warmup_cosine, steps=args.steps, warmup=args.warmup)
    return (*train(model, batches, transfer.lm_loss, opt, sched), opt)


def demo_run(
    state: str, args: argparse.Namespace, text: Tensor
) -> tuple[list[float], list[Errors], str, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = demo.TinyUmupLM(256, args.demo_width, args.demo_depth)
    data = demo.text_batches(text, 24, 4, args.demo_steps, seed=1)
    opt = _adamw(model.named_parameters(), state, args, lr=0.2, weight_decay=1e-4)
    sched = demo.schedule(len(data), max(1, len(data) // 10))
    return (*train(model, data, demo_loss, opt, sched), opt)


def _state_bytes_per_param(opt: torch.optim.Optimizer) -> float:
    numel = sum(p.numel() for g in opt.param_groups for p in g["params"])
    nbytes = sum(
        t.numel() * t.element_size()
        for s in opt.state.values()
        for t in s.values()
        if isinstance(t, Tensor)
    )
    return nbytes / numel


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks quant8-train",
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for name, default in (("width", 128), ("depth", 2), ("heads", 4), ("seq", 64)):
        parser.add_argument(f"--{name}", type=int, default=default)
    for name, default in (("batch", 16), ("steps", 200), ("seed", 0)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--warmup", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=1.0, help="u-μP optimum: 2^0")
    parser.add_argument("--weight-decay", type=float, default=2**-13)
    parser.add_argument("--demo-steps", type=int, default=200, help="0: no demo runs")
    parser.add_argument("--demo-width", type=int, default=256)
    parser.add_argument("--demo-depth", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--eager", action="store_true", help="the eager engine")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--tag", default="")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny models, 12 steps: checks it runs"
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.width, args.depth, args.heads, args.seq, args.batch = 64, 1, 2, 16, 4
        args.steps, args.demo_steps, args.demo_width, args.demo_depth = 12, 12, 64, 1
        args.eager = True
    return args


def summarize(
    model: str,
    state: str,
    losses: list[float],
    errs: list[Errors],
    base: float | None,
) -> dict[str, Any]:
    tail = statistics.fmean(losses[-TAIL:])
    finite = math.isfinite(tail) and len(losses) > 0
    pct = 100 * (tail / base - 1) if base is not None and finite else 0.0
    row: dict[str, Any] = {
        "model": model,
        "state": state,
        "tail_loss": f"{tail:.4f}" if finite else "diverged",
        "vs_fp32_pct": f"{pct:+.2f}" if finite else "diverged",
        "ok": finite and pct <= LIMIT,
    }
    cols = ("m_err_max", "m_err_rms", "v_err_max", "v_err_rms", "v_zeroed_max")
    for k, col in enumerate(cols):
        vals = [e[k] for e in errs]  # max over the steps, mean of the rms
        agg = (max if col.endswith("max") else statistics.fmean)(vals) if vals else 0
        row[col] = f"{agg:.2e}" if vals else "-"
    return row


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    head = common.header(torch.device("cpu"))
    corpus = transfer.load_corpus()
    text, _ = demo.corpus()
    rows: list[dict[str, Any]] = []
    error_rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    models: list[tuple[str, Callable[[str], Any]]] = []
    if args.steps:
        models.append(
            ("TransformerDecoder", lambda s: transformer_run(s, args, corpus))
        )
    if args.demo_steps:
        models.append(("demo TinyUmupLM", lambda s: demo_run(s, args, text)))
    for model_name, run in models:
        base = None
        for state in STATES:
            t1 = time.perf_counter()
            losses, errs, slack, opt = run(state)
            row = summarize(model_name, state, losses, errs, base)
            row["v_slack_oct"] = slack
            row["state_B_per_param"] = f"{_state_bytes_per_param(opt):.3f}"
            row["run_s"] = f"{time.perf_counter() - t1:.1f}"
            if base is None:
                base = statistics.fmean(losses[-TAIL:])
            rows.append(row | {c: head.get(c, "") for c in common.RUN_COLUMNS})
            for i, loss in enumerate(losses):
                e = errs[i] if i < len(errs) else ("",) * 5
                error_rows.append(
                    dict(zip(ERROR_COLUMNS, (model_name, state, i + 1, loss, *e)))
                )
            print(
                f"{model_name:18s} {state:8s} tail {row['tail_loss']:>8s} "
                f"({row['vs_fp32_pct']}%) m err {row['m_err_max']}/{row['m_err_rms']}"
                f" v err {row['v_err_max']}/{row['v_err_rms']} zeroed "
                f"{row['v_zeroed_max']} slack {row['v_slack_oct']} "
                f"{row['state_B_per_param']} B/param {row['run_s']} s",
                flush=True,
            )
    if args.out is not None:
        out = args.out
    elif args.smoke:
        out = Path(tempfile.mkdtemp(prefix="quant8_train_smoke_"))
    else:
        out = common.RESULTS / head["device"]
    stem = f"{head['date']}_quant8_train_t{head['threads']}" + (
        f"_{args.tag}" if args.tag else ""
    )
    common.write_csv(out / f"{stem}.csv", rows, COLUMNS)
    common.write_csv(out / f"{stem}_errors.csv", error_rows, ERROR_COLUMNS)
    command = " ".join(sys.argv[1:] if argv is None else argv)
    engine = "eager" if args.eager else "compiled"
    setup = [
        f"TransformerDecoder({args.width}, 256, layers={args.depth}, heads="
        f"{args.heads}), {args.steps} steps x {args.batch} x {args.seq} bytes, lr "
        f"{args.lr:g} (warm-up {args.warmup:.0%}, cosine to 0), independent weight "
        f"decay {args.weight_decay:g}, seed {args.seed}",
        f"demo: TinyUmupLM(256, {args.demo_width}, {args.demo_depth}), "
        f"{args.demo_steps} steps x 4 x 24 bytes, lr 0.2, wd 1e-4, the demo's schedule",
        f"optimizer: umup_compile.optim.AdamW, {engine} engine, state_dtype "
        f"torch.int8 vs torch.float32; ok: mean loss of the last {TAIL} steps <= "
        f"{LIMIT} % above float32 state's",
        "errors: |decoded - exact| / block absmax of each 8-bit moment after each "
        "step; max over the steps, mean of the per-step rms; v_zeroed: the largest "
        "per-step fraction of non-zero v stored as code 0; v_slack_oct: octaves of "
        "v's block scale above the block's largest decoded v at the end (median / "
        "max over the blocks)",
        f"load average at end: {os.getloadavg()}; wall {time.perf_counter() - t0:.0f} s",
        f"command: `python -m benchmarks quant8-train {command}`",
    ]
    md = "# quant8-train: AdamW with 8-bit state vs float32 state, integrated\n\n"
    md += "(smoke sizes: the numbers mean nothing)\n\n" if args.smoke else ""
    md += "\n".join(f"- {x}" for x in [*(f"{k}: {x}" for k, x in head.items()), *setup])
    md += "\n\n" + common.markdown_table(rows, COLUMNS[:13]) + "\n"
    (out / f"{stem}.md").write_text(md)
    print(f"wrote {out / stem}.{{md,csv}} and {stem}_errors.csv")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
