"""opt.step() inside a user's torch.compile(train_step, fullgraph=True)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from tests.helpers import (
    TOLERANCES,
    ToyUmupNet,
    fullgraph_train_step,
    needs_traced_step,
    use_backend,
)
from umup_compile.optim import SGD, AdamW

# (id, class, options, two param groups). SGD's traced config reads the state: with
# two groups it once met the second group's parameters as state keys first, and
# recompiled at every step (FailOnRecompileLimitHit at the 9th under fullgraph).
CASES = [
    ("adamw", AdamW, {"weight_decay": 0.1, "amsgrad": True}, False),
    ("sgd_nesterov", SGD, {"momentum": 0.9, "nesterov": True}, False),
    ("sgd_momentum_two_groups", SGD, {"momentum": 0.9}, True),
]


def _groups(net: torch.nn.Module, two: bool) -> list[dict[str, object]]:
    params = list(net.parameters())
    if not two:
        return [{"params": params}]
    return [{"params": params[:2]}, {"params": params[2:], "weight_decay": 0.01}]


@needs_traced_step
@pytest.mark.parametrize(
    "cls,kwargs,two_groups", [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
@pytest.mark.filterwarnings("ignore:Detected call of:UserWarning")
def test_fullgraph_train_step_no_breaks_no_recompiles(cls, kwargs, two_groups) -> None:  # noqa: ANN001
    net, ref_net = ToyUmupNet(), ToyUmupNet()
    ref_net.load_state_dict(net.state_dict())
    # A tensor lr, filled in place by the scheduler: no graph constant to recompile on.
    opt = cls(_groups(net, two_groups), lr=torch.tensor(0.05), **kwargs)
    ref = cls(_groups(ref_net, two_groups), lr=0.05, compile=False, **kwargs)
    scheds = [
        torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1 / (1 + s)) for o in (opt, ref)
    ]
    tokens = torch.randint(0, 32, (4, 8))
    counter = CompileCounter()

    train_step = fullgraph_train_step(lambda t: net.loss(t, t), opt, counter)

    frames = []
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        for _ in range(30):
            loss = train_step(tokens)
            ref_loss = ref_net.loss(tokens, tokens)
            ref_loss.backward()
            ref.step()
            ref.zero_grad()
            for s in scheds:
                s.step()
            frames.append(counter.frame_count)
            torch.testing.assert_close(
                loss, ref_loss.detach(), **TOLERANCES[torch.float32]
            )
    # The first step creates the state; every later step reuses one graph.
    assert frames[1:] == [2] * 29
    for p, q in zip(net.parameters(), ref_net.parameters()):
        torch.testing.assert_close(p, q, **TOLERANCES[torch.float32])
        assert p.grad is None


def test_zero_grad_set_to_none_false_keeps_zeroed_tensors() -> None:
    net = ToyUmupNet()
    opt = AdamW(net.parameters(), compile=False)
    net.loss(
        torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long)
    ).backward()
    grads = [p.grad for p in net.parameters()]
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is g and not g.any() for p, g in zip(net.parameters(), grads))


@pytest.mark.parametrize("engine", ["eager", "compiled"])
def test_torch_older_than_2_11_runs_the_step_outside_the_users_graph(
    monkeypatch: pytest.MonkeyPatch, engine: str
) -> None:
    # Where the traced step is unsupported, Dynamo meets a disabled call: it runs
    # opt.step() untraced (fullgraph=False), or reports it (fullgraph=True). The
    # step, untraced, compiles its own graphs: it raised to break the graph, and
    # Dynamo then traced the engine's frames, which failed (torch 2.6: "Attempt to
    # trace forbidden callable maybe_mark_dynamic", after minutes of tracing).
    # (On torch 2.6 itself the flag is False and this is the real behaviour.)
    from umup_compile import _runner

    monkeypatch.setattr(_runner, "TRACED_STEP_SUPPORTED", False)
    torch._dynamo.reset()
    net, ref_net = ToyUmupNet(), ToyUmupNet()
    ref_net.load_state_dict(net.state_dict())
    opt = AdamW(net.parameters(), lr=0.05, compile=engine == "compiled")
    if engine == "compiled":
        use_backend(opt, "eager")
    ref = AdamW(ref_net.parameters(), lr=0.05, compile=False)
    tokens = torch.randint(0, 32, (4, 8))

    @torch.compile(backend="eager", fullgraph=True)
    def strict() -> None:
        opt.step()

    net.loss(tokens, tokens).backward()
    # Dynamo reports the raise (its words vary by version), or passes it on
    with pytest.raises((torch._dynamo.exc.Unsupported, RuntimeError)):
        strict()
    opt.zero_grad()
    torch._dynamo.reset()

    @torch.compile(backend="eager")
    def step() -> None:
        opt.step()

    for _ in range(3):
        for model, o, run in ((net, opt, step), (ref_net, ref, ref.step)):
            model.loss(tokens, tokens).backward()
            run()
            o.zero_grad()
    for p, q in zip(net.parameters(), ref_net.parameters()):
        torch.testing.assert_close(p, q, **TOLERANCES[torch.float32])


@needs_traced_step
@pytest.mark.parametrize("fullgraph", [True, False], ids=["fullgraph", "graph_breaks"])
def test_sgd_with_two_groups_and_new_gradients_compiles_once(fullgraph: bool) -> None:
    """SGD's traced config looks at the state, which walks all its keys: computed per
    group, it met the second group's parameters as state keys before their group, so
    Dynamo guarded their gradients by identity and recompiled at every step (under
    fullgraph, FailOnRecompileLimitHit at the 9th)."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(4, 4, generator=gen)) for _ in range(3)]
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    kwargs = {"lr": 0.05, "momentum": 0.9, "allow_non_unit_scaling_params": True}
    opt = SGD([{"params": ps[:2]}, {"params": ps[2:]}], **kwargs)
    ref = SGD([{"params": qs[:2]}, {"params": qs[2:]}], compile=False, **kwargs)
    counter = CompileCounter()
    step = torch.compile(opt.step, backend=counter, fullgraph=fullgraph)
    for s in range(12):
        for p, q in zip(ps, qs):  # new gradient tensors at every step
            p.grad = torch.sin(p.detach() + s)
            q.grad = torch.sin(q.detach() + s)
        step()
        ref.step()
    assert counter.frame_count == 2  # the first step's, then the steady one
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p, q, **TOLERANCES[torch.float32])


@needs_traced_step
def test_a_closure_inside_the_users_compile_raises() -> None:
    """``torch.compile(opt.step, fullgraph=True)(closure)``: the closure's backward
    cannot be traced into the step, which read wrong gradients (0.05 off eager after
    4 steps, with ``trace_autograd_ops``); torch's optimizers refuse it, so do we."""
    torch._dynamo.reset()
    p = torch.nn.Parameter(torch.randn(8, 8))
    opt = SGD([p], lr=0.05, allow_non_unit_scaling_params=True)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    before = p.detach().clone()
    with pytest.raises(Exception, match=r"opt.step\(closure\) inside torch.compile"):
        torch.compile(opt.step, fullgraph=True)(closure)
    torch.testing.assert_close(p.detach(), before, rtol=0, atol=0)


def _side_by_side(
    opt: torch.optim.Optimizer,
    traced: Callable[[], object],
    ref: torch.optim.Optimizer,
    p: torch.Tensor,
    q: torch.Tensor,
    key: str,
    plan: list[tuple[float, bool]],
) -> None:
    """Step ``opt`` (over ``p``; traced where the plan says so) and ``ref`` (over
    ``q``) with ``key`` set to the plan's value, comparing after every step."""
    for s, (value, in_compile) in enumerate(plan):
        for o, t in ((opt, p), (ref, q)):
            o.param_groups[0][key] = value
            t.grad = torch.sin(t.detach() * 3) + 0.1 * s
        traced() if in_compile else opt.step()
        ref.step()
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12, msg=f"step {s}")


@needs_traced_step
@pytest.mark.parametrize(
    "cls,kwargs,key,values",
    [
        (AdamW, {"weight_decay": 0.1}, "weight_decay", (0.1, 0.5)),
        (SGD, {"momentum": 0.9}, "momentum", (0.9, 0.5)),
    ],
    ids=["adamw_weight_decay", "sgd_momentum"],
)
def test_plain_steps_after_a_traced_step_read_their_own_hypers(
    cls, kwargs, key, values
) -> None:  # noqa: ANN001
    """Plain ``opt.step()`` calls around one traced inside the user's compile, with a
    hyper-parameter set back to the value the last plain step saw: the traced step
    refreshes the hyper table, so the next plain step must compare the key again (it
    took it as unchanged from its own last step, and used the traced step's value)."""
    torch._dynamo.reset()
    base = torch.randn(8, 8, dtype=torch.float64)
    p, q = torch.nn.Parameter(base.clone()), torch.nn.Parameter(base.clone())
    common = {"lr": 0.05, "allow_non_unit_scaling_params": True, **kwargs}
    opt, ref = cls([p], **common), cls([q], compile=False, **common)
    traced = torch.compile(opt.step, fullgraph=True)
    plan = [
        (values[0], False),
        (values[1], True),
        (values[0], False),
        (values[1], False),
    ]
    _side_by_side(opt, traced, ref, p, q, key, plan)


@needs_traced_step
@pytest.mark.parametrize("dampening", [0.0, 0.5])
def test_sgd_momentum_set_to_zero_between_traced_steps_skips_the_buffer(
    dampening: float,
) -> None:
    """SGD's traced config keeps momentum on where buffers exist (a scheduled
    momentum is no graph constant); set to 0, torch uses the gradient as it is and
    keeps the buffer for later. The traced step overwrote the buffer with the
    gradient (0.06-0.09 off torch)."""
    torch._dynamo.reset()
    base = torch.randn(8, 8, dtype=torch.float64)
    p, q = torch.nn.Parameter(base.clone()), torch.nn.Parameter(base.clone())
    kwargs = {"lr": 0.05, "momentum": 0.9, "dampening": dampening}
    opt = SGD([p], allow_non_unit_scaling_params=True, **kwargs)
    ref = torch.optim.SGD([q], foreach=False, **kwargs)
    traced = torch.compile(opt.step, fullgraph=True)
    plan = [(momentum, True) for momentum in (0.9, 0.9, 0.0, 0.0, 0.9, 0.9)]
    _side_by_side(opt, traced, ref, p, q, "momentum", plan)
