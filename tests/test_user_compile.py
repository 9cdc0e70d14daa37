"""Float hyper-parameters and any scheduler inside the user's own compiled step.

Users write ``lr=1e-2`` and attach a scheduler; the step must trace into their
``torch.compile(train_step, fullgraph=True)`` without graph breaks and without a
recompile per scheduled value (Note [traced hypers]), with the numbers of the same
loop run eagerly. Graphs are counted with the ``eager``/``aot_eager`` backends (the
numerics of Inductor's kernels are tested elsewhere); one test counts Inductor's own
compiles.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch._dynamo.testing import CompileCounter, CompileCounterWithBackend
from torch.optim import lr_scheduler as lrs

from tests.helpers import (
    TOLERANCES,
    ToyUmupNet,
    fullgraph_train_step,
    needs_traced_step,
)
from umup_compile.optim import SGD, Adam, AdamW

pytestmark = needs_traced_step
CALLS = 30


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> None:
    # Every test compiles a function of the same code object: without a reset, the
    # cache entries of earlier tests count toward Dynamo's recompile limit.
    torch._dynamo.reset()


# name -> (class, options): every float hyper-parameter the update reads is in play.
OPTIMIZERS: dict[str, tuple[type, dict[str, Any]]] = {
    "adam": (Adam, {"lr": 0.05, "weight_decay": 0.1}),
    "adamw_amsgrad": (AdamW, {"lr": 0.05, "weight_decay": 0.1, "amsgrad": True}),
    "sgd_nesterov": (
        SGD,
        {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.1},
    ),
    "sgd_dampening": (
        SGD,
        {"lr": 0.05, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.1},
    ),
}


def _manual(opt: torch.optim.Optimizer, call: int) -> None:
    """Edits by hand, as recipes do: a value of every hyper-parameter, first at a
    late call (a compile that specialised on it would recompile there)."""
    if call % 7 != 6:
        return
    for group in opt.param_groups:
        group["lr"] = group["lr"] * 0.8
        group["weight_decay"] = group["weight_decay"] * 0.5
        if "betas" in group:
            b1, b2 = group["betas"]
            group["betas"] = (b1 * 0.99, b2 * 0.999)
            group["eps"] = group["eps"] * 2
        else:
            group["momentum"] = group["momentum"] * 0.95
            if not group["nesterov"]:
                group["dampening"] = group["dampening"] + 0.05


class _Manual:
    """A "scheduler" that edits the groups by hand."""

    def __init__(self, opt: torch.optim.Optimizer) -> None:
        self.opt, self.call = opt, 0

    def step(self) -> None:
        _manual(self.opt, self.call)
        self.call += 1


class _Plateau:
    """ReduceLROnPlateau fed a rising metric: it cuts lr every 4 calls, from call 5."""

    def __init__(self, opt: torch.optim.Optimizer) -> None:
        self.inner = lrs.ReduceLROnPlateau(opt, factor=0.5, patience=3)
        self.call = 0

    def step(self) -> None:
        self.call += 1
        self.inner.step(float(self.call))


SCHEDULERS: dict[str, Callable[[torch.optim.Optimizer], Any]] = {
    "step": lambda o: lrs.StepLR(o, step_size=1, gamma=0.9),
    "cosine": lambda o: lrs.CosineAnnealingLR(o, T_max=CALLS),
    # cycles betas (Adam) or momentum (SGD) too
    "one_cycle": lambda o: lrs.OneCycleLR(o, max_lr=0.05, total_steps=CALLS + 1),
    "lambda": lambda o: lrs.LambdaLR(o, lambda s: 1 / (1 + s)),
    "plateau": _Plateau,
    "sequential": lambda o: lrs.SequentialLR(
        o,
        [lrs.LinearLR(o, start_factor=0.2, total_iters=5), lrs.ExponentialLR(o, 0.9)],
        milestones=[5],
    ),
    "manual": _Manual,
}


def _pair(name: str, **extra: Any) -> tuple[Any, ...]:
    """Two equal nets, each with its optimizer: ours compiled by the user, and the
    reference run eagerly with ``compile=False``."""
    cls, kwargs = OPTIMIZERS[name]
    net, ref_net = ToyUmupNet(), ToyUmupNet()
    ref_net.load_state_dict(net.state_dict())
    opt = cls(net.parameters(), **kwargs, **extra)
    ref = cls(ref_net.parameters(), **kwargs, **extra, compile=False)
    return net, opt, ref_net, ref


def _assert_same(net: torch.nn.Module, ref_net: torch.nn.Module, opt: Any, ref: Any):
    for p, q in zip(net.parameters(), ref_net.parameters()):
        torch.testing.assert_close(p, q, **TOLERANCES[torch.float32])
        for key, value in ref.state[q].items():
            torch.testing.assert_close(
                opt.state[p][key], value, **TOLERANCES[torch.float32]
            )
    for g, h in zip(opt.param_groups, ref.param_groups):  # the schedule was applied
        assert g["lr"] == h["lr"]


TOKENS = torch.randint(0, 32, (4, 8), generator=torch.Generator().manual_seed(0))


def _ref_step(ref_net: torch.nn.Module, ref: Any, zero_grad: bool = True) -> None:
    ref_net.loss(TOKENS, TOKENS).backward()
    ref.step()
    if zero_grad:
        ref.zero_grad()


@pytest.mark.parametrize("sched", list(SCHEDULERS))
@pytest.mark.parametrize("name", list(OPTIMIZERS))
@torch._dynamo.config.patch(trace_autograd_ops=True)
def test_float_hypers_any_scheduler_fullgraph_train_step(name: str, sched: str):
    net, opt, ref_net, ref = _pair(name)
    scheds = [SCHEDULERS[sched](o) for o in (opt, ref)]
    counter = CompileCounter()

    train_step = fullgraph_train_step(lambda t: net.loss(t, t), opt, counter)

    frames = []
    for _ in range(CALLS):
        train_step(TOKENS)
        _ref_step(ref_net, ref)
        for s in scheds:
            s.step()
        frames.append((counter.frame_count, counter.op_count > 0))
    # Call 1 creates the state, call 2 compiles the steady step; nothing after.
    assert [f for f, _ in frames[1:]] == [2] * (CALLS - 1), frames
    _assert_same(net, ref_net, opt, ref)
    assert all(p.grad is None for p in net.parameters())


@pytest.mark.parametrize("form", ["compile_step_method", "decorated_step"])
@pytest.mark.parametrize("name", ["adamw_amsgrad", "sgd_nesterov"])
def test_user_compiles_only_the_step(name: str, form: str):
    # torch's compiled-optimizer recipe: torch.compile(opt.step) or a decorated
    # function that calls it, with the backward outside.
    net, opt, ref_net, ref = _pair(name)
    scheds = [SCHEDULERS["one_cycle"](o) for o in (opt, ref)]
    counter = CompileCounter()
    if form == "compile_step_method":
        step = torch.compile(opt.step, fullgraph=True, backend=counter)
    else:

        @torch.compile(fullgraph=True, backend=counter)
        def step() -> None:
            opt.step()

    for call in range(CALLS):
        net.loss(TOKENS, TOKENS).backward()
        step()
        opt.zero_grad()
        _ref_step(ref_net, ref)
        for s in scheds:
            s.step()
        _manual(opt, call)
        _manual(ref, call)
        if call >= 1:
            assert counter.frame_count == 2, call
    _assert_same(net, ref_net, opt, ref)


@torch._dynamo.config.patch(trace_autograd_ops=True)
def test_bf16_autocast_forward_with_float_hypers():
    # A GradScaler-free bf16 autocast forward; the parameters and update stay fp32.
    net, opt, ref_net, ref = _pair("adamw_amsgrad")
    scheds = [SCHEDULERS["cosine"](o) for o in (opt, ref)]
    counter = CompileCounterWithBackend("aot_eager")

    def loss_of(model: ToyUmupNet) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model.loss(TOKENS, TOKENS)

    train_step = fullgraph_train_step(lambda: loss_of(net), opt, counter)

    for call in range(CALLS):
        train_step()
        loss_of(ref_net).backward()
        ref.step()
        ref.zero_grad()
        for s in scheds:
            s.step()
        if call >= 1:
            assert counter.frame_count == 2, call
    _assert_same(net, ref_net, opt, ref)


@torch._dynamo.config.patch(trace_autograd_ops=True)
def test_float_and_tensor_hypers_mixed_across_groups_and_group_added():
    # One group with a float lr, one with a tensor lr (filled in place); then a group
    # is added, which recompiles once (the group count is part of the graph).
    net, _, ref_net, _ = _pair("adam")
    ps, qs = list(net.parameters()), list(ref_net.parameters())

    def make(params: list[torch.Tensor], **kw: Any) -> Adam:
        return Adam(
            [{"params": params[:2], "lr": torch.tensor(0.02)}, {"params": params[2:4]}],
            lr=0.05,
            **kw,
        )

    opt, ref = make(ps), make(qs, compile=False)
    scheds = [lrs.StepLR(o, step_size=1, gamma=0.9) for o in (opt, ref)]
    counter = CompileCounter()

    @torch.compile(fullgraph=True, backend=counter)
    def train_step() -> None:
        net.loss(TOKENS, TOKENS).backward()
        opt.step()
        opt.zero_grad()

    frames = []
    for call in range(12):
        if call == 6:
            for o, params in ((opt, ps), (ref, qs)):
                o.add_param_group({"params": params[4:], "lr": 0.01})
        train_step()
        _ref_step(ref_net, ref)
        for s in scheds:
            s.step()
        frames.append(counter.frame_count)
    assert frames[1:6] == [2] * 5, frames
    # the added group: its state (call 7) and its steady graph (call 8)
    assert frames[7:] == [frames[7]] * 5 and frames[7] <= 4, frames
    _assert_same(net, ref_net, opt, ref)


@torch._dynamo.config.patch(trace_autograd_ops=True)
def test_inductor_compiles_nothing_after_call_2_with_a_float_lr_schedule():
    # The real backend: Inductor's compile count, not only Dynamo's frames.
    from torch._dynamo.utils import counters

    net, opt, ref_net, ref = _pair("adam")
    scheds = [SCHEDULERS["one_cycle"](o) for o in (opt, ref)]

    train_step = fullgraph_train_step(lambda: net.loss(TOKENS, TOKENS), opt)

    compiles = []
    for _ in range(12):
        train_step()
        _ref_step(ref_net, ref)
        for s in scheds:
            s.step()
        compiles.append(
            (
                counters["stats"]["unique_graphs"],
                counters["inductor"]["fxgraph_cache_miss"]
                + counters["inductor"]["fxgraph_cache_hit"],
            )
        )
    assert compiles[1][0] >= 2 and compiles[1][1] >= 2, compiles  # graphs of calls 1, 2
    assert compiles[2:] == [compiles[1]] * 10, compiles
    _assert_same(net, ref_net, opt, ref)


@pytest.mark.parametrize("name", ["adam", "sgd_dampening"])
def test_groups_edited_before_the_step_in_the_compiled_function(name: str) -> None:
    # Note [edits in the traced frame]: the step read the last call's values (Dynamo
    # writes the frame's dict edits back after the graph): 0.13 off after 5 calls.
    # Now the graph breaks before the step (fullgraph=False), or it raises.
    net, opt, ref_net, ref = _pair(name)

    def warm_up(o: torch.optim.Optimizer, call: int) -> None:
        for group in o.param_groups:
            group["lr"] = 0.01 * (call + 1)
            group["weight_decay"] = 0.02 * (call + 1)

    def body(call: int) -> None:
        net.loss(TOKENS, TOKENS).backward()
        warm_up(opt, call)
        opt.step()
        opt.zero_grad()

    step = torch.compile(body, backend="eager")
    for call in range(4):
        step(call)
        warm_up(ref, call)
        _ref_step(ref_net, ref)
        _assert_same(net, ref_net, opt, ref)

    def edit_and_step(call: int) -> None:
        warm_up(opt, call)
        opt.step()

    net.loss(TOKENS, TOKENS).backward()
    strict = torch.compile(edit_and_step, backend="eager", fullgraph=True)
    with pytest.raises(Exception, match="edited in the compiled function"):
        strict(4)
