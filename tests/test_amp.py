"""GradScaler support: unscale inside the update, skip inf steps with no host sync."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tests.helpers import TOLERANCES, assert_states_close, toy_params, use_backend
from umup_compile.optim import SGD, Adam, AdamW

BAD_STEPS = {2: float("inf"), 4: float("nan")}

CASES = [
    (
        "adam",
        Adam,
        torch.optim.Adam,
        {"lr": 0.01, "weight_decay": 0.1, "amsgrad": True},
    ),
    ("adamw", AdamW, torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.1}),
    ("sgd", SGD, torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.1}),
]


def _scaled_step(
    opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler, params, step: int
) -> None:  # noqa: ANN001
    gen = torch.Generator().manual_seed(step)
    loss = sum((p * torch.randn(p.shape, generator=gen)).sum() for p in params)
    opt.zero_grad()
    scaler.scale(loss).backward()
    if step in BAD_STEPS:
        params[1].grad.view(-1)[3] = BAD_STEPS[step]
    scaler.step(opt)
    scaler.update()


@pytest.mark.parametrize("engine", ["eager", "aot_eager"])
@pytest.mark.parametrize(
    "cls,torch_cls,kwargs", [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_amp_matches_torch_fused_under_gradscaler(
    cls, torch_cls, kwargs, engine
) -> None:  # noqa: ANN001
    params = [nn.Parameter(torch.randn(p.shape)) for p in toy_params()]
    ref_params = copy.deepcopy(params)
    opt = cls(
        params,
        allow_non_unit_scaling_params=True,
        independent_weight_decay=False,
        compile=engine != "eager",
        **kwargs,
    )
    if engine != "eager":
        use_backend(opt, engine)
    ref = torch_cls(ref_params, fused=True, **kwargs)
    scalers = [
        torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=2)
        for _ in range(2)
    ]
    for step in range(6):
        before = [p.detach().clone() for p in params]
        before_state = copy.deepcopy(opt.state_dict()["state"])
        _scaled_step(opt, scalers[0], params, step)
        _scaled_step(ref, scalers[1], ref_params, step)
        assert_states_close(opt, ref, **TOLERANCES[torch.float32])
        if step in BAD_STEPS:  # skipped: bitwise unchanged, step not advanced
            assert all(torch.equal(p, b) for p, b in zip(params, before))
            after_state = opt.state_dict()["state"]
            for k, state in before_state.items():
                for key, value in state.items():
                    assert torch.equal(after_state[k][key], value), (k, key)
    assert scalers[0].get_scale() == scalers[1].get_scale()


def test_amp_skips_without_host_sync_in_the_core() -> None:
    # The scaler passes device tensors; the optimizer must not read them on the host.
    params = toy_params()
    opt = Adam(params, lr=0.01, compile=False)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.grad_scale = torch.tensor(4.0)
    opt.found_inf = torch.tensor(1.0)
    calls = []
    original = torch.Tensor.item
    torch.Tensor.item = lambda self: calls.append(self) or original(self)  # type: ignore[method-assign]
    try:
        opt.step()
    finally:
        torch.Tensor.item = original  # type: ignore[method-assign]
    assert all(s["step"].item() == 0 for s in opt.state.values())
    assert calls == []


@pytest.mark.parametrize("engine", ["eager", "aot_eager"])
@pytest.mark.parametrize("dampening", [0.0, 0.5])
def test_sgd_buffers_start_after_a_skipped_first_step_as_torch(
    engine: str, dampening: float
) -> None:
    # Note [skipped first step]: the scaler skips torch's step outright, so no buffer
    # exists after it, and the next step starts the buffer as the gradient itself.
    params = [nn.Parameter(torch.randn(p.shape)) for p in toy_params()]
    ref_params = copy.deepcopy(params)
    kwargs = {"lr": 0.1, "momentum": 0.9, "dampening": dampening}
    opt = SGD(
        params, allow_non_unit_scaling_params=True, compile=engine != "eager", **kwargs
    )
    if engine != "eager":
        use_backend(opt, engine)
    ref = torch.optim.SGD(ref_params, foreach=False, **kwargs)
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**8) for _ in range(2)]
    for step in range(4):
        for o, s, ps in ((opt, scalers[0], params), (ref, scalers[1], ref_params)):
            gen = torch.Generator().manual_seed(step)
            loss = sum((p * torch.randn(p.shape, generator=gen)).sum() for p in ps)
            o.zero_grad()
            s.scale(loss * (float("inf") if step == 0 else 1.0)).backward()
            s.step(o)
            s.update()
        assert len(opt.state) == len(ref.state), step
        assert_states_close(opt, ref, **TOLERANCES[torch.float32])
