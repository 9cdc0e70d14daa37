"""Checkpoint interop: unit_scaling.optim and torch.optim state dicts load into ours."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import Any

import pytest
import torch
import unit_scaling.optim as uo
from torch import Tensor

import umup_compile as uc
from tests.edge_helpers import UMUP
from tests.helpers import (
    TOLERANCES,
    assert_states_close,
    clone_params,
    run_steps,
    set_grads,
    toy_params,
    use_backend,
)
from umup_compile.optim import SGD, Adam, AdamW

CASES = [
    ("adam", Adam, uo.Adam, {"lr": 0.01, "weight_decay": 0.1, "amsgrad": True}),
    ("adamw", AdamW, uo.AdamW, {"lr": 0.01, "weight_decay": 0.1}),
    ("sgd", SGD, uo.SGD, {"lr": 0.1, "momentum": 0.9}),
]


@pytest.mark.parametrize("engine", ["eager", "aot_eager"])
@pytest.mark.parametrize(
    "cls,ref_cls,kwargs", [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_checkpoint_from_unit_scaling_resumes(cls, ref_cls, kwargs, engine) -> None:  # noqa: ANN001
    params = toy_params(torch.float64)
    ref = ref_cls(params, **kwargs)
    run_steps([ref], [params], 4)
    saved_params = clone_params(params)
    saved = copy.deepcopy(ref.state_dict())
    run_steps([ref], [params], 4)  # uninterrupted reference training

    resumed = clone_params(saved_params)
    opt = cls(resumed, compile=engine != "eager", **kwargs)
    if engine != "eager":
        use_backend(opt, engine)
    opt.load_state_dict(saved)
    assert len(opt.param_groups) == 1
    run_steps([opt], [resumed], 4)
    for p, q in zip(params, resumed):
        torch.testing.assert_close(p, q, **TOLERANCES[torch.float64])
    assert_states_close(ref, opt, **TOLERANCES[torch.float64])


def test_checkpoint_round_trip_with_torch_adam() -> None:
    params = toy_params()
    opt = Adam(params, lr=0.01, allow_non_unit_scaling_params=True, compile=False)
    run_steps([opt], [params], 3)
    plain_params = clone_params(params)
    plain = torch.optim.Adam(plain_params, lr=0.01)
    plain.load_state_dict(opt.state_dict())
    assert plain.state[plain_params[0]]["step"].item() == 3
    back = Adam(clone_params(plain_params), lr=0.01, compile=False)
    back.load_state_dict(plain.state_dict())
    assert back.param_groups[0]["lr_scales"] == opt.param_groups[0]["lr_scales"]
    assert_states_close(opt, back, rtol=0, atol=0)


def test_checkpoint_shape_mismatch_is_clear_and_mutates_nothing() -> None:
    params = toy_params()
    opt = Adam(params, compile=False)
    run_steps([opt], [params], 1)
    before = copy.deepcopy(opt.state_dict())
    other_params = toy_params()
    other_params[0] = uc.Parameter(torch.randn(8, 8), "weight")
    other = Adam(other_params, compile=False)
    run_steps([other], [other_params], 1)
    with pytest.raises(
        ValueError, match=r"'exp_avg' for parameter 0 has shape \(8, 8\)"
    ):
        opt.load_state_dict(other.state_dict())
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert all(
        torch.equal(after["state"][k][key], v)
        for k, s in before["state"].items()
        for key, v in s.items()
    )


_Make = Callable[[list[Tensor]], torch.optim.Optimizer]


def _ours_and_torch(name: str, **options: Any) -> tuple[_Make, _Make]:
    """Makers of ours (eager, untagged parameters: factors 1) and torch's class."""
    ours_cls, torch_cls, kwargs = {
        "adam": (Adam, torch.optim.Adam, {"lr": 0.01, "weight_decay": 0.1}),
        "sgd": (SGD, torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
    }[name]
    kwargs = {**kwargs, **options}
    ours = functools.partial(ours_cls, compile=False, **UMUP, **kwargs)
    return ours, functools.partial(torch_cls, **kwargs)


def _trained(
    name: str, steps: int, **options: Any
) -> tuple[list[tuple[torch.optim.Optimizer, list[Tensor]]], list[_Make]]:
    """Ours and torch's, each trained ``steps`` steps on the same parameters and
    gradients (float64, untagged), and their makers."""
    makers = _ours_and_torch(name, **options)
    params = toy_params(torch.float64, tagged=False)
    sides = [clone_params(params) for _ in makers]
    opts = [make(side) for make, side in zip(makers, sides)]
    run_steps(opts, sides, steps)
    return list(zip(opts, sides)), list(makers)


def _zero_first_moments(opt: Any, sd: dict[str, Any]) -> dict[str, Any]:
    sd = copy.deepcopy(sd)
    for state in sd["state"].values():
        for key in {"exp_avg", "momentum_buffer"} & set(state):
            state[key] = torch.zeros_like(state[key])
    return sd


_RENAMED = {"exp_avg": "m", "exp_avg_sq": "v", "momentum_buffer": "buf"}


def _rename_keys(opt: Any, sd: dict[str, Any]) -> dict[str, Any]:
    rename = lambda s: {_RENAMED.get(k, k): v for k, v in s.items()}  # noqa: E731
    return {**sd, "state": {i: rename(s) for i, s in sd["state"].items()}}


def _rename_back_in_place(opt: Any, sd: dict[str, Any]) -> None:
    back = {v: k for k, v in _RENAMED.items()}
    for state in sd["state"].values():
        for key in [k for k in state if k in back]:
            state[back[key]] = state.pop(key)


@pytest.mark.parametrize("name", ["adam", "sgd"])
@pytest.mark.parametrize("hooks", ["returns_a_new_dict", "renames_in_place"])
def test_load_pre_hooks_run_before_our_conversion_as_with_torch(
    name: str, hooks: str
) -> None:
    # A pre-hook sees the dict as given and what it returns (or edits) is loaded;
    # ours validated and restored the dict as it was before the user's hooks.
    trained, makers = _trained(name, 3)
    fresh = []
    for (opt, side), make in zip(trained, makers):
        copies = clone_params(side)
        new = make(copies)
        if hooks == "returns_a_new_dict":
            new.register_load_state_dict_pre_hook(_zero_first_moments)
        else:
            opt.register_state_dict_post_hook(_rename_keys)
            new.register_load_state_dict_pre_hook(_rename_back_in_place)
        saved = opt.state_dict()
        if hooks == "renames_in_place":
            assert not {"exp_avg", "momentum_buffer"} & set(saved["state"][0])
        new.load_state_dict(saved)
        fresh.append((new, copies))
    (ours, params), (ref, ref_params) = fresh
    assert_states_close(ours, ref, **TOLERANCES[torch.float64])
    run_steps([ours, ref], [params, ref_params], 2)
    assert_states_close(ours, ref, **TOLERANCES[torch.float64])


def test_load_post_hooks_see_the_converted_state() -> None:
    # Ours runs first among the post-hooks, even ones registered with prepend=True.
    params = toy_params(torch.bfloat16)
    opt = AdamW(params, lr=0.01, state_dtype=torch.float32, compile=False)
    run_steps([opt], [params], 1)
    seen: list[torch.dtype] = []
    opt.register_load_state_dict_post_hook(
        lambda o: seen.append(o.state[params[0]]["exp_avg"].dtype), prepend=True
    )
    opt.load_state_dict(opt.state_dict())
    assert seen == [torch.float32]  # torch alone casts it to the parameters' bf16


@pytest.mark.parametrize("state_dtype", [None, torch.float32, torch.int8])
def test_state_dict_goes_through_torch_distributed_state_dict_tools(
    state_dtype: torch.dtype | None,
) -> None:
    # full_state_dict, cpu_offload and torchtitan's staging copy refuse a torch.dtype
    # among the groups' values; the state dtype is saved by name.
    dcp_sd = pytest.importorskip("torch.distributed.checkpoint.state_dict")
    utils = pytest.importorskip("torch.distributed._state_dict_utils")
    model = torch.nn.Sequential(torch.nn.Linear(80, 64), torch.nn.Linear(64, 8))
    kw = {"lr": 0.01, "weight_decay": 0.1, "allow_non_unit_scaling_params": True}
    opt = AdamW(model.parameters(), **kw, state_dtype=state_dtype, compile=False)
    set_grads([list(model.parameters())], 0)
    opt.step()
    saved = opt.state_dict()
    assert saved["param_groups"][0]["state_dtype"] == (
        None if state_dtype is None else str(state_dtype).removeprefix("torch.")
    )
    assert opt.param_groups[0]["state_dtype"] == state_dtype  # the live group's
    for options in ({"full_state_dict": True}, {"cpu_offload": True}):
        options_ = dcp_sd.StateDictOptions(**options)
        full = dcp_sd.get_optimizer_state_dict(model, opt, options=options_)
        staged = utils._copy_state_dict(full, utils._create_cpu_state_dict(full))

        copy_model = copy.deepcopy(model)
        back = AdamW(copy_model.parameters(), **kw, state_dtype=state_dtype,
                     compile=False)  # fmt: skip
        dcp_sd.set_optimizer_state_dict(copy_model, back, staged, options=options_)
        assert back.param_groups[0]["state_dtype"] == state_dtype
        for p, q in zip(model.parameters(), copy_model.parameters()):
            for key, value in opt.state[p].items():
                assert back.state[q][key].dtype == value.dtype, key
                assert torch.equal(back.state[q][key], value), key


def test_checkpoint_options_win_over_the_constructors_as_with_torch() -> None:
    # amsgrad saved False, constructed True: torch loads the checkpoint's options and
    # steps without a maximum; ours refused the state for lacking one.
    ((_, _), (ref, ref_params)), _ = _trained("adam", 2)
    saved = ref.state_dict()
    resumed = []
    for make in _ours_and_torch("adam", amsgrad=True):
        copies = clone_params(ref_params)
        opt = make(copies)
        opt.load_state_dict(copy.deepcopy(saved))
        assert opt.param_groups[0]["amsgrad"] is False
        resumed.append((opt, copies))
    (ours, params), (ref2, ref_params2) = resumed
    run_steps([ours, ref2], [params, ref_params2], 2)
    assert_states_close(ours, ref2, **TOLERANCES[torch.float64])


def test_one_element_step_counter_loads_as_with_torch() -> None:
    ((ours, params), (ref, ref_params)), _ = _trained("adam", 2)
    saved = ref.state_dict()
    ref.load_state_dict(copy.deepcopy(saved))
    for state in saved["state"].values():
        state["step"] = state["step"].reshape(1)
    ours.load_state_dict(saved)
    assert ours.state[params[0]]["step"].shape == ()
    bad = copy.deepcopy(ours.state_dict())
    bad["state"][0]["step"] = torch.zeros(2)
    with pytest.raises(ValueError, match=r"'step' for parameter 0 has shape \(2,\)"):
        ours.load_state_dict(bad)
    run_steps([ours, ref], [params, ref_params], 2)
    assert_states_close(ours, ref, **TOLERANCES[torch.float64])
