"""Engines: eager == compiled (Inductor), recompiles only on structure, fallbacks."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from tests.helpers import (
    TOLERANCES,
    assert_states_close,
    clone_params,
    needs_traced_step,
    run_steps,
    step_scheduled_against,
    toy_params,
    use_backend,
)
from umup_compile._engine import CompiledEngine, choose_engine, run_eager
from umup_compile.optim import SGD, Adam, AdamW

# Full Inductor numerics on a representative subset: each entry is one compile.
INDUCTOR_CASES = [
    ("adam_l2_amsgrad", Adam, {"lr": 0.01, "weight_decay": 0.1, "amsgrad": True}),
    ("adamw_maximize", AdamW, {"lr": 0.01, "weight_decay": 0.1, "maximize": True}),
    (
        "sgd_nesterov",
        SGD,
        {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.1},
    ),
]


@pytest.mark.parametrize(
    "cls,kwargs", [c[1:] for c in INDUCTOR_CASES], ids=[c[0] for c in INDUCTOR_CASES]
)
def test_engine_inductor_matches_eager(cls, kwargs) -> None:  # noqa: ANN001
    params = toy_params()
    ref_params = clone_params(params)
    compiled = cls(params, compile="strict", **kwargs)
    eager = cls(ref_params, compile=False, **kwargs)
    step_scheduled_against(compiled, eager, [params, ref_params], 4)
    assert compiled._engine.failed is None


def test_engine_recompiles_only_on_structure_change() -> None:
    params = toy_params()
    opt = Adam(params, lr=0.01, weight_decay=0.1)
    counter = CompileCounter()
    use_backend(opt, counter)
    run_steps([opt], [params], 3)
    opt.param_groups[0]["lr"] = 0.5  # value: no recompile
    opt.param_groups[0]["eps"] = 1e-6
    run_steps([opt], [params], 3)
    assert counter.frame_count == 1
    opt.param_groups[0]["amsgrad"] = True  # structure: exactly one recompile
    run_steps([opt], [params], 3)
    assert counter.frame_count == 2
    opt.param_groups[0]["weight_decay"] = 0.0  # decay mode "none": one more
    run_steps([opt], [params], 3)
    assert counter.frame_count == 3
    assert "max_exp_avg_sq" in opt.state[params[0]]


def test_engine_grad_none_rebuild_is_bounded() -> None:
    params = toy_params()
    opt = Adam(params, lr=0.01)
    counter = CompileCounter()
    use_backend(opt, counter)
    for _ in range(6):
        run_steps([opt], [params], 1)
    params[0].grad = None
    opt.step()
    opt.step()
    # the pack's sizes are dynamic: another membership rebuilds the layout only
    assert (opt.layout_builds, counter.frame_count) == (2, 1)


def test_engine_umup_compile_env_selects_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UMUP_COMPILE", "0")
    assert Adam(toy_params())._engine is run_eager
    monkeypatch.setenv("UMUP_COMPILE", "strict")
    assert Adam(toy_params(), compile=False)._engine.strict is True
    monkeypatch.setenv("UMUP_COMPILE", "maybe")
    with pytest.raises(ValueError, match="UMUP_COMPILE='maybe' is not understood"):
        Adam(toy_params())


def test_engine_differentiable_uses_eager_with_warning() -> None:
    with pytest.warns(UserWarning, match="differentiable=True"):
        opt = Adam(toy_params(), differentiable=True)
    assert opt._engine is run_eager
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert (
            Adam(toy_params(), differentiable=True, compile=False)._engine is run_eager
        )


def _broken_backend(gm, example_inputs):  # noqa: ANN001, ANN202
    raise RuntimeError("no C++ compiler here")


def test_engine_falls_back_to_eager_once_with_warning() -> None:
    params = toy_params()
    ref_params = clone_params(params)
    opt = Adam(params, lr=0.01)
    opt._engine = CompiledEngine(backend=_broken_backend)
    ref = Adam(ref_params, lr=0.01, compile=False)
    with pytest.warns(
        RuntimeWarning, match="falling back to the eager engine"
    ) as record:
        run_steps([opt, ref], [params, ref_params], 3)
    assert len([w for w in record if w.category is RuntimeWarning]) == 1
    assert_states_close(opt, ref, rtol=0, atol=0)


def test_engine_strict_raises_on_compile_failure() -> None:
    params = toy_params()
    opt = Adam(params, lr=0.01)
    opt._engine = CompiledEngine(strict=True, backend=_broken_backend)
    run_steps([], [params], 1)
    with pytest.raises(Exception, match="no C\\+\\+ compiler here"):
        opt.step()


@needs_traced_step
def test_engine_inlines_inside_outer_compile() -> None:
    params = toy_params()
    ref_params = clone_params(params)
    opt = Adam(params, lr=0.01)
    inner = CompileCounter()
    use_backend(opt, inner)
    ref = Adam(ref_params, lr=0.01, compile=False)
    outer = CompileCounter()

    @torch.compile(backend=outer)
    def train_step() -> None:
        opt.step()

    for _ in range(3):
        run_steps([], [params, ref_params], 1)
        train_step()
        ref.step()
    assert inner.frame_count == 0  # the outer compile traced the core itself
    assert outer.frame_count >= 1
    assert_states_close(opt, ref, **TOLERANCES[torch.float32])


def test_choose_engine_rejects_unknown_compile_value() -> None:
    with pytest.raises(ValueError, match="compile=2 is not supported"):
        choose_engine(2, env=None, differentiable=False)  # type: ignore[arg-type]


def test_combo_kernel_arguments_follow_the_cuda_driver(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Note [combo kernel arguments]: 1024 buffer arguments where the driver takes
    32 KB of kernel parameters (12.1 on), Inductor's 250 below and without one."""
    from umup_compile import _engine

    version = _engine.cuda_driver_version()
    assert isinstance(version, int) and version >= 0
    if torch.version.cuda is not None and torch.cuda.is_available():
        assert version > 0
    if not _engine._combo_skips_cpu():
        pytest.skip("this torch groups CPU nodes too: the engine sets no combo options")
    wanted = {11080: None, 12000: None, 12010: 1024, 12080: 1024, 13000: 1024}
    try:
        for driver, args in wanted.items():
            monkeypatch.setattr(_engine, "cuda_driver_version", lambda d=driver: d)
            _engine._combo_kernels.cache_clear()
            options = _engine._combo_kernels()
            assert options["combo_kernels"] is True
            assert options.get("combo_kernel_max_num_args") == args, driver
    finally:
        monkeypatch.undo()
        _engine._combo_kernels.cache_clear()
