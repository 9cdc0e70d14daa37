"""Tests of ``umup_compile._plan``: scaled_parameters and the optimizers' group factors."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import unit_scaling.optim as uso
from torch import Tensor, nn

import umup_compile as uc
import umup_compile.optim as uo
from tests.helpers import TOY_SPECS, toy_params

# (id, our rule, unit_scaling's rule)
RULES: list[tuple[str, Callable[[Any], float], Callable[[Any], float]]] = [
    ("adam", uo.lr_scale_func_adam, uso.lr_scale_func_adam),
    (
        "sgd_to_output_scale",
        uo.lr_scale_func_sgd("to_output_scale"),
        uso.lr_scale_func_sgd("to_output_scale"),
    ),
]
RULE_IDS = [rule[0] for rule in RULES]
RULE_PAIRS = [rule[1:] for rule in RULES]

# (id, lr builder): a tensor lr is built fresh per use.
LRS: list[tuple[str, Callable[[], float | Tensor]]] = [
    ("float_lr", lambda: 0.02),
    ("tensor_lr", lambda: torch.tensor(0.02, dtype=torch.float64)),
]


def _untagged_mix() -> list[nn.Parameter]:
    """Tagged toy parameters with two plain ones in between."""
    params = toy_params(torch.float64)
    params.insert(1, nn.Parameter(torch.randn(4, 4, dtype=torch.float64)))
    params.append(nn.Parameter(torch.randn(3, dtype=torch.float64)))
    return params


def _as_float(value: float | Tensor) -> float:
    return float(value.item()) if isinstance(value, Tensor) else float(value)


def _assert_groups_equal(
    ours: list[dict[str, Any]], theirs: list[dict[str, Any]]
) -> None:
    """Same layout and values as unit_scaling; tensor lrs stay tensors of one dtype."""
    assert len(ours) == len(theirs)
    for k, (a, b) in enumerate(zip(ours, theirs)):
        assert set(a) == set(b), k
        assert len(a["params"]) == 1
        assert a["params"][0] is b["params"][0], k
        assert isinstance(a["lr"], Tensor) == isinstance(b["lr"], Tensor), k
        if isinstance(b["lr"], Tensor):
            assert a["lr"].dtype == b["lr"].dtype
            assert a["lr"].shape == b["lr"].shape
        assert _as_float(a["lr"]) == _as_float(b["lr"]), k
        assert _as_float(a["weight_decay"]) == _as_float(b["weight_decay"]), k
        for key in set(b) - {"params", "lr", "weight_decay"}:
            assert a[key] == b[key], (k, key)


def _assert_tensor_lrs_cloned(groups: list[dict[str, Any]], lr: Tensor) -> None:
    ptrs = {lr.data_ptr()}
    for group in groups:
        assert isinstance(group["lr"], Tensor)
        assert group["lr"].data_ptr() not in ptrs, "tensor lr shared between groups"
        ptrs.add(group["lr"].data_ptr())


@pytest.mark.parametrize(
    "independent_weight_decay", [True, False], ids=["independent_wd", "coupled_wd"]
)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1], ids=["wd_0", "wd_0.1"])
@pytest.mark.parametrize("make_lr", [lr[1] for lr in LRS], ids=[lr[0] for lr in LRS])
@pytest.mark.parametrize(("ours_rule", "their_rule"), RULE_PAIRS, ids=RULE_IDS)
def test_scaled_parameters_matches_unit_scaling(
    ours_rule: Callable[[Any], float],
    their_rule: Callable[[Any], float],
    make_lr: Callable[[], float | Tensor],
    weight_decay: float,
    independent_weight_decay: bool,
) -> None:
    params = toy_params(torch.float64)
    lr = make_lr()
    kwargs = {
        "weight_decay": weight_decay,
        "independent_weight_decay": independent_weight_decay,
    }
    ours = uo.scaled_parameters(params, ours_rule, lr=lr, **kwargs)
    theirs = uso.scaled_parameters(params, their_rule, lr=make_lr(), **kwargs)
    _assert_groups_equal(ours, theirs)  # type: ignore[arg-type]
    assert len(ours) == len(TOY_SPECS)
    if isinstance(lr, Tensor):
        _assert_tensor_lrs_cloned(ours, lr)
        assert lr.item() == 0.02  # the caller's lr is untouched


@pytest.mark.parametrize("make_lr", [lr[1] for lr in LRS], ids=[lr[0] for lr in LRS])
@pytest.mark.parametrize(
    "independent_weight_decay", [True, False], ids=["independent_wd", "coupled_wd"]
)
def test_scaled_parameters_matches_unit_scaling_untagged_allowed(
    independent_weight_decay: bool, make_lr: Callable[[], float | Tensor]
) -> None:
    params = _untagged_mix()
    kwargs = {
        "weight_decay": 0.1,
        "independent_weight_decay": independent_weight_decay,
        "allow_non_unit_scaling_params": True,
    }
    lr = make_lr()
    ours = uo.scaled_parameters(params, uo.lr_scale_func_adam, lr=lr, **kwargs)
    theirs = uso.scaled_parameters(
        params, uso.lr_scale_func_adam, lr=make_lr(), **kwargs
    )
    _assert_groups_equal(ours, theirs)  # type: ignore[arg-type]
    assert _as_float(ours[1]["lr"]) == 0.02  # untagged: lr scale 1
    if isinstance(lr, Tensor):
        # unit_scaling hands untagged params the caller's tensor itself; we clone it.
        _assert_tensor_lrs_cloned(ours, lr)


@pytest.mark.parametrize("make_lr", [lr[1] for lr in LRS], ids=[lr[0] for lr in LRS])
def test_scaled_parameters_matches_unit_scaling_dict_groups(
    make_lr: Callable[[], float | Tensor],
) -> None:
    params = toy_params(torch.float64)

    def groups(lr: float | Tensor) -> list[dict[str, Any]]:
        return [
            {
                "params": params[:2],
                "lr": lr,
                "betas": (0.8, 0.9),
                "name": "embed+block",
            },
            {"params": params[2:4], "weight_decay": 0.3},
            {"params": params[4:], "lr": 0.5, "weight_decay": 0.0, "nesterov": True},
        ]

    ours_in, theirs_in = groups(make_lr()), groups(make_lr())
    snapshot = [dict(g) for g in ours_in]
    ours = uo.scaled_parameters(
        ours_in, uo.lr_scale_func_adam, lr=0.01, weight_decay=0.1
    )
    theirs = uso.scaled_parameters(
        theirs_in, uso.lr_scale_func_adam, lr=0.01, weight_decay=0.1
    )
    _assert_groups_equal(ours, theirs)  # type: ignore[arg-type]
    assert ours_in == snapshot  # the caller's dicts are not modified
    assert [g.get("name") for g in ours] == ["embed+block"] * 2 + [None] * 4
    assert _as_float(ours[2]["lr"]) == 0.01 * uo.lr_scale_func_adam(params[2])  # type: ignore[arg-type]


def test_scaled_parameters_zero_lr_without_weight_decay() -> None:
    # unit_scaling divides 0 by 0 here; with no weight decay there is nothing to divide.
    groups = uo.scaled_parameters(toy_params(), uo.lr_scale_func_adam, lr=0.0)
    assert [(g["lr"], g["weight_decay"]) for g in groups] == [(0.0, 0)] * len(TOY_SPECS)


def _tagged_then_untagged() -> list[Tensor]:
    return [uc.Parameter(torch.zeros(4, 4), "weight"), nn.Parameter(torch.zeros(5, 3))]


# (id, call, exception, message regex)
PLAN_ERROR_CASES: list[tuple[str, Callable[[], object], type[Exception], str]] = [
    (
        "lr_missing",
        lambda: uo.scaled_parameters(toy_params(), uo.lr_scale_func_adam),
        ValueError,
        r"group 0 has no lr; pass lr=\.\.\. or give every group an 'lr'",
    ),
    (
        "lr_missing_in_second_group",
        lambda: uo.scaled_parameters(
            [{"params": toy_params()[:1], "lr": 0.1}, {"params": toy_params()[1:]}],
            uo.lr_scale_func_adam,
        ),
        ValueError,
        r"group 1 has no lr",
    ),
    (
        "untagged_param",
        lambda: uo.scaled_parameters(
            _tagged_then_untagged(), uo.lr_scale_func_adam, lr=0.1
        ),
        ValueError,
        r"parameter group 1, index 0 \(shape \(5, 3\)\) is not u-μP tagged: set mup_type "
        r".*or pass allow_non_unit_scaling_params=True",
    ),
    (
        "zero_lr_with_independent_weight_decay",
        lambda: uo.scaled_parameters(
            toy_params(), uo.lr_scale_func_adam, lr=0.0, weight_decay=0.1
        ),
        ValueError,
        r"parameter group 0, index 0 \(shape \(32, 16\), mup_type 'weight'\): independent "
        r"weight decay divides weight_decay by the initial lr, which is 0.0; start from a "
        r"non-zero lr or pass independent_weight_decay=False",
    ),
    (
        "invalid_tag",
        lambda: uo.scaled_parameters(
            [_bad_depth()],
            uo.lr_scale_func_adam,
            lr=0.1,
            allow_non_unit_scaling_params=True,
        ),
        ValueError,
        r"parameter group 0, index 0 .*mup_scaling_depth=0 must be None or a positive int",
    ),
    (
        "weight_4d",
        lambda: uo.scaled_parameters(
            [uc.Parameter(torch.zeros(1, 2, 3, 4), "weight")],
            uo.lr_scale_func_adam,
            lr=0.1,
        ),
        ValueError,
        r"parameter group 0, index 0 .*: u-μP has no fan_in rule for a 4-D weight.*reshape",
    ),
    (
        "optimizer_named_untagged_param",
        lambda: uo.Adam(
            [("blocks.0.attn.w", nn.Parameter(torch.zeros(64, 64)))],
            lr=0.1,
            compile=False,
        ),
        ValueError,
        r"parameter 'blocks.0.attn.w' \(shape \(64, 64\)\) is not u-μP tagged: set "
        r"mup_type .*allow_non_unit_scaling_params=True",
    ),
    (
        "optimizer_zero_lr_with_independent_weight_decay",
        lambda: uo.AdamW(
            [("head", uc.Parameter(torch.zeros(2, 2), "output"))],
            lr=0.0,
            weight_decay=0.1,
            compile=False,
        ),
        ValueError,
        r"parameter 'head' .*independent_weight_decay=False",
    ),
]


def _bad_depth() -> Tensor:
    p = nn.Parameter(torch.zeros(3))
    p.mup_type = "bias"  # type: ignore[attr-defined]
    p.mup_scaling_depth = 0  # type: ignore[attr-defined]
    return p


@pytest.mark.parametrize(
    ("call", "exception", "message"),
    [case[1:] for case in PLAN_ERROR_CASES],
    ids=[case[0] for case in PLAN_ERROR_CASES],
)
def test_scaled_parameters_error_names_param_and_fix(
    call: Callable[[], object], exception: type[Exception], message: str
) -> None:
    with pytest.raises(exception, match=message):
        call()


# (id, our optimizer class, unit_scaling's class, extra kwargs for both)
OPTIMIZER_CASES: list[tuple[str, type, type, dict[str, Any]]] = [
    ("adam", uo.Adam, uso.Adam, {}),
    ("adamw", uo.AdamW, uso.AdamW, {}),
    ("sgd", uo.SGD, uso.SGD, {}),
    ("sgd_to_output_scale", uo.SGD, uso.SGD, {"readout_constraint": "to_output_scale"}),
]


@pytest.mark.parametrize(
    "independent_weight_decay", [True, False], ids=["independent_wd", "coupled_wd"]
)
@pytest.mark.parametrize(
    ("ours_cls", "their_cls", "extra"),
    [case[1:] for case in OPTIMIZER_CASES],
    ids=[case[0] for case in OPTIMIZER_CASES],
)
def test_optimizer_group_scales_match_unit_scaling_groups(
    ours_cls: type,
    their_cls: type,
    extra: dict[str, Any],
    independent_weight_decay: bool,
) -> None:
    params = _untagged_mix()
    # Two groups of our own, each with its own lr and weight decay.
    group_options = [
        {"lr": 0.02, "weight_decay": 0.1},
        {"lr": 0.3, "weight_decay": 0.05},
    ]
    slices = [slice(0, 3), slice(3, None)]
    kwargs = {
        "independent_weight_decay": independent_weight_decay,
        "allow_non_unit_scaling_params": True,
        **extra,
    }
    ours = ours_cls(
        [{"params": params[s], **o} for s, o in zip(slices, group_options)],
        compile=False,
        **kwargs,
    )
    theirs = their_cls(
        [{"params": params[s], **o} for s, o in zip(slices, group_options)], **kwargs
    )
    assert len(ours.param_groups) == 2  # groups stay as given
    their_groups = iter(theirs.param_groups)
    for group, options in zip(ours.param_groups, group_options):
        assert group["lr"] == options["lr"]  # base values stay in the group
        assert group["weight_decay"] == options["weight_decay"]
        n = len(group["params"])
        assert len(group["lr_scales"]) == len(group["wd_scales"]) == n
        assert all(
            isinstance(s, float) for s in group["lr_scales"] + group["wd_scales"]
        )
        for i in range(n):
            their = next(their_groups)
            assert their["params"][0] is group["params"][i]
            assert group["lr_scales"][i] == pytest.approx(
                their["lr"] / group["lr"], rel=1e-14
            )
            assert group["wd_scales"][i] == pytest.approx(
                their["weight_decay"] / group["weight_decay"], rel=1e-14
            )
    assert next(their_groups, None) is None


def test_scaled_parameters_takes_named_parameters_as_torch_optimizers_do() -> None:
    # torch's optimizers take named_parameters(); scaled_parameters failed on the
    # pairs ("dictionary update sequence element #0 has length 1"), and read a lone
    # tensor as rows of parameters.
    params = toy_params(torch.float64)
    named = [(f"p{i}", p) for i, p in enumerate(params)]
    plain = uo.scaled_parameters(params, uo.lr_scale_func_adam, lr=0.1)
    groups = uo.scaled_parameters(named, uo.lr_scale_func_adam, lr=0.1)
    assert [g["lr"] for g in groups] == [g["lr"] for g in plain]
    assert [g["params"] for g in groups] == [[pair] for pair in named]
    opt = torch.optim.AdamW(groups)
    assert [g["param_names"] for g in opt.param_groups] == [[n] for n, _ in named]
    with pytest.raises(TypeError, match="iterable of Tensors or dicts"):
        uo.scaled_parameters(params[0], uo.lr_scale_func_adam, lr=0.1)
