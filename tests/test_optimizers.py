"""The optimizer classes as torch users drive them: groups, schedulers, hooks, state."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounter

import umup_compile as uc
from tests.helpers import (
    TOLERANCES,
    ToyUmupNet,
    assert_states_close,
    clone_params,
    run_steps,
    set_grads,
    toy_params,
    use_backend,
)
from umup_compile._engine import run_eager
from umup_compile.optim import SGD, Adam, AdamW

SCHEDULERS = [
    (
        "steplr",
        lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5),
    ),
    ("cosine", lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)),
    (
        "onecycle",
        lambda opt: torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=0.05, total_steps=40
        ),
    ),
    (
        "lambda",
        lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (1 + s)),
    ),
]


def test_classes_subclass_torch_optimizers() -> None:
    params = toy_params()
    assert isinstance(Adam(params, compile=False), torch.optim.Adam)
    adamw = AdamW(params, compile=False)
    assert isinstance(adamw, torch.optim.AdamW) and isinstance(adamw, torch.optim.Adam)
    assert isinstance(SGD(params, compile=False), torch.optim.SGD)


def test_adam_positional_order_matches_torch() -> None:
    opt = Adam(toy_params(), 1e-2, (0.8, 0.9), 1e-6, 0.1, True, compile=False)
    group = opt.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"]) == (1e-2, (0.8, 0.9), 1e-6)
    assert (group["weight_decay"], group["amsgrad"]) == (0.1, True)


def test_sgd_positional_order_matches_torch() -> None:
    opt = SGD(toy_params(), 0.1, 0.9, 0.0, 0.01, True, compile=False)
    group = opt.param_groups[0]
    assert (group["lr"], group["momentum"], group["dampening"]) == (0.1, 0.9, 0.0)
    assert (group["weight_decay"], group["nesterov"]) == (0.01, True)


def test_adamw_defaults_to_zero_weight_decay() -> None:
    opt = AdamW(toy_params(), compile=False)
    assert opt.param_groups[0]["weight_decay"] == 0.0
    assert opt.param_groups[0]["decoupled_weight_decay"] is True


def test_param_groups_stay_as_given() -> None:
    params = toy_params()
    opt = Adam(
        [{"params": params[:2], "lr": 0.1}, {"params": params[2:]}],
        lr=0.01,
        compile=False,
    )
    assert len(opt.param_groups) == 2
    assert [len(g["params"]) for g in opt.param_groups] == [2, len(params) - 2]
    assert [len(g["lr_scales"]) for g in opt.param_groups] == [2, len(params) - 2]
    assert opt.param_groups[0]["lr"] == 0.1 and opt.param_groups[1]["lr"] == 0.01


def test_named_parameters_are_accepted() -> None:
    net = ToyUmupNet()
    opt = Adam(net.named_parameters(), compile=False)
    assert opt.param_groups[0]["param_names"][0] == "embed"


@pytest.mark.parametrize("name,make", SCHEDULERS, ids=[s[0] for s in SCHEDULERS])
def test_adam_no_recompile_under_scheduler(name: str, make) -> None:  # noqa: ANN001
    params = toy_params()
    ref_params = clone_params(params)
    opt = Adam(params, lr=0.05, weight_decay=0.1)
    counter = CompileCounter()
    use_backend(opt, counter)
    ref = Adam(ref_params, lr=0.05, weight_decay=0.1, compile=False)
    scheds = [make(opt), make(ref)]
    run_steps(
        [opt, ref], [params, ref_params], 30, lambda _: [s.step() for s in scheds]
    )
    assert counter.frame_count == 1
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p, q, **TOLERANCES[torch.float32])


def test_sgd_momentum_compiles_once_after_eager_first_step() -> None:
    params = toy_params()
    opt = SGD(params, lr=0.1, momentum=0.9, nesterov=True)
    counter = CompileCounter()
    use_backend(opt, counter)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.5, total_steps=40)
    run_steps([opt], [params], 30, lambda _: sched.step())
    assert counter.frame_count == 1


def test_manual_lr_change_does_not_recompile() -> None:
    params = toy_params()
    opt = AdamW(params, lr=0.01, weight_decay=0.1)
    counter = CompileCounter()
    use_backend(opt, counter)

    def bump(step: int) -> None:
        opt.param_groups[0]["lr"] = 0.01 * (step + 2)
        opt.param_groups[0]["betas"] = (0.9 - 0.01 * step, 0.999)

    run_steps([opt], [params], 10, bump)
    assert counter.frame_count == 1


def _first_step_update_sizes(opt_cls, params, **kwargs) -> list[float]:  # noqa: ANN001
    before = [p.detach().clone() for p in params]
    opt = opt_cls(params, **kwargs)
    # OneCycleLR sets every group's lr to max_lr / div_factor when it is built.
    torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.01, total_steps=20)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    return [(p - b).abs().mean().item() for p, b in zip(params, before)]


def test_onecycle_preserves_umup_ratios() -> None:
    params = toy_params(torch.float64)
    sizes = _first_step_update_sizes(Adam, params, lr=0.01, compile=False)
    scales = Adam(toy_params(), compile=False).param_groups[0]["lr_scales"]
    # Adam's first update is lr * sign(grad): its size is group lr x u-μP scale.
    ratios = [s / sizes[0] for s in sizes]
    torch.testing.assert_close(
        torch.tensor(ratios), torch.tensor(scales) / scales[0], rtol=1e-6, atol=0
    )


def test_reference_onecycle_flattens_umup_ratios() -> None:
    # The fault this package fixes: one group per parameter lets OneCycleLR reset every
    # group to the same absolute lr.
    import unit_scaling.optim as uo

    sizes = _first_step_update_sizes(uo.Adam, toy_params(torch.float64), lr=0.01)
    assert max(sizes) / min(sizes) < 1.01


def test_hooks_all_fire() -> None:
    params = toy_params()
    opt = Adam(params, compile=False)
    calls: list[str] = []
    opt.register_step_pre_hook(lambda *a: calls.append("step_pre"))
    opt.register_step_post_hook(lambda *a: calls.append("step_post"))
    opt.register_state_dict_pre_hook(lambda *a: calls.append("sd_pre"))
    opt.register_state_dict_post_hook(lambda *a: calls.append("sd_post"))
    opt.register_load_state_dict_pre_hook(lambda *a: calls.append("load_pre"))
    opt.register_load_state_dict_post_hook(lambda *a: calls.append("load_post"))
    set_grads([params], 0)
    opt.step()
    opt.load_state_dict(opt.state_dict())
    assert calls == [
        "step_pre",
        "step_post",
        "sd_pre",
        "sd_post",
        "load_pre",
        "load_post",
    ]


def test_step_closure_returns_loss_with_grad_enabled() -> None:
    net = ToyUmupNet()
    opt = Adam(net.parameters(), lr=0.01, compile=False)
    tokens = torch.randint(0, 32, (4, 8))

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = net.loss(tokens, tokens)
        loss.backward()
        return loss

    with torch.no_grad():
        first = opt.step(closure)
    assert first.requires_grad
    for _ in range(20):
        last = opt.step(closure)
    assert last.item() < first.item()


@pytest.mark.parametrize("engine", ["eager", "aot_eager"])
@pytest.mark.parametrize(
    "cls,kwargs",
    [
        (Adam, {"lr": 0.01, "weight_decay": 0.1, "amsgrad": True}),
        (AdamW, {"lr": 0.01, "weight_decay": 0.1}),
        (SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.1}),
    ],
    ids=["adam_amsgrad", "adamw", "sgd_momentum"],
)
def test_state_dict_resume_is_bitwise(cls, kwargs, engine: str) -> None:  # noqa: ANN001
    def make(params):  # noqa: ANN001, ANN202
        opt = cls(params, compile=engine != "eager", **kwargs)
        if engine != "eager":
            use_backend(opt, engine)
        return opt

    params = toy_params()
    opt = make(params)
    run_steps([opt], [params], 5)
    saved_params = clone_params(params)
    saved_state = copy.deepcopy(opt.state_dict())
    run_steps([opt], [params], 5)

    resumed = clone_params(saved_params)
    opt2 = make(resumed)
    opt2.load_state_dict(saved_state)
    run_steps([opt2], [resumed], 5)
    for p, q in zip(params, resumed):
        assert torch.equal(p, q)
    for p, q in zip(params, resumed):
        for key, value in opt.state[p].items():
            assert torch.equal(value, opt2.state[q][key]), key


def test_state_dict_keeps_torch_layout() -> None:
    params = toy_params()
    opt = Adam(params, amsgrad=True, compile=False)
    set_grads([params], 0)
    opt.step()
    state = opt.state_dict()["state"][0]
    assert sorted(state) == ["exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step"]
    assert state["step"].dtype == torch.float32 and state["step"].ndim == 0


def test_add_param_group_applies_scaling_after_compiled_steps() -> None:
    params = toy_params()
    first, extra = params[:3], params[3:]
    opt = Adam(first, lr=0.01)
    counter = CompileCounter()
    use_backend(opt, counter)
    run_steps([opt], [first], 2)
    opt.add_param_group({"params": extra, "lr": 0.02})
    reference = Adam(toy_params()[3:], lr=0.02, compile=False).param_groups[0][
        "lr_scales"
    ]
    assert opt.param_groups[1]["lr_scales"] == reference
    run_steps([opt], [params], 3)
    assert counter.frame_count == 2  # one rebuild for the new group, then none
    assert all(opt.state[p]["step"].item() == 3 for p in extra)


@pytest.mark.parametrize("engine", ["eager", "inductor"])
def test_add_param_group_matches_unit_scaling_groups(engine: str) -> None:
    import unit_scaling.optim as uo

    params = toy_params()
    ref_params = clone_params(params)
    opt = AdamW(params[:3], lr=0.01, weight_decay=0.1, compile=engine == "inductor")
    run_steps([opt], [params[:3]], 2)
    opt.add_param_group({"params": params[3:], "lr": 0.02})
    # The reference scales only at construction: give it the final layout up front.
    ref = uo.AdamW(
        [{"params": ref_params[:3]}, {"params": ref_params[3:], "lr": 0.02}],
        lr=0.01,
        weight_decay=0.1,
    )
    run_steps([ref], [ref_params[:3]], 2)
    run_steps([opt, ref], [params, ref_params], 3)
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p, q, **TOLERANCES[torch.float32])


def test_params_without_grad_are_skipped() -> None:
    params = toy_params()
    opt = Adam(params, compile=False)
    set_grads([params], 0)
    params[1].grad = None
    before = params[1].detach().clone()
    opt.step()
    assert torch.equal(params[1], before)
    assert params[1] not in opt.state
    assert opt.state[params[0]]["step"].item() == 1


def test_zero_grad_sets_none() -> None:
    params = toy_params()
    opt = SGD(params, compile=False)
    set_grads([params], 0)
    opt.zero_grad()
    assert all(p.grad is None for p in params)


CONSTRUCTOR_ERRORS = [
    ("lr_none", Adam, {"lr": None}, ValueError, "lr is None"),
    ("lr_negative", Adam, {"lr": -1.0}, ValueError, "Invalid learning rate: -1.0"),
    (
        "lr_tensor_shape",
        Adam,
        {"lr": torch.ones(2)},
        ValueError,
        "Tensor lr must be 1-element",
    ),
    (
        "beta1",
        Adam,
        {"betas": (1.0, 0.9)},
        ValueError,
        "Invalid beta parameter at index 0",
    ),
    (
        "beta2",
        AdamW,
        {"betas": (0.9, -0.1)},
        ValueError,
        "Invalid beta parameter at index 1",
    ),
    ("eps", Adam, {"eps": -1.0}, ValueError, "Invalid epsilon value"),
    (
        "weight_decay",
        Adam,
        {"weight_decay": -1},
        ValueError,
        "Invalid weight_decay value: -1",
    ),
    ("momentum", SGD, {"momentum": -0.5}, ValueError, "Invalid momentum value: -0.5"),
    ("nesterov", SGD, {"nesterov": True}, ValueError, "Nesterov momentum requires"),
    (
        "readout",
        SGD,
        {"readout_constraint": "bogus"},
        ValueError,
        "readout_constraint='bogus'",
    ),
    (
        "compile_flag",
        Adam,
        {"compile": "fast"},
        ValueError,
        "compile='fast' is not supported",
    ),
    (
        "independent_flag",
        Adam,
        {"independent_weight_decay": 1},
        TypeError,
        "must be a bool",
    ),
]


@pytest.mark.parametrize(
    "cls,kwargs,exc,pattern",
    [c[1:] for c in CONSTRUCTOR_ERRORS],
    ids=[c[0] for c in CONSTRUCTOR_ERRORS],
)
def test_constructor_rejects_bad_option(cls, kwargs, exc, pattern) -> None:  # noqa: ANN001
    with pytest.raises(exc, match=re.escape(pattern)):
        cls(toy_params(), **kwargs)


def _untagged_named() -> list[tuple[str, nn.Parameter]]:
    return [("blocks.0.attn.w", nn.Parameter(torch.randn(64, 64)))]


PARAM_ERRORS = [
    (
        "untagged_named",
        lambda: _untagged_named(),
        ValueError,
        r"parameter 'blocks.0.attn.w' \(shape \(64, 64\)\) is not u-μP tagged.*"
        r"allow_non_unit_scaling_params=True",
    ),
    (
        "untagged_index",
        lambda: [{"params": toy_params()}, {"params": [nn.Parameter(torch.randn(3))]}],
        ValueError,
        r"parameter group 1, index 0 \(shape \(3,\)\) is not u-μP tagged",
    ),
    (
        "unknown_mup_type",
        lambda: [_tag(nn.Parameter(torch.randn(3)), "embedding", None)],
        ValueError,
        r"mup_type='embedding' is not a u-μP type",
    ),
    (
        "bad_depth",
        lambda: [_tag(nn.Parameter(torch.randn(3)), "bias", 0)],
        ValueError,
        r"mup_scaling_depth=0 must be None or a positive int",
    ),
    (
        "weight_4d",
        lambda: [uc.Parameter(torch.randn(2, 2, 2, 2), "weight")],
        ValueError,
        r"no fan_in rule for a 4-D weight",
    ),
    (
        "in_two_groups",
        lambda: (lambda ps: [{"params": ps}, {"params": ps[:1]}])(toy_params()),
        ValueError,
        r"some parameters appear in more than one parameter group: parameter group 1",
    ),
    (
        "twice_in_group",
        lambda: (lambda ps: [ps[0], ps[0]])(toy_params()),
        ValueError,
        r"appears twice in its param group",
    ),
    (
        "integer_param",
        lambda: [nn.Parameter(torch.ones(3, dtype=torch.int64), requires_grad=False)],
        TypeError,
        r"dtype torch.int64 is not supported",
    ),
    (
        "lone_tensor",
        lambda: uc.Parameter(torch.randn(3), "bias"),
        TypeError,
        r"params argument given to the optimizer should be an iterable",
    ),
]


def _tag(p: nn.Parameter, mup_type: str, depth: object) -> nn.Parameter:
    p.mup_type = mup_type  # type: ignore[attr-defined]
    p.mup_scaling_depth = depth  # type: ignore[attr-defined]
    return p


@pytest.mark.parametrize(
    "make,exc,pattern", [c[1:] for c in PARAM_ERRORS], ids=[c[0] for c in PARAM_ERRORS]
)
def test_constructor_rejects_bad_param(make, exc, pattern) -> None:  # noqa: ANN001
    with pytest.raises(exc, match=pattern):
        Adam(make(), compile=False)


def test_add_param_group_error_leaves_optimizer_unchanged() -> None:
    params = toy_params()
    opt = Adam(params[:2], compile=False)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="is not u-μP tagged"):
        opt.add_param_group({"params": [params[2], nn.Parameter(torch.randn(2))]})
    assert len(opt.param_groups) == 1
    assert opt.state_dict() == before


def test_sparse_grad_fails_before_any_update() -> None:
    params = toy_params()
    opt = Adam(params, compile=False)
    set_grads([params], 0)
    params[-1].grad = params[-1].grad.to_sparse()
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match="sparse gradient"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert len(opt.state) == 0


def test_untagged_allowed_gets_unit_lr_scale_and_scaled_decay() -> None:
    params = [nn.Parameter(torch.randn(4, 4))]
    opt = AdamW(params, lr=0.01, weight_decay=0.1, allow_non_unit_scaling_params=True)
    assert opt.param_groups[0]["lr_scales"] == [1.0]
    assert opt.param_groups[0]["wd_scales"] == [pytest.approx(100.0)]


def test_load_torch_state_dict_keeps_umup_scales() -> None:
    params = toy_params()
    opt = Adam(params, lr=0.01, compile=False)
    scales = list(opt.param_groups[0]["lr_scales"])
    plain = torch.optim.Adam(clone_params(params), lr=0.01)
    set_grads([plain.param_groups[0]["params"]], 0)
    plain.step()
    opt.load_state_dict(plain.state_dict())
    assert opt.param_groups[0]["lr_scales"] == scales
    assert opt.state[params[0]]["step"].item() == 1


def test_load_state_dict_mismatch_is_clear_and_mutates_nothing() -> None:
    params = toy_params()
    opt = Adam(params, compile=False)
    other = Adam(params[:2], compile=False)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="doesn't match the size"):
        opt.load_state_dict(other.state_dict())
    assert opt.state_dict() == before


@pytest.mark.parametrize("engine", ["eager", "aot_eager"])
@pytest.mark.parametrize("eps", [1e-8, 0.0])
def test_adam_zero_lr_warmup_leaves_params_unchanged(engine: str, eps: float) -> None:
    # Warm-up from lr 0 with gradients that are exactly zero in places (unused
    # embedding rows) must not move or poison parameters. (With eps=0 torch computes
    # 0 * 0/0 = nan there; we keep the parameter.)
    params = [nn.Parameter(torch.randn(4, 3))]
    before = params[0].detach().clone()
    ref_params = clone_params(params)
    opt = Adam(params, lr=0.0, eps=eps, allow_non_unit_scaling_params=True)
    if engine != "eager":
        use_backend(opt, engine)
    ref = torch.optim.Adam(ref_params, lr=0.0, eps=eps)
    for p in params + ref_params:
        p.grad = torch.zeros(4, 3)
        p.grad[0] = 1.0
    opt.step()
    ref.step()
    assert torch.equal(params[0], before)
    if eps == 0.0:
        return
    assert torch.equal(params[0], ref_params[0])
    for group in (opt.param_groups[0], ref.param_groups[0]):
        group["lr"] = 0.1
    opt.step()
    ref.step()
    torch.testing.assert_close(params[0], ref_params[0], **TOLERANCES[torch.float32])


@pytest.mark.parametrize(
    "cls,kwargs",
    [
        (Adam, {"amsgrad": True}),
        (SGD, {"momentum": 0.9, "readout_constraint": "to_output_scale"}),
    ],
    ids=["adam", "sgd"],
)
def test_optimizer_deepcopy_and_pickle_keep_working(cls, kwargs) -> None:  # noqa: ANN001
    import pickle

    params = toy_params()
    opt = cls(
        params, lr=0.01, weight_decay=0.1, independent_weight_decay=False, **kwargs
    )
    use_backend(opt, "aot_eager")
    run_steps([opt], [params], 2)
    for copy_of in (copy.deepcopy, lambda o: pickle.loads(pickle.dumps(o))):
        other = copy_of(opt)
        assert other.independent_weight_decay is False
        assert getattr(other, "readout_constraint", None) == kwargs.get(
            "readout_constraint"
        )
        other_params = [p for g in other.param_groups for p in g["params"]]
        ref = copy.deepcopy(opt)
        ref_params = [p for g in ref.param_groups for p in g["params"]]
        ref._engine = run_eager
        run_steps([other, ref], [other_params, ref_params], 2)
        assert_states_close(other, ref, **TOLERANCES[torch.float32])


def test_capturable_on_cpu_steps_as_without_it() -> None:
    """torch's fused CPU Adam takes capturable=True, and Dynamo writes it into the
    groups of an optimizer whose step it traced; an untraced step then refused it."""
    params = toy_params()
    ref_params = copy.deepcopy(params)
    opt = Adam(params, lr=0.01, capturable=True, compile=False)
    ref = Adam(ref_params, lr=0.01, compile=False)
    run_steps([opt, ref], [params, ref_params], 3)
    for p, q in zip(params, ref_params):
        assert torch.equal(p, q)
