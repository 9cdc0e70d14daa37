"""Parity with ``torch.optim`` on untagged parameters, driven by torch's own test inputs.

With ``allow_non_unit_scaling_params=True`` every plain ``nn.Parameter`` has lr scale 1,
so with ``independent_weight_decay=False`` (or no weight decay) our optimizers must be
torch's optimizers, number for number. The configurations come from
``torch.testing._internal.common_optimizers`` (``optim_inputs_func_*`` and
``optim_error_inputs_func_*``), so new torch inputs are picked up automatically.
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import pytest
import torch
from torch import Tensor, nn
from torch.testing._internal import common_optimizers as co

from tests.helpers import (
    TOLERANCES,
    assert_states_close,
    clone_params,
    run_steps,
    set_grads,
)
from umup_compile._engine import CompiledEngine
from umup_compile.optim import SGD, Adam, AdamW

SHAPES = [(4, 3), (5,), (2, 3, 2)]
STEPS = 4
LR_CHANGE_AFTER = 1  # halve the lr after this step, as a scheduler would
DTYPES = [torch.float64, torch.float32]
ENGINES = ["eager", "aot_eager"]
UMUP = {"allow_non_unit_scaling_params": True, "independent_weight_decay": False}

# (id, ours, torch's, torch's inputs, torch's error inputs)
OPTIMIZERS = [
    (
        "adam",
        Adam,
        torch.optim.Adam,
        co.optim_inputs_func_adam,
        co.optim_error_inputs_func_adam,
    ),
    (
        "adamw",
        AdamW,
        torch.optim.AdamW,
        getattr(co, "optim_inputs_func_adamw", co.optim_inputs_func_adam),
        getattr(co, "optim_error_inputs_func_adamw", co.optim_error_inputs_func_adam),
    ),
    (
        "sgd",
        SGD,
        torch.optim.SGD,
        co.optim_inputs_func_sgd,
        co.optim_error_inputs_func_sgd,
    ),
]
_TORCH_CLS = {name: torch_cls for name, _, torch_cls, _, _ in OPTIMIZERS}

# torch's AdamW defaults to weight_decay=1e-2, ours to 0 (as unit_scaling): pass it.
TORCH_DEFAULT_WEIGHT_DECAY = {"adamw": 1e-2}


def _kwargs_id(kwargs: dict[str, Any]) -> str:
    parts = []
    for key, value in kwargs.items():
        if isinstance(value, Tensor) or (
            isinstance(value, tuple) and isinstance(value[0], Tensor)
        ):
            parts.append(f"tensor_{key}")
        elif isinstance(value, bool):
            parts.append(key if value else f"no_{key}")
        else:
            parts.append(f"{key}={value}")
    return "-".join(parts) or "default"


def _torch_inputs(name: str, inputs_func: Callable[..., Any]) -> list[dict[str, Any]]:
    """torch's CPU inputs, plus its device-only ones (tensor lr/betas) minus capturable.

    The tensor-lr and tensor-betas inputs are listed for CUDA/MPS only, because torch's
    capturable path needs a GPU; our engines take tensor hyper-parameters on any device,
    so they are compared on CPU with ``capturable`` dropped.
    """
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for device in ("cpu", "cuda", "mps"):
        for optim_input in inputs_func(device=device):
            kwargs = {k: v for k, v in optim_input.kwargs.items() if k != "capturable"}
            if name in TORCH_DEFAULT_WEIGHT_DECAY:
                kwargs.setdefault("weight_decay", TORCH_DEFAULT_WEIGHT_DECAY[name])
            key = _kwargs_id(kwargs) + repr(kwargs)
            if key not in seen:
                seen.add(key)
                out.append(kwargs)
    return out


def _grid() -> dict[str, tuple[type, type, dict[str, Any]]]:
    grid: dict[str, tuple[type, type, dict[str, Any]]] = {}
    for name, ours, theirs, inputs_func, _ in OPTIMIZERS:
        for kwargs in _torch_inputs(name, inputs_func):
            case = f"{name}-{_kwargs_id(kwargs)}"
            if case in grid:  # a new torch input needs a more telling id
                raise AssertionError(f"two torch inputs map to the id {case!r}")
            grid[case] = (ours, theirs, kwargs)
    return grid


GRID = _grid()


def _in_dtype(kwargs: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """A deep copy with tensor hyper-parameters cast to the parameters' dtype.

    torch does its scalar arithmetic on a tensor lr/beta in that tensor's dtype (float32
    by default), e.g. ``1 - lr * weight_decay`` for float64 parameters, while ours reads
    the value into float64. Cast, torch's scalar math is as precise as its update, so
    float64 parity compares the updates, not float32 rounding of torch's scalars.
    """
    out = copy.deepcopy(kwargs)
    for key, value in out.items():
        if isinstance(value, Tensor):
            out[key] = value.to(dtype)
        elif isinstance(value, tuple) and isinstance(value[0], Tensor):
            out[key] = tuple(v.to(dtype) for v in value)
    return out


# One compiled engine per backend for the whole module: a graph compiled for one
# optimizer is reused by every later one with the same config, dtype and shapes. That
# halves the compile time of the grid, and checks that no hyper-parameter value (lr,
# betas, weight decay) is baked into a graph.
_SHARED_ENGINES: dict[str, CompiledEngine] = {}


def _make_ours(
    ours_cls: type[torch.optim.Optimizer], params: list[Tensor], engine: str, **kwargs
) -> torch.optim.Optimizer:
    """Our optimizer on the eager engine, or on the module's shared compiled engine."""
    opt = ours_cls(params, **kwargs, compile=engine != "eager")
    if engine != "eager":
        if engine not in _SHARED_ENGINES:
            _SHARED_ENGINES[engine] = CompiledEngine(strict=True, backend=engine)
        opt._engine = _SHARED_ENGINES[engine]  # type: ignore[attr-defined]
    return opt


def _plain_params(dtype: torch.dtype, shapes: list[tuple[int, ...]] = SHAPES):
    return [nn.Parameter(torch.randn(shape, dtype=dtype)) for shape in shapes]


def _scale_lr_(opt: torch.optim.Optimizer, factor: float) -> None:
    """Scale every group's lr like a scheduler: a tensor lr in place, a float rebound."""
    for group in opt.param_groups:
        if isinstance(group["lr"], Tensor):
            group["lr"].mul_(factor)
        else:
            group["lr"] = group["lr"] * factor


def _run_against_torch(
    ours: torch.optim.Optimizer,
    ref: torch.optim.Optimizer,
    params: list[Tensor],
    ref_params: list[Tensor],
    dtype: torch.dtype,
    *,
    steps: int = STEPS,
    change_lr: bool = True,
) -> None:
    """Step both, comparing params and every state tensor after every step."""

    def after_each(s: int) -> None:
        assert_states_close(ours, ref, **TOLERANCES[dtype])
        if change_lr and s == LR_CHANGE_AFTER:
            _scale_lr_(ours, 0.5)
            _scale_lr_(ref, 0.5)

    run_steps([ours, ref], [params, ref_params], steps, after_each=after_each)


# -- a. torch's inputs ----------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
@pytest.mark.parametrize("case", list(GRID))
def test_optimizers_match_torch_inputs(case: str, dtype: torch.dtype, engine: str):
    ours_cls, torch_cls, kwargs = GRID[case]
    params = _plain_params(dtype)
    ref_params = clone_params(params)
    ours = _make_ours(ours_cls, params, engine, **_in_dtype(kwargs, dtype), **UMUP)
    ref = torch_cls(ref_params, **_in_dtype(kwargs, dtype))
    _run_against_torch(ours, ref, params, ref_params, dtype)


def test_torch_inputs_cover_tensor_hyperparameters():
    for name in ("adam", "adamw", "sgd"):
        assert any(c.startswith(f"{name}-tensor_lr") for c in GRID), name
    for name in ("adam", "adamw"):
        assert any(
            c.startswith(f"{name}-tensor_lr-tensor_betas-amsgrad") for c in GRID
        ), name


# Inductor costs 5-25 s per compile on a small CPU box: a few representative inputs.
INDUCTOR_CASES = [
    ("adamw-weight_decay=0.1-amsgrad", torch.float32),
    ("sgd-momentum=0.9-nesterov-weight_decay=0.1", torch.float32),
    ("adam-tensor_lr-tensor_betas-no_amsgrad", torch.float64),
]


@pytest.mark.filterwarnings("error::RuntimeWarning")  # no silent eager fallback
@pytest.mark.parametrize(
    ("case", "dtype"),
    INDUCTOR_CASES,
    ids=[f"{case}-{str(dtype)[6:]}" for case, dtype in INDUCTOR_CASES],
)
def test_optimizers_match_torch_inputs_inductor(case: str, dtype: torch.dtype):
    ours_cls, torch_cls, kwargs = GRID[case]
    params = _plain_params(dtype)
    ref_params = clone_params(params)
    ours = ours_cls(params, **_in_dtype(kwargs, dtype), **UMUP)  # compile=True
    ref = torch_cls(ref_params, **_in_dtype(kwargs, dtype))
    _run_against_torch(ours, ref, params, ref_params, dtype)
    engine = ours._engine  # type: ignore[attr-defined]
    assert isinstance(engine, CompiledEngine) and engine.backend == "inductor"
    assert engine.failed is None
    assert len(engine._cache) == 1  # one compiled step for all STEPS steps


# 0-d parameters (a learned temperature, a gate) are legal torch parameters.
SCALAR_CASES = [
    ("adam", Adam, {"lr": 0.01}),
    ("adam_l2", Adam, {"lr": 0.01, "weight_decay": 0.1}),
    ("adamw", AdamW, {"lr": 0.01, "weight_decay": 0.1}),
    ("sgd_momentum", SGD, {"lr": 0.01, "momentum": 0.9, "weight_decay": 0.1}),
    ("sgd", SGD, {"lr": 0.01, "weight_decay": 0.1}),
]


def _scalar_params():
    cases = []
    for name, ours_cls, kwargs in SCALAR_CASES:
        for dtype in DTYPES:
            for engine in ENGINES:
                marks: list = []
                cases.append(
                    pytest.param(
                        ours_cls,
                        kwargs,
                        dtype,
                        engine,
                        marks=marks,
                        id=f"{name}-{str(dtype)[6:]}-{engine}",
                    )
                )
    return cases


@pytest.mark.parametrize(("ours_cls", "kwargs", "dtype", "engine"), _scalar_params())
def test_optimizers_match_torch_scalar_param(ours_cls, kwargs, dtype, engine):
    params = _plain_params(dtype, [(), (3,)])
    ref_params = clone_params(params)
    ours = _make_ours(ours_cls, params, engine, **kwargs, **UMUP)
    ref = _TORCH_CLS[ours_cls.__name__.lower()](ref_params, **kwargs)
    _run_against_torch(ours, ref, params, ref_params, dtype, steps=3)


# -- b. torch's error inputs ----------------------------------------------------------


class Divergence(NamedTuple):
    """How we answer one of torch's error inputs instead, and why."""

    error_type: type[Exception] | None  # None: accepted, and must step like torch
    error_regex: str
    reason: str


# Keyed by torch's ErrorOptimizerInput desc. Everything not listed must raise torch's
# error type with a message matching torch's regex.
INTENTIONAL_DIVERGENCES: dict[str, Divergence] = {
    "lr as Tensor doesn't work with foreach & not capturable": Divergence(
        None,
        "",
        "both engines read a tensor lr into the per-step hyper-parameter tensor; "
        "foreach is accepted for compatibility only (the engine decides)",
    ),
    r"betas\[0\] as a Tensor is not supported for capturable=False and foreach=True": (
        Divergence(
            None,
            "",
            "tensor betas are read like a tensor lr, whatever foreach says",
        )
    ),
    "a param group cannot have duplicate parameters": Divergence(
        ValueError,
        "appears twice in its param group; list each parameter once",
        "torch only warns and then updates the parameter twice per step; we raise, "
        "naming the parameter",
    ),
}


def _error_inputs() -> list[Any]:
    cases = []
    for name, ours_cls, _, _, error_func in OPTIMIZERS:
        seen: dict[str, int] = {}
        for error_input in error_func(device="cpu", dtype=torch.float32):
            desc = error_input.optimizer_error_input.desc
            seen[desc] = seen.get(desc, 0) + 1
            slug = re.sub(r"\W+", "_", desc).strip("_")
            suffix = f"_{seen[desc]}" if seen[desc] > 1 else ""
            cases.append(
                pytest.param(name, ours_cls, error_input, id=f"{name}-{slug}{suffix}")
            )
    return cases


def _ours_from_error_input(
    ours_cls: type[torch.optim.Optimizer], params: Any, kwargs: dict[str, Any]
) -> torch.optim.Optimizer:
    return ours_cls(params, **kwargs, **UMUP, compile=False)


@pytest.mark.parametrize(("name", "ours_cls", "error_input"), _error_inputs())
def test_optimizers_reject_torch_error_inputs(name, ours_cls, error_input):
    optim_input = error_input.optimizer_error_input
    assert error_input.error_on == co.OptimizerErrorEnum.CONSTRUCTION_ERROR
    divergence = INTENTIONAL_DIVERGENCES.get(optim_input.desc)
    params = optim_input.params
    if params is None:  # torch's checks fire before params are read; ours may not
        params = [nn.Parameter(torch.randn(2, 3))]
    kwargs = copy.deepcopy(optim_input.kwargs)
    if divergence is None:
        if issubclass(error_input.error_type, Warning):
            with pytest.warns(error_input.error_type, match=error_input.error_regex):
                _ours_from_error_input(ours_cls, params, kwargs)
        else:
            with pytest.raises(error_input.error_type, match=error_input.error_regex):
                _ours_from_error_input(ours_cls, params, kwargs)
    elif divergence.error_type is not None:
        with pytest.raises(divergence.error_type, match=divergence.error_regex):
            _ours_from_error_input(ours_cls, params, kwargs)
    else:
        # Accepted: it must then step exactly like torch without foreach.
        if name in TORCH_DEFAULT_WEIGHT_DECAY:
            kwargs.setdefault("weight_decay", TORCH_DEFAULT_WEIGHT_DECAY[name])
        ref_params = clone_params(params)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ours = _ours_from_error_input(ours_cls, params, kwargs)
        ref_kwargs = {**copy.deepcopy(kwargs), "foreach": False}
        ref = _TORCH_CLS[name](ref_params, **ref_kwargs)
        _run_against_torch(ours, ref, params, ref_params, torch.float32, steps=3)


def test_optimizers_error_divergences_are_torch_error_inputs():
    descs = {
        e.optimizer_error_input.desc
        for _, _, _, _, error_func in OPTIMIZERS
        for e in error_func(device="cpu", dtype=torch.float32)
    }
    assert set(INTENTIONAL_DIVERGENCES) <= descs


@pytest.mark.parametrize("name", ["adam", "adamw"])
@pytest.mark.parametrize("engine", ENGINES)
def test_adam_accepts_tensor_hypers_with_foreach(name: str, engine: str):
    ours_cls, torch_cls = {
        "adam": (Adam, torch.optim.Adam),
        "adamw": (AdamW, torch.optim.AdamW),
    }[name]
    kwargs = {
        "lr": torch.tensor(0.01),
        "betas": (torch.tensor(0.8), torch.tensor(0.9)),
        "weight_decay": 0.1,
    }
    params = _plain_params(torch.float32)
    ref_params = clone_params(params)
    ours = _make_ours(
        ours_cls, params, engine, **copy.deepcopy(kwargs), foreach=True, **UMUP
    )
    ref = torch_cls(ref_params, **copy.deepcopy(kwargs), foreach=False)
    _run_against_torch(ours, ref, params, ref_params, torch.float32)


# torch lists these for CUDA only, but raises them on CPU too.
FLAG_CONFLICTS = [
    (
        {"foreach": True, "fused": True},
        "`fused` and `foreach` cannot be `True` together",
    ),
    (
        {"fused": True, "differentiable": True},
        "`fused` does not support `differentiable`",
    ),
]


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
@pytest.mark.parametrize(
    ("kwargs", "regex"), FLAG_CONFLICTS, ids=["fused_foreach", "fused_differentiable"]
)
def test_optimizers_reject_flag_conflicts_like_torch(name: str, kwargs, regex: str):
    # Same message; ValueError by house rule (bad input), where torch uses RuntimeError.
    ours_cls = {"adam": Adam, "adamw": AdamW, "sgd": SGD}[name]
    with pytest.raises(RuntimeError, match=regex):
        _TORCH_CLS[name]([nn.Parameter(torch.randn(2))], **kwargs)
    with pytest.raises(ValueError, match=regex):
        _ours_from_error_input(ours_cls, [nn.Parameter(torch.randn(2))], kwargs)


# -- c. independent weight decay ------------------------------------------------------

INDEPENDENT_WD = [
    ("adam_l2", Adam, torch.optim.Adam, {"lr": 0.01, "weight_decay": 0.1}),
    ("adamw", AdamW, torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.1}),
    (
        "adam_amsgrad_maximize",
        Adam,
        torch.optim.Adam,
        {"lr": 0.02, "weight_decay": 0.05, "amsgrad": True, "maximize": True},
    ),
    (
        "sgd_momentum",
        SGD,
        torch.optim.SGD,
        {"lr": 0.01, "momentum": 0.9, "weight_decay": 1e-3},
    ),
]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(
    ("ours_cls", "torch_cls", "kwargs"),
    [case[1:] for case in INDEPENDENT_WD],
    ids=[case[0] for case in INDEPENDENT_WD],
)
def test_optimizers_match_torch_independent_weight_decay(
    ours_cls, torch_cls, kwargs, engine
):
    dtype = torch.float64
    params = _plain_params(dtype)
    ref_params = clone_params(params)
    ours = _make_ours(
        ours_cls,
        params,
        engine,
        **kwargs,
        allow_non_unit_scaling_params=True,
        independent_weight_decay=True,
    )
    # unit_scaling's rule: the decay is divided by the initial effective lr (scale 1).
    ref_kwargs = {**kwargs, "weight_decay": kwargs["weight_decay"] / kwargs["lr"]}
    ref = torch_cls(ref_params, **ref_kwargs)
    _run_against_torch(ours, ref, params, ref_params, dtype, change_lr=False)


# -- d. state_dict interchange --------------------------------------------------------

INTERCHANGE = [
    (
        "adam_amsgrad",
        Adam,
        torch.optim.Adam,
        {"lr": 0.01, "weight_decay": 0.1, "amsgrad": True},
    ),
    ("adamw", AdamW, torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.1}),
    (
        "sgd_nesterov",
        SGD,
        torch.optim.SGD,
        {"lr": 0.01, "momentum": 0.9, "nesterov": True, "weight_decay": 0.1},
    ),
]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("direction", ["ours_to_torch", "torch_to_ours"])
@pytest.mark.parametrize(
    ("ours_cls", "torch_cls", "kwargs"),
    [case[1:] for case in INTERCHANGE],
    ids=[case[0] for case in INTERCHANGE],
)
def test_state_dict_interchanges_with_torch(
    ours_cls, torch_cls, kwargs, direction: str, engine: str
):
    dtype = torch.float64

    def make(cls, params):
        if cls is torch_cls:
            return torch_cls(params, **kwargs)
        return _make_ours(ours_cls, params, engine, **kwargs, **UMUP)

    src_cls, dst_cls = (
        (ours_cls, torch_cls) if direction == "ours_to_torch" else (torch_cls, ours_cls)
    )
    params = _plain_params(dtype)
    straight_params = clone_params(params)
    straight = make(src_cls, straight_params)
    first = make(src_cls, params)
    run_steps([straight, first], [straight_params, params], 3)

    saved = copy.deepcopy(first.state_dict())
    resumed = make(dst_cls, params)
    resumed.load_state_dict(saved)
    for p in params:
        state = resumed.state[p]
        for key, value in first.state[p].items():
            assert value.dtype == state[key].dtype, key
    del first

    for s in range(3):
        set_grads([straight_params, params], seed=100 + s)
        straight.step()
        resumed.step()
        assert_states_close(resumed, straight, **TOLERANCES[dtype])
