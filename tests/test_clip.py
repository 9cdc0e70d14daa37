"""``max_grad_norm``: global-norm clipping fused into the step (Note [fused clipping]).

The oracle is torch's own sequence, ``clip_grad_norm_(params, max_norm)`` then the
same torch.optim step (untagged parameters: torch's numbers), and unit_scaling's
optimizer after the same clip (tagged parameters: u-μP numbers).
"""

from __future__ import annotations

import copy
import math
import pickle
from typing import Any

import pytest
import torch
import unit_scaling.optim as uso
from torch import nn

import umup_compile as uc
from tests.edge_helpers import (
    ENGINES,
    UMUP,
    assert_pair_close,
    assert_unchanged,
    build,
    snapshot,
)
from tests.helpers import TOLERANCES, needs_traced_step
from umup_compile.optim import SGD, Adam, AdamW

# name -> (ours, torch's, options)
CASES: dict[str, tuple[type, type, dict[str, Any]]] = {
    "adam": (Adam, torch.optim.Adam, {"lr": 0.01, "weight_decay": 0.1}),
    "adamw_amsgrad": (
        AdamW,
        torch.optim.AdamW,
        {"lr": 0.01, "weight_decay": 0.1, "amsgrad": True},
    ),
    "sgd": (
        SGD,
        torch.optim.SGD,
        {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.1},
    ),
}
# Small tensors (the pack), a 0-d one, and large ones (their own units).
SHAPES = [(4, 4), (3,), (), (300, 70), (64, 64), (5, 7)]
STEPS = 4


def _params(seed: int = 0) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]


def _grads(params: list[torch.Tensor], step: int, scale: float = 1.0) -> None:
    gen = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype) * (step + 1) * scale


def _step_against_torch(
    ours: torch.optim.Optimizer,
    ref: torch.optim.Optimizer,
    ps: list[nn.Parameter],
    qs: list[nn.Parameter],
    step: int,
    max_norm: float,
) -> None:
    """Step ours, and torch's ``clip_grad_norm_`` then step on the twin parameters,
    from the same gradients; the two norms agree."""
    _grads(ps, step)
    _grads(qs, step)
    ours.step()
    norm = torch.nn.utils.clip_grad_norm_(qs, max_norm)
    ref.step()
    torch.testing.assert_close(ours.last_grad_norm, norm)


@pytest.mark.parametrize("max_norm", [0.5, 1e6], ids=["clips", "inactive"])
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", list(CASES))
def test_matches_clip_grad_norm_then_torch_step(name: str, engine: str, max_norm):
    ours_cls, torch_cls, kwargs = CASES[name]
    ps, qs = _params(), _params()
    ours = build(ours_cls, ps, engine, **kwargs, **UMUP, max_grad_norm=max_norm)
    ref = torch_cls(qs, **kwargs, foreach=False)
    for step in range(STEPS):
        _step_against_torch(ours, ref, ps, qs, step, max_norm)
        assert ours.last_grad_norm.device == ps[0].device
    assert_pair_close(ours, ref, list(zip(ps, qs)))
    # the gradients themselves are left as they were (no pass rewrites them)
    _grads(qs, STEPS - 1)
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)


def test_compiled_engine_inductor_matches_clip_grad_norm():
    ps, qs = _params(), _params()
    ours = Adam(ps, lr=0.01, **UMUP, max_grad_norm=0.5)
    ref = torch.optim.Adam(qs, lr=0.01, fused=True)
    for step in range(STEPS):
        _step_against_torch(ours, ref, ps, qs, step, 0.5)
    assert_pair_close(ours, ref, list(zip(ps, qs)))


def _tagged(seed: int = 0) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [
        uc.Parameter(torch.randn(16, 8, generator=gen), "weight"),
        uc.Parameter(torch.randn(8, generator=gen), "bias"),
        uc.Parameter(torch.randn(32, 16, generator=gen), "output"),
    ]


@pytest.mark.parametrize("engine", ENGINES)
def test_matches_unit_scaling_after_its_own_clip(engine: str):
    ps, qs = _tagged(), _tagged()
    ours = build(AdamW, ps, engine, lr=0.02, weight_decay=0.1, max_grad_norm=0.3)
    ref = uso.AdamW(qs, lr=0.02, weight_decay=0.1)
    for step in range(STEPS):
        _grads(ps, step)
        _grads(qs, step)
        ours.step()
        torch.nn.utils.clip_grad_norm_(qs, 0.3)
        ref.step()
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p, q, **TOLERANCES[torch.float32])


class _Scaler(torch.amp.GradScaler):
    """A CPU GradScaler with a fixed scale: the inf check is what is tested."""

    def __init__(self, scale: float = 2.0**10) -> None:
        super().__init__("cpu", init_scale=scale, growth_interval=10**6)
        self.scale(torch.zeros(()))  # what scaling the loss does first: make _scale


def _scaled_steps(
    ours: torch.optim.Optimizer,
    ref: torch.optim.Optimizer,
    qs: list[nn.Parameter],
    scalers: tuple[_Scaler, _Scaler],
    max_norm: float,
) -> torch.Tensor:
    """Step ours under its scaler, and torch's as torch documents it (unscale_,
    clip_grad_norm_, step); torch's norm."""
    s_ours, s_ref = scalers
    s_ours.step(ours)
    s_ours.update()
    s_ref.unscale_(ref)
    norm = torch.nn.utils.clip_grad_norm_(qs, max_norm)
    s_ref.step(ref)
    s_ref.update()
    return norm


@pytest.mark.parametrize("engine", ENGINES)
def test_grad_scaler_norm_of_unscaled_grads_and_skipped_step_stays_skipped(engine):
    ps, qs = _params(), _params()
    ours = build(Adam, ps, engine, lr=0.01, **UMUP, max_grad_norm=0.5)
    ref = torch.optim.Adam(qs, lr=0.01, foreach=False)
    s_ours, s_ref = _Scaler(), _Scaler()
    for step in range(STEPS):
        scale = s_ours.get_scale()
        _grads(ps, step, scale)  # what scaler.scale(loss).backward() leaves
        _grads(qs, step, s_ref.get_scale())
        if step == 2:  # an overflow: both must skip the step
            ps[3].grad[0, 0] = math.inf
            qs[3].grad[0, 0] = math.inf
        before = snapshot(ours)
        norm = _scaled_steps(ours, ref, qs, (s_ours, s_ref), 0.5)
        if step == 2:
            assert_unchanged(ours, before)
            assert not torch.isfinite(ours.last_grad_norm)
        else:
            torch.testing.assert_close(ours.last_grad_norm, norm)
    assert_pair_close(ours, ref, list(zip(ps, qs)))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", list(CASES))
def test_float64_norm_and_update_are_float64_like_torch(name: str, engine: str):
    # Note [norm precision]: the norm was float32 (1e-8 off torch's float64 norm)
    ours_cls, torch_cls, kwargs = CASES[name]
    ps, qs = ([nn.Parameter(p.detach().double()) for p in _params()] for _ in "ab")
    ours = build(ours_cls, ps, engine, **kwargs, **UMUP, max_grad_norm=0.5)
    ref = torch_cls(qs, **kwargs, foreach=False)
    for step in range(STEPS):
        _grads(ps, step)
        _grads(qs, step)
        ours.step()
        norm = torch.nn.utils.clip_grad_norm_(qs, 0.5)
        ref.step()
        assert ours.last_grad_norm.dtype == torch.float64
        torch.testing.assert_close(ours.last_grad_norm, norm, rtol=1e-14, atol=0)
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p, q, **TOLERANCES[torch.float64])


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", ["adam", "sgd"])
def test_norm_whose_square_overflows_float32_still_clips(name: str, engine: str):
    # Note [norm precision]: 16 tensors (none small enough for the pack) whose
    # scaled norms are ~8e18 each; their squares summed in float32 overflowed
    # (3.4e38), the norm was inf, the coefficient 0 and every update 0, silently,
    # while torch (unscale_, clip, step) clips
    ours_cls, torch_cls, kwargs = CASES[name]
    gen = torch.Generator().manual_seed(0)
    ps = [nn.Parameter(torch.randn(20_000, generator=gen)) for _ in range(16)]
    qs = [nn.Parameter(p.detach().clone()) for p in ps]
    ours = build(ours_cls, ps, engine, **kwargs, **UMUP, max_grad_norm=0.5)
    ref = torch_cls(qs, **kwargs, foreach=False)
    # 2**60: where a long bf16 run's scale may grow to
    s_ours, s_ref = _Scaler(2.0**60), _Scaler(2.0**60)
    before = [p.detach().clone() for p in ps]
    for step in range(2):
        gen = torch.Generator().manual_seed(100 + step)
        scale = 0.05 * s_ours.get_scale()
        grads = [torch.randn(20_000, generator=gen) * scale for _ in ps]
        for p, q, g in zip(ps, qs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        norm = _scaled_steps(ours, ref, qs, (s_ours, s_ref), 0.5)
        torch.testing.assert_close(ours.last_grad_norm, norm)
    assert s_ours.get_scale() == 2.0**60  # no step was skipped
    assert not any(torch.equal(p, b) for p, b in zip(ps, before))
    assert_pair_close(ours, ref, list(zip(ps, qs)))


@needs_traced_step
@pytest.mark.parametrize("name", ["adam", "sgd"])
def test_clipping_inside_the_users_compiled_step(name: str):
    ours_cls, _, kwargs = CASES[name]
    ps, qs = _params(), _params()
    ours = ours_cls(ps, **kwargs, **UMUP, max_grad_norm=0.5)
    ref = ours_cls(qs, **kwargs, **UMUP, max_grad_norm=0.5, compile=False)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step() -> None:
        ours.step()

    for s in range(STEPS):
        _grads(ps, s)
        _grads(qs, s)
        step()
        ref.step()
        torch.testing.assert_close(ours.last_grad_norm, ref.last_grad_norm)
    assert_pair_close(ours, ref, list(zip(ps, qs)))


def test_no_gradients_norm_is_zero_and_none_before_any_step():
    p = nn.Parameter(torch.randn(3))
    opt = Adam([p], **UMUP, max_grad_norm=1.0, compile=False)
    assert opt.last_grad_norm is None
    opt.step()
    assert float(opt.last_grad_norm) == 0.0


@pytest.mark.parametrize(
    "value,error",
    [("1.0", TypeError), (True, TypeError), (-1.0, ValueError), (math.nan, ValueError)],
)
def test_bad_max_grad_norm_names_the_option(value: Any, error: type[Exception]):
    with pytest.raises(error, match="max_grad_norm"):
        Adam([nn.Parameter(torch.randn(3))], **UMUP, max_grad_norm=value)
    opt = SGD([nn.Parameter(torch.randn(3))], **UMUP)
    with pytest.raises(error, match="max_grad_norm"):
        opt.max_grad_norm = value
    assert opt.max_grad_norm is None


def test_max_grad_norm_survives_pickling_and_deepcopy():
    opt = AdamW([nn.Parameter(torch.randn(3))], **UMUP, max_grad_norm=2.0)
    opt.max_grad_norm = 0.25
    for clone in (pickle.loads(pickle.dumps(opt)), copy.deepcopy(opt)):
        assert clone.max_grad_norm == 0.25


def test_new_max_grad_norm_never_recompiles():
    """The compiled engine reads max_grad_norm as a tensor: changing it between steps
    compiles nothing, and the numbers follow torch's clip at the new threshold."""
    from torch._dynamo.testing import CompileCounter

    from tests.helpers import use_backend

    ps, qs = _params(), _params()
    ours = Adam(ps, lr=0.01, **UMUP, max_grad_norm=0.5)
    counter = CompileCounter()
    use_backend(ours, counter)
    ref = torch.optim.Adam(qs, lr=0.01, foreach=False)
    frames = None
    for step, max_norm in enumerate([0.5, 0.5, 0.5, 0.1, 3.0, 0.1]):
        ours.max_grad_norm = max_norm
        _step_against_torch(ours, ref, ps, qs, step, max_norm)
        if step == 2:
            frames = counter.frame_count
    assert frames is not None and counter.frame_count == frames
    assert_pair_close(ours, ref, list(zip(ps, qs)))
