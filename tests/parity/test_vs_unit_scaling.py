"""Parity of ``umup_compile.optim`` with ``unit_scaling.optim``, after every step.

unit_scaling builds one param group per parameter and lets torch.optim do the maths;
ours keeps the caller's groups and runs its own core. Both see identical gradients,
and parameters plus every state tensor are compared after each of ``STEPS`` steps.

Engines: eager (``compile=False``) over the whole grid in float64 and float32; the
compiled engine over the whole grid through the cheap ``aot_eager`` backend (the same
Dynamo graph); real Inductor over a small subset in float32.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
import unit_scaling.optim as uso
from torch import Tensor, nn
from torch._dynamo.testing import CompileCounterWithBackend

import umup_compile as uc
import umup_compile.optim as uo
from tests.helpers import (
    TOLERANCES,
    TOY_SPECS,
    assert_states_close,
    clone_params,
    needs_torch_adam_decoupled,
    set_grads,
    toy_params,
    use_backend,
)
from umup_compile._engine import CompiledEngine

STEPS = 5
# A tensor lr in a table is a template: each optimizer gets its own copy in the
# parameters' dtype (unit_scaling scales a float32 lr in float32).
TENSOR_LR = torch.tensor(1e-2, dtype=torch.float64)

# (id, kwargs) in the style of torch's optim_inputs_func_adam. TOY_SPECS covers every
# mup_type, depth None and 4, and 1-D, 2-D and 3-D shapes.
ADAM_INPUTS: list[tuple[str, dict[str, Any]]] = [
    ("default", {}),
    ("float_lr", {"lr": 3e-2}),
    ("tensor_lr", {"lr": TENSOR_LR}),
    ("betas", {"betas": (0.8, 0.95)}),
    ("eps", {"eps": 1e-3}),
    ("weight_decay", {"weight_decay": 0.1}),
    ("weight_decay_coupled", {"weight_decay": 0.1, "independent_weight_decay": False}),
    ("amsgrad", {"amsgrad": True}),
    ("maximize", {"maximize": True}),
    ("decoupled_weight_decay", {"weight_decay": 0.1, "decoupled_weight_decay": True}),
    (
        "all_options",
        {
            "lr": TENSOR_LR,
            "betas": (0.7, 0.9),
            "eps": 1e-6,
            "weight_decay": 0.05,
            "amsgrad": True,
            "maximize": True,
        },
    ),
]
# AdamW's weight decay is always decoupled.
ADAMW_INPUTS: list[tuple[str, dict[str, Any]]] = [
    case for case in ADAM_INPUTS if "decoupled_weight_decay" not in case[1]
]
SGD_INPUTS: list[tuple[str, dict[str, Any]]] = [
    ("default", {}),
    ("float_lr", {"lr": 3e-2}),
    ("tensor_lr", {"lr": TENSOR_LR}),
    ("momentum", {"momentum": 0.9}),
    ("dampening", {"momentum": 0.9, "dampening": 0.3}),
    ("nesterov", {"momentum": 0.9, "nesterov": True}),
    ("weight_decay", {"weight_decay": 0.1}),
    ("weight_decay_coupled", {"weight_decay": 0.1, "independent_weight_decay": False}),
    ("maximize", {"maximize": True, "momentum": 0.5}),
    ("to_output_scale", {"readout_constraint": "to_output_scale"}),
    (
        "to_output_scale_all_options",
        {
            "lr": TENSOR_LR,
            "readout_constraint": "to_output_scale",
            "momentum": 0.8,
            "dampening": 0.1,
            "weight_decay": 0.05,
            "maximize": True,
        },
    ),
]

# name -> (ours, unit_scaling's, input table)
OPTIMIZERS: dict[str, tuple[type, type, list[tuple[str, dict[str, Any]]]]] = {
    "adam": (uo.Adam, uso.Adam, ADAM_INPUTS),
    "adamw": (uo.AdamW, uso.AdamW, ADAMW_INPUTS),
    "sgd": (uo.SGD, uso.SGD, SGD_INPUTS),
}
GRID = [
    pytest.param(
        name,
        kwargs,
        id=f"{name}_{case_id}",
        marks=[needs_torch_adam_decoupled]
        if "decoupled_weight_decay" in kwargs
        else [],
    )
    for name, (_, _, table) in OPTIMIZERS.items()
    for case_id, kwargs in table
]
# The Inductor subset: one compile each (5-20 s on CPU), so few configs (AdamW covers
# decoupled weight decay), small specs that still cover 1-D, 2-D, 3-D, depth None and 4.
INDUCTOR_SPECS = [TOY_SPECS[0], TOY_SPECS[2], TOY_SPECS[3]]
INDUCTOR_GRID = [
    pytest.param("adam", {}, id="adam_default"),
    pytest.param("adam", dict(ADAM_INPUTS)["all_options"], id="adam_all_options"),
    pytest.param(
        "adamw", {"weight_decay": 0.1, "lr": TENSOR_LR}, id="adamw_tensor_lr_wd"
    ),
    pytest.param(
        "sgd",
        dict(SGD_INPUTS)["nesterov"] | {"weight_decay": 0.1},
        id="sgd_nesterov_wd",
    ),
    pytest.param(
        "sgd", dict(SGD_INPUTS)["to_output_scale_all_options"], id="sgd_to_output_scale"
    ),
]
DTYPES = [
    pytest.param(torch.float64, id="float64"),
    pytest.param(torch.float32, id="float32"),
]


def _materialize(kwargs: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """Fresh kwargs for one optimizer: tensor values copied into ``dtype``."""
    return {
        k: v.to(dtype).clone() if isinstance(v, Tensor) else v
        for k, v in kwargs.items()
    }


def _build(
    name: str,
    kwargs: dict[str, Any],
    dtype: torch.dtype,
    engine: str,
    specs: Sequence[tuple[str, tuple[int, ...], str, int | None]] = TOY_SPECS,
) -> tuple[
    torch.optim.Optimizer, torch.optim.Optimizer, list[nn.Parameter], list[nn.Parameter]
]:
    """(ours, unit_scaling's, our params, their params) on identical initial values."""
    ours_cls, their_cls, _ = OPTIMIZERS[name]
    theirs_params = toy_params(dtype, specs)
    ours_params = clone_params(theirs_params)
    theirs = their_cls(theirs_params, **_materialize(kwargs, dtype))
    ours = ours_cls(
        ours_params, **_materialize(kwargs, dtype), compile=engine != "eager"
    )
    return ours, theirs, ours_params, theirs_params


def _assert_state_layouts_equal(
    ours: torch.optim.Optimizer, theirs: torch.optim.Optimizer
) -> None:
    """State tensors have torch's dtype, device and shape (values are checked elsewhere)."""
    pa = [p for g in ours.param_groups for p in g["params"]]
    pb = [p for g in theirs.param_groups for p in g["params"]]
    for i, (x, y) in enumerate(zip(pa, pb)):
        for key, value in theirs.state[y].items():
            mine = ours.state[x][key]
            assert (mine.dtype, mine.device, mine.shape) == (
                value.dtype,
                value.device,
                value.shape,
            ), (i, key)


def _step_and_compare(
    ours: torch.optim.Optimizer,
    theirs: torch.optim.Optimizer,
    ours_params: Sequence[Tensor],
    theirs_params: Sequence[Tensor],
    dtype: torch.dtype,
    steps: int = STEPS,
    drop: Callable[[int], Sequence[int]] = lambda step: (),
    after_step: Callable[[], None] = lambda: None,
) -> None:
    """Step both on identical gradients, comparing everything after every step.

    ``drop(step)`` lists parameter indices whose gradient is ``None`` at that step;
    ``after_step`` runs after both optimizers stepped (e.g. lr schedulers).
    """
    initial = [p.detach().clone() for p in ours_params]
    for step in range(steps):
        set_grads([ours_params, theirs_params], seed=step)
        for k in drop(step):
            ours_params[k].grad = None
            theirs_params[k].grad = None
        ours.step()
        theirs.step()
        after_step()
        try:
            assert_states_close(ours, theirs, **TOLERANCES[dtype])
        except AssertionError as e:
            raise AssertionError(f"after step {step + 1}: {e}") from e
    _assert_state_layouts_equal(ours, theirs)
    for p, p0 in zip(ours_params, initial):
        assert not torch.equal(p, p0), (
            "a parameter never moved: the comparison is vacuous"
        )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("name", "kwargs"), GRID)
def test_optim_matches_unit_scaling_eager(
    name: str, kwargs: dict[str, Any], dtype: torch.dtype
) -> None:
    ours, theirs, ours_params, theirs_params = _build(name, kwargs, dtype, "eager")
    _step_and_compare(ours, theirs, ours_params, theirs_params, dtype)


@pytest.mark.parametrize(("name", "kwargs"), GRID)
def test_optim_matches_unit_scaling_compiled_aot_eager(
    name: str, kwargs: dict[str, Any]
) -> None:
    dtype = torch.float64
    ours, theirs, ours_params, theirs_params = _build(name, kwargs, dtype, "compiled")
    counter = CompileCounterWithBackend("aot_eager")
    use_backend(ours, counter)
    _step_and_compare(ours, theirs, ours_params, theirs_params, dtype)
    # One graph serves every step: the compiled path really ran, and never recompiled.
    assert counter.frame_count == 1


@pytest.mark.parametrize(("name", "kwargs"), INDUCTOR_GRID)
def test_optim_matches_unit_scaling_compiled_inductor(
    name: str, kwargs: dict[str, Any]
) -> None:
    dtype = torch.float32
    ours, theirs, ours_params, theirs_params = _build(
        name, kwargs, dtype, "compiled", specs=INDUCTOR_SPECS
    )
    engine = ours._engine  # type: ignore[attr-defined]
    assert isinstance(engine, CompiledEngine) and engine.backend == "inductor"
    _step_and_compare(ours, theirs, ours_params, theirs_params, dtype)
    assert engine.failed is None, f"fell back to eager: {engine.failed}"
    assert len(engine._cache) == 1


# Parameter sets beyond the toy grid: (id, builder of our params' groups, optimizer kwargs).
def _two_groups(params: list[nn.Parameter]) -> list[dict[str, Any]]:
    return [
        {"params": params[:3], "lr": 2e-2, "weight_decay": 0.1},
        {"params": params[3:], "lr": 5e-3},
    ]


def _with_untagged(params: list[nn.Parameter]) -> list[nn.Parameter]:
    # Strip the tags of the 2-D weight and the bias (unit_scaling gives them lr scale 1).
    return [
        nn.Parameter(p.detach().clone()) if k in (1, 3) else p
        for k, p in enumerate(params)
    ]


def _mixed_dtypes(params: list[nn.Parameter]) -> list[nn.Parameter]:
    # float32 copies of the 3-D weight and the bias: two buckets in one optimizer.
    return [
        uc.Parameter(p.detach().float(), p.mup_type, p.mup_scaling_depth)  # type: ignore[attr-defined]
        if k in (2, 3)
        else p
        for k, p in enumerate(params)
    ]


PARAM_SET_CASES: list[
    tuple[str, Callable[[list[nn.Parameter]], Any], dict[str, Any]]
] = [
    ("dict_groups", _two_groups, {}),
    (
        "untagged_allowed",
        _with_untagged,
        {"weight_decay": 0.1, "allow_non_unit_scaling_params": True},
    ),
    ("mixed_dtypes", _mixed_dtypes, {"weight_decay": 0.1}),
]
# AdamW shares Adam's group handling and graph layout: eager only, to save compiles.
PARAM_SET_GRID = [
    pytest.param(name, build, kwargs, engine, id=f"{name}_{case_id}_{engine}")
    for name in OPTIMIZERS
    for case_id, build, kwargs in PARAM_SET_CASES
    for engine in ("eager", "aot_eager")
    if name != "adamw" or engine == "eager"
]


@pytest.mark.parametrize(("name", "build", "kwargs", "engine"), PARAM_SET_GRID)
def test_optim_matches_unit_scaling_param_sets(
    name: str,
    build: Callable[[list[nn.Parameter]], Any],
    kwargs: dict[str, Any],
    engine: str,
) -> None:
    dtype = torch.float64
    ours_cls, their_cls, _ = OPTIMIZERS[name]
    if name == "sgd":
        kwargs = {**kwargs, "momentum": 0.9}  # so that SGD has state to compare
    theirs_params = toy_params(dtype)
    ours_params = clone_params(theirs_params)
    ours_groups, theirs_groups = build(ours_params), build(theirs_params)
    # Untagged copies are new objects: read the parameter lists back from the groups.
    ours_params = _flat(ours_groups)
    theirs_params = _flat(theirs_groups)
    theirs = their_cls(theirs_groups, lr=1e-2, **kwargs)
    ours = ours_cls(ours_groups, lr=1e-2, compile=engine != "eager", **kwargs)
    if engine == "aot_eager":
        use_backend(ours, "aot_eager")
    # The loosest tolerance of the dtypes present.
    if any(p.dtype == torch.float32 for p in ours_params):
        dtype = torch.float32
    _step_and_compare(ours, theirs, ours_params, theirs_params, dtype)


def _flat(groups: Any) -> list[nn.Parameter]:
    out: list[nn.Parameter] = []
    for entry in groups:
        out.extend(entry["params"] if isinstance(entry, dict) else [entry])
    return out


@pytest.mark.parametrize("engine", ["eager", "aot_eager"])
@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        pytest.param("adam", {"amsgrad": True, "weight_decay": 0.1}, id="adam"),
        pytest.param("sgd", {"momentum": 0.9, "weight_decay": 0.1}, id="sgd_momentum"),
    ],
)
def test_optim_matches_unit_scaling_missing_grads(
    name: str, kwargs: dict[str, Any], engine: str
) -> None:
    # Parameters without a gradient are skipped (no state, no step count) by both:
    # params 0 and 4 start their state at step 2, then sit out step 4 with state kept.
    dtype = torch.float64
    ours, theirs, ours_params, theirs_params = _build(name, kwargs, dtype, engine)
    if engine == "aot_eager":
        use_backend(ours, "aot_eager")
    pattern = {0: (0, 4), 1: (), 2: (), 3: (0, 4), 4: ()}
    _step_and_compare(
        ours, theirs, ours_params, theirs_params, dtype, drop=lambda step: pattern[step]
    )


@pytest.mark.parametrize("engine", ["eager", "aot_eager"])
@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        pytest.param("adam", {"weight_decay": 0.1}, id="adam_float_lr"),
        pytest.param(
            "adamw", {"weight_decay": 0.1, "lr": TENSOR_LR}, id="adamw_tensor_lr"
        ),
        pytest.param("sgd", {"momentum": 0.9, "lr": TENSOR_LR}, id="sgd_tensor_lr"),
    ],
)
def test_optim_matches_unit_scaling_lr_schedule(
    name: str, kwargs: dict[str, Any], engine: str
) -> None:
    # ExponentialLR scales every group's lr: unit_scaling's per-parameter lrs and our
    # group lr move together, keeping the u-μP ratios (weight decay stays as built).
    dtype = torch.float64
    ours, theirs, ours_params, theirs_params = _build(name, kwargs, dtype, engine)
    counter = CompileCounterWithBackend("aot_eager")
    if engine == "aot_eager":
        use_backend(ours, counter)
    schedulers = [
        torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.7) for o in (ours, theirs)
    ]
    lr0 = float(ours.param_groups[0]["lr"])

    def after_step() -> None:
        for scheduler in schedulers:
            scheduler.step()

    _step_and_compare(
        ours, theirs, ours_params, theirs_params, dtype, after_step=after_step
    )
    assert float(ours.param_groups[0]["lr"]) == pytest.approx(lr0 * 0.7**STEPS)
    if engine == "aot_eager":
        assert counter.frame_count == 1  # a new lr is data, never a recompile


# (id, our call with positional args, unit_scaling's equivalent call with keywords)
POSITIONAL_CASES: list[tuple[str, Callable[[Any], Any], Callable[[Any], Any]]] = [
    (
        "adam_lr_betas",
        lambda p: uo.Adam(p, 1e-2, (0.9, 0.99), compile=False),
        lambda p: uso.Adam(p, lr=1e-2, betas=(0.9, 0.99)),
    ),
    (
        "adam_all",
        lambda p: uo.Adam(p, 1e-2, (0.8, 0.99), 1e-6, 0.1, True, compile=False),
        lambda p: uso.Adam(
            p, lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1, amsgrad=True
        ),
    ),
    (
        "adamw_all",
        lambda p: uo.AdamW(p, 1e-2, (0.8, 0.99), 1e-6, 0.1, True, compile=False),
        lambda p: uso.AdamW(
            p, lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1, amsgrad=True
        ),
    ),
    (
        "sgd_all",
        lambda p: uo.SGD(p, 1e-2, 0.9, 0.0, 0.1, True, compile=False),
        lambda p: uso.SGD(
            p, lr=1e-2, momentum=0.9, dampening=0.0, weight_decay=0.1, nesterov=True
        ),
    ),
    (
        "sgd_dampening",
        lambda p: uo.SGD(p, 1e-2, 0.9, 0.5, compile=False),
        lambda p: uso.SGD(p, lr=1e-2, momentum=0.9, dampening=0.5),
    ),
]


@pytest.mark.parametrize(
    ("make_ours", "make_theirs"),
    [case[1:] for case in POSITIONAL_CASES],
    ids=[case[0] for case in POSITIONAL_CASES],
)
def test_optim_matches_unit_scaling_positional_args(
    make_ours: Callable[[Any], Any], make_theirs: Callable[[Any], Any]
) -> None:
    dtype = torch.float64
    theirs_params = toy_params(dtype)
    ours_params = clone_params(theirs_params)
    ours, theirs = make_ours(ours_params), make_theirs(theirs_params)
    _step_and_compare(ours, theirs, ours_params, theirs_params, dtype)


def test_unit_scaling_adam_rejects_positional_betas() -> None:
    # Why the positional cases above call unit_scaling with keywords: it forwards
    # *args to torch after taking lr itself, so the betas land in torch's lr.
    with pytest.raises(TypeError):
        uso.Adam(toy_params(), 1e-2, (0.9, 0.99))


# (id, corruption of our optimizer after a step): the comparison must notice each.
CORRUPTIONS: list[tuple[str, Callable[[torch.optim.Optimizer], None]]] = [
    ("param", lambda opt: opt.param_groups[0]["params"][2].data.mul_(1 + 1e-8)),
    (
        "exp_avg_sq",
        lambda opt: opt.state[opt.param_groups[0]["params"][3]]["exp_avg_sq"].add_(
            1e-9
        ),
    ),
    ("step", lambda opt: opt.state[opt.param_groups[0]["params"][0]]["step"].add_(1)),
    (
        "missing_key",
        lambda opt: opt.state[opt.param_groups[0]["params"][5]].pop("max_exp_avg_sq"),
    ),
]


@pytest.mark.parametrize(
    "corrupt", [case[1] for case in CORRUPTIONS], ids=[case[0] for case in CORRUPTIONS]
)
def test_assert_states_close_detects_corruption(
    corrupt: Callable[[torch.optim.Optimizer], None],
) -> None:
    dtype = torch.float64
    ours, theirs, ours_params, theirs_params = _build(
        "adam", {"amsgrad": True}, dtype, "eager"
    )
    _step_and_compare(ours, theirs, ours_params, theirs_params, dtype, steps=1)
    corrupt(ours)
    with pytest.raises(AssertionError):
        assert_states_close(ours, theirs, **TOLERANCES[dtype])
