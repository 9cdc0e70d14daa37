"""The step contestants, as data: one ``ContestantSpec`` per optimizer configuration.

Every step workload (``python -m benchmarks gpt`` and the other sets) picks names from
``CONTESTANTS``; ``build_contestant`` turns one into an optimizer, the callable that
is timed, and a ``LambdaLR`` that changes lr on every step (so a recompile on a new
lr shows in the ``graphs_later`` column). Adding a contestant is one entry here.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

LR = 1e-2
BASELINE = "torch-fused"
# The clipping threshold of the ``*-clip`` contestants: below the set's gradient norm,
# so every step clips.
MAX_NORM = 1.0

Builder = Callable[[list[nn.Parameter]], Any]


def _schedule(step: int) -> float:
    """lr factor: changes on every step, so a float lr that is guarded would recompile."""
    return 1.0 / (1.0 + 1e-3 * step)


@dataclass(frozen=True)
class ContestantSpec:
    """How one contestant is built and stepped.

    ``mode``: "step" (``opt.step`` called), "clip" (``clip_grad_norm_`` then step),
    "compile" (``torch.compile`` of a function calling it) or "graph" (captured once
    in a CUDA graph, then replayed). ``dtype``: its parameter dtype when not the run's
    ``--dtype`` (the low-precision set). ``needs``: an optional package; without it
    the contestant is a row with a note and no timings. ``clears_grads``: its step
    sets ``.grad`` to None (HeavyBall's does).
    """

    build: Builder
    description: str
    mode: str = "step"
    dtype: torch.dtype | None = None
    needs: str | None = None
    clears_grads: bool = False
    cuda_only: bool = False


@dataclass
class Contestant:
    """A built optimizer with its step function and per-step scheduler."""

    name: str
    optimizer: torch.optim.Optimizer
    step: Callable[[], Any]
    scheduler: torch.optim.lr_scheduler.LRScheduler
    note: str = ""


# -- builders -----------------------------------------------------------------------


def _umup(**kwargs: Any) -> Builder:
    def build(params: list[nn.Parameter]) -> Any:
        import umup_compile.optim as uo

        return uo.Adam(params, lr=LR, **kwargs)

    return build


def _umup_lowp(stochastic_rounding: bool, compile_: bool = True) -> Builder:
    """bf16 parameters with float32 moments (``state_dtype``), optionally SR write-back."""
    return _umup(
        state_dtype=torch.float32,
        stochastic_rounding=stochastic_rounding,
        compile=compile_,
    )


def _umup_capturable() -> Builder:
    def build(params: list[nn.Parameter]) -> Any:
        from umup_compile.optim import Adam

        # A device lr: LambdaLR fills it in place, so replays see the schedule.
        lr = torch.tensor(LR, device=params[0].device)
        return Adam(params, lr=lr, capturable=True)

    return build


def _unit_scaling(fused: bool | None) -> Builder:
    def build(params: list[nn.Parameter]) -> Any:
        import unit_scaling.optim as uso

        kwargs = {} if fused is None else {"fused": fused}
        return uso.Adam(params, lr=LR, **kwargs)

    return build


def _torch(**kwargs: Any) -> Builder:
    def build(params: list[nn.Parameter]) -> Any:
        return torch.optim.Adam(params, lr=LR, **kwargs)

    return build


def _torch_tensor_lr() -> Builder:
    def build(params: list[nn.Parameter]) -> Any:
        return torch.optim.Adam(params, lr=torch.tensor(LR))

    return build


def _heavyball_adamw() -> Builder:
    """HeavyBall's AdamW at weight decay 0 (= Adam); optional (``needs``)."""

    def build(params: list[nn.Parameter]) -> Any:
        import heavyball  # type: ignore[import-not-found]

        cls = getattr(heavyball, "AdamW", None) or heavyball.ForeachAdamW
        return cls(params, lr=LR, weight_decay=0.0)

    return build


def _torchao_adamw8bit() -> Builder:
    """torchao's AdamW8bit (a dynamic-tree map, 256-element blocks, one compiled
    update per parameter); optional (``needs``)."""

    def build(params: list[nn.Parameter]) -> Any:
        from torchao.optim import AdamW8bit  # type: ignore[import-not-found]

        return AdamW8bit(params, lr=LR, weight_decay=0.0)

    return build


def _bnb_adamw8bit() -> Builder:
    """bitsandbytes' AdamW8bit (its CPU backend off CUDA); optional (``needs``)."""

    def build(params: list[nn.Parameter]) -> Any:
        import bitsandbytes as bnb  # type: ignore[import-not-found]

        return bnb.optim.AdamW8bit(params, lr=LR, weight_decay=0.0)

    return build


BF16 = torch.bfloat16
INT8 = torch.int8
CONTESTANTS: dict[str, ContestantSpec] = {
    "umup-compiled": ContestantSpec(
        _umup(compile=True), "umup_compile.optim.Adam (default: compiled)"
    ),
    "umup-eager": ContestantSpec(
        _umup(compile=False), "umup_compile.optim.Adam(compile=False)"
    ),
    "us-default": ContestantSpec(
        _unit_scaling(None), "unit_scaling.optim.Adam, defaults"
    ),
    "us-fused": ContestantSpec(
        _unit_scaling(True), "unit_scaling.optim.Adam(fused=True)"
    ),
    BASELINE: ContestantSpec(
        _torch(fused=True), "torch.optim.Adam(fused=True), 1 group"
    ),
    "torch-foreach": ContestantSpec(
        _torch(foreach=True), "torch.optim.Adam(foreach=True), 1 group"
    ),
    "torch-compiled": ContestantSpec(
        # A tensor lr, as the torch docs advise with schedulers: LambdaLR fill_s it,
        # so a new lr is not a new constant in the graph.
        _torch_tensor_lr(),
        "torch.compile(fullgraph=False) of torch.optim.Adam.step, tensor lr, 1 group",
        mode="compile",
    ),
    "umup-capturable": ContestantSpec(
        _umup_capturable(),
        "umup_compile.optim.Adam(capturable=True), tensor lr, step captured in a CUDA "
        "graph and replayed (CUDA only)",
        mode="graph",
        cuda_only=True,
    ),
    # Global-norm clipping at MAX_NORM (not in the default list).
    "umup-compiled-clip": ContestantSpec(
        _umup(max_grad_norm=MAX_NORM),
        "umup_compile.optim.Adam(max_grad_norm=1.0): clipping fused into the step",
    ),
    "torch-fused-clip": ContestantSpec(
        _torch(fused=True),
        "torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True), then "
        "torch.optim.Adam(fused=True).step()",
        mode="clip",
    ),
    # Not in the default list: torch's CPU default is the single-tensor for-loop.
    "torch-default": ContestantSpec(_torch(), "torch.optim.Adam, defaults, 1 group"),
    # Low precision (``--dtype bf16-fp32state``): each contestant runs on its own
    # parameter dtype, from the same starting values.
    "umup-bf16": ContestantSpec(
        _umup(compile=True),
        "umup_compile.optim.Adam, bf16 params and state (the parameter's dtype), "
        "compiled",
        dtype=BF16,
    ),
    "umup-fp32state": ContestantSpec(
        _umup_lowp(False),
        "umup_compile.optim.Adam(state_dtype=float32), bf16 params, compiled",
        dtype=BF16,
    ),
    "umup-fp32state-sr": ContestantSpec(
        _umup_lowp(True),
        "umup_compile.optim.Adam(state_dtype=float32, stochastic_rounding=True), "
        "bf16 params, compiled",
        dtype=BF16,
    ),
    "umup-fp32state-sr-eager": ContestantSpec(
        _umup_lowp(True, compile_=False),
        "umup_compile.optim.Adam(state_dtype=float32, stochastic_rounding=True, "
        "compile=False), bf16 params",
        dtype=BF16,
    ),
    "torch-fused-fp32": ContestantSpec(
        _torch(fused=True),
        "torch.optim.Adam(fused=True), float32 params and state, 1 group",
        dtype=torch.float32,
    ),
    "torch-fused-bf16": ContestantSpec(
        _torch(fused=True),
        "torch.optim.Adam(fused=True), bf16 params and state, 1 group",
        dtype=BF16,
    ),
    "heavyball-adamw": ContestantSpec(
        _heavyball_adamw(),
        "heavyball AdamW(weight_decay=0), bf16 params, its default state dtype",
        dtype=BF16,
        needs="heavyball",
        clears_grads=True,
    ),
    # 8-bit moments (``--dtype int8-state``): the parameters in the run's dtype.
    "umup-int8": ContestantSpec(
        _umup(state_dtype=INT8),
        "umup_compile.optim.Adam(state_dtype=torch.int8): 8-bit moments, compiled",
    ),
    "umup-int8-eager": ContestantSpec(
        _umup(state_dtype=INT8, compile=False),
        "umup_compile.optim.Adam(state_dtype=torch.int8, compile=False)",
    ),
    "umup-bf16-int8-sr": ContestantSpec(
        _umup(state_dtype=INT8, stochastic_rounding=True),
        "umup_compile.optim.Adam(state_dtype=torch.int8, stochastic_rounding=True), "
        "bf16 params, compiled",
        dtype=BF16,
    ),
    "torchao-adamw8bit": ContestantSpec(
        _torchao_adamw8bit(),
        "torchao.optim.AdamW8bit(weight_decay=0), 1 group (optional: pip install "
        "torchao)",
        needs="torchao",
    ),
    "bnb-adamw8bit": ContestantSpec(
        _bnb_adamw8bit(),
        "bitsandbytes.optim.AdamW8bit(weight_decay=0), 1 group (optional: pip "
        "install bitsandbytes)",
        needs="bitsandbytes",
    ),
    # The same on the run's --dtype (the default list: the GPT-like fp32 run).
    "heavyball": ContestantSpec(
        _heavyball_adamw(),
        "heavyball AdamW(weight_decay=0), 1 group (optional: pip install heavyball)",
        needs="heavyball",
        clears_grads=True,
    ),
}
DEFAULT_CONTESTANTS = [
    "umup-compiled",
    "umup-eager",
    "us-default",
    "us-fused",
    BASELINE,
    "torch-foreach",
    "torch-compiled",
    "umup-capturable",
    "heavyball",
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
# 8-bit state (``--dtype int8-state``), against torch fused on float32 state.
INT8_CONTESTANTS = [
    "umup-int8",
    "umup-compiled",
    BASELINE,
    "torchao-adamw8bit",
    "bnb-adamw8bit",
    "umup-bf16-int8-sr",
]
INT8_SMOKE_CONTESTANTS = [
    "umup-int8-eager",
    BASELINE,
    "torchao-adamw8bit",
    "bnb-adamw8bit",
]


def skip_reason(name: str, device: torch.device) -> str | None:
    """Why contestant ``name`` cannot run here (a missing optional package, no CUDA)."""
    spec = CONTESTANTS[name]
    if spec.cuda_only and device.type != "cuda":
        return "needs a CUDA device"
    if spec.needs is None or importlib.util.find_spec(spec.needs) is not None:
        return None
    return f"`import {spec.needs}` failed (optional; pip install {spec.needs})"


def build_contestant(name: str, params: list[nn.Parameter]) -> Contestant:
    spec = CONTESTANTS[name]
    opt = spec.build(params)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule)
    if spec.mode == "graph":
        return Contestant(name, opt, _graph_step(opt), sched)
    if spec.mode == "step" and spec.clears_grads:
        # Gradients are set once in this benchmark: give them back before each step
        # (51 attribute writes, microseconds), or later steps would do nothing.
        grads = [p.grad for p in params]

        def step_with_grads() -> None:
            for p, g in zip(params, grads):
                p.grad = g
            opt.step()

        return Contestant(name, opt, step_with_grads, sched)
    if spec.mode == "step":
        return Contestant(name, opt, opt.step, sched)
    if spec.mode == "clip":

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
