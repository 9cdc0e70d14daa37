"""8-bit AdamW step (``_quant_step.adam8_step_``, compiled) vs torch fused AdamW.

Phase 1 of issue 26: the fused update with 8-bit moments is a core function not yet
wired into the optimizer, so this script compiles it directly, as the compiled engine
would (one static-shape graph over every tensor, like the unrolled unit), on the
GPT-like set with each tensor passed as ``(blocks, --block)`` aliases (Note [one pass]).
Contestants, in one process, on the same parameters and gradients, timed in
round-robin windows (``common.time_interleaved``, medians):

- ``torch-fused``: ``torch.optim.AdamW(fused=True)``, float32 state (the baseline);
- ``umup fp32``: ``umup_compile.optim.AdamW``, compiled, float32 state;
- ``umup 8-bit``: ``adam8_step_`` compiled (int8 / uint8 codes, (blocks, 2) scales);
- ``torchao AdamW8bit`` and ``bnb AdamW8bit`` when installed (else a row saying so).

Also checks the generated C++ of the 8-bit graph: the number of loop nests over each
tensor's blocks (one per tensor when the update is a single pass).

Examples:
    python -m benchmarks quant8-kernel --threads 1
    python -m benchmarks quant8-kernel --threads 2 --no-peers
    python -m benchmarks quant8-kernel --smoke --out /tmp/q8
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import umup_compile.optim as uo
from benchmarks import common
from umup_compile._codegen_hints import codegen_hints
from umup_compile._functional import AdamConfig
from umup_compile._quant import BLOCK, num_blocks
from umup_compile._quant_step import adam8_step_

LR, WD = 1e-3, 0.01
COLUMNS = "contestant median_ms q1_ms q3_ms vs_torch_fused state_B_per_param first_step_s note".split()


def _alias(t: Tensor, shape: tuple[int, ...]) -> Tensor:
    """A base-less alias of contiguous ``t`` with ``shape`` (as ``_pack._flat``)."""
    return t.new_empty(0).set_(t.untyped_storage(), t.storage_offset(), shape)


class Adam8:
    """The compiled 8-bit update over every tensor, with its state."""

    def __init__(self, params: list[Tensor], block: int = BLOCK) -> None:
        n = len(params)
        self.params = params
        self.codes_m = [torch.zeros_like(p, dtype=torch.int8) for p in params]
        self.codes_v = [torch.zeros_like(p, dtype=torch.uint8) for p in params]
        self.block = block
        self.scales = [torch.zeros(num_blocks(p.numel(), block), 2) for p in params]
        self.steps = [torch.zeros(()) for _ in params]
        hyper = [LR, 0.9, 0.999, 1e-8, WD]
        self.hyper_t = torch.tensor([hyper], dtype=torch.float64)
        self.index_t = torch.zeros(n, dtype=torch.int64)
        self.lr_scales_t = torch.ones(n, dtype=torch.float64)
        self.wd_scales_t = torch.ones(n, dtype=torch.float64)
        self.compiled = torch.compile(adam8_step_, fullgraph=True, dynamic=False)
        rows = [self._rows(p) for p in params]
        self.args = (
            rows,
            [self._rows(p.grad) for p in params],  # type: ignore[arg-type]
            [self._rows(c) for c in self.codes_m],
            [self._rows(c) for c in self.codes_v],
            self.scales,
            [s.view(1) for s in self.steps],
            self.hyper_t,
            self.index_t,
            self.lr_scales_t,
            self.wd_scales_t,
        )
        self.kwargs = {"config": AdamConfig(weight_decay="decoupled"), "block": block}

    def _rows(self, t: Tensor) -> Tensor:
        if t.numel() % self.block:  # the functional cuts the tail itself
            return _alias(t, (t.numel(),))
        return _alias(t, (t.numel() // self.block, self.block))

    def step(self) -> None:
        with codegen_hints:  # as the compiled engine: vector bit casts
            self.compiled(*self.args, **self.kwargs)

    def state_bytes(self) -> int:
        tensors = self.codes_m + self.codes_v + self.scales + self.steps
        return sum(t.numel() * t.element_size() for t in tensors)


def _loop_nests(code: str) -> int:
    """Outer loops over blocks in the generated C++ (one per tensor: one pass)."""
    return len(re.findall(r"for\(int64_t x0=", code))


def build(args: argparse.Namespace) -> dict[str, Any]:
    specs = common.gpt_like_specs()
    if args.smoke:
        specs = common.gpt_like_specs(d_model=64, n_layers=2, vocab=256)
    base = common.build_params(specs, device=torch.device("cpu"))
    out: dict[str, Any] = {}
    ps = common.copy_params(base)
    opt = torch.optim.AdamW(ps, lr=LR, weight_decay=WD, fused=True)
    out["torch-fused"] = (opt.step, lambda o=opt: common.state_bytes(o), "")
    ps = common.copy_params(base)
    uopt = uo.AdamW(ps, lr=LR, weight_decay=WD, allow_non_unit_scaling_params=True)
    out["umup fp32"] = (uopt.step, lambda o=uopt: common.state_bytes(o), "")
    adam8 = Adam8(common.copy_params(base), args.block)
    out["umup 8-bit"] = (adam8.step, adam8.state_bytes, "")
    out["_adam8"] = adam8
    if args.peers:
        for name, make in (("torchao AdamW8bit", _torchao), ("bnb AdamW8bit", _bnb)):
            try:
                popt = make(common.copy_params(base))
            except Exception as e:  # noqa: BLE001 - a peer that cannot run: say why
                out[name] = (None, None, f"not run: {type(e).__name__}: {e}"[:120])
                continue
            out[name] = (popt.step, lambda o=popt: _peer_bytes(o), "")
    return out


def _torchao(params: list[Tensor]) -> torch.optim.Optimizer:
    from torchao.optim import AdamW8bit  # type: ignore[import-not-found]

    opt: torch.optim.Optimizer = AdamW8bit(params, lr=LR, weight_decay=WD)
    return opt


def _bnb(params: list[Tensor]) -> torch.optim.Optimizer:
    import bitsandbytes as bnb  # type: ignore[import-not-found]

    opt: torch.optim.Optimizer = bnb.optim.AdamW8bit(params, lr=LR, weight_decay=WD)
    return opt


def _peer_bytes(opt: torch.optim.Optimizer) -> int:
    """State bytes of a peer (torchao's tensor subclass: its codes and scales)."""
    total = 0
    for state in opt.state.values():
        for v in state.values():
            if isinstance(v, Tensor):
                inner = getattr(v, "__tensor_flatten__", None)
                parts = [getattr(v, a) for a in inner()[0]] if inner else [v]
                total += sum(t.numel() * t.element_size() for t in parts)
    return total


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks quant8-kernel",
        description=(__doc__ or "").split("\n\n")[0],
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--block", type=int, default=BLOCK, help="elements per scale")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-peers", dest="peers", action="store_false")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--tag", default="")
    parser.add_argument("--smoke", action="store_true", help="tiny set, 2 repeats")
    args = parser.parse_args(argv)
    if args.smoke:
        args.repeats, args.warmup, args.peers = 2, 1, False
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    head = common.header(torch.device("cpu"))
    built = build(args)
    adam8: Adam8 = built.pop("_adam8")
    n_params = sum(p.numel() for p in adam8.params)
    firsts: dict[str, float] = {}
    fns: dict[str, Callable[[], Any]] = {}
    for name, (step, _, _) in built.items():
        if step is None:
            continue
        t0 = time.perf_counter()
        if name == "umup 8-bit":
            from torch._inductor.utils import run_and_get_code

            _, codes = run_and_get_code(step)
            nests = _loop_nests(codes[0])
        else:
            step()
        firsts[name] = time.perf_counter() - t0
        fns[name] = step
    timings = common.time_interleaved(
        fns, torch.device("cpu"), warmup=args.warmup, repeats=args.repeats
    )
    base = timings["torch-fused"].median
    rows = []
    for name, (step, nbytes, note) in built.items():
        row: dict[str, Any] = {"contestant": name, "note": note}
        if step is not None:
            t = timings[name]
            row |= {
                "median_ms": f"{1e3 * t.median:.2f}",
                "q1_ms": f"{1e3 * t.q1:.2f}",
                "q3_ms": f"{1e3 * t.q3:.2f}",
                "vs_torch_fused": f"{t.median / base:.3f}",
                "state_B_per_param": f"{nbytes() / n_params:.3f}",
                "first_step_s": f"{firsts[name]:.1f}",
            }
        rows.append(row | {c: head.get(c, "") for c in common.RUN_COLUMNS})
        print(
            f"{name:20s} {row.get('median_ms', '-'):>9s} ms "
            f"{row.get('vs_torch_fused', '-'):>7s}x {note}"
        )
    print(
        f"8-bit graph: {nests} loop nests over blocks for {len(adam8.params)} tensors"
    )
    out = args.out or (
        Path(tempfile.mkdtemp(prefix="q8_"))
        if args.smoke
        else common.RESULTS / head["device"]
    )
    stem = f"{head['date']}_quant8_gpt_t{head['threads']}" + (
        f"_{args.tag}" if args.tag else ""
    )
    common.write_csv(out / f"{stem}.csv", rows, [*COLUMNS, *common.RUN_COLUMNS])
    command = " ".join(sys.argv[1:] if argv is None else argv)
    md = (
        "# 8-bit AdamW step (adam8_step_, compiled) vs torch fused AdamW\n\n"
        + "\n".join(f"- {k}: {x}" for k, x in head.items())
        + f"\n- set: GPT-like, {len(adam8.params)} tensors, {n_params:,} elements; "
        f"8-bit blocks of {args.block}; "
        f"{args.repeats} round-robin windows, medians\n"
        f"- 8-bit graph: {nests} outer loop nests over blocks in the generated C++ "
        f"for {len(adam8.params)} tensors (one per tensor: a single pass)\n"
        f"- command: `python -m benchmarks quant8-kernel {command}`\n\n"
        + common.markdown_table(rows, COLUMNS)
        + "\n"
    )
    (out / f"{stem}.md").write_text(md)
    print(f"wrote {out / stem}.{{md,csv}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
