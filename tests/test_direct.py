"""Direct calls (Note [direct calls]): steady steps run the compiled graph without
Dynamo, with the numbers of the Dynamo path, and every change the guards would have
caught sends the call back through Dynamo."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import Tensor
from torch._dynamo.testing import CompileCounter
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from tests.helpers import (
    TOLERANCES,
    TOY_SPECS,
    assert_states_close,
    clone_params,
    run_steps,
    set_grads,
    step_scheduled_against,
    toy_params,
    use_backend,
)
from umup_compile import _direct
from umup_compile._direct import Capture, Graph, Site
from umup_compile._engine import CompiledEngine
from umup_compile.optim import SGD, Adam

# Two parameters large enough for the unrolled unit (static shapes), two small ones
# that join it: one static graph per step.
SPECS: list[tuple[str, tuple[int, ...], str, int | None]] = [
    ("embed", (128, 128), "weight", None),
    ("block.w", (128, 136), "weight", 4),
    ("block.b", (128,), "bias", 4),
    ("norm", (128,), "norm", None),
]


def _sites(opt: torch.optim.Optimizer) -> list[Site]:
    runner = opt._runner  # type: ignore[attr-defined]
    return [c.site for p in runner.plans for c in p.calls if c.site is not None]


def _direct_calls(opt: torch.optim.Optimizer) -> int:
    return sum(s.direct_calls for s in _sites(opt))


@pytest.fixture
def no_direct(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every call through Dynamo (the reference path)."""
    monkeypatch.setattr(Site, "run", lambda self, args, rest: False)
    yield


def _pair(
    cls: type, backend: Any = "aot_eager", specs: Any = SPECS, **kwargs: Any
) -> tuple[list[Tensor], list[Tensor], Any, Any]:
    params = toy_params(specs=specs)
    ref_params = clone_params(params)
    opt = cls(params, compile="strict", **kwargs)
    ref = cls(ref_params, compile=False, **kwargs)
    if backend != "inductor":
        use_backend(opt, backend)
    return params, ref_params, opt, ref


@pytest.mark.parametrize(
    "cls,kwargs",
    [
        (Adam, {"lr": 0.01, "weight_decay": 0.1}),
        (SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
    ],
    ids=["adam", "sgd"],
)
def test_steady_steps_call_the_graph_directly_with_eager_numbers(cls, kwargs) -> None:  # noqa: ANN001
    params, ref_params, opt, ref = _pair(cls, **kwargs)
    step_scheduled_against(opt, ref, [params, ref_params], 5)
    (site,) = _sites(opt)  # one unit: its first step compiles, the rest are direct
    assert site.direct_calls >= 3


def test_a_pack_with_symbolic_sizes_is_called_directly() -> None:
    """Small parameters only: the pack's dynamic-shape graph takes its sizes as
    inputs, read from the tensors at each direct call."""
    params, ref_params, opt, ref = _pair(Adam, specs=TOY_SPECS, lr=0.01)
    for _ in range(4):
        run_steps([opt, ref], [params, ref_params], 1)
        assert_states_close(opt, ref, **TOLERANCES[torch.float32])
    (site,) = _sites(opt)
    assert site.plan is not None and site.plan.sizes
    assert site.direct_calls == 3


def test_direct_calls_are_bitwise_the_dynamo_path_under_inductor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same compiled graph, reached with and without Dynamo (Inductor numerics,
    a schedule, gradients in other strides, then a parameter in other strides: a
    graph that bakes in strides)."""
    kwargs = {"lr": 0.01, "weight_decay": 0.1}
    params = toy_params(specs=SPECS)
    ref_params, eager_params = clone_params(params), clone_params(params)
    opt = Adam(params, compile="strict", **kwargs)
    ref = Adam(ref_params, compile="strict", **kwargs)
    eager = Adam(eager_params, compile=False, **kwargs)
    sets = [params, ref_params, eager_params]
    for s in range(6):
        set_grads(sets, seed=s)
        if s >= 2:  # the same values in transposed memory
            for ps in sets:
                ps[0].grad = ps[0].grad.t().contiguous().t()
        if s == 4:
            for ps in sets:
                ps[1].data = ps[1].data.t().contiguous().t()
        opt.step()
        eager.step()
        with monkeypatch.context() as m:
            m.setattr(Site, "run", lambda self, args, rest: False)
            ref.step()
        for o in (opt, ref, eager):
            o.param_groups[0]["lr"] *= 0.5
        assert_states_close(opt, ref, rtol=0, atol=0)
        assert_states_close(opt, eager, **TOLERANCES[torch.float32])
    # Step 4 gathered again and rebuilt the layout (a strided parameter leaves the
    # unrolled unit for a strided one; the unit left behind is a new membership:
    # a chunk and a pack): step 5 called those three directly.
    assert _direct_calls(opt) == 3
    assert _direct_calls(ref) == 0


def _steps_with(
    opt: Any,
    ref: Any,
    params: list[Tensor],
    ref_params: list[Tensor],
    change: Any,
    steps: int = 2,
) -> None:
    """Warm up, apply ``change`` to both parameter sets, step on and compare."""
    run_steps([opt, ref], [params, ref_params], 2)
    change(params)
    change(ref_params)
    for s in range(steps):
        set_grads([params, ref_params], seed=10 + s)
        opt.step()
        ref.step()
    assert_states_close(opt, ref, **TOLERANCES[torch.float32])


def test_a_gradient_in_other_strides_reaches_the_graph_contiguous() -> None:
    """Gradients are made contiguous before a unit's graph (``unit_lists``), so a
    transposed one keeps the direct call, with the same numbers."""
    params, ref_params, opt, ref = _pair(Adam, lr=0.01)
    run_steps([opt, ref], [params, ref_params], 3)
    assert _direct_calls(opt) == 2
    for s in range(2):
        set_grads([params, ref_params], seed=7 + s)
        for ps in (params, ref_params):  # same values, transposed memory
            ps[0].grad = ps[0].grad.t().contiguous().t()
        opt.step()
        ref.step()
        assert_states_close(opt, ref, **TOLERANCES[torch.float32])
    assert _direct_calls(opt) == 4


def test_parameter_data_swapped_for_other_strides_goes_back_through_dynamo() -> None:
    params, ref_params, opt, ref = _pair(Adam, lr=0.01)

    def change(ps: list[Tensor]) -> None:
        ps[1].data = ps[1].data.t().contiguous().t()

    _steps_with(opt, ref, params, ref_params, change)
    # The changed step gathered again and rebuilt the layout (a strided unit, and the
    # rest as a chunk and a pack): the next step called those three directly.
    assert _direct_calls(opt) == 3


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        self.ops += 1
        return func(*args, **(kwargs or {}))


class _PassThrough(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    "context",
    [
        lambda: torch.compiler.set_stance("force_eager"),
        _CountOps,
        _PassThrough,  # a torch function mode (other than a default device)
    ],
    ids=["stance", "dispatch-mode", "function-mode"],
)
def test_contexts_a_direct_call_would_skip_go_through_dynamo(context: Any) -> None:
    params, ref_params, opt, ref = _pair(Adam, lr=0.01)
    run_steps([opt, ref], [params, ref_params], 3)
    (site,) = _sites(opt)
    calls = site.direct_calls
    with context() as mode:
        run_steps([opt, ref], [params, ref_params], 2)
    assert site.direct_calls == calls
    if isinstance(mode, _CountOps):
        assert mode.ops > 0  # the mode saw the step's ops
    run_steps([opt, ref], [params, ref_params], 2)
    assert site.direct_calls > calls
    assert_states_close(opt, ref, **TOLERANCES[torch.float32])


def test_a_grad_scaler_arriving_later_is_applied() -> None:
    """New optional arguments (the scaler's tensors) change the call's structure:
    that call goes through Dynamo, and the next ones are direct again."""
    params, ref_params, opt, ref = _pair(Adam, lr=0.01)
    run_steps([opt, ref], [params, ref_params], 3)
    scale = torch.tensor(4.0)
    for o in (opt, ref):
        o.grad_scale = scale  # what GradScaler.step sets (Note [skipped steps])
        o.found_inf = torch.tensor(0.0)
    for s in range(3):
        set_grads([params, ref_params], seed=20 + s)
        for ps in (params, ref_params):
            for p in ps:
                p.grad.mul_(scale)
        opt.step()
        ref.step()
        assert_states_close(opt, ref, **TOLERANCES[torch.float32])
    (site,) = _sites(opt)
    assert site.direct_calls >= 3  # 2 before the scaler, >= 1 after


def test_compiled_clip_call_is_direct_on_steady_steps() -> None:
    params, ref_params, opt, ref = _pair(Adam, lr=0.01, max_grad_norm=0.5)
    run_steps([opt, ref], [params, ref_params], 4)
    assert_states_close(opt, ref, **TOLERANCES[torch.float32])
    assert opt._runner.clip.site.direct_calls == 3  # type: ignore[attr-defined]
    for o in (opt, ref):
        o.max_grad_norm = 0.25  # a new threshold tensor, same structure
    run_steps([opt, ref], [params, ref_params], 2)
    assert_states_close(opt, ref, **TOLERANCES[torch.float32])
    torch.testing.assert_close(opt.last_grad_norm, ref.last_grad_norm)


# -- the engine's sites -----------------------------------------------------------


def _axpy(xs: list[Tensor], ys: list[Tensor], a: Tensor, *, config: Any = None) -> None:
    for x, y in zip(xs, ys):
        x.add_(y * a)


def test_engine_site_checks_its_loose_tensors() -> None:
    engine = CompiledEngine(strict=True, backend="aot_eager")
    xs, ys = [torch.zeros(3), torch.zeros(2)], [torch.ones(3), torch.ones(2)]
    site = Site()
    for a in (1.0, 2.0, 3.0):
        engine(_axpy, (xs, ys, torch.tensor(a)), {"config": None}, "axpy", True, site)
    assert site.direct_calls == 2
    assert xs[0].tolist() == [6.0] * 3
    # A loose tensor of another dtype: through Dynamo (a recompile), then direct.
    for _ in range(2):
        engine(
            _axpy,
            (xs, ys, torch.tensor(1, dtype=torch.float64)),
            {"config": None},
            "axpy",
            True,
            site,
        )
    assert site.direct_calls == 3
    assert xs[1].tolist() == [8.0] * 2
    # Another list length is another structure.
    engine(
        _axpy, (xs[:1], ys[:1], torch.tensor(1.0)), {"config": None}, "axpy", True, site
    )
    assert site.direct_calls == 3
    assert xs[0].tolist() == [9.0] * 3 and xs[1].tolist() == [8.0] * 2


_GLOBAL = torch.ones(2)


def _reads_a_global(xs: list[Tensor], *, config: Any = None) -> None:
    xs[0].add_(_GLOBAL)


def _returns(xs: list[Tensor], *, config: Any = None) -> Tensor:
    return xs[0] * 2


@pytest.mark.parametrize("fn", [_reads_a_global, _returns])
def test_graphs_a_site_cannot_read_stay_on_the_dynamo_path(fn: Any) -> None:
    engine = CompiledEngine(strict=True, backend="eager")
    xs = [torch.zeros(2)]
    site = Site()
    for _ in range(3):
        engine(fn, (xs,), {"config": None}, "g", True, site)
    assert site.plan is None and site.direct_calls == 0


def test_a_tensor_passed_twice_is_not_planned() -> None:
    engine = CompiledEngine(strict=True, backend="eager")
    x = torch.ones(2)
    site = Site()
    for _ in range(3):
        engine(
            _axpy, ([x], [x], torch.tensor(1.0)), {"config": None}, "twice", True, site
        )
    assert site.plan is None
    assert x.tolist() == [8.0, 8.0]  # x += x, three times


def test_capture_records_the_graph_that_ran() -> None:
    capture = Capture(torch._dynamo.lookup_backend("eager"))
    compiled = torch.compile(_axpy, backend=capture, fullgraph=True, dynamic=False)
    xs, ys = [torch.zeros(2)], [torch.ones(2)]
    compiled(xs, ys, torch.tensor(1.0))
    first = capture.last
    assert isinstance(first, Graph)
    assert sorted(first.sources) == [
        ("a", None, None),
        ("xs", 0, None),
        ("ys", 0, None),
    ]
    capture.last = None
    compiled(xs, ys, torch.tensor(1.0))  # a cache hit still reports its graph
    assert capture.last is first


def test_source_names_of_either_form() -> None:
    class Old:
        def name(self) -> str:
            return "L['xs'][0]"

    class New:
        name = "L['xs'][0]"

    assert _direct._name(Old()) == _direct._name(New()) == "L['xs'][0]"


def test_a_step_under_a_dispatch_mode_runs_eagerly_and_compiling_resumes() -> None:
    """Dynamo skips frames under a dispatch mode; that is not a compile failure."""
    params, ref_params, opt, ref = _pair(Adam, lr=0.01)
    opt._engine = CompiledEngine(backend="aot_eager")  # the default: may fall back
    run_steps([opt, ref], [params, ref_params], 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with _CountOps() as mode:
            run_steps([opt, ref], [params, ref_params], 1)
    assert mode.ops > 0 and opt._engine.failed is None
    run_steps([opt, ref], [params, ref_params], 2)
    assert _direct_calls(opt) == 3  # the site outlives the eager call
    assert_states_close(opt, ref, **TOLERANCES[torch.float32])


def test_dynamo_reset_makes_the_next_call_compile_again() -> None:
    params, ref_params, opt, ref = _pair(Adam, lr=0.01)
    counter = CompileCounter()
    use_backend(opt, counter)
    run_steps([opt, ref], [params, ref_params], 3)
    assert counter.frame_count == 1 and _direct_calls(opt) == 2
    torch._dynamo.reset()
    run_steps([opt, ref], [params, ref_params], 2)
    assert counter.frame_count == 2  # compiled again, then direct again
    assert _direct_calls(opt) == 3
    assert_states_close(opt, ref, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("how", ["with_device", "set_default_device"])
def test_a_default_device_keeps_direct_calls(how: str) -> None:
    # torch.set_default_device("cuda") is a torch function mode for the whole run:
    # every step went through Dynamo's guards. The update gives every tensor it makes
    # its device, so its graphs compute the same under one (Inductor's too).
    params, ref_params, opt, ref = _pair(Adam, backend="inductor", lr=0.01)
    run_steps([opt, ref], [params, ref_params], 3)
    (site,) = _sites(opt)
    calls = site.direct_calls
    if how == "with_device":
        with torch.device("cpu"):
            run_steps([opt, ref], [params, ref_params], 3)
    else:
        torch.set_default_device("cpu")
        try:
            run_steps([opt, ref], [params, ref_params], 3)
        finally:
            torch.set_default_device(None)
    assert site.direct_calls == calls + 3
    assert_states_close(opt, ref, **TOLERANCES[torch.float32])
