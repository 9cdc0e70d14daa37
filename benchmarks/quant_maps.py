"""Which 8-bit code map keeps Adam's training? Emulated 8-bit moments vs float32 state.

Trains ``unit_scaling.TransformerDecoder`` on text (``benchmarks.transfer``'s corpus,
batches and warm-up + cosine schedule; ``umup_compile.optim.AdamW``, independent weight
decay, eager engine) and the demo's ``TinyUmupLM``, with float32 moments and with each
candidate map. 8-bit state is *emulated*: after every step each moment is quantized per
block of ``--block`` elements (float32 scale: the block's absmax) and dequantized in
place, as a fused update does (it updates with the new float32 moments, then stores
codes). The first moment uses signed linear codes (``round(127 m / absmax)``); the
second moment's map is the candidate: ``linear`` ``255 v/max``; ``sqrt``
``255 sqrt(v/max)``; ``pow4`` ``255 (v/max)^(1/4)``; ``log`` 8 codes per octave;
``log2`` the float32 bits ``(code + 761) << 20`` (3 mantissa bits, a kernel's integer
ops); ``dynamic`` a dynamic-tree table (Dettmers 2016); ``e4m3`` ``float8_e4m3fn(448
v/max)``. ``nearest`` rounds the code position (formula maps: in code space, as a
kernel would; tables: to the nearest value); ``stochastic`` picks a neighbouring code,
unbiased in value. Zero encodes to code 0, which decodes to 0; nothing decodes below
0. Errors per step: ``|dequantized - exact| / block absmax`` (max and RMS).

Writes ``<date>_quant_maps_t<threads>[_TAG].{md,csv}`` and ``..._errors.csv`` (per
step) under ``--out`` (default ``benchmarks/results/<device>/``). Examples:
    python -m benchmarks quant-maps --threads 1
    python -m benchmarks quant-maps --smoke --out /tmp/qm
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
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

import umup_compile.optim as uo
from benchmarks import common
from benchmarks import transfer_model as transfer
from umup_compile import demo

TAIL = 20  # the verdict: mean loss of the last 20 steps
LIMIT = 1.5  # per cent above float32 state
COLUMNS = (
    "model variant v_map rounding block tail_loss vs_fp32_pct ok m_err_max m_err_rms "
    "v_err_max v_err_rms run_s"
).split() + common.RUN_COLUMNS
Errors = tuple[float, float, float, float]  # m max, m rms, v max, v rms
ERROR_COLUMNS = ["model", "variant", "step", "loss", "m_max", "m_rms", "v_max", "v_rms"]


# -- maps ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CodeMap:
    """An unsigned map: ``position(u)`` (u in [0, 1]) -> real code; ``decode(c)``."""

    name: str
    top: int  # the largest code
    position: Callable[[Tensor], Tensor]
    decode: Callable[[Tensor], Tensor]


def _table_map(name: str, table: Tensor) -> CodeMap:
    """A map given by its sorted decode table: positions interpolate between codes, so
    rounding a position is rounding to the nearest value."""
    t = table.float()

    def position(u: Tensor) -> Tensor:
        lo = (torch.searchsorted(t, u, right=True) - 1).clamp(0, len(t) - 2)
        return lo + ((u - t[lo]) / (t[lo + 1] - t[lo])).clamp(0, 1)

    return CodeMap(name, len(t) - 1, position, lambda c: t[c.long()])


def _dynamic_table() -> Tensor:
    """Unsigned dynamic tree: code = e zeros, a one, then 7 - e fraction bits; the
    value is 10^-e times the fraction's midpoint in [0.1, 1]; plus 0 and 1."""
    values = [0.0, 1.0]
    for e in range(7):
        n = 2 ** (7 - e)
        edges = torch.linspace(0.1, 1.0, n + 1, dtype=torch.float64)
        values += (10.0**-e * (edges[:-1] + edges[1:]) / 2).tolist()
    return torch.tensor(sorted(set(values))[:256], dtype=torch.float64)


def _log2_table() -> Tensor:
    """``_quant``'s log map (code c >= 1: the float32 bits ``(c + 761) << 20``)."""
    bits = (torch.arange(1, 256, dtype=torch.int32) + 761) << 20
    return torch.cat([torch.zeros(1), bits.view(torch.float32)])


def _log_map(per_octave: int = 8) -> CodeMap:
    k = float(per_octave)
    smallest = 2.0 ** (-254 / k)  # the value of code 1

    def position(u: Tensor) -> Tensor:
        safe = u.clamp_min(smallest)
        return torch.where(u < smallest, u / smallest, 255 + k * torch.log2(safe))

    def decode(c: Tensor) -> Tensor:
        return torch.where(c == 0, 0.0, torch.exp2((c.float() - 255) / k))

    return CodeMap("log", 255, position, decode)


def _power_map(name: str, power: float) -> CodeMap:
    up, down = (lambda u: 255 * u.pow(1 / power)), (lambda c: (c / 255).pow(power))
    return CodeMap(name, 255, up, down)


_E4M3 = torch.arange(128, dtype=torch.uint8).view(torch.float8_e4m3fn).float()


MAPS: dict[str, Callable[[], CodeMap]] = {
    "linear": partial(_power_map, "linear", 1.0),
    "sqrt": partial(_power_map, "sqrt", 2.0),
    "pow4": partial(_power_map, "pow4", 4.0),
    "log": _log_map,
    "log2": lambda: _table_map("log2", _log2_table()),
    "dynamic": lambda: _table_map("dynamic", _dynamic_table()),
    "e4m3": lambda: _table_map("e4m3", _E4M3[torch.isfinite(_E4M3)].unique() / 448),
}
LINEAR_SIGNED = _power_map("signed", 1.0)  # m: |m| / absmax -> 127 codes, sign apart


def _codes(
    cmap: CodeMap, u: Tensor, top: int, stochastic: bool, gen: torch.Generator
) -> Tensor:
    pos = cmap.position(u) * (top / cmap.top)
    if not stochastic:
        return pos.round().clamp(0, top)
    lo = pos.floor().clamp(0, top - 1)
    a = cmap.decode(lo * cmap.top / top)
    b = cmap.decode((lo + 1) * cmap.top / top)
    p = ((u - a) / (b - a)).clamp(0, 1)
    return lo + (torch.rand(u.shape, generator=gen, dtype=u.dtype) < p).to(u.dtype)


def emulate_(
    t: Tensor, cmap: CodeMap, signed: bool, block: int, sr: bool, gen: torch.Generator
) -> tuple[float, float, int]:
    """Quantize ``t`` per block and write the dequantized values back; return the max
    and the sum of squares of the error relative to each block's absmax, and a count."""
    x = t.detach().float().flatten()
    pad = -len(x) % block
    xb = torch.nn.functional.pad(x, (0, pad)).view(-1, block)
    scale = xb.abs().amax(dim=1, keepdim=True)
    u = (xb.abs() / scale.clamp_min(1e-38)).clamp(0, 1)
    top = 127 if signed else cmap.top
    c = _codes(cmap, u, top, sr, gen)
    deq = cmap.decode(c * cmap.top / top) * scale
    if signed:
        deq = deq * xb.sign()
    err = ((deq - xb).abs() / scale).where(scale > 0, 0.0).flatten()[: len(x)]
    t.copy_(deq.flatten()[: len(x)].view_as(t))
    return err.max().item(), err.square().sum().item(), len(x)


class Variant(NamedTuple):
    name: str
    v_map: str  # "" for float32 state
    rounding: str
    block: int


def variants(args: argparse.Namespace) -> list[Variant]:
    return [Variant("fp32", "", "-", 0)] + [
        Variant(f"{m}/{r}", m, r, args.block) for r in args.rounding for m in args.maps
    ]


# -- training -----------------------------------------------------------------------


def train(
    model: torch.nn.Module,
    batches: list[Tensor],
    loss_fn: Callable[[torch.nn.Module, Tensor], Tensor],
    opt: torch.optim.Optimizer,
    lr_lambda: Callable[[int], float],
    variant: Variant,
    seed: int,
) -> tuple[list[float], list[Errors]]:
    """Per step: the loss and (m max, m rms, v max, v rms) quantization errors."""
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    gen = torch.Generator().manual_seed(1000 + seed)
    vmap = MAPS[variant.v_map]() if variant.v_map else None
    losses: list[float] = []
    errors: list[Errors] = []
    for tokens in batches:
        loss = loss_fn(model, tokens)
        opt.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        sched.step()
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            break
        if vmap is None:
            continue
        out: list[float] = []
        for key, cmap in (("exp_avg", LINEAR_SIGNED), ("exp_avg_sq", vmap)):
            sr, signed = variant.rounding == "stochastic", key == "exp_avg"
            stats = [
                emulate_(s[key], cmap, signed, variant.block, sr, gen)
                for s in opt.state.values()
            ]
            total = sum(n for _, _, n in stats)
            out += [
                max(m for m, _, _ in stats),
                math.sqrt(sum(q for _, q, _ in stats) / total),
            ]
        errors.append((out[0], out[1], out[2], out[3]))
    return losses, errors


def transformer_run(
    variant: Variant, args: argparse.Namespace, corpus: transfer.Corpus
) -> tuple[list[float], list[Errors]]:
    torch.manual_seed(args.seed)
    model = transfer.build_model(transfer.UMUP, args.width, args)
    opt = uo.AdamW(
        model.parameters(),
        lr=args.lr,
        weight_decay=args.weight_decay,
        independent_weight_decay=True,
        compile=False,
    )
    batches = list(transfer.train_batches(corpus, args, args.seed))
    sched = partial(transfer.warmup_cosine, steps=args.steps, warmup=args.warmup)
    return train(model, batches, transfer.lm_loss, opt, sched, variant, args.seed)


def demo_loss(model: torch.nn.Module, tokens: Tensor) -> Tensor:
    logits = model(tokens[:, :-1])
    return torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), tokens[:, 1:].flatten()
    )


def demo_run(
    variant: Variant, args: argparse.Namespace, text: Tensor
) -> tuple[list[float], list[Errors]]:
    torch.manual_seed(0)
    model = demo.TinyUmupLM(256, args.demo_width, args.demo_depth)
    data = demo.text_batches(text, 24, 4, args.demo_steps, seed=1)
    opt = uo.AdamW(model.named_parameters(), lr=0.2, weight_decay=1e-4, compile=False)
    sched = demo.schedule(len(data), max(1, len(data) // 10))
    return train(model, data, demo_loss, opt, sched, variant, 0)


# -- main ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks quant-maps",
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--maps", type=lambda s: s.split(","), default=list(MAPS))
    parser.add_argument(
        "--rounding",
        type=lambda s: s.split(","),
        default=["nearest", "stochastic"],
        help="comma-separated: nearest, stochastic",
    )
    parser.add_argument("--block", type=int, default=128, help="elements per scale")
    for name, default in (("width", 256), ("depth", 2), ("heads", 4), ("seq", 64)):
        parser.add_argument(f"--{name}", type=int, default=default)
    for name, default in (("batch", 16), ("steps", 240), ("seed", 0)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--warmup", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=1.0, help="u-μP optimum: 2^0")
    parser.add_argument("--weight-decay", type=float, default=2**-13)
    parser.add_argument("--demo-steps", type=int, default=200, help="0: no demo runs")
    parser.add_argument("--demo-width", type=int, default=384)
    parser.add_argument("--demo-depth", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--tag", default="")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny models, 24 steps: checks it runs"
    )
    args = parser.parse_args(argv)
    bad = [m for m in args.maps if m not in MAPS]
    if bad or not set(args.rounding) <= {"nearest", "stochastic"}:
        parser.error(f"unknown map {bad} or rounding {args.rounding}")
    if args.smoke:
        args.width, args.depth, args.heads, args.seq, args.batch = 32, 1, 2, 16, 4
        args.steps, args.demo_steps, args.demo_width, args.demo_depth = 24, 24, 32, 1
    return args


def summarize(
    model: str, v: Variant, losses: list[float], errs: list[Any], base: float | None
) -> dict[str, Any]:
    tail = statistics.fmean(losses[-TAIL:])
    finite = math.isfinite(tail) and len(losses) > 0
    pct = 100 * (tail / base - 1) if base is not None and finite else 0.0
    row: dict[str, Any] = {
        "model": model,
        "variant": v.name,
        "v_map": v.v_map or "float32",
        "rounding": v.rounding,
        "block": v.block or "-",
        "tail_loss": f"{tail:.4f}" if finite else "diverged",
        "vs_fp32_pct": f"{pct:+.2f}" if finite else "diverged",
        "ok": finite and pct <= LIMIT,
    }
    for k, col in enumerate(COLUMNS[8:12]):  # max over the steps, mean of the rms
        vals = [e[k] for e in errs] or [math.nan]
        agg = max(vals) if col.endswith("max") else statistics.fmean(vals)
        row[col] = f"{agg:.2e}" if errs else "-"
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
    models: list[tuple[str, Callable[[Variant], Any]]] = []
    if args.steps:
        models.append(
            ("TransformerDecoder", lambda v: transformer_run(v, args, corpus))
        )
    if args.demo_steps:
        models.append(("demo TinyUmupLM", lambda v: demo_run(v, args, text)))
    for model_name, run in models:
        base = None
        for v in variants(args):
            t1 = time.perf_counter()
            losses, errs = run(v)
            row = summarize(model_name, v, losses, errs, base)
            row["run_s"] = f"{time.perf_counter() - t1:.1f}"
            if base is None:
                base = statistics.fmean(losses[-TAIL:])
            rows.append(row | {c: head.get(c, "") for c in common.RUN_COLUMNS})
            for i, loss in enumerate(losses):
                e = errs[i] if i < len(errs) else ("",) * 4
                error_rows.append(
                    dict(zip(ERROR_COLUMNS, (model_name, v.name, i + 1, loss, *e)))
                )
            print(
                f"{model_name:18s} {v.name:20s} tail {row['tail_loss']:>8s} "
                f"({row['vs_fp32_pct']}%) m err {row['m_err_max']}/{row['m_err_rms']}"
                f" v err {row['v_err_max']}/{row['v_err_rms']} {row['run_s']} s",
                flush=True,
            )
    if args.out is not None:
        out = args.out
    elif args.smoke:
        out = Path(tempfile.mkdtemp(prefix="quant_maps_smoke_"))
    else:
        out = common.RESULTS / head["device"]
    stem = f"{head['date']}_quant_maps_t{head['threads']}" + (
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
        f"demo: TinyUmupLM(256, {args.demo_width}, {args.demo_depth}), "
        f"{args.demo_steps} steps x 4 x 24 bytes, lr 0.2, wd 1e-4, the demo's schedule",
        "optimizer: AdamW(compile=False), float32 state, 8-bit state emulated after "
        f"each step; ok: mean loss of the last {TAIL} steps <= {LIMIT} % above fp32's",
        "errors: |dequantized - exact| / block absmax; max over the steps, mean rms",
        f"load average at end: {os.getloadavg()}; wall {time.perf_counter() - t0:.0f} s",
        f"command: `python -m benchmarks quant-maps {command}`",
    ]
    md = "# benchmarks.quant_maps: 8-bit Adam moments, which code map trains\n\n"
    md += "(smoke sizes: the numbers mean nothing)\n\n" if args.smoke else ""
    md += "\n".join(f"- {x}" for x in [*(f"{k}: {x}" for k, x in head.items()), *setup])
    md += "\n\n" + common.markdown_table(rows, COLUMNS[:13]) + "\n"
    (out / f"{stem}.md").write_text(md)
    print(f"wrote {out / stem}.{{md,csv}} and {stem}_errors.csv")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
