"""Reliability at the edges (issue 13): many groups, complex parameters, odd inputs.

Every input here was first run through ``torch.optim`` (or ``unit_scaling.optim`` for
tagged parameters). Where torch accepts it, ours must give torch's numbers, state
keys, dtypes, devices and shapes, in the eager and the compiled engine (through the
cheap ``aot_eager`` backend; Inductor for a few cases). Where torch rejects it, ours
must raise a ``ValueError``/``TypeError`` that names the parameter, before anything
changes: parameters and state bitwise as before, ``opt.state`` not grown.

Parameters are named (``named_parameters()`` style) where an error must name one; the
culprit is always called ``bad``.
"""

from __future__ import annotations

import copy
import io
import re
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
import unit_scaling.optim as uso
from torch import Tensor, nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch.testing._internal import common_optimizers as co

import umup_compile as uc
from tests.edge_helpers import (
    ENGINES,
    UMUP,
    assert_pair_close,
    assert_state_layout_like,
    assert_unchanged,
    build,
    snapshot,
    tolerance,
)
from tests.helpers import TORCH, needs_mixed_grad_dtype, use_backend
from umup_compile.optim import SGD, Adam, AdamW, lr_scale_func_adam

# name -> (ours, torch's, unit_scaling's)
OPTIMIZERS: dict[str, tuple[type, type, type]] = {
    "adam": (Adam, torch.optim.Adam, uso.Adam),
    "adamw": (AdamW, torch.optim.AdamW, uso.AdamW),
    "sgd": (SGD, torch.optim.SGD, uso.SGD),
}
# Options that exercise every state key and both weight-decay paths.
KWARGS: dict[str, dict[str, Any]] = {
    "adam": {"lr": 0.01, "weight_decay": 0.1, "amsgrad": True},
    "adamw": {"lr": 0.01, "weight_decay": 0.1},
    "sgd": {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.1},
}
STEPS = 3


def _grad_gen(step: int, k: int) -> torch.Generator:
    return torch.Generator().manual_seed(1000 * step + k)


def _twin_params(
    seed: int,
    shapes: Sequence[tuple[int, ...]] = ((6, 5), (7,)),
    dtype: torch.dtype = torch.float64,
) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Two equal lists of parameters (ours and the reference's), drawn from ``seed``."""
    sides = []
    for _ in range(2):
        _GEN.manual_seed(seed)
        sides.append([nn.Parameter(_randn(*shape).to(dtype)) for shape in shapes])
    return sides[0], sides[1]


def _random_grads(params: Sequence[Tensor], step: int) -> None:
    """Deterministic gradients in each parameter's dtype (same for both sides);
    complex parameters get complex gradients (real and imaginary parts random)."""
    for k, p in enumerate(params):
        gen = _grad_gen(step, k)
        if p.is_complex():
            g = torch.randn((*p.shape, 2), generator=gen, dtype=torch.float64)
            p.grad = torch.view_as_complex(g).to(p.device, p.dtype)
        else:
            g = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            p.grad = g.to(p.device, p.dtype)


def _ours_and_torch(
    name: str, params: Any, ref_params: Any, engine: str, **kwargs: Any
) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    ours_cls, torch_cls, _ = OPTIMIZERS[name]
    kwargs = {**KWARGS[name], **kwargs}
    ours = build(ours_cls, params, engine, **kwargs, **UMUP)
    ref = torch_cls(ref_params, **kwargs, foreach=False)
    return ours, ref


# -- a. stochastic-rounding seeds --------------------------------------------------


def seeds(group_sizes: Sequence[int], sr_seeds: Sequence[int]) -> list[list[int]]:
    """Every parameter's stochastic-rounding seed, per group, for an optimizer whose
    groups hold ``group_sizes`` parameters and have ``sr_seed`` ``sr_seeds[g]``.

    The ONLY place in the tests that names the private seed derivation (today
    ``_rounding.parameter_seeds`` over the parameters' indices counted across groups,
    as ``_hypers.factor_vectors`` calls it); update it here when that moves.
    """
    from umup_compile._rounding import parameter_seeds

    group_seeds: list[int] = []
    flat: list[int] = []
    for g, n in enumerate(group_sizes):
        group_seeds += [sr_seeds[g]] * n
        flat += range(len(flat), len(flat) + n)
    out = parameter_seeds(group_seeds, flat)
    nested, start = [], 0
    for n in group_sizes:
        nested.append(out[start : start + n])
        start += n
    return nested


# 2,100 one-parameter groups (group indices past 2**11, where group << 52 overflowed
# int64), then a group of 2**20 + 3 (positions past 2**20, where i << 32 reached the
# group bits: (g, i + 2**20) collided with (g + 1, i)), then more groups after it.
SEED_GROUP_SIZES = [1] * 2100 + [2**20 + 3] + [2, 1, 5]


@pytest.mark.parametrize("sr_seed", [0, 12345, 0x7FFFFFFF])
def test_rounding_seeds_distinct_past_2048_groups_and_2_20_positions(sr_seed: int):
    out = seeds(SEED_GROUP_SIZES, [sr_seed] * len(SEED_GROUP_SIZES))
    flat = [s for group in out for s in group]
    assert len(flat) == sum(SEED_GROUP_SIZES)
    assert len(set(flat)) == len(flat)
    assert all(-(2**63) <= s < 2**63 for s in flat)  # they fit an int64 tensor


def test_rounding_seeds_deterministic_and_keyed_by_group_seed():
    sizes = [2, 1, 3]
    assert seeds(sizes, [5, 5, 5]) == seeds(sizes, [5, 5, 5])
    a, b = seeds(sizes, [5, 5, 5]), seeds(sizes, [6, 6, 6])
    assert all(x != y for ga, gb in zip(a, b) for x, y in zip(ga, gb))


# -- b. thousands of groups and tensors ---------------------------------------------

MANY_GROUPS = 2100
MANY_TENSORS = 5000
# Tiny tagged tensors of every mup_type: all of them go to the compiled pack.
SCALE_SPECS: list[tuple[tuple[int, ...], str, int | None]] = [
    ((4, 4), "weight", None),
    ((3,), "bias", 2),
    ((2, 2, 2), "weight", 2),
    ((3,), "norm", None),
    ((2, 3), "output", None),
]


def _scale_params(n: int, dtype: torch.dtype = torch.float64) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(n)
    return [
        uc.Parameter(torch.randn(shape, generator=gen, dtype=dtype), mup_type, depth)  # type: ignore[arg-type]
        for shape, mup_type, depth in (
            SCALE_SPECS[k % len(SCALE_SPECS)] for k in range(n)
        )
    ]


def _run_vs_unit_scaling(
    name: str,
    ours_groups: Any,
    ours_params: list[Tensor],
    ref_params: list[Tensor],
    engine: str,
    steps: int = 2,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    ours_cls, _, uso_cls = OPTIMIZERS[name]
    ours = build(ours_cls, ours_groups, engine, **kwargs)
    ref = uso_cls(ref_params, **kwargs)
    pairs = list(zip(ours_params, ref_params))
    for step in range(steps):
        _random_grads(ours_params, step)
        _random_grads(ref_params, step)
        ours.step()
        ref.step()
        assert_pair_close(ours, ref, pairs, where=f"step {step + 1}: ")
    return ours


SCALE_KWARGS = {
    "adam": {"lr": 0.01, "weight_decay": 0.1},
    "sgd": {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.1},
}


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", ["adam", "sgd"])
def test_many_groups_of_one_param_match_unit_scaling(name: str, engine: str):
    # unit_scaling's own layout, one group per parameter, passed to ours as groups.
    params = _scale_params(MANY_GROUPS)
    ref_params = copy.deepcopy(params)
    groups = [{"params": [p]} for p in params]
    _run_vs_unit_scaling(name, groups, params, ref_params, engine, **SCALE_KWARGS[name])


@pytest.mark.parametrize("engine", ENGINES)
def test_many_tensors_in_one_group_match_unit_scaling(engine: str):
    params = _scale_params(MANY_TENSORS)
    ref_params = copy.deepcopy(params)
    _run_vs_unit_scaling(
        "adam", params, params, ref_params, engine, **SCALE_KWARGS["adam"]
    )


def test_many_groups_compile_like_one_group():
    # Groups are bookkeeping: 2,100 one-parameter groups trace the graphs that the
    # same parameters in one group do (one pack graph).
    counts = []
    for grouped in (False, True):
        params = _scale_params(MANY_GROUPS, torch.float32)
        opt = Adam(
            [{"params": [p]} for p in params] if grouped else params,
            lr=0.01,
            weight_decay=0.1,
        )
        counter = CompileCounterWithBackend("aot_eager")
        use_backend(opt, counter)
        for step in range(3):
            _random_grads(params, step)
            opt.step()
        counts.append(counter.frame_count)
    assert counts[0] == counts[1] == 1, counts


def _mid_ulp_params(n: int, groups: bool) -> tuple[Any, list[nn.Parameter]]:
    # bf16 1.5 with an exact Adam step of 2**-8 (eps=0): every element lands half-way
    # between two bf16 values, so it rounds up with probability 1/2 per element.
    params = [
        nn.Parameter(torch.full((64,), 1.5, dtype=torch.bfloat16)) for _ in range(n)
    ]
    return ([{"params": [p]} for p in params] if groups else params), params


@pytest.mark.parametrize(
    ("groups", "engine"),
    [(True, "eager"), (True, "aot_eager"), (False, "aot_eager")],
    ids=["2100_groups-eager", "2100_groups-aot_eager", "one_group-aot_eager"],
)
def test_many_params_stochastic_rounding_streams_distinct(engine: str, groups: bool):
    # Identical parameters and gradients: only their rounding streams differ, so every
    # parameter must come out different (2**-64 per pair if the streams are distinct).
    results = []
    for run_engine in (engine, "eager"):
        spec, params = _mid_ulp_params(MANY_GROUPS, groups)
        opt = build(
            Adam,
            spec,
            run_engine,
            lr=2.0**-8,
            eps=0.0,
            stochastic_rounding=True,
            allow_non_unit_scaling_params=True,
        )
        for p in params:
            p.grad = torch.full_like(p, -1.0)
        opt.step()
        results.append(torch.stack([p.detach() for p in params]))
    rows = {tuple(row.view(torch.int16).tolist()) for row in results[0]}
    assert len(rows) == MANY_GROUPS
    assert torch.equal(results[0], results[1])  # the compiled engine's streams too


def test_compiled_step_keeps_compiling_with_mixed_dtypes_and_changing_membership():
    # Found by tests/test_property.py (shrunk): float64, float32 and bf16 parameters
    # in one SGD, a few without gradients on one step, a group added on another. Each
    # variant is legitimately a new graph, but all of them must stay within what the
    # compiled engine can hold (with use_backend's strict engine a failure raises; the
    # default engine would fall back to eager for good, with a warning).
    def make() -> list[nn.Parameter]:
        _GEN.manual_seed(5)
        specs = [
            ((), torch.float64),
            ((2,), torch.bfloat16),
            ((1,), torch.float32),
            ((0,), torch.float32),
            ((0, 3, 1), torch.bfloat16),
            ((), torch.float64),
        ]
        return [nn.Parameter(_randn(*s).to(dtype)) for s, dtype in specs]

    runs = []
    for engine in ("aot_eager", "eager"):
        params = make()
        opt = build(SGD, [params[k] for k in (1, 2, 3, 5)], engine, lr=0.01, **UMUP)
        for step, missing in enumerate([(), (1, 2, 5), ()]):
            if step == 1:
                opt.add_param_group({"params": [params[0], params[4]]})
            _random_grads(params, step)
            for k in missing:
                params[k].grad = None
            opt.step()
        runs.append(params)
    for p, q in zip(*runs):
        torch.testing.assert_close(p, q, **tolerance(p.dtype))


# Which parameters have gradients, step by step ("add": a group joins): frozen and
# unfrozen layers, a bucket holding only a zero-element tensor, a group added.
MEMBERSHIP_STEPS: list[tuple[str, ...] | str] = [
    ("r",),
    ("p",),
    ("p", "q"),
    ("q",),
    ("r", "p"),
    ("r", "p", "q"),
    "add",
    ("p",),
    ("p", "q"),
    ("q",),
    ("r",),
    ("r", "p"),
    ("r", "p", "q", "s"),
    ("s",),
    ("q", "s"),
]


@pytest.mark.parametrize("name", ["adam", "sgd"])
def test_compiled_step_keeps_compiling_through_membership_changes(name: str):
    # One dtype: the pack's rows (0, 1, 2), its member count (1, 2+) and the group
    # count (1, 2) change from step to step. Each is a size Dynamo specialises when it
    # is 0 or 1, so together they must not exhaust the recompile limit (8 per graph).
    def make() -> dict[str, nn.Parameter]:
        _GEN.manual_seed(6)
        shapes = {"r": (200,), "p": (1,), "q": (0,), "s": (3,)}
        return {k: nn.Parameter(_randn(*shape).float()) for k, shape in shapes.items()}

    runs = []
    for engine in ("aot_eager", "eager"):
        ps = make()
        opt = build(
            OPTIMIZERS[name][0], [ps["r"], ps["p"], ps["q"]], engine, lr=0.01, **UMUP
        )
        for step, members in enumerate(MEMBERSHIP_STEPS):
            if members == "add":
                opt.add_param_group({"params": [ps["s"]]})
                continue
            for key, p in ps.items():
                p.grad = None
                if key in members:
                    _random_grads([p], step)
            opt.step()
        runs.append(ps)
    for key in runs[0]:
        torch.testing.assert_close(
            runs[0][key], runs[1][key], **tolerance(torch.float32)
        )


def test_named_group_appended_to_without_a_name_still_steps():
    # param_names is not extended by an in-place append: no IndexError
    w, b = _tagged_pair(0)
    opt = AdamW([("w", w)], lr=0.01, compile=False)
    opt.param_groups[0]["params"].append(b)
    _random_grads([w, b], 0)
    opt.step()
    assert opt.param_groups[0]["lr_scales"] == [0.25, 1.0]


def test_params_list_appended_in_place_with_tags_is_scaled_by_them():
    w, b = _tagged_pair(0)
    opt = AdamW([w], lr=0.01, weight_decay=0.1, compile=False)
    _random_grads([w], 0)
    opt.step()
    opt.param_groups[0]["params"].append(b)
    _random_grads([w, b], 1)
    opt.step()
    fresh = AdamW([w, b], lr=0.01, weight_decay=0.1)
    for key in ("lr_scales", "wd_scales"):
        assert opt.param_groups[0][key] == fresh.param_groups[0][key]
    assert "step" in opt.state[b]


@pytest.mark.parametrize(
    "name, engine",
    [(name, "aot_eager") for name in OPTIMIZERS] + [("adam", "inductor")],
)
def test_float64_0d_param_in_the_unrolled_unit_is_updated(name: str, engine: str):
    # A graph's in-place update of a 0-d float64 CPU input is dropped (torch 2.13);
    # the unrolled unit passed a 0-d parameter as it is, so the compiled engine left
    # it unchanged (SGD 0.11, Adam 0.064 off torch after 4 steps)
    shapes = [(4, 4), (3,), (), (300, 70)]
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    ps = [nn.Parameter(b.clone()) for b in base]
    refs = [nn.Parameter(b.clone()) for b in base]
    ours, ref = _ours_and_torch(name, ps, refs, engine)
    for step in range(4):
        _random_grads(ps, step)
        _random_grads(refs, step)
        ours.step()
        ref.step()
    assert_pair_close(ours, ref, list(zip(ps, refs)))


def _tagged_pair(seed: int) -> list[nn.Parameter]:
    """A weight (lr scale 1/sqrt(16) for Adam) and a bias (1): different scales."""
    gen = torch.Generator().manual_seed(seed)
    return [
        uc.Parameter(torch.randn(4, 16, generator=gen, dtype=torch.float64), "weight"),
        uc.Parameter(torch.randn(4, generator=gen, dtype=torch.float64), "bias"),
    ]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("how", ["swap", "new_list"])
def test_reordered_group_keeps_each_params_scales(name: str, engine: str, how: str):
    # Note [admitted order]: torch keys state by the parameter, so reordering a
    # group's list changes no update; the u-μP factors must follow their parameters
    # (they were positional: each got the other's lr scale).
    runs = []
    for reorder in (False, True):
        ps = _tagged_pair(0)
        opt = build(OPTIMIZERS[name][0], list(ps), engine, lr=0.01, weight_decay=0.1)
        for step in range(5):
            if reorder and step == 2:
                if how == "swap":
                    live = opt.param_groups[0]["params"]
                    live[0], live[1] = live[1], live[0]
                else:
                    opt.param_groups[0]["params"] = [ps[1], ps[0]]
            _random_grads(ps, step)
            opt.step()
        runs.append(([p.detach().clone() for p in ps], opt))
    (plain, _), (reordered, opt) = runs
    for a, b in zip(plain, reordered):
        assert torch.equal(a, b)
    fresh = OPTIMIZERS[name][0](_tagged_pair(0)[::-1], lr=0.01, weight_decay=0.1)
    for key in ("lr_scales", "wd_scales"):
        assert opt.param_groups[0][key] == fresh.param_groups[0][key]


def _put_wide_weight_first(opt: torch.optim.Optimizer, b: Tensor, step: int) -> None:
    """Put a new tagged weight in the first place of ``opt``'s group (an AdamW built
    at lr 0.01, weight decay 0.1, beside bias ``b``), step, and check its factors are
    those of an AdamW built with it: scaled with the group's lr at admission."""
    wide = uc.Parameter(torch.randn(4, 64, dtype=torch.float64), "weight")
    opt.param_groups[0]["params"][0] = wide
    _random_grads([wide, b], step)
    opt.step()
    fresh = AdamW([wide, b], lr=0.01, weight_decay=0.1)
    for key in ("lr_scales", "wd_scales"):
        assert opt.param_groups[0][key] == fresh.param_groups[0][key]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("tensor_lr", [False, True])
def test_param_put_in_a_groups_place_gets_its_own_scales(engine: str, tensor_lr: bool):
    # A tagged parameter replacing another in place is scaled from its own tags and
    # the group's lr and weight decay at admission, as add_param_group would have
    # (it used to take the replaced parameter's factors). A tensor lr that a
    # scheduler fills in place counts with its value at admission (it was read when
    # the parameter came: 8x the weight decay scale after three halvings).
    w, b = _tagged_pair(0)
    lr = torch.tensor(0.01, dtype=torch.float64) if tensor_lr else 0.01
    opt = build(AdamW, [w, b], engine, lr=lr, weight_decay=0.1)
    for step in range(2):
        _random_grads([w, b], step)
        opt.step()
    if tensor_lr:  # a scheduler: admission used 0.01
        opt.param_groups[0]["lr"].fill_(0.005)
    else:
        opt.param_groups[0]["lr"] = 0.005
    _put_wide_weight_first(opt, b, step=2)
    assert opt.param_groups[0]["lr_scales"][0] == 64**-0.5
    # untagged, without allow_non_unit_scaling_params: the construction's error
    opt.param_groups[0]["params"][0] = nn.Parameter(_randn(4, 64))
    _random_grads(opt.param_groups[0]["params"], 3)
    before = snapshot(opt)
    with pytest.raises(ValueError, match=r"group 0, index 0 .* not u-μP tagged"):
        opt.step()
    assert_unchanged(opt, before)


@pytest.mark.parametrize("engine", ENGINES)
def test_param_put_in_a_group_after_load_state_dict_keeps_admission_lr(engine: str):
    # load_state_dict makes new group dicts; holding the same parameters, they keep
    # the lr and weight decay of their admission (they took the scheduled lr of the
    # checkpoint: twice the weight-decay scale here).
    w, b = _tagged_pair(0)
    opt = build(AdamW, [w, b], engine, lr=0.01, weight_decay=0.1)
    _random_grads([w, b], 0)
    opt.step()
    opt.param_groups[0]["lr"] = 0.005  # a scheduler
    opt.load_state_dict(opt.state_dict())  # a resume
    _put_wide_weight_first(opt, b, step=1)


def _edit_in_place(opt: torch.optim.Optimizer, pool: list[Tensor], edit: str) -> None:
    """``edit`` one optimizer's first group or state in place; ``pool``: its three
    parameters and a fourth, not in the optimizer."""
    live = opt.param_groups[0]["params"]
    if edit == "replace_param":
        live[1] = pool[3]
    elif edit == "delete_state":
        del opt.state[pool[0]]
    elif edit == "replace_state":
        opt.state[pool[2]] = {}
    else:  # the params list shortened and/or lengthened
        if edit.startswith("pop"):
            live.pop(1)
        if edit.endswith("append"):
            live.append(pool[3])


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(
    "edit",
    [
        "replace_param",
        "delete_state",
        "replace_state",
        "append",
        "pop",
        "pop_then_append",
    ],
)
def test_steady_step_sees_params_and_state_edited_in_place(engine: str, edit: str):
    # torch.optim reads group["params"] and state[p] at every step; so must the
    # cached steady step (it compares them by identity). A parameter appended in
    # place is stepped (its state created then), one removed is no longer; Note
    # [admitted order]: a new one gets its u-μP factors as add_param_group would (1
    # for these untagged ones), the others keep theirs (appending used to raise).
    name = "adam"
    ps = [nn.Parameter(_randn(3, 5)) for _ in range(3)]
    extra = nn.Parameter(_randn(3, 5))
    refs = [p.detach().clone().requires_grad_() for p in [*ps, extra]]
    ours, ref = _ours_and_torch(name, ps, refs[:3], engine)
    for step in range(4):
        if step == 2:
            _edit_in_place(ours, [*ps, extra], edit)
            _edit_in_place(ref, refs, edit)
        live = ours.param_groups[0]["params"]
        live_ref = ref.param_groups[0]["params"]
        _random_grads(live, step)
        _random_grads(live_ref, step)
        ours.step()
        ref.step()
    assert_pair_close(ours, ref, list(zip([*ps, extra], refs)))
    assert len(ours.param_groups[0]["lr_scales"]) == len(live)


# -- c. complex parameters ----------------------------------------------------------

# torch's test_complex shapes, plus a 0-d, a zero-size and a 1-D parameter.
COMPLEX_SHAPES = [(10, 5), (10, 5), (10, 5), (), (0, 3), (4,)]
_TORCH_COMPLEX_INPUTS = {
    "adam": co.optim_inputs_func_adam,
    "adamw": getattr(co, "optim_inputs_func_adamw", co.optim_inputs_func_adam),
    "sgd": co.optim_inputs_func_sgd,
}


# The compiled engine on the inputs that use every state key and option.
COMPLEX_COMPILED_INPUTS = {"amsgrad", "maximize", "tensor lr", "nesterov", "dampening"}


def _complex_inputs() -> list[Any]:
    cases = []
    for name, func in _TORCH_COMPLEX_INPUTS.items():
        for optim_input in func(device="cpu", dtype=torch.complex128):
            kwargs = dict(optim_input.kwargs)
            if name == "adamw":  # torch's default decay; ours defaults to 0
                kwargs.setdefault("weight_decay", 1e-2)
            slug = re.sub(r"\W+", "_", optim_input.desc).strip("_")
            engines = (
                ENGINES if optim_input.desc in COMPLEX_COMPILED_INPUTS else ["eager"]
            )
            for engine in engines:
                cases.append(
                    pytest.param(name, kwargs, engine, id=f"{name}-{slug}-{engine}")
                )
    return cases


def _complex_params(dtype: torch.dtype = torch.complex128) -> list[Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [
        torch.randn(shape, generator=gen, dtype=dtype).requires_grad_()
        for shape in COMPLEX_SHAPES
    ]


def _copy_leaves(params: Sequence[Tensor]) -> list[Tensor]:
    return [p.detach().clone().requires_grad_() for p in params]


def _real_kwargs(kwargs: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """Tensor hyper-parameters cast to the parameters' real dtype (a deep copy)."""
    out = copy.deepcopy(kwargs)
    for key, value in out.items():
        if isinstance(value, Tensor):
            out[key] = value.to(dtype)
    return out


@pytest.mark.parametrize(("name", "kwargs", "engine"), _complex_inputs())
def test_complex_params_match_torch_inputs(name: str, kwargs: dict, engine: str):
    params = _complex_params()
    ref_params = _copy_leaves(params)
    ours_cls, torch_cls, _ = OPTIMIZERS[name]
    ours = build(
        ours_cls, params, engine, **_real_kwargs(kwargs, torch.float64), **UMUP
    )
    ref = torch_cls(ref_params, **_real_kwargs(kwargs, torch.float64), foreach=False)
    pairs = list(zip(params, ref_params))
    for step in range(STEPS):
        _random_grads(params, step)
        _random_grads(ref_params, step)
        ours.step()
        ref.step()
        assert_pair_close(ours, ref, pairs, where=f"step {step + 1}: ")
    assert_state_layout_like(ours, ref, pairs)  # complex state, as torch keeps it


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_complex_params_match_their_real_views(name: str, engine: str):
    # torch's test_complex: complex parameters step like their view_as_real copies.
    params = _complex_params()
    real_params = [
        torch.view_as_real(p).detach().clone().requires_grad_() for p in params
    ]
    ours_cls = OPTIMIZERS[name][0]
    ours = build(ours_cls, params, engine, **KWARGS[name], **UMUP)
    real = build(ours_cls, real_params, engine, **KWARGS[name], **UMUP)
    for step in range(STEPS):
        _random_grads(params, step)
        for c, r in zip(params, real_params):
            r.grad = torch.view_as_real(c.grad).clone()  # type: ignore[arg-type]
        ours.step()
        real.step()
        assert_pair_close(ours, real, list(zip(params, real_params)))


COMPLEX_TAGGED: list[tuple[tuple[int, ...], str, int | None]] = [
    ((4, 6), "weight", None),  # fan_in 6 (not 12, as view_as_real's (4, 6, 2) says)
    ((2, 3, 4), "weight", 2),  # fan_in 12
    ((6,), "bias", 2),
    ((6,), "norm", None),
    ((5, 6), "output", None),
]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_complex_tagged_params_match_unit_scaling(name: str, engine: str):
    gen = torch.Generator().manual_seed(1)
    params = [
        uc.Parameter(torch.randn(shape, generator=gen, dtype=torch.complex128), t, d)  # type: ignore[arg-type]
        for shape, t, d in COMPLEX_TAGGED
    ]
    ref_params = copy.deepcopy(params)
    ours = _run_vs_unit_scaling(
        name, params, params, ref_params, engine, steps=STEPS, **KWARGS[name]
    )
    # The fan-in comes from the complex parameter's own shape.
    expected = [lr_scale_func_adam(p) for p in params]  # type: ignore[arg-type]
    assert ours.param_groups[0]["lr_scales"] == pytest.approx(expected)


@pytest.mark.filterwarnings("error::RuntimeWarning")  # no silent eager fallback
def test_complex_params_match_torch_inductor():
    params = _complex_params(torch.complex64)
    ref_params = _copy_leaves(params)
    ours, ref = _ours_and_torch("adam", params, ref_params, "inductor")
    pairs = list(zip(params, ref_params))
    for step in range(STEPS):
        _random_grads(params, step)
        _random_grads(ref_params, step)
        ours.step()
        ref.step()
        assert_pair_close(ours, ref, pairs, where=f"step {step + 1}: ")


@pytest.mark.parametrize("engine", ENGINES)
def test_complex_state_dict_from_torch_resumes(engine: str):
    params = _complex_params()
    straight_params = _copy_leaves(params)
    first = torch.optim.Adam(params, **KWARGS["adam"])
    straight = torch.optim.Adam(straight_params, **KWARGS["adam"])
    for step in range(2):
        _random_grads(params, step)
        _random_grads(straight_params, step)
        first.step()
        straight.step()
    resumed = build(Adam, params, engine, **KWARGS["adam"], **UMUP)
    resumed.load_state_dict(copy.deepcopy(first.state_dict()))
    for step in range(2, 4):
        _random_grads(params, step)
        _random_grads(straight_params, step)
        resumed.step()
        straight.step()
        assert_pair_close(resumed, straight, list(zip(params, straight_params)))


# -- d. odd inputs torch accepts ------------------------------------------------------


def _p(t: Tensor, requires_grad: bool = True) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=requires_grad)


def _randn(*shape: int) -> Tensor:
    return torch.randn(shape, generator=_GEN, dtype=torch.float64)


_GEN = torch.Generator()


def _make(build_params: Callable[[], list[Tensor]]) -> Callable[[], list[Tensor]]:
    """Deterministic builder: the same values and layouts on every call."""

    def make() -> list[Tensor]:
        _GEN.manual_seed(0)
        return build_params()

    return make


def _non_contiguous() -> list[Tensor]:
    return [
        _p(_randn(6, 4).t()),  # transposed (dense)
        _p(_randn(8, 6)[::2]),  # strided (not dense)
        _p(_randn(130, 256).t()),  # large (>= 16384 elements) and transposed
        _p(_randn(3, 260, 64)[:, :256]),  # large and not dense
    ]


def _channels_last() -> list[Tensor]:
    return [
        _p(_randn(2, 3, 4, 5).to(memory_format=torch.channels_last)),
        _p(_randn(4, 32, 16, 8).to(memory_format=torch.channels_last)),
    ]


def _grads_transposed(params: Sequence[Tensor], step: int) -> None:
    for k, p in enumerate(params):
        g = torch.randn(p.shape[::-1], generator=_grad_gen(step, k), dtype=p.dtype)
        p.grad = g.t() if p.ndim == 2 else g


def _grads_expanded(params: Sequence[Tensor], step: int) -> None:
    for k, p in enumerate(params):
        row = torch.randn(
            (1, *p.shape[1:]), generator=_grad_gen(step, k), dtype=p.dtype
        )
        p.grad = row.expand(p.shape)


def _grads_shared(params: Sequence[Tensor], step: int) -> None:
    # Tied weights: one gradient tensor object for both.
    g = torch.randn(params[0].shape, generator=_grad_gen(step, 0), dtype=torch.float64)
    for p in params:
        p.grad = g


def _grads_non_leaf(params: Sequence[Tensor], step: int) -> None:
    for k, p in enumerate(params):
        w = torch.randn(
            p.shape, generator=_grad_gen(step, k), dtype=p.dtype
        ).requires_grad_()
        p.grad = w * 1.5  # has a grad_fn


def _grads_create_graph(params: Sequence[Tensor], step: int) -> None:
    for p in params:
        p.grad = None
        ((p**3).sum() * (step + 1)).backward(create_graph=True)


# (id, parameter builder, gradient setter)
ACCEPTED: list[tuple[str, Callable[[], list[Tensor]], Callable[..., None]]] = [
    (
        "zero_element",
        _make(lambda: [_p(_randn(0, 3)), _p(_randn(3)), _p(_randn(2, 0, 4))]),
        _random_grads,
    ),
    ("zero_element_only", _make(lambda: [_p(_randn(0))]), _random_grads),
    ("scalar", _make(lambda: [_p(_randn()), _p(_randn(3))]), _random_grads),
    ("non_contiguous", _make(_non_contiguous), _random_grads),
    ("channels_last", _make(_channels_last), _random_grads),
    (
        "requires_grad_false",
        _make(lambda: [_p(_randn(3, 2), False), _p(_randn(200, 100), False)]),
        _random_grads,
    ),
    (
        "plain_tensor_leaves",
        _make(lambda: [_randn(3, 2).requires_grad_(), _randn(4)]),
        _random_grads,
    ),
    (
        "grad_non_contiguous",
        _make(lambda: [_p(_randn(6, 4)), _p(_randn(200, 100))]),
        _grads_transposed,
    ),
    (
        "grad_expanded",
        _make(lambda: [_p(_randn(6, 4)), _p(_randn(200, 100))]),
        _grads_expanded,
    ),
    ("grad_shared", _make(lambda: [_p(_randn(6, 4)), _p(_randn(6, 4))]), _grads_shared),
    (
        "grad_non_leaf",
        _make(lambda: [_p(_randn(6, 4)), _p(_randn(200, 100))]),
        _grads_non_leaf,
    ),
    (
        "grad_create_graph",
        _make(lambda: [_p(_randn(6, 4)), _p(_randn(3))]),
        _grads_create_graph,
    ),
]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", ["adam", "sgd"])
@pytest.mark.parametrize(
    ("make", "set_grads"),
    [case[1:] for case in ACCEPTED],
    ids=[case[0] for case in ACCEPTED],
)
def test_odd_inputs_step_like_torch(make, set_grads, name: str, engine: str):
    params, ref_params = make(), make()
    ours, ref = _ours_and_torch(name, params, ref_params, engine)
    pairs = list(zip(params, ref_params))
    for step in range(STEPS):
        set_grads(params, step)
        set_grads(ref_params, step)
        ours.step()
        ref.step()
        assert_pair_close(ours, ref, pairs, where=f"step {step + 1}: ")
    assert_state_layout_like(ours, ref, pairs)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(
    "make",
    [_make(_non_contiguous), _make(_channels_last)],
    ids=["non_contiguous", "channels_last"],
)
def test_odd_layouts_state_keeps_param_memory_format(make, engine: str):
    # torch's Adam creates its moments with zeros_like(p, torch.preserve_format): a
    # transposed or channels_last parameter keeps that layout in its state. (torch's
    # SGD clones the first gradient instead, so its buffer follows the gradient's
    # layout; that is not pinned here.)
    params, ref_params = make(), make()
    ours, ref = _ours_and_torch("adam", params, ref_params, engine)  # AdamW's too
    for step in range(2):
        _random_grads(params, step)
        _random_grads(ref_params, step)
        ours.step()
        ref.step()
    assert_state_layout_like(ours, ref, list(zip(params, ref_params)), strides=True)


@pytest.mark.parametrize(
    "engine",
    [
        *ENGINES,
        pytest.param(
            "inductor",
            marks=pytest.mark.skipif(
                TORCH < "2.11",
                reason="torch 2.6's Inductor cannot compile for meta parameters (the "
                "optimizer then warns and runs eagerly)",
            ),
        ),
    ],
)
@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.filterwarnings("error::RuntimeWarning")  # no eager fallback
def test_meta_params_step_like_torch(name: str, engine: str):
    # Meta parameters (shape-only dry runs, deferred init) step without data; the
    # state has torch's keys, dtypes, devices (``step`` on the CPU) and shapes.
    params = [
        nn.Parameter(torch.empty(s, device="meta")) for s in [(3, 4), (), (200, 100)]
    ]
    ref_params = [
        nn.Parameter(torch.empty(s, device="meta")) for s in [(3, 4), (), (200, 100)]
    ]
    ours, ref = _ours_and_torch(name, params, ref_params, engine)
    for _ in range(2):
        for p in [*params, *ref_params]:
            p.grad = torch.empty_like(p)
        ours.step()
        ref.step()
    assert_state_layout_like(ours, ref, list(zip(params, ref_params)))


@needs_mixed_grad_dtype
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("check", ["numbers", "state_dtype"])
@pytest.mark.parametrize(
    ("param_dtype", "grad_dtype"),
    [(torch.float32, torch.float64), (torch.float64, torch.float32)],
    ids=["float32_param_float64_grad", "float64_param_float32_grad"],
)
@pytest.mark.parametrize("plain", [False, True], ids=["momentum_wd", "plain"])
def test_sgd_grad_dtype_differs_like_torch(
    param_dtype, grad_dtype, check: str, engine: str, plain: bool
):
    # torch 2.13 lets a parameter's gradient have another dtype (``grad_dtype``);
    # torch's SGD accepts it (foreach and for-loop): its momentum buffer is a clone of
    # the first (weight-decayed) gradient, so it takes that tensor's dtype:
    # promote_types(grad, param) with weight decay, else the gradient's. Its
    # Adam/AdamW reject such a gradient (see REJECTED).
    def make() -> list[nn.Parameter]:
        _GEN.manual_seed(0)
        ps = [
            nn.Parameter(_randn(4, 3).to(param_dtype)),
            nn.Parameter(_randn(5).to(param_dtype)),
        ]
        for p in ps:
            p.grad_dtype = None  # type: ignore[attr-defined]
        return ps

    params, ref_params = make(), make()
    # plain: the update is the gradient times the lr, which torch scales in the
    # parameter's wider dtype (ours rounded it to the gradient's)
    options = {"momentum": 0.0, "nesterov": False, "weight_decay": 0.0} if plain else {}
    ours, ref = _ours_and_torch("sgd", params, ref_params, engine, **options)
    pairs = list(zip(params, ref_params))
    for step in range(STEPS):
        for side in (params, ref_params):
            for k, p in enumerate(side):
                p.grad = torch.randn(
                    p.shape, generator=_grad_gen(step, k), dtype=torch.float64
                ).to(grad_dtype)
        ours.step()
        ref.step()
        if check == "numbers":
            for p, q in pairs:
                torch.testing.assert_close(p, q, **tolerance(p.dtype))
                if plain:
                    continue
                torch.testing.assert_close(
                    ours.state[p]["momentum_buffer"].double(),
                    ref.state[q]["momentum_buffer"].double(),
                    **tolerance(torch.float32),
                )
    if check == "state_dtype":
        assert_state_layout_like(ours, ref, pairs)


def test_zero_element_tagged_params_are_accepted():
    # unit_scaling divides by zero on a weight with fan-in 0 or a width-0 bias (SGD's
    # to_output_scale); torch accepts zero-element parameters, and an update of no
    # elements needs no lr scale: ours accepts them (finite factors) and steps the rest
    # like unit_scaling.
    zero_weight = uc.Parameter(torch.randn(3, 0, dtype=torch.float64), "weight")
    zero_bias = uc.Parameter(torch.randn(0, dtype=torch.float64), "bias")
    weight = uc.Parameter(torch.randn(4, 3, dtype=torch.float64), "weight")
    ref_weight = copy.deepcopy(weight)
    for cls, uso_cls, kwargs in [
        (Adam, uso.Adam, {"lr": 0.01, "weight_decay": 0.1}),
        (
            SGD,
            uso.SGD,
            {"lr": 0.01, "weight_decay": 0.1, "readout_constraint": "to_output_scale"},
        ),
    ]:
        params = [zero_weight, weight, zero_bias]
        opt = cls(params, compile=False, **kwargs)
        ref = uso_cls([ref_weight], **kwargs)
        for scale in [
            *opt.param_groups[0]["lr_scales"],
            *opt.param_groups[0]["wd_scales"],
        ]:
            assert scale == scale and abs(scale) != float("inf"), opt.param_groups[0]
        for step in range(2):
            _random_grads([weight], step)
            _random_grads([ref_weight], step)
            for p in (zero_weight, zero_bias):
                p.grad = torch.zeros_like(p)
            opt.step()
            ref.step()
            assert_pair_close(opt, ref, [(weight, ref_weight)])
        assert opt.state[zero_weight] == {} or all(
            v.shape in ((3, 0), ()) for v in opt.state[zero_weight].values()
        )


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("lr_dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("groups", [1, 2, 5])
def test_tensor_lr_per_group_filled_in_place_matches_torch(
    groups: int, lr_dtype: torch.dtype, engine: str
):
    """Note [tensor hyper refresh]: up to FEW_TENSORS tensor lrs are copied into views
    of the hyper table, more scattered into it; either way each step reads the values
    a scheduler wrote in place, converted to the table's float64 exactly (torch gets
    the same values in float64: its arithmetic follows a float32 lr's dtype)."""
    from umup_compile import _hypers

    assert (groups <= _hypers.FEW_TENSORS) == (groups < 5)
    _GEN.manual_seed(0)
    params = [_p(_randn(4, 3)) for _ in range(groups)]
    refs = [_p(p.detach().clone()) for p in params]
    lrs = [torch.tensor(0.01 * (k + 1), dtype=lr_dtype) for k in range(groups)]
    ref_lrs = [lr.double() for lr in lrs]
    ours = build(
        Adam, [{"params": [p], "lr": lr} for p, lr in zip(params, lrs)], engine, **UMUP
    )
    ref = torch.optim.Adam(
        [{"params": [q], "lr": lr} for q, lr in zip(refs, ref_lrs)], foreach=False
    )
    for step in range(3):
        for k, (p, q) in enumerate(zip(params, refs)):
            p.grad = torch.randn(p.shape, generator=_grad_gen(step, k), dtype=p.dtype)
            q.grad = p.grad.clone()
        ours.step()
        ref.step()
        for lr in (*lrs, *ref_lrs):
            lr.mul_(0.5)  # in place, as a scheduler fills a tensor lr
    assert_pair_close(ours, ref, list(zip(params, refs)))


# -- e. odd inputs torch rejects ------------------------------------------------------


def _contains(*parts: str) -> str:
    """A regex matching a message that contains every part (any order)."""
    return "(?s)" + "".join(f"(?=.*{re.escape(p)})" for p in parts)


FUSED_TEXT = "`fused=True` requires all the params to be floating point Tensors"

# A case builds an optimizer through ``make(named_params, **kwargs)``: ours, or
# torch's with the same arguments (to check torch's answer).
Make = Callable[..., torch.optim.Optimizer]


def _makers(name: str, engine: str) -> tuple[Make, Make]:
    ours_cls, torch_cls, _ = OPTIMIZERS[name]

    def ours(params: Any, **kwargs: Any) -> torch.optim.Optimizer:
        return build(ours_cls, params, engine, **kwargs, **UMUP)

    def theirs(params: Any, **kwargs: Any) -> torch.optim.Optimizer:
        return torch_cls(params, **kwargs)

    return ours, theirs


def _fused_with(bad_param: Callable[[], nn.Parameter]) -> Callable[[Make, str], Any]:
    def case(make: Make, name: str) -> torch.optim.Optimizer:
        good, bad = nn.Parameter(torch.randn(3)), bad_param()
        opt = make([("good", good), ("bad", bad)], lr=0.01, fused=True)
        for p in (good, bad):
            p.grad = torch.ones_like(p)
        return opt

    return case


def _step_once_then(
    mutate: Callable[[nn.Parameter], None], dtype: torch.dtype = torch.float32
) -> Callable[[Make, str], Any]:
    """A case whose first step is fine; ``mutate(bad)`` then breaks the gradient."""

    def case(make: Make, name: str) -> torch.optim.Optimizer:
        good = nn.Parameter(torch.randn(3, dtype=dtype))
        bad = nn.Parameter(torch.randn(3, 2, dtype=dtype))
        opt = make([("good", good), ("bad", bad)], **KWARGS[name])
        _random_grads([good, bad], 0)
        opt.step()
        _random_grads([good, bad], 1)
        mutate(bad)
        return opt

    return case


def _grad_dtype(dtype: torch.dtype) -> Callable[[nn.Parameter], None]:
    def mutate(p: nn.Parameter) -> None:
        p.grad_dtype = None  # type: ignore[attr-defined]  # torch 2.13: any grad dtype
        p.grad = p.grad.to(dtype)  # type: ignore[union-attr]

    return mutate


def _grad_shape(*shape: int) -> Callable[[nn.Parameter], None]:
    def mutate(p: nn.Parameter) -> None:
        # torch refuses ``p.grad = g`` of another shape, but not through ``.data``.
        p.grad.data = torch.randn(shape, dtype=p.dtype)  # type: ignore[union-attr]

    return mutate


# (id, optimizers, case, exception, regex, torch's answer). The culprit is "bad".
REJECTED: list[tuple[str, list[str], Any, type[Exception], str, str]] = [
    (
        "fused_meta",
        ["adam", "adamw", "sgd"],
        _fused_with(lambda: nn.Parameter(torch.empty(2, 2, device="meta"))),
        RuntimeError,  # at the step, as torch (Note: the meta workflow builds first)
        _contains(FUSED_TEXT, "'bad'", "meta"),
        "rejects",
    ),
    (
        "fused_complex",
        ["adam", "adamw", "sgd"],
        _fused_with(lambda: nn.Parameter(torch.randn(2, 2, dtype=torch.complex64))),
        RuntimeError,
        _contains(FUSED_TEXT, "'bad'", "complex64"),
        "rejects",
    ),
    (
        "grad_dtype_float64",
        ["adam", "adamw"],
        _step_once_then(_grad_dtype(torch.float64)),
        TypeError,
        _contains("'bad'", "float64", "float32"),
        "rejects",
    ),
    (
        "grad_dtype_bf16_param_float32_grad",
        ["adam", "adamw"],
        _step_once_then(_grad_dtype(torch.float32), torch.bfloat16),
        TypeError,
        _contains("'bad'", "bfloat16", "float32"),
        "rejects",
    ),
    (
        "grad_shape",
        ["adam", "sgd"],
        _step_once_then(_grad_shape(6)),
        ValueError,
        _contains("'bad'", "(6,)", "(3, 2)"),
        "rejects",
    ),
    # Divergence: torch broadcasts a (2,) gradient over a (3, 2) parameter (its SGD
    # then keeps a (2,) momentum buffer); its own ``p.grad = g`` refuses that shape.
    (
        "grad_shape_broadcastable",
        ["adam", "sgd"],
        _step_once_then(_grad_shape(2)),
        ValueError,
        _contains("'bad'", "(2,)", "(3, 2)"),
        "accepts",
    ),
]


def _rejected_params() -> list[Any]:
    return [
        pytest.param(
            name,
            engine,
            case,
            exc,
            regex,
            answer,
            id=f"{case_id}-{name}-{engine}",
            marks=[needs_mixed_grad_dtype] if case_id.startswith("grad_dtype") else [],
        )
        for case_id, names, case, exc, regex, answer in REJECTED
        for name in names
        for engine in ENGINES
    ]


@pytest.mark.parametrize(
    ("name", "engine", "case", "exc", "regex", "answer"), _rejected_params()
)
def test_odd_inputs_rejected_naming_param_before_any_change(
    name: str, engine: str, case: Any, exc: type[Exception], regex: str, answer: str
):
    ours_make, torch_make = _makers(name, engine)
    try:
        case(torch_make, name).step()
        torch_answer = "accepts"
    except Exception:  # noqa: BLE001 - any failure is torch rejecting the input
        torch_answer = "rejects"
    assert torch_answer == answer  # the premise of the case still holds
    try:
        opt = case(ours_make, name)
    except (ValueError, TypeError) as e:  # rejected while building: fine too
        assert isinstance(e, exc) and re.search(regex, str(e)), repr(e)
        return
    before = snapshot(opt)
    with pytest.raises(exc, match=regex):
        opt.step()
    assert_unchanged(opt, before)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("engine", ENGINES)
def test_fused_true_accepts_meta_params_until_the_step(name: str, engine: str):
    """The meta-device workflow: build the model on ``meta``, the optimizer with
    ``fused=True`` (a habit), then ``to_empty`` onto a real device and train, with
    torch's numbers; torch checks ``fused``'s rule at the step, and so do we. (The
    parameters must stay the optimizer's: ``to_empty`` swaps their contents under
    ``swap_module_params_on_conversion``; without it, it makes new parameters and
    neither optimizer would update the model.)"""
    results = []
    swap = torch.__future__.get_swap_module_params_on_conversion()
    for make in _makers(name, engine):
        with torch.device("meta"):
            model = nn.Linear(4, 3)
        opt = make(list(model.named_parameters()), **KWARGS[name], fused=True)
        torch.__future__.set_swap_module_params_on_conversion(True)
        try:
            model.to_empty(device="cpu")
        finally:
            torch.__future__.set_swap_module_params_on_conversion(swap)
        assert [p for g in opt.param_groups for p in g["params"]] == list(
            model.parameters()
        )
        torch.manual_seed(0)
        for p in model.parameters():
            p.data.copy_(torch.randn(p.shape))
        start = [p.detach().clone() for p in model.parameters()]
        for s in range(2):
            _random_grads(list(model.parameters()), s)
            opt.step()
        results.append([p.detach().clone() for p in model.parameters()])
        assert not any(map(torch.equal, start, results[-1]))
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs, **tolerance(torch.float32))


def test_non_leaf_param_rejected_naming_it():
    good = nn.Parameter(torch.randn(3))
    bad = nn.Parameter(torch.randn(3)) * 2
    with pytest.raises(ValueError, match=_contains("non-leaf", "'bad'")):
        Adam([("good", good), ("bad", bad)], compile=False, **UMUP)
    opt = Adam([("good", good)], compile=False, **UMUP)
    _random_grads([good], 0)
    opt.step()
    before = snapshot(opt)
    with pytest.raises(ValueError, match=_contains("non-leaf", "group 1, index 1")):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(2)), bad]})
    assert_unchanged(opt, before)


def _through_the_step(cls: type, **kwargs: Any) -> tuple[Tensor, tuple[Tensor, ...]]:
    """One differentiable step from a given state; the gradients of the new
    parameter's sum with respect to the gradient and both moments."""
    gen = torch.Generator().manual_seed(0)
    p = torch.rand(10, dtype=torch.float64, generator=gen)
    grad, m0, v0 = (
        torch.rand(10, dtype=torch.float64, generator=gen, requires_grad=True)
        for _ in range(3)
    )
    p.grad = grad
    opt = cls([p], lr=0.1, weight_decay=0.01, differentiable=True, **kwargs)
    opt.state[p].update(
        exp_avg=m0.clone(),
        exp_avg_sq=v0.clone(),
        step=torch.tensor(3.0, dtype=torch.float64),
    )
    opt.step()
    return p.detach(), torch.autograd.grad(p.sum(), [grad, m0, v0])


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_differentiable_adam_gradients_through_the_step_match_torch(name: str):
    # autograd through the step (torch's differentiable=True): ours raised, the
    # update having changed sqrt's output in place
    ours_cls, torch_cls, _ = OPTIMIZERS[name]
    expected, expected_grads = _through_the_step(torch_cls)
    value, grads = _through_the_step(ours_cls, **UMUP)
    torch.testing.assert_close(value, expected, rtol=1e-14, atol=0)
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


def _hypergradients(cls: type, steps: int, **kwargs: Any) -> tuple[Tensor, ...]:
    """Meta-learning: ``steps`` differentiable steps of a quadratic from ``w0`` with
    a learned lr; the gradients of a final loss with respect to ``w0`` and the lr."""
    gen = torch.Generator().manual_seed(5)
    h = torch.rand(6, dtype=torch.float64, generator=gen) + 0.5
    targets = torch.randn(steps + 1, 6, dtype=torch.float64, generator=gen)
    w0 = torch.randn(6, dtype=torch.float64, generator=gen).requires_grad_()
    lr = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    w = w0.clone()
    opt = cls([w], lr=lr, differentiable=True, **kwargs)
    for k in range(steps):
        w.grad = h * (w - targets[k])
        opt.step()
    return torch.autograd.grad((w - targets[-1]).square().sum(), [w0, lr])


# (name, options, whether torch's own differentiable step runs the case)
DIFFERENTIABLE = [
    ("adam", {"weight_decay": 0.1}, True),
    ("adamw", {"weight_decay": 0.1}, True),
    ("adam", {"amsgrad": True}, False),
    ("sgd", {"momentum": 0.9, "nesterov": True, "weight_decay": 0.1}, True),
    ("sgd", {"momentum": 0.9, "dampening": 0.3}, False),
    ("sgd", {"momentum": torch.tensor(0.9, dtype=torch.float64)}, False),
]


@pytest.mark.parametrize(
    "name,kwargs,torch_runs", DIFFERENTIABLE, ids=range(len(DIFFERENTIABLE))
)
def test_differentiable_steps_give_the_hypergradients(
    name: str, kwargs: Any, torch_runs: bool
) -> None:
    # Note [differentiable steps]: a second step changed in place what autograd had
    # saved at the first ("modified by an inplace operation"), and a second tensor
    # hyper-parameter failed to enter the hyper table. Against torch where its
    # differentiable step runs (its float32 bias corrections: ~5e-6 off), and always
    # against finite differences of our own steps.
    ours_cls, torch_cls, _ = OPTIMIZERS[name]
    options = {**kwargs, "independent_weight_decay": False, **UMUP}
    grads = _hypergradients(ours_cls, 3, **options, compile=False)
    if torch_runs and TORCH >= "2.11":  # torch 2.6's own fails these too
        for a, b in zip(grads, _hypergradients(torch_cls, 3, **kwargs)):
            torch.testing.assert_close(a, b, rtol=0, atol=2e-5 * b.abs().max().item())

    def final_loss(lr: float) -> float:
        gen = torch.Generator().manual_seed(5)
        h = torch.rand(6, dtype=torch.float64, generator=gen) + 0.5
        targets = torch.randn(4, 6, dtype=torch.float64, generator=gen)
        w = torch.randn(6, dtype=torch.float64, generator=gen)
        opt = ours_cls(
            [w], lr=torch.tensor(lr, dtype=torch.float64), **options, compile=False
        )
        for k in range(3):
            w.grad = h * (w - targets[k])
            opt.step()
        return (w - targets[-1]).square().sum().item()

    eps = 1e-6
    finite = (final_loss(0.05 + eps) - final_loss(0.05 - eps)) / (2 * eps)
    torch.testing.assert_close(grads[1].item(), finite, rtol=1e-6, atol=0)


def test_non_leaf_params_accepted_where_torch_accepts_them():
    # torch optimizes a non-leaf that retains its grad, or any non-leaf with
    # differentiable=True (it used to be refused whatever the case)
    base = nn.Parameter(torch.randn(3, dtype=torch.float64))
    kept = base * 2
    kept.retain_grad()
    refs = [kept.detach().clone().requires_grad_()]
    ours, ref = _ours_and_torch("sgd", [kept], refs, "eager")
    _random_grads([kept], 0)
    _random_grads(refs, 0)
    ours.step()
    ref.step()
    torch.testing.assert_close(kept.detach(), refs[0].detach(), rtol=0, atol=0)
    SGD([base * 3], lr=0.1, differentiable=True, **UMUP)  # accepted


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_grad_on_another_device_rejected_naming_param(name: str):
    # ``p.data = p.data.cuda()`` moves a parameter but not its gradient.
    good = nn.Parameter(torch.randn(3, device="cuda"))
    bad = nn.Parameter(torch.randn(3, 2))
    opt = OPTIMIZERS[name][0](
        [("good", good), ("bad", bad)], compile=False, **KWARGS[name], **UMUP
    )
    _random_grads([good, bad], 0)
    bad.data = bad.data.cuda()
    before = snapshot(opt)
    with pytest.raises(ValueError, match=_contains("'bad'", "cuda", "cpu")):
        opt.step()
    assert_unchanged(opt, before)


# -- f. checkpoints -----------------------------------------------------------------


def _edit_state(
    sd: dict[str, Any], fn: Callable[[dict[str, Any]], None]
) -> dict[str, Any]:
    sd = copy.deepcopy(sd)
    fn(sd)
    return sd


def _drop_state_key(key: str, index: int = 1) -> Callable[[dict[str, Any]], None]:
    return lambda sd: sd["state"][index].pop(key)


def _set_state_key(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(sd: dict[str, Any]) -> None:
        sd["state"][1][key] = copy.deepcopy(value)

    return edit


def _float_steps(sd: dict[str, Any]) -> None:
    # torch < 1.12 saved ``step`` as a Python number.
    for state in sd["state"].values():
        state["step"] = float(state["step"])


def _drop_group_flags(sd: dict[str, Any]) -> None:
    # Checkpoints from older torch versions lack the newer group flags.
    for group in sd["param_groups"]:
        for key in (
            "decoupled_weight_decay",
            "fused",
            "differentiable",
            "capturable",
            "foreach",
        ):
            group.pop(key, None)


def _extra_group_key(sd: dict[str, Any]) -> None:
    for group in sd["param_groups"]:
        group["initial_lr"] = group["lr"]  # as lr schedulers add


def _drop_param_state(sd: dict[str, Any]) -> None:
    del sd["state"][0]


# (id, optimizer, checkpoint edit): torch loads these and keeps stepping.
CHECKPOINT_ACCEPTED: list[tuple[str, str, Callable[[dict[str, Any]], None]]] = [
    (
        "extra_tensor_key",
        "adam",
        _set_state_key("ema", torch.ones(3, 2, dtype=torch.float64)),
    ),
    ("extra_object_key", "adam", _set_state_key("note", "from another tool")),
    (
        "extra_max_exp_avg_sq_without_amsgrad",
        "adamw",
        _set_state_key("max_exp_avg_sq", torch.ones(3, 2, dtype=torch.float64)),
    ),
    ("float_step", "adam", _float_steps),
    ("missing_group_flags", "adam", _drop_group_flags),
    ("extra_group_key", "sgd", _extra_group_key),
    ("param_without_state", "adam", _drop_param_state),
    ("missing_momentum_buffer", "sgd", _drop_state_key("momentum_buffer")),
    ("none_momentum_buffer", "sgd", _set_state_key("momentum_buffer", None)),
]


def _named_pair() -> list[tuple[str, nn.Parameter]]:
    _GEN.manual_seed(3)
    return [("good", _p(_randn(4))), ("bad", _p(_randn(3, 2)))]


def _stepped(
    name: str,
    engine: str,
    ours: bool,
    named: list[tuple[str, nn.Parameter]],
    steps: int = 2,
) -> torch.optim.Optimizer:
    ours_cls, torch_cls, _ = OPTIMIZERS[name]
    opt = (
        build(ours_cls, named, engine, **KWARGS[name], **UMUP)
        if ours
        else torch_cls(named, **KWARGS[name])
    )
    params = [p for _, p in named]
    for step in range(steps):
        _random_grads(params, step)
        opt.step()
    return opt


# Loading is engine-independent; the compiled engine then rebuilds its layouts from
# the loaded state, checked on the edits that change which state tensors exist.
CHECKPOINT_COMPILED = {
    "extra_tensor_key",
    "param_without_state",
    "missing_momentum_buffer",
}


@pytest.mark.parametrize(
    ("name", "edit", "engine"),
    [
        pytest.param(name, edit, engine, id=f"{case_id}-{engine}")
        for case_id, name, edit in CHECKPOINT_ACCEPTED
        for engine in (ENGINES if case_id in CHECKPOINT_COMPILED else ["eager"])
    ],
)
def test_edited_checkpoints_load_like_torch(name: str, edit: Any, engine: str):
    ours_named, ref_named = _named_pair(), _named_pair()
    saved = {
        side: _edit_state(
            _stepped(name, engine, side == "ours", named).state_dict(), edit
        )
        for side, named in (("ours", ours_named), ("torch", ref_named))
    }
    ours_cls, torch_cls, _ = OPTIMIZERS[name]
    ours = build(ours_cls, ours_named, engine, **KWARGS[name], **UMUP)
    ref = torch_cls(ref_named, **KWARGS[name])
    ours.load_state_dict(saved["ours"])
    ref.load_state_dict(saved["torch"])
    params, ref_params = [p for _, p in ours_named], [p for _, p in ref_named]
    pairs = list(zip(params, ref_params))
    for step in range(2, 4):
        _random_grads(params, step)
        _random_grads(ref_params, step)
        ours.step()
        ref.step()
        assert_pair_close(ours, ref, pairs, where=f"step {step + 1}: ")


# (id, optimizer, checkpoint edit, regex): torch fails on these (KeyError, at load or
# at the next step); ours must refuse them at load, naming the parameter and the key.
CHECKPOINT_REJECTED: list[tuple[str, str, Callable[[dict[str, Any]], None], str]] = [
    ("missing_step", "adam", _drop_state_key("step"), _contains("'bad'", "'step'")),
    (
        "missing_exp_avg",
        "adamw",
        _drop_state_key("exp_avg"),
        _contains("'bad'", "'exp_avg'"),
    ),
    (
        "missing_exp_avg_sq",
        "adam",
        _drop_state_key("exp_avg_sq"),
        _contains("'bad'", "'exp_avg_sq'"),
    ),
    (
        "missing_max_exp_avg_sq_with_amsgrad",
        "adam",
        _drop_state_key("max_exp_avg_sq"),
        _contains("'bad'", "'max_exp_avg_sq'"),
    ),
]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(
    ("name", "edit", "regex"),
    [case[1:] for case in CHECKPOINT_REJECTED],
    ids=[case[0] for case in CHECKPOINT_REJECTED],
)
def test_checkpoint_missing_state_keys_rejected_at_load(
    name: str, edit: Any, regex: str, engine: str
):
    # torch's answer, for the record: it fails (KeyError) at load or at the next step.
    ref_named = _named_pair()
    ref_sd = _edit_state(_stepped(name, engine, False, ref_named).state_dict(), edit)
    with pytest.raises(KeyError):
        fresh = OPTIMIZERS[name][1](_named_pair(), **KWARGS[name])
        fresh.load_state_dict(ref_sd)
        for step in range(2):
            _random_grads([p for g in fresh.param_groups for p in g["params"]], step)
            fresh.step()

    saved = _edit_state(_stepped(name, engine, True, _named_pair()).state_dict(), edit)
    target = _stepped(name, engine, True, _named_pair(), steps=1)
    before = snapshot(target)
    with pytest.raises(ValueError, match=regex):
        target.load_state_dict(saved)
    assert_unchanged(target, before)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", ["adam", "sgd"])
def test_add_param_group_after_checkpoint_load_matches_torch(name: str, engine: str):
    def run(ours: bool) -> tuple[torch.optim.Optimizer, list[Tensor]]:
        _GEN.manual_seed(7)
        first, later = (
            [_p(_randn(4, 3)), _p(_randn(5))],
            [_p(_randn(2, 2)), _p(_randn(300, 100))],
        )
        make = (
            (lambda ps: build(OPTIMIZERS[name][0], ps, engine, **KWARGS[name], **UMUP))
            if ours
            else (lambda ps: OPTIMIZERS[name][1](ps, **KWARGS[name]))
        )
        opt = make(first)
        for step in range(2):
            _random_grads(first, step)
            opt.step()
        buffer = io.BytesIO()
        torch.save(opt.state_dict(), buffer)
        buffer.seek(0)
        resumed = make(first)
        resumed.load_state_dict(torch.load(buffer, weights_only=True))
        resumed.add_param_group({"params": later, "lr": 0.02, "weight_decay": 0.0})
        return resumed, [*first, *later]

    (ours, params), (ref, ref_params) = run(True), run(False)
    pairs = list(zip(params, ref_params))
    for step in range(2, 5):
        _random_grads(params, step)
        _random_grads(ref_params, step)
        ours.step()
        ref.step()
        assert_pair_close(ours, ref, pairs, where=f"step {step + 1}: ")


@pytest.mark.parametrize("engine", ENGINES)
def test_add_param_group_after_checkpoint_load_matches_unit_scaling(engine: str):
    kwargs = {"lr": 0.01, "weight_decay": 0.1}

    def tagged() -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        _GEN.manual_seed(8)
        first = [
            uc.Parameter(_randn(4, 3), "weight"),
            uc.Parameter(_randn(3), "bias", 2),
        ]
        later = [
            uc.Parameter(_randn(5, 4), "weight", 2),
            uc.Parameter(_randn(4), "norm"),
        ]
        return first, later

    first, later = tagged()
    ref_first, ref_later = tagged()
    ours = build(Adam, first, engine, **kwargs)
    ref = uso.Adam(ref_first, **kwargs)
    for step in range(2):
        _random_grads(first, step)
        _random_grads(ref_first, step)
        ours.step()
        ref.step()
    ours_sd, ref_sd = copy.deepcopy(ours.state_dict()), copy.deepcopy(ref.state_dict())
    ours = build(Adam, first, engine, **kwargs)
    ours.load_state_dict(ours_sd)
    ours.add_param_group({"params": later, "lr": 0.02})
    ref = uso.Adam(ref_first, **kwargs)
    ref.load_state_dict(ref_sd)
    for group in uso.scaled_parameters(
        [{"params": ref_later, "lr": 0.02}], uso.lr_scale_func_adam, weight_decay=0.1
    ):
        ref.add_param_group(group)
    params, ref_params = [*first, *later], [*ref_first, *ref_later]
    for step in range(2, 5):
        _random_grads(params, step)
        _random_grads(ref_params, step)
        ours.step()
        ref.step()
        assert_pair_close(
            ours, ref, list(zip(params, ref_params)), where=f"step {step + 1}: "
        )


# Note [hyper fingerprints]: edits that compare equal to the old value but are not
# the same hyper-parameter to torch. An edit takes the group and the dtype a tensor lr
# has: float32 for ours; torch, which computes in a tensor lr's dtype where ours
# computes in float64 (documented), gets the same float32 values as float64 tensors.
def _f32(value: float, dtype: torch.dtype) -> Tensor:
    return torch.tensor(value, dtype=torch.float32).to(dtype)


def _lr_to_float32_tensor(group: dict[str, Any], dtype: torch.dtype) -> None:
    if not isinstance(group["lr"], Tensor):
        group["lr"] = _f32(group["lr"], dtype)  # == the float, in float32


def _betas_list_edited_in_place(group: dict[str, Any], dtype: torch.dtype) -> None:
    if isinstance(group["betas"], list):
        group["betas"][0] = 0.5  # the same list object, edited
    else:
        group["betas"] = list(group["betas"])


Edit = Callable[[dict[str, Any], torch.dtype], None]
HYPER_EDITS: dict[str, tuple[Edit, tuple[str, ...]]] = {
    # name: (edit, optimizers)
    "lr_to_float32_tensor": (_lr_to_float32_tensor, ("adam", "sgd")),
    "betas_list_edited_in_place": (_betas_list_edited_in_place, ("adam",)),
}


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(
    "name,edit_name",
    [(n, e) for e, (_, names) in HYPER_EDITS.items() for n in names],
)
def test_hyper_edits_equal_in_value_are_still_edits(
    name: str, edit_name: str, engine: str
) -> None:
    """A float lr replaced by a float32 tensor that compares equal, a betas list
    edited in place: torch computes with the new value, and so do we (both were
    missed while hyper-parameters were compared by value alone; a tensor replaced by
    another, or by a float, is caught by value as soon as the two differ)."""
    edit, _ = HYPER_EDITS[edit_name]
    ours_cls, torch_cls, _ = OPTIMIZERS[name]
    _GEN.manual_seed(0)
    params = [_p(_randn(4, 3)), _p(_randn(5))]
    refs = [_p(p.detach().clone()) for p in params]
    kwargs = {"momentum": 0.9} if name == "sgd" else {}
    ours = build(ours_cls, params, engine, lr=0.01, **kwargs, **UMUP)
    ref = torch_cls(refs, lr=0.01, foreach=False, **kwargs)
    for step in range(5):
        _random_grads(params, step)
        _random_grads(refs, step)
        if step >= 2:
            edit(ours.param_groups[0], torch.float32)
            edit(ref.param_groups[0], torch.float64)
        ours.step()
        ref.step()
    assert_pair_close(ours, ref, list(zip(params, refs)))


def test_betas_given_as_a_list_are_kept_as_a_tuple() -> None:
    """As torch's from 2.11 on (2.6 keeps the list; its edits in place reach the
    step either way: ``test_hyper_edits_equal_in_value_are_still_edits``)."""
    opt = Adam([_p(_randn(3))], betas=[0.8, 0.9], **UMUP)
    assert opt.param_groups[0]["betas"] == (0.8, 0.9)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("kind", ["numpy", "tensor"])
def test_betas_as_an_array_or_a_1d_tensor_step_as_torch(kind: str, engine: str) -> None:
    """torch indexes betas: a numpy array (its items are floats) or a 1-d tensor of
    two elements (0-d tensor betas) constructs and steps; both were refused as not
    a pair, in the constructor and in ``add_param_group``."""
    np = pytest.importorskip("numpy")
    dtype = torch.float64  # the parameters' (float32 tensor betas differ by ~1e-8)

    def betas() -> Any:
        pair = [0.8, 0.99]
        return np.array(pair) if kind == "numpy" else torch.tensor(pair, dtype=dtype)

    params, refs = _twin_params(3)
    ours = build(AdamW, params[:1], engine, lr=0.1, betas=betas(), **UMUP)
    ref = torch.optim.AdamW(refs[:1], lr=0.1, betas=betas(), weight_decay=0)
    ours.add_param_group({"params": params[1:], "betas": betas()})
    ref.add_param_group({"params": refs[1:], "betas": betas()})
    for step in range(4):
        _random_grads(params, step)
        _random_grads(refs, step)
        ours.step()
        ref.step()
        assert_pair_close(ours, ref, list(zip(params, refs)), where=f"step {step}: ")


@pytest.mark.parametrize("engine", ENGINES)
def test_sgd_tensor_momentum_and_weight_decay_like_torch(engine: str) -> None:
    # torch's SGD reads a tensor momentum or weight decay by value (``momentum != 0``);
    # ours kept that comparison as a tensor in the graph's static config, which a
    # graph cannot branch on (strict: Unsupported; default: eager with a warning).
    # Momentum set to 0 in place mid-run: the buffers stay, the update is the gradient.
    params, ref_params = _twin_params(1)
    momentum, weight_decay = torch.tensor(0.9, dtype=torch.float64), torch.tensor(0.01)
    ours, ref = _ours_and_torch(
        "sgd", params, ref_params, engine, momentum=momentum,
        weight_decay=weight_decay, nesterov=False, dampening=0.5,
    )  # fmt: skip
    for step in range(4):
        if step == 2:
            momentum.fill_(0.0)
        for side in (params, ref_params):
            _random_grads(side, step)
        ours.step()
        ref.step()
        for p, q in zip(params, ref_params):
            torch.testing.assert_close(p, q, **tolerance(p.dtype))
            torch.testing.assert_close(
                ours.state[p]["momentum_buffer"],
                ref.state[q]["momentum_buffer"],
                **tolerance(p.dtype),
            )


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(
    "name,key",
    [("sgd", "momentum"), ("sgd", "weight_decay"), ("adam", "weight_decay"),
     ("adamw", "weight_decay")],
)  # fmt: skip
def test_tensor_option_of_zero_filled_in_place_turns_it_on_like_torch(
    name: str, key: str, engine: str
) -> None:
    # Note [options off by a tensor's zero]: torch reads the tensor at every step; our
    # config had read it once, so decay or momentum stayed off (1e-3 to 3e-2 off torch).
    params, ref_params = _twin_params(3)
    value = torch.tensor(0.0, dtype=torch.float64)
    extra = {"dampening": 0.5, "nesterov": False} if key == "momentum" else {}
    ours, ref = _ours_and_torch(
        name, params, ref_params, engine, **{key: value}, **extra
    )
    for step in range(5):
        if step == 2:
            value.fill_(0.9 if key == "momentum" else 0.1)
        for side in (params, ref_params):
            _random_grads(side, step)
        ours.step()
        ref.step()
        assert len(ours.state[params[0]]) == len(ref.state[ref_params[0]]), step
        for p, q in zip(params, ref_params):
            torch.testing.assert_close(p, q, **tolerance(p.dtype))


@pytest.mark.parametrize("engine", ENGINES)
def test_a_one_element_step_set_by_hand_steps_as_torch(engine: str) -> None:
    # torch takes state["step"] = torch.tensor([n]); the eager engine's stack of step
    # counts crashed on a (1,) beside 0-d ones. More elements: refused, state intact.
    params, ref_params = _twin_params(4)
    ours, ref = _ours_and_torch("adam", params, ref_params, engine)
    for step in range(4):
        for side in (params, ref_params):
            _random_grads(side, step)
        if step == 2:
            ours.state[params[0]]["step"] = torch.tensor([2.0])
            ref.state[ref_params[0]]["step"] = torch.tensor([2.0])
        ours.step()
        ref.step()
        for p, q in zip(params, ref_params):
            torch.testing.assert_close(p, q, **tolerance(p.dtype))
    ours.state[params[1]]["step"] = torch.tensor([4.0, 4.0])
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match=r"state\['step'\] .* has shape \(2,\)"):
        ours.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("big", [1e20, 1e30])
def test_a_gradient_whose_square_overflows_steps_as_torch(
    engine: str, dtype: torch.dtype, big: float
) -> None:
    # Note [second moment as torch's]: one gradient of 1e20 made its element's v inf
    # (its square overflows float32), and lerp made it nan at the next step, and the
    # parameter with it. torch's v = b2 * v + ((1 - b2) * g) * g stays finite at 1e20
    # and is inf at 1e30 (that element's updates are then 0); ours as torch's, every
    # element, with no nan.
    params, ref_params = _twin_params(6, dtype=dtype)
    ours = build(AdamW, params, engine, **KWARGS["adamw"], **UMUP,
                 state_dtype=torch.float32)  # fmt: skip
    ref = torch.optim.AdamW(ref_params, **KWARGS["adamw"], fused=True)
    for step in range(4):
        for side in (params, ref_params):
            _random_grads(side, step)
            if step == 1:
                side[0].grad.view(-1)[3] = big
        ours.step()
        ref.step()
        for p, q in zip(params, ref_params):
            assert p.isfinite().all(), step
            if dtype == torch.bfloat16:  # torch's state is bf16 there, ours float32
                torch.testing.assert_close(p, q, rtol=2e-2, atol=1e-2)
            else:
                torch.testing.assert_close(p, q, **tolerance(dtype))
    v = ours.state[params[0]]["exp_avg_sq"].view(-1)[3]
    assert v.isinf() == (big == 1e30)
    assert v.isinf() == ref.state[ref_params[0]]["exp_avg_sq"].view(-1)[3].isinf()


@pytest.mark.parametrize("amsgrad", [False, True])
def test_eager_moments_are_torchs_bitwise(amsgrad: bool) -> None:
    # Note [second moment as torch's]: the eager engine's moments are torch's
    # single-tensor Adam's (its CPU default) to the bit; v was lerp'd before, one
    # rounding apart. (L2 weight decay rounds apart: torch's add(alpha=) fuses it.)
    params, ref_params = _twin_params(3, dtype=torch.float32)
    ours = Adam(params, lr=0.01, betas=(0.9, 0.95), amsgrad=amsgrad, compile=False,
                **UMUP)  # fmt: skip
    ref = torch.optim.Adam(
        ref_params, lr=0.01, betas=(0.9, 0.95), amsgrad=amsgrad, foreach=False
    )
    for step in range(5):
        for side in (params, ref_params):
            _random_grads(side, step)
        ours.step()
        ref.step()
        for p, q in zip(params, ref_params):
            for key in ref.state[q]:
                if key != "step":
                    assert torch.equal(ours.state[p][key], ref.state[q][key]), key
        with torch.no_grad():  # the same inputs at every step
            for p, q in zip(params, ref_params):
                p.copy_(q)


@needs_mixed_grad_dtype
@pytest.mark.parametrize("engine", ENGINES)
def test_sgd_refuses_a_complex_gradient_of_a_real_parameter(engine: str) -> None:
    # (torch 2.13's grad_dtype=None lets one be set) it moved the parameters before
    # it, then a cast failed, or, first in its bucket, dropped the imaginary part
    # silently; torch raises
    params = [_p(_randn(4, 3)), _p(_randn(5)), _p(_randn(4, 4))]
    ours = build(SGD, params, engine, lr=0.1, momentum=0.9, **UMUP)
    for k, p in enumerate(params):
        p.grad = torch.randn(p.shape, generator=_grad_gen(0, k)).to(p.dtype)
    params[-1].grad_dtype = None
    params[-1].grad = params[-1].grad.to(torch.complex128)
    before = snapshot(ours)
    with pytest.raises(TypeError, match=r"index 2 .* a real parameter needs a real"):
        ours.step()
    assert_unchanged(ours, before)


EDITED = [  # (key, value, error, message)
    ("lr", None, TypeError, r"param group 0's 'lr' is None, .* set a number"),
    ("lr", "0.01", TypeError, r"'lr' is '0.01'"),
    ("lr", torch.tensor([0.1, 0.2]), TypeError, r"'lr' is tensor"),
    ("betas", (0.9,), TypeError, r"'betas' is \(0.9,\), .* set 2 numbers"),
    ("betas", (1.0, 0.999), ValueError, r"betas are \(1.0, 0.999\): each beta"),
    ("betas", (0.9, 1.5), ValueError, r"each beta must be in \[0, 1\)"),
    ("betas", (float("nan"), 0.999), ValueError, r"each beta must be in \[0, 1\)"),
    ("eps", None, TypeError, r"'eps' is None"),
]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(
    "key,value,error,message", EDITED, ids=[f"{k}={v!r}" for k, v, *_ in EDITED]
)
def test_a_group_value_edited_to_a_bad_one_is_refused_naming_it(
    key: str, value: Any, error: type, message: str, engine: str
) -> None:
    # Note [edited values]: Python's own errors (or silent infs and nans for betas at
    # 1 or above) before; the next good step is the step never refused
    params = [_p(_randn(4, 3)), _p(_randn(5))]
    refs = [_p(p.detach().clone()) for p in params]
    ours = build(Adam, params, engine, lr=0.01, **UMUP)
    ref = build(Adam, refs, engine, lr=0.01, **UMUP)
    for step in range(3):
        for side in (params, refs):
            _random_grads(side, step)
        if step == 1:
            good = ours.param_groups[0][key]
            ours.param_groups[0][key] = value
            before = snapshot(ours)
            with pytest.raises(error, match=message):
                ours.step()
            assert_unchanged(ours, before)
            ours.param_groups[0][key] = good
        ours.step()
        ref.step()
    for p, q in zip(params, refs):
        assert torch.equal(p, q)


@pytest.mark.parametrize("engine", ENGINES)
def test_numpy_betas_edited_out_of_range_are_refused(engine: str) -> None:
    # numpy betas (as torch keeps an array's) were read, not checked, at step time:
    # a beta2 of 1.5 made every moment grow without bound
    numpy = pytest.importorskip("numpy")
    params = [_p(_randn(4, 3)), _p(_randn(5))]
    ours = build(Adam, params, engine, lr=0.01, **UMUP)
    _random_grads(params, 0)
    ours.step()
    _random_grads(params, 1)
    for betas in [
        (numpy.float64(0.9), numpy.float64(1.5)),
        (numpy.float32(0.9), numpy.float32(-0.5)),
        (0.9, numpy.float64("nan")),
    ]:
        ours.param_groups[0]["betas"] = betas
        before = snapshot(ours)
        with pytest.raises(ValueError, match=r"each beta must be in \[0, 1\)"):
            ours.step()
        assert_unchanged(ours, before)
    ours.param_groups[0]["betas"] = (numpy.float64(0.8), numpy.float32(0.99))
    ours.step()  # in range: taken


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_numpy_scalar_hyper_parameters_like_torch(name: str) -> None:
    # torch takes numpy scalars (np.float32 is not a float); ours refused them.
    # (torch's arithmetic on an np.float32 lr stays in float32, so float32 parameters)
    numpy = pytest.importorskip("numpy")
    options = {
        "adam": {"lr": numpy.float32(0.01), "eps": numpy.float64(1e-8)},
        "adamw": {"lr": numpy.float32(0.01), "weight_decay": numpy.int64(0)},
        "sgd": {"lr": numpy.float32(0.1), "momentum": numpy.float32(0.9),
                "dampening": numpy.float32(0.1), "nesterov": False},
    }[name]  # fmt: skip

    params, ref_params = _twin_params(2, ((4, 3), (5,)), torch.float32)
    ours, ref = _ours_and_torch(name, params, ref_params, "eager", **options)
    for step in range(3):
        for side in (params, ref_params):
            _random_grads(side, step)
        ours.step()
        ref.step()
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p, q, **tolerance(p.dtype))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_group_dicts_passed_are_the_optimizers_groups_as_in_torch(
    name: str, engine: str
) -> None:
    # torch keeps the dict you pass: your later edits (its lr) reach the optimizer,
    # and a second optimizer built on another's param_groups shares them. Ours
    # copied it, and both kinds of edit were lost (0.17 off torch after 3 steps).
    params, ref_params = _twin_params(3, ((4, 3), (5,)))
    dicts = [{"params": [p], "lr": 0.1} for p in params]
    ref_dicts = [{"params": [p], "lr": 0.1} for p in ref_params]
    ours, ref = _ours_and_torch(name, dicts, ref_dicts, engine)
    assert all(a is b for a, b in zip(ours.param_groups, dicts))
    assert dicts[0]["params"] == [params[0]] and "lr_scales" in dicts[0]
    for step in range(3):
        for side in (params, ref_params):
            _random_grads(side, step)
        ours.step()
        ref.step()
        for d in (dicts[0], ref_dicts[0]):
            d["lr"] *= 0.5
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p, q, **tolerance(p.dtype))


def test_a_refused_group_dict_is_left_as_it_was() -> None:
    ok = nn.Parameter(_randn(3))
    opt = Adam([ok], lr=0.01, allow_non_unit_scaling_params=True, compile=False)
    bad = {"params": (nn.Parameter(_randn(2)),), "lr": -1.0}
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group(bad)
    assert set(bad) == {"params", "lr"} and isinstance(bad["params"], tuple)


@pytest.mark.parametrize("engine", ENGINES)
def test_param_moved_to_the_neighbouring_group_takes_its_options(engine: str) -> None:
    # The steady check compared the parameters in group order only: moving the first
    # parameter of group 1 to the end of group 0 keeps that order, and it kept group
    # 1's lr (0.27 off torch after 3 steps), in both engines.
    def make() -> list[nn.Parameter]:
        _GEN.manual_seed(4)
        return [
            nn.Parameter(_randn(3)),
            nn.Parameter(_randn(4)),
            nn.Parameter(_randn(5)),
        ]

    sides = []
    for maker in (make, make):
        a, b, c = maker()
        sides.append(([{"params": [a]}, {"params": [b, c], "lr": 0.01}], [a, b, c]))
    (groups, params), (ref_groups, ref_params) = sides
    ours, ref = _ours_and_torch("adam", groups, ref_groups, engine, lr=0.1)
    for step in range(5):
        if step == 2:
            for opt, (a, b, c) in ((ours, params), (ref, ref_params)):
                opt.param_groups[0]["params"] = [a, b]
                opt.param_groups[1]["params"] = [c]
        for side in (params, ref_params):
            _random_grads(side, step)
        ours.step()
        ref.step()
        for p, q in zip(params, ref_params):
            torch.testing.assert_close(p, q, **tolerance(p.dtype))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("edit", ["append", "assign_list", "replace_one"])
def test_groups_put_in_param_groups_directly_step_like_torch(
    edit: str, engine: str
) -> None:
    # torch.optim steps a group dict appended to (or put in) param_groups without
    # add_param_group; ours raised KeyError: 'lr_scales' at the next gather. It is now
    # scaled as add_param_group would have.
    params, ref_params = _twin_params(5, [(3,)] * 4)
    first = slice(None) if edit == "replace_one" else slice(1)
    ours, ref = _ours_and_torch(
        "adam", [{"params": params[:2]}, {"params": params[2:]}][first],
        [{"params": ref_params[:2]}, {"params": ref_params[2:]}][first], engine,
    )  # fmt: skip
    for step in range(6):
        if step == 2:
            for opt, side in ((ours, params), (ref, ref_params)):
                new = {**opt.defaults, "params": side[2:], "lr": 0.05}
                if edit == "append":
                    opt.param_groups.append(new)
                elif edit == "assign_list":
                    opt.param_groups = [opt.param_groups[0], new]
                else:
                    opt.param_groups[1] = new
        for side in (params, ref_params):
            _random_grads(side, step)
        if step == 4:  # a gather: one parameter without a gradient
            params[3].grad = ref_params[3].grad = None
        ours.step()
        ref.step()
        for p, q in zip(params, ref_params):
            torch.testing.assert_close(p, q, **tolerance(p.dtype))


def test_zero_element_params_take_the_rule_where_it_is_defined():
    # A (0, 16) weight has fan-in 16: unit_scaling scales it by 1/4, ours took 1
    # (its update after p.data is set was 4x unit_scaling's). Only where the rule
    # divides by zero (fan-in 0) or gives 0 does it keep 1.
    weight = uc.Parameter(torch.randn(0, 16, dtype=torch.float64), "weight")
    fan_in_0 = uc.Parameter(torch.randn(3, 0, dtype=torch.float64), "weight")
    bias = uc.Parameter(torch.randn(3, 0, dtype=torch.float64), "bias")
    adam = Adam([weight, fan_in_0], lr=0.1, compile=False)
    assert adam.param_groups[0]["lr_scales"] == [uso.lr_scale_func_adam(weight), 1.0]
    assert adam.param_groups[0]["lr_scales"][0] == 0.25
    sgd = SGD([bias], lr=0.1, readout_constraint="to_output_scale", compile=False)
    expected = uso.lr_scale_func_sgd("to_output_scale")(bias)
    assert sgd.param_groups[0]["lr_scales"] == [expected] and expected == 3.0


@pytest.mark.parametrize("engine", ENGINES)
def test_a_groups_differentiable_flag_leaves_grad_mode_to_the_defaults(engine: str):
    # torch.optim steps under the defaults' differentiable (_use_grad_for_differentiable);
    # ours enabled grad for any group's, and a group switched to it mid-run raised
    # "a leaf Variable that requires grad is being used in an in-place operation".
    def run(toggle: bool) -> list[Tensor]:
        _GEN.manual_seed(6)
        params = [nn.Parameter(_randn(3)), nn.Parameter(_randn(4))]
        opt = build(Adam, params, engine, lr=0.1, **UMUP)
        for step in range(4):
            if toggle and step == 2:
                opt.param_groups[0]["differentiable"] = True
            for k, p in enumerate(params):
                p.grad = torch.randn(p.shape, generator=_grad_gen(step, k)).double()
            opt.step()
        return params

    for p, q in zip(run(True), run(False)):
        assert torch.equal(p, q)
