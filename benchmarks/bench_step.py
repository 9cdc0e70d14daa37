"""Optimizer step time: umup_compile Adam vs unit_scaling and torch.optim baselines.

All contestants run in one process, on copies of the same parameters and gradients,
with the gradients set once and reused. Every contestant gets a ``LambdaLR`` that
changes lr on every step (untimed unless ``--time-scheduler``), so a recompile on a
new lr shows up in the ``graphs_later`` column and in the step time. Steady-state
samples are taken in round-robin windows (see ``common.time_interleaved``).

Examples:
    python benchmarks/bench_step.py                      # GPT-like set, all contestants
    python benchmarks/bench_step.py --set many-small --repeats 20
    python benchmarks/bench_step.py --smoke --out /tmp/smoke.csv
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

LR = 1e-2
BASELINE = "torch-fused"


def _schedule(step: int) -> float:
    """lr factor: changes on every step, so a float lr that is guarded would recompile."""
    return 1.0 / (1.0 + 1e-3 * step)


# -- contestants ---------------------------------------------------------------------


@dataclass
class Contestant:
    """A built optimizer with its step function and per-step scheduler."""

    name: str
    optimizer: torch.optim.Optimizer
    step: Callable[[], Any]
    scheduler: torch.optim.lr_scheduler.LRScheduler
    note: str = ""


def _umup(compile_: bool) -> Callable[[list[nn.Parameter]], Any]:
    def build(params: list[nn.Parameter]) -> Any:
        import umup_compile.optim as uo

        return uo.Adam(params, lr=LR, compile=compile_)

    return build


def _unit_scaling(fused: bool | None) -> Callable[[list[nn.Parameter]], Any]:
    def build(params: list[nn.Parameter]) -> Any:
        import unit_scaling.optim as uso

        kwargs = {} if fused is None else {"fused": fused}
        return uso.Adam(params, lr=LR, **kwargs)

    return build


def _umup_lowp(
    stochastic_rounding: bool, compile_: bool = True
) -> Callable[[list[nn.Parameter]], Any]:
    """bf16 parameters with float32 moments (``state_dtype``), optionally SR write-back."""

    def build(params: list[nn.Parameter]) -> Any:
        import umup_compile.optim as uo

        return uo.Adam(
            params,
            lr=LR,
            state_dtype=torch.float32,
            stochastic_rounding=stochastic_rounding,
            compile=compile_,
        )

    return build


def _heavyball_adamw() -> Callable[[list[nn.Parameter]], Any]:
    """HeavyBall's AdamW at weight decay 0 (= Adam); optional, see ``OPTIONAL``."""

    def build(params: list[nn.Parameter]) -> Any:
        import heavyball  # type: ignore[import-not-found]

        cls = getattr(heavyball, "AdamW", None) or heavyball.ForeachAdamW
        return cls(params, lr=LR, weight_decay=0.0)

    return build


def _torch(**kwargs: Any) -> Callable[[list[nn.Parameter]], Any]:
    def build(params: list[nn.Parameter]) -> Any:
        return torch.optim.Adam(params, lr=LR, **kwargs)

    return build


def _umup_capturable() -> Callable[[list[nn.Parameter]], Any]:
    def build(params: list[nn.Parameter]) -> Any:
        from umup_compile.optim import Adam

        # A device lr: LambdaLR fills it in place, so replays see the schedule.
        lr = torch.tensor(LR, device=params[0].device)
        return Adam(params, lr=lr, capturable=True)

    return build


# The clipping threshold of the ``*-clip`` contestants: below the set's gradient norm,
# so every step clips.
MAX_NORM = 1.0


def _umup_clip() -> Callable[[list[nn.Parameter]], Any]:
    def build(params: list[nn.Parameter]) -> Any:
        from umup_compile.optim import Adam

        return Adam(params, lr=LR, max_grad_norm=MAX_NORM)

    return build


def _torch_tensor_lr() -> Callable[[list[nn.Parameter]], Any]:
    def build(params: list[nn.Parameter]) -> Any:
        return torch.optim.Adam(params, lr=torch.tensor(LR))

    return build


# name -> (builder, description, how the step runs: "step" (called), "clip"
# (clip_grad_norm_ then step), "compile" (torch.compile of a function calling it) or
# "graph" (captured once in a CUDA graph, then replayed))
CONTESTANTS: dict[str, tuple[Callable[[list[nn.Parameter]], Any], str, str]] = {
    "umup-compiled": (
        _umup(True),
        "umup_compile.optim.Adam (default: compiled)",
        "step",
    ),
    "umup-eager": (_umup(False), "umup_compile.optim.Adam(compile=False)", "step"),
    "us-default": (_unit_scaling(None), "unit_scaling.optim.Adam, defaults", "step"),
    "us-fused": (_unit_scaling(True), "unit_scaling.optim.Adam(fused=True)", "step"),
    BASELINE: (_torch(fused=True), "torch.optim.Adam(fused=True), 1 group", "step"),
    "torch-foreach": (
        _torch(foreach=True),
        "torch.optim.Adam(foreach=True), 1 group",
        "step",
    ),
    "torch-compiled": (
        # A tensor lr, as the torch docs advise with schedulers: LambdaLR fill_s it,
        # so a new lr is not a new constant in the graph.
        _torch_tensor_lr(),
        "torch.compile(fullgraph=False) of torch.optim.Adam.step, tensor lr, 1 group",
        "compile",
    ),
    "umup-capturable": (
        _umup_capturable(),
        "umup_compile.optim.Adam(capturable=True), tensor lr, step captured in a CUDA "
        "graph and replayed (CUDA only)",
        "graph",
    ),
    # Global-norm clipping at MAX_NORM (not in the default list).
    "umup-compiled-clip": (
        _umup_clip(),
        "umup_compile.optim.Adam(max_grad_norm=1.0): clipping fused into the step",
        "step",
    ),
    "torch-fused-clip": (
        _torch(fused=True),
        "torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True), then "
        "torch.optim.Adam(fused=True).step()",
        "clip",
    ),
    # Not in the default list: torch's CPU default is the single-tensor for-loop.
    "torch-default": (_torch(), "torch.optim.Adam, defaults, 1 group", "step"),
    # Low precision (``python -m benchmarks --dtype bf16-fp32state``): each contestant
    # runs on its own parameter dtype (PARAM_DTYPES), from the same starting values.
    "umup-bf16": (
        _umup(True),
        "umup_compile.optim.Adam, bf16 params and state (the parameter's dtype), "
        "compiled",
        "step",
    ),
    "umup-fp32state": (
        _umup_lowp(False),
        "umup_compile.optim.Adam(state_dtype=float32), bf16 params, compiled",
        "step",
    ),
    "umup-fp32state-sr": (
        _umup_lowp(True),
        "umup_compile.optim.Adam(state_dtype=float32, stochastic_rounding=True), "
        "bf16 params, compiled",
        "step",
    ),
    "umup-fp32state-sr-eager": (
        _umup_lowp(True, compile_=False),
        "umup_compile.optim.Adam(state_dtype=float32, stochastic_rounding=True, "
        "compile=False), bf16 params",
        "step",
    ),
    "torch-fused-fp32": (
        _torch(fused=True),
        "torch.optim.Adam(fused=True), float32 params and state, 1 group",
        "step",
    ),
    "torch-fused-bf16": (
        _torch(fused=True),
        "torch.optim.Adam(fused=True), bf16 params and state, 1 group",
        "step",
    ),
    "heavyball-adamw": (
        _heavyball_adamw(),
        "heavyball AdamW(weight_decay=0), bf16 params, its default state dtype",
        "step",
    ),
    # The same on the run's --dtype (the default list: the GPT-like fp32 run).
    "heavyball": (
        _heavyball_adamw(),
        "heavyball AdamW(weight_decay=0), 1 group (optional: pip install heavyball)",
        "step",
    ),
}
# Parameter dtype per contestant where it is not --dtype (the low-precision set).
PARAM_DTYPES: dict[str, torch.dtype] = {
    "umup-bf16": torch.bfloat16,
    "umup-fp32state": torch.bfloat16,
    "umup-fp32state-sr": torch.bfloat16,
    "umup-fp32state-sr-eager": torch.bfloat16,
    "torch-fused-fp32": torch.float32,
    "torch-fused-bf16": torch.bfloat16,
    "heavyball-adamw": torch.bfloat16,
}
# Contestants that need a package that is not a dependency: skipped (a row with a
# note, no timings) when the import fails. Likewise for CUDA-only contestants.
OPTIONAL = {"heavyball-adamw": "heavyball", "heavyball": "heavyball"}
# Contestants whose step sets .grad to None (HeavyBall's does).
CLEARS_GRADS = {"heavyball-adamw", "heavyball"}
CUDA_ONLY = {"umup-capturable"}
DEFAULT_CONTESTANTS = [
    n
    for n in CONTESTANTS
    if n != "torch-default" and n not in PARAM_DTYPES and not n.endswith("-clip")
]
SMOKE_CONTESTANTS = ["umup-compiled", "umup-eager", "us-default", BASELINE]
# The low-precision set and its reference (the baseline of its ratios).
LOWP_CONTESTANTS = [
    "umup-bf16",
    "umup-fp32state",
    "umup-fp32state-sr",
    "torch-fused-fp32",
    "torch-fused-bf16",
    "heavyball-adamw",
]
LOWP_SMOKE_CONTESTANTS = [
    "umup-fp32state-sr-eager",
    "torch-fused-fp32",
    "torch-fused-bf16",
    "heavyball-adamw",
]
LOWP_BASELINE = "torch-fused-fp32"


def skip_reason(name: str, device: torch.device) -> str | None:
    """Why contestant ``name`` cannot run here (a missing optional package, no CUDA)."""
    if name in CUDA_ONLY and device.type != "cuda":
        return "needs a CUDA device"
    module = OPTIONAL.get(name)
    if module is None:
        return None
    import importlib.util

    if importlib.util.find_spec(module) is not None:
        return None
    return f"`import {module}` failed (optional; pip install {module})"


def build_contestant(name: str, params: list[nn.Parameter]) -> Contestant:
    builder, _, mode = CONTESTANTS[name]
    opt = builder(params)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule)
    if mode == "graph":
        return Contestant(name, opt, _graph_step(opt), sched)
    if mode == "step" and name in CLEARS_GRADS:
        # Gradients are set once in this benchmark: give them back before each step
        # (51 attribute writes, microseconds), or later steps would do nothing.
        grads = [p.grad for p in params]

        def step_with_grads() -> None:
            for p, g in zip(params, grads):
                p.grad = g
            opt.step()

        return Contestant(name, opt, step_with_grads, sched)
    if mode == "step":
        return Contestant(name, opt, opt.step, sched)
    if mode == "clip":

        def clip_then_step() -> None:
            torch.nn.utils.clip_grad_norm_(params, MAX_NORM, foreach=True)
            opt.step()

        return Contestant(name, opt, clip_then_step, sched)

    # As the torch docs show for compiling an optimizer: a compiled function that
    # calls step() (Optimizer.step itself graph-breaks, hence fullgraph=False).
    @torch.compile(fullgraph=False)
    def compiled_step() -> None:
        opt.step()

    return Contestant(name, opt, compiled_step, sched)


def _graph_step(opt: torch.optim.Optimizer) -> Callable[[], None]:
    """``opt.step`` captured in a CUDA graph at the first call, replayed after.

    The first call warms up on a side stream (compiles, creates state and layouts),
    as CUDA-graph capture requires, then captures one step: the first-step time
    includes all of it. Gradients are set once in this benchmark, so the captured
    step keeps reading the right tensors.
    """
    graph: torch.cuda.CUDAGraph | None = None

    def step() -> None:
        nonlocal graph
        if graph is None:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):
                    opt.step()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                opt.step()
        graph.replay()

    return step


class GraphTracker:
    """Attributes Dynamo's ``unique_graphs`` counter to whichever contestant ran last."""

    def __init__(self) -> None:
        self.graphs: dict[str, int] = {}
        self._last: str | None = None
        self._count = self.read()

    @staticmethod
    def read() -> int:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])

    def mark(self, name: str | None) -> None:
        now = self.read()
        if self._last is not None:
            self.graphs[self._last] = self.graphs.get(self._last, 0) + now - self._count
        self._last, self._count = name, now


# -- main -----------------------------------------------------------------------------


COLUMNS = [
    "set",
    "contestant",
    "n_tensors",
    "numel",
    "param_dtype",
    "first_step_ms",
    "median_ms",
    "q1_ms",
    "q3_ms",
    "iqr_ms",
    "min_ms",
    "max_ms",
    "ratio_vs_torch_fused",
    "graphs_first_step",
    "graphs_later",
    "repeats",
    "warmup",
    "window",
    "time_scheduler",
    "note",
    "description",
    *common.RUN_COLUMNS,
]
TABLE_COLUMNS = [
    "contestant",
    "first_step_ms",
    "median_ms",
    "iqr_ms",
    "min_ms",
    "max_ms",
    "ratio_vs_torch_fused",
    "graphs_first_step",
    "graphs_later",
    "note",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--set", choices=["gpt", "many-small"], default="gpt")
    parser.add_argument(
        "--contestants",
        default=",".join(DEFAULT_CONTESTANTS),
        help=f"comma-separated, from: {', '.join(CONTESTANTS)}",
    )
    parser.add_argument("--repeats", type=int, default=30, help="timed samples each")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps each")
    parser.add_argument("--window", type=int, default=1, help="steps per sample")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads (default: keep)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--baseline",
        default=BASELINE,
        help=f"contestant whose median is the denominator of every ratio "
        f"({LOWP_BASELINE} for the low-precision set)",
    )
    parser.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float64"], default="float32"
    )
    parser.add_argument(
        "--n-small",
        type=int,
        default=256,
        help="tensors in many-small (a compile takes about 1 s per tensor on CPU)",
    )
    parser.add_argument(
        "--time-scheduler",
        action="store_true",
        help="time LambdaLR.step() together with step() (default: untimed)",
    )
    parser.add_argument(
        "--warm-cache",
        action="store_true",
        help="reuse the Inductor on-disk cache (default: a fresh one, so the first step "
        "includes a cold compile)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="CSV path (default: benchmarks/results/<date>_<device>_step_<set>[_t<threads>].csv; "
        "with --smoke, a temporary directory)",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny sizes, 3 repeats, a few contestants: checks that the script runs",
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.repeats = min(args.repeats, 3)
        args.warmup = min(args.warmup, 1)
        if args.contestants == ",".join(DEFAULT_CONTESTANTS):
            args.contestants = ",".join(SMOKE_CONTESTANTS)
    names = [n.strip() for n in args.contestants.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONTESTANTS]
    if unknown:
        parser.error(
            f"unknown contestant(s) {unknown}; choose from {list(CONTESTANTS)}"
        )
    args.contestants = names
    return args


def param_specs(args: argparse.Namespace) -> list[common.ParamSpec]:
    # The large GPU workloads of ``python -m benchmarks`` (untied head, vocab 50304).
    if args.set == "gpt-124m":  # GPT-2 small: 12 x 768 (163M with the untied head)
        return common.gpt_like_specs(d_model=768, n_layers=12, vocab=50304)
    if args.set == "gpt-1.2b":  # 20 x 2048: 1.21B
        return common.gpt_like_specs(d_model=2048, n_layers=20, vocab=50304)
    if args.set == "gpt":
        if args.smoke:
            return common.gpt_like_specs(d_model=16, n_layers=1, vocab=32)
        return common.gpt_like_specs()
    if args.smoke:
        return common.many_small_specs(n=8, numel=256)
    return common.many_small_specs(n=args.n_small)


def target_lines(rows: dict[str, dict[str, Any]]) -> list[str]:
    """The issue's targets, checked against this run's medians."""

    def med(name: str) -> float | None:
        return rows[name].get("_median") if name in rows else None

    checks = _lowp_lines(med)
    ours, fused = med("umup-compiled"), med(BASELINE)
    eager, us = med("umup-eager"), med("us-default")
    if ours is not None and fused is not None:
        r = ours / fused
        checks.append(
            f"- compiled / torch fused = {r:.3f}x (target <= 1.10x): "
            + ("PASS" if r <= 1.10 else "FAIL")
        )
    if ours is not None and us is not None:
        r = us / ours
        checks.append(
            f"- unit_scaling default / compiled = {r:.3f}x (target >= 3x): "
            + ("PASS" if r >= 3.0 else "FAIL")
        )
    if eager is not None and us is not None:
        r = eager / us
        checks.append(
            f"- eager / unit_scaling default = {r:.3f}x (target <= 1.00x): "
            + ("PASS" if r <= 1.0 else "FAIL")
        )
    return checks


def _lowp_lines(med: Callable[[str], float | None]) -> list[str]:
    """bf16 + float32 state vs torch fused on float32 (informative, no target)."""
    lines = []
    ref = med(LOWP_BASELINE)
    for name in ("umup-fp32state", "umup-fp32state-sr", "torch-fused-bf16"):
        t = med(name)
        if t is not None and ref is not None:
            lines.append(f"- {name} / {LOWP_BASELINE} = {t / ref:.3f}x")
    return lines


def cast_params(params: list[nn.Parameter], dtype: torch.dtype) -> list[nn.Parameter]:
    """Copies of tagged parameters (and gradients) in ``dtype``, same starting values."""
    out = common.copy_params(params)
    for p in out:
        p.data = p.data.to(dtype)
        if p.grad is not None:
            p.grad = p.grad.to(dtype)
    return out


def skipped_row(name: str, reason: str) -> dict[str, Any]:
    """A table row for a contestant that cannot run here (see ``skip_reason``)."""
    return {
        "contestant": name,
        "description": CONTESTANTS[name][1],
        "note": f"skipped: {reason}",
        "skipped": True,
    }


def run(
    args: argparse.Namespace,
    *,
    progress: Callable[[int, int], Any] | None = None,
    contestants_out: dict[str, Contestant] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, str], list[str]]:
    """Build, first-step and time every contestant; return rows, header, target lines.

    ``progress(done, total)`` is called after every build and every timed window;
    ``contestants_out``, when given, receives the built contestants (for state sizes).
    Each row also carries ``state_bytes`` (tensors in ``optimizer.state``) and, on
    CUDA, ``peak_extra_bytes``: peak allocated memory during build + first step,
    over what was allocated before (the parameters and gradients).
    """
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    head = common.header(device)
    specs = param_specs(args)
    master = common.build_params(specs, device=device, dtype=dtype)
    n_tensors, numel = len(master), common.count_numel(master)
    print(
        f"# bench_step: set={args.set} tensors={n_tensors} numel={numel:,} dtype={args.dtype}"
    )
    print("# " + ", ".join(f"{k}={v}" for k, v in head.items()), flush=True)

    contestants: dict[str, Contestant] = {}
    first: dict[str, float] = {}
    first_graphs: dict[str, int] = {}
    n_names = len(args.contestants)
    total = n_names * (1 + args.warmup + args.repeats)
    peak_extra: dict[str, int | None] = {}
    skipped = {
        n: why for n in args.contestants if (why := skip_reason(n, device)) is not None
    }
    for i, name in enumerate(args.contestants):
        if name in skipped:
            print(f"  skipped {name}: {skipped[name]}", flush=True)
            continue
        gc.collect()
        dtype_ = PARAM_DTYPES.get(name, dtype)
        params = (
            common.copy_params(master)
            if dtype_ == dtype
            else cast_params(master, dtype_)
        )
        if device.type == "cuda":
            common.synchronize(device)
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        c = build_contestant(name, params)
        graphs_before = GraphTracker.read()
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            first[name] = common.time_once(c.step, device)
        first_graphs[name] = GraphTracker.read() - graphs_before
        peak_extra[name] = (
            torch.cuda.max_memory_allocated(device) - before
            if device.type == "cuda"
            else None
        )
        for w in caught:
            if "umup_compile" in str(w.message):  # e.g. a fallback to the eager engine
                c.note = "WARNING: " + str(w.message).splitlines()[0][:80]
            # Re-issue under the normal filters (recording bypassed them).
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        c.scheduler.step()
        contestants[name] = c
        print(
            f"  built {name:15s} first step {first[name] * 1e3:10.1f} ms "
            f"({time.perf_counter() - t0:.1f} s wall)",
            flush=True,
        )
        if progress is not None:
            progress(i + 1, total)

    tracker = GraphTracker()

    def between_for(c: Contestant) -> Callable[[], None]:
        def between() -> None:
            tracker.mark(c.name)
            c.scheduler.step()

        return between

    if args.time_scheduler:
        fns = {n: _with_scheduler(c) for n, c in contestants.items()}
        between = {n: (lambda n=n: tracker.mark(n)) for n in contestants}
    else:
        fns = {n: c.step for n, c in contestants.items()}
        between = {n: between_for(c) for n, c in contestants.items()}
    timings = common.time_interleaved(
        fns,
        device,
        warmup=args.warmup,
        repeats=args.repeats,
        window=args.window,
        between=between,
        progress=(
            None
            if progress is None
            else lambda done, _total: progress(n_names + done, total)
        ),
    )
    tracker.mark(None)
    if contestants_out is not None:
        contestants_out.update(contestants)

    rows: dict[str, dict[str, Any]] = {}
    for name in args.contestants:
        if name in skipped:
            rows[name] = {
                "set": args.set,
                "n_tensors": n_tensors,
                "numel": numel,
                **skipped_row(name, skipped[name]),
                **head,
            }
            continue
        c = contestants[name]
        t = timings[name]
        note = c.note
        engine = getattr(c.optimizer, "_engine", None)
        if getattr(engine, "failed", None):
            note = f"FELL BACK TO EAGER: {engine.failed}"[:100]
        rows[name] = {
            "set": args.set,
            "contestant": name,
            "description": CONTESTANTS[name][1],
            "n_tensors": n_tensors,
            "numel": numel,
            "first_step_ms": f"{first[name] * 1e3:.1f}",
            "median_ms": f"{t.median * 1e3:.2f}",
            "q1_ms": f"{t.q1 * 1e3:.2f}",
            "q3_ms": f"{t.q3 * 1e3:.2f}",
            "iqr_ms": f"{t.iqr * 1e3:.2f}",
            "min_ms": f"{t.min * 1e3:.2f}",
            "max_ms": f"{t.max * 1e3:.2f}",
            "graphs_first_step": first_graphs[name],
            "graphs_later": tracker.graphs.get(name, 0),
            "repeats": args.repeats,
            "warmup": args.warmup,
            "window": args.window,
            "time_scheduler": args.time_scheduler,
            "note": note,
            "param_dtype": str(PARAM_DTYPES.get(name, dtype)).replace("torch.", ""),
            "state_bytes": common.state_bytes(c.optimizer),
            "peak_extra_bytes": peak_extra[name],
            "_median": t.median,
            **head,
        }
    baseline = getattr(args, "baseline", BASELINE)
    if baseline in contestants:
        base = rows[baseline]["_median"]
        for row in rows.values():
            if "_median" in row:
                row["ratio_vs_torch_fused"] = f"{row['_median'] / base:.2f}"
    return list(rows.values()), head, target_lines(rows)


def _with_scheduler(c: Contestant) -> Callable[[], None]:
    def step_and_schedule() -> None:
        c.step()
        c.scheduler.step()

    return step_and_schedule


def default_out(args: argparse.Namespace, head: dict[str, str]) -> Path:
    if args.smoke:
        return Path(tempfile.mkdtemp(prefix="bench_step_smoke_")) / "smoke.csv"
    threads = f"_t{head['threads']}" if args.device == "cpu" else ""
    return (
        common.RESULTS / f"{head['date']}_{head['device']}_step_{args.set}{threads}.csv"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = " ".join(sys.argv[1:] if argv is None else argv)
    if args.warm_cache:
        rows, head, targets = run(args)
    else:
        # A private Inductor cache (read lazily by Inductor), so first_step_ms is a
        # cold compile rather than a disk-cache hit from an earlier run.
        with tempfile.TemporaryDirectory(prefix="bench_step_inductor_") as cache:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
            rows, head, targets = run(args)
    table = common.markdown_table(rows, TABLE_COLUMNS)
    meta = (
        f"set={args.set}, tensors={rows[0]['n_tensors']}, numel={rows[0]['numel']:,}, "
        f"dtype={args.dtype}, repeats={args.repeats}, warmup={args.warmup}, "
        f"window={args.window}, time_scheduler={args.time_scheduler}, "
        f"inductor cache={'warm' if args.warm_cache else 'fresh'}"
    )
    print()
    print(table)
    print()
    if args.smoke:
        targets = ["(smoke sizes: the target checks below mean nothing)", *targets]
    print("\n".join(targets))
    out = args.out or default_out(args, head)
    common.write_csv(out, rows, COLUMNS)
    md = out.with_suffix(".md")
    md.write_text(
        f"# bench_step: {args.set}\n\n"
        + "\n".join(f"- {k}: {v}" for k, v in head.items())
        + f"\n- run: {meta}\n"
        + f"- command: `python benchmarks/bench_step.py {command}`\n\n"
        + "Times in ms per optimizer step; median and IQR over round-robin samples; "
        + f"ratio = median / median of {args.baseline}.\n\n"
        + table
        + "\n\nTargets:\n\n"
        + "\n".join(targets)
        + "\n"
    )
    print(f"\nwrote {out} and {md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
