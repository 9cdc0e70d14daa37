"""Checkpoint interop: unit_scaling.optim and torch.optim state dicts load into ours."""

from __future__ import annotations

import copy

import pytest
import torch
import unit_scaling.optim as uo

import umup_compile as uc
from tests.helpers import (
    TOLERANCES,
    assert_states_close,
    clone_params,
    run_steps,
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
