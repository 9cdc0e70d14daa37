"""8-bit AdamW step (``_quant_step.adam8_step_``, compiled) vs torch fused AdamW.

Phase 1 of issue 26: the fused update with 8-bit moments is a core function not yet
wired into the optimizer, so this script compiles it directly, as the compiled engine
would (one static-shape graph over every tensor, like the unrolled unit), on the
GPT-like set with each tensor passed as ``(blocks, --block)`` aliases (Note [one pass]).
Contestants, in one process, on the same parameters and gradients, timed in
round-robin windows (``timer.time_interleaved``, medians):

- ``torch-fused``: ``torch.optim.AdamW(fused=True)``, float32 state (the baseline);
- ``umup fp32``: ``umup_compile.optim.AdamW``, compiled, float32 state;
- ``umup 8-bit``: ``adam8_step_`` compiled (int8 / uint8 codes, (blocks, 2) scales);
- ``torchao AdamW8bit`` and ``bnb AdamW8bit`` when installed (else a row saying so).

Also checks the generated C++ of the 8-bit graph: the number of loop nests over each
tensor's blocks (one per tensor when the update is a single pass).

``--floor`` adds ``bytes floor``: a compiled graph over the same tensors that moves
the 8-bit update's bytes (parameter and gradient read, parameter and both codes read
and written; scales aside) with trivial arithmetic, under the same hints. The 8-bit
update can run no faster; the gap to it is arithmetic (measured 2026-12-07, 1 thread:
floor 0.62x torch fused, the update 0.80x).

``--ablate`` adds the 8-bit update with each speed change undone, in the same process
and windows (each its own copy of ``adam8_step_`` and its own compile, Inductor's
caches off so that no variant reuses another's kernels):

- ``no prefetch``: compiled without Note [row prefetch]'s prefetches;
- ``plain codes``: ``round``/``clamp`` and ``torch.where`` (the first formulation) in
  place of Note [cheap codes];
- ``none of them``: both undone (the coefficient table stays).

Examples:
    python -m benchmarks quant8-kernel --threads 1
    python -m benchmarks quant8-kernel --threads 2 --no-peers
    python -m benchmarks quant8-kernel --threads 1 --no-peers --ablate
    python -m benchmarks quant8-kernel --threads 1 --no-peers --floor
    python -m benchmarks quant8-kernel --smoke --out /tmp/q8
"""

from __future__ import annotations

import argparse
import contextlib
import re
import statistics
import sys
import tempfile
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch._inductor import config as inductor_config
from torch._inductor.utils import run_and_get_code

import umup_compile.optim as uo
from benchmarks import common, sets, timer
from benchmarks.bandwidth import state_bytes
from umup_compile import _codegen_hints, _quant
from umup_compile._codegen_hints import codegen_hints
from umup_compile._functional import AdamConfig
from umup_compile._quant import BLOCK, num_blocks
from umup_compile._quant_step import adam8_step_

LR, WD = 1e-3, 0.01
COLUMNS = (
    "contestant median_ms q1_ms q3_ms vs_torch_fused paired_ratio state_B_per_param "
    "first_step_s note"
).split()


def _plain_encode_signed(x: Tensor) -> tuple[Tensor, Tensor]:
    """``_quant.encode_signed`` before Note [cheap codes] (the same codes)."""
    absmax = x.abs().amax(-1, keepdim=True)
    position = x * (_quant._inverse(absmax) * _quant.SIGNED_TOP)
    top = _quant.SIGNED_TOP
    return position.round().clamp(-top, top).to(torch.int8), absmax


def _plain_decode_unsigned(codes: Tensor, top: Tensor) -> Tensor:
    """``_quant.decode_unsigned`` before Note [cheap codes] (the same values)."""
    c = codes.to(torch.int32)
    u = ((c + _quant.LOG_BIAS) << _quant.MANTISSA_SHIFT).view(torch.float32)
    return torch.where(c == 0, 0.0, u) * top


# variant -> (prefetch, replaced globals of adam8_step_)
VARIANTS: dict[str, tuple[bool, dict[str, Any]]] = {
    "umup 8-bit": (True, {}),
    "umup 8-bit no prefetch": (False, {}),
    "umup 8-bit plain codes": (
        True,
        {
            "encode_signed": _plain_encode_signed,
            "decode_unsigned": _plain_decode_unsigned,
        },
    ),
    "umup 8-bit none of them": (
        False,
        {
            "encode_signed": _plain_encode_signed,
            "decode_unsigned": _plain_decode_unsigned,
        },
    ),
}


def _variant(replaced: dict[str, Any]) -> Callable[..., None]:
    """A copy of ``adam8_step_`` (its own code object, so its own Dynamo cache) whose
    globals have ``replaced`` swapped in."""
    fn = adam8_step_
    globals_ = fn.__globals__ | replaced
    copy = types.FunctionType(fn.__code__.replace(), globals_, fn.__name__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    return copy


@contextlib.contextmanager
def _no_prefetch() -> Iterator[None]:
    original = _codegen_hints.prefetch_rows
    _codegen_hints.prefetch_rows = lambda source: source
    try:
        yield
    finally:
        _codegen_hints.prefetch_rows = original


def _alias(t: Tensor, shape: tuple[int, ...]) -> Tensor:
    """A base-less alias of contiguous ``t`` with ``shape`` (as ``_pack._flat``)."""
    return t.new_empty(0).set_(t.untyped_storage(), t.storage_offset(), shape)


class Adam8:
    """The compiled 8-bit update over every tensor, with its state."""

    def __init__(
        self, params: list[Tensor], block: int = BLOCK, variant: str = "umup 8-bit"
    ) -> None:
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
        self.prefetch, replaced = VARIANTS[variant]
        # Every variant its own copy: one code object would share one Dynamo cache
        # (and the prefetch-less variant would run the first variant's kernels).
        fn = adam8_step_ if variant == "umup 8-bit" else _variant(replaced)
        self.compiled = torch.compile(fn, fullgraph=True, dynamic=False)
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
        # As the compiled engine: vector bit casts, prefetches (a first call compiles).
        off = contextlib.nullcontext() if self.prefetch else _no_prefetch()
        with codegen_hints, off:
            self.compiled(*self.args, **self.kwargs)

    def state_nbytes(self) -> int:
        tensors = self.codes_m + self.codes_v + self.scales + self.steps
        return sum(t.numel() * t.element_size() for t in tensors)


def _floor_update(
    params: list[Tensor], grads: list[Tensor], m: list[Tensor], v: list[Tensor]
) -> None:
    for p, g, cm, cv in zip(params, grads, m, v):
        p.copy_(p + 1e-3 * g)
        cm.copy_(cm + 1)
        cv.copy_(cv + 1)


class BytesFloor:
    """The 8-bit update's reads and writes with trivial arithmetic (``--floor``)."""

    def __init__(self, adam8: Adam8) -> None:
        self.args = adam8.args[:4]
        self.compiled = torch.compile(_floor_update, fullgraph=True, dynamic=False)

    def step(self) -> None:
        with codegen_hints:
            self.compiled(*self.args)


def _loop_nests(code: str) -> int:
    """Outer loops over blocks in the generated C++ (one per tensor: one pass)."""
    return len(re.findall(r"for\(int64_t x0=", code))


def build(args: argparse.Namespace) -> dict[str, Any]:
    specs = sets.gpt_like_specs()
    if args.smoke:
        specs = sets.gpt_like_specs(d_model=64, n_layers=2, vocab=256)
    base = sets.build_params(specs, device=torch.device("cpu"))
    out: dict[str, Any] = {}
    ps = sets.copy_params(base)
    opt = torch.optim.AdamW(ps, lr=LR, weight_decay=WD, fused=True)
    out["torch-fused"] = (opt.step, lambda o=opt: state_bytes(o), "")
    ps = sets.copy_params(base)
    uopt = uo.AdamW(ps, lr=LR, weight_decay=WD, allow_non_unit_scaling_params=True)
    out["umup fp32"] = (uopt.step, lambda o=uopt: state_bytes(o), "")
    adam8 = Adam8(sets.copy_params(base), args.block)
    out["umup 8-bit"] = (adam8.step, adam8.state_nbytes, "")
    out["_adam8"] = adam8
    if args.floor:
        floor = BytesFloor(Adam8(sets.copy_params(base), args.block))
        out["bytes floor"] = (floor.step, adam8.state_nbytes, "same bytes, no math")
    if args.ablate:
        for variant in list(VARIANTS)[1:]:
            a8 = Adam8(sets.copy_params(base), args.block, variant)
            out[variant] = (a8.step, a8.state_nbytes, "")
    if args.peers:
        for name, make in (("torchao AdamW8bit", _torchao), ("bnb AdamW8bit", _bnb)):
            try:
                popt = make(sets.copy_params(base))
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


def _paired(t: timer.Timing, base: timer.Timing) -> float:
    """Median over the rounds of this sample / torch fused's sample in the same round
    (neighbours in time: a burst of load from another job hits both)."""
    return statistics.median(a / b for a, b in zip(t.samples, base.samples))


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
    parser.add_argument(
        "--ablate", action="store_true", help="also each speed change undone"
    )
    parser.add_argument(
        "--floor", action="store_true", help="also the bytes alone (trivial math)"
    )
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
        # Caches off: their keys do not see the hints, and a variant would reuse
        # another's kernels; so every first step here is a cold compile.
        with inductor_config.patch(force_disable_caches=True):
            if name == "umup 8-bit":
                _, codes = run_and_get_code(step)
                nests = _loop_nests(codes[0])
                prefetches = codes[0].count("__builtin_prefetch")
            else:
                step()
        firsts[name] = time.perf_counter() - t0
        fns[name] = step
    timings = timer.time_interleaved(
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
                "paired_ratio": f"{_paired(t, timings['torch-fused']):.3f}",
                "state_B_per_param": f"{nbytes() / n_params:.3f}",
                "first_step_s": f"{firsts[name]:.1f}",
            }
        rows.append(row | {c: head.get(c, "") for c in common.RUN_COLUMNS})
        print(
            f"{name:20s} {row.get('median_ms', '-'):>9s} ms "
            f"{row.get('vs_torch_fused', '-'):>7s}x "
            f"(paired {row.get('paired_ratio', '-')}) {note}"
        )
    print(
        f"8-bit graph: {nests} loop nests over blocks for {len(adam8.params)} "
        f"tensors, {prefetches} prefetch lines"
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
        f"{args.repeats} round-robin windows, medians; paired_ratio: the median over "
        "the rounds of the ratio to torch fused's sample in the same round\n"
        f"- 8-bit graph: {nests} outer loop nests over blocks in the generated C++ "
        f"for {len(adam8.params)} tensors (one per tensor: a single pass), "
        f"{prefetches} prefetch lines (Note [row prefetch])\n"
        f"- command: `python -m benchmarks quant8-kernel {command}`\n\n"
        + common.markdown_table(rows, COLUMNS)
        + "\n"
    )
    (out / f"{stem}.md").write_text(md)
    print(f"wrote {out / stem}.{{md,csv}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
