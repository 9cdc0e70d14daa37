"""Tests of ``umup_compile._rules``: the u-μP lr rules equal unit_scaling's."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import expecttest
import pytest
import torch
import unit_scaling.optim as uso
from tabulate import tabulate

import umup_compile as uc
import umup_compile.optim as uo
from umup_compile._rules import fan_in

# (id, shape, mup_type, mup_scaling_depth)
RULE_CASES: list[tuple[str, tuple[int, ...], str, int | None]] = [
    ("weight_1d", (16,), "weight", None),
    ("weight_2d", (32, 16), "weight", None),
    ("weight_2d_depth_4", (16, 64), "weight", 4),
    ("weight_3d", (2, 16, 8), "weight", None),
    ("weight_3d_depth_3", (4, 3, 5), "weight", 3),
    ("bias_1d_depth_4", (16,), "bias", 4),
    ("bias_2d", (8, 2), "bias", None),
    ("norm_1d", (24,), "norm", None),
    ("norm_1d_depth_1", (24,), "norm", 1),
    ("output_2d", (10, 16), "output", None),
    ("output_3d_depth_2", (3, 10, 16), "output", 2),
    ("output_1d", (7,), "output", None),
]
RULE_IDS = [case[0] for case in RULE_CASES]
RULE_ARGS = [case[1:] for case in RULE_CASES]

# (id, shape, mup_type, depth, Adam lr scale, SGD "to_output_scale" lr scale): by hand.
HAND_CHECKED_CASES: list[tuple[str, tuple[int, ...], str, int | None, float, float]] = [
    ("embedding", (1000, 64), "weight", None, 1 / 8, 8.0),
    ("weight_depth_4", (32, 16), "weight", 4, 1 / 8, 2.0),
    ("weight_3d_depth_16", (2, 16, 4), "weight", 16, 1 / 32, 2.0),
    ("bias_depth_4", (16,), "bias", 4, 1 / 2, 8.0),
    ("norm", (16,), "norm", None, 1.0, 16.0),
    ("output_depth_4", (10, 16), "output", 4, 1 / 2, 1 / 2),
]


def _param(shape: tuple[int, ...], mup_type: str, depth: int | None) -> Any:
    return uc.Parameter(torch.empty(shape), mup_type, depth)  # type: ignore[arg-type]


def _duck(shape: tuple[int, ...], mup_type: str, depth: int | None = None) -> Any:
    """A duck-typed tag holder that skips Parameter()'s validation."""
    return SimpleNamespace(
        shape=torch.Size(shape), mup_type=mup_type, mup_scaling_depth=depth
    )


@pytest.mark.parametrize(("shape", "mup_type", "depth"), RULE_ARGS, ids=RULE_IDS)
def test_fan_in_matches_unit_scaling(
    shape: tuple[int, ...], mup_type: str, depth: int | None
) -> None:
    p = _param(shape, mup_type, depth)
    assert fan_in(p) == uso._get_fan_in(p)
    assert isinstance(fan_in(p), int)


@pytest.mark.parametrize(("shape", "mup_type", "depth"), RULE_ARGS, ids=RULE_IDS)
def test_lr_scale_for_depth_matches_unit_scaling(
    shape: tuple[int, ...], mup_type: str, depth: int | None
) -> None:
    p = _param(shape, mup_type, depth)
    ours = uo.lr_scale_for_depth(p)
    assert ours == uso.lr_scale_for_depth(p)
    assert isinstance(ours, float)


@pytest.mark.parametrize(("shape", "mup_type", "depth"), RULE_ARGS, ids=RULE_IDS)
def test_lr_scale_func_adam_matches_unit_scaling(
    shape: tuple[int, ...], mup_type: str, depth: int | None
) -> None:
    p = _param(shape, mup_type, depth)
    ours = uo.lr_scale_func_adam(p)
    assert ours == uso.lr_scale_func_adam(p)
    assert isinstance(ours, float)


@pytest.mark.parametrize(
    "readout", [None, "to_output_scale"], ids=["none", "to_output_scale"]
)
@pytest.mark.parametrize(("shape", "mup_type", "depth"), RULE_ARGS, ids=RULE_IDS)
def test_lr_scale_func_sgd_matches_unit_scaling(
    shape: tuple[int, ...], mup_type: str, depth: int | None, readout: str | None
) -> None:
    p = _param(shape, mup_type, depth)
    ours = uo.lr_scale_func_sgd(readout)(p)
    assert ours == uso.lr_scale_func_sgd(readout)(p)
    assert isinstance(ours, float)


def test_lr_scale_func_sgd_without_readout_constraint_is_adam_rule() -> None:
    assert uo.lr_scale_func_sgd(None) is uo.lr_scale_func_adam


@pytest.mark.parametrize(
    ("shape", "mup_type", "depth", "adam", "sgd"),
    [case[1:] for case in HAND_CHECKED_CASES],
    ids=[case[0] for case in HAND_CHECKED_CASES],
)
def test_lr_scale_funcs_equal_hand_checked_values(
    shape: tuple[int, ...], mup_type: str, depth: int | None, adam: float, sgd: float
) -> None:
    p = _param(shape, mup_type, depth)
    assert uo.lr_scale_func_adam(p) == pytest.approx(adam, rel=1e-15)
    assert uo.lr_scale_func_sgd("to_output_scale")(p) == pytest.approx(sgd, rel=1e-15)


# (id, call, message regex): each message names the problem and the fix.
RULE_ERROR_CASES: list[tuple[str, Callable[[], object], str]] = [
    (
        "fan_in_4d_weight",
        lambda: fan_in(_param((2, 2, 2, 2), "weight", None)),
        r"no fan_in rule for a 4-D weight of shape \(2, 2, 2, 2\); "
        r"reshape it to at most 3 dimensions, or tag it with a mup_type other than",
    ),
    (
        "fan_in_0d_weight",
        lambda: fan_in(_param((), "weight", None)),
        r"0-D weight of shape \(\); reshape it",
    ),
    (
        "adam_4d_weight",
        lambda: uo.lr_scale_func_adam(_param((1, 2, 3, 4), "weight", 2)),
        r"4-D weight .* reshape it to at most 3 dimensions",
    ),
    (
        "sgd_4d_weight",
        lambda: uo.lr_scale_func_sgd("to_output_scale")(
            _param((1, 2, 3, 4), "weight", None)
        ),
        r"4-D weight .* reshape it to at most 3 dimensions",
    ),
    (
        "unknown_readout_constraint",
        lambda: uo.lr_scale_func_sgd("to_input_scale"),
        r"readout_constraint='to_input_scale' is not supported; "
        r"use one of \(None, 'to_output_scale'\)",
    ),
    (
        "adam_unknown_mup_type",
        lambda: uo.lr_scale_func_adam(_duck((4, 4), "embedding")),
        r"unknown mup_type 'embedding' on a parameter of shape \(4, 4\); "
        r"use 'weight', 'bias', 'norm' or 'output'",
    ),
    (
        "sgd_unknown_mup_type",
        lambda: uo.lr_scale_func_sgd("to_output_scale")(_duck((4,), "gain", 2)),
        r"unknown mup_type 'gain' on a parameter of shape \(4,\); use 'weight'",
    ),
    (
        "sgd_0d_bias",
        lambda: uo.lr_scale_func_sgd("to_output_scale")(_duck((), "bias")),
        r"0-D 'bias' parameter has no width .*give it shape \(width,\)",
    ),
]


@pytest.mark.parametrize(
    ("call", "message"),
    [case[1:] for case in RULE_ERROR_CASES],
    ids=[case[0] for case in RULE_ERROR_CASES],
)
def test_rules_raise_value_error_naming_fix(
    call: Callable[[], object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        call()


# A small u-μP model: (name, shape, mup_type, depth) of each parameter.
GOLDEN_MODEL: list[tuple[str, tuple[int, ...], str, int | None]] = [
    ("embed", (256, 64), "weight", None),
    ("blocks.0.attn.qkv", (192, 64), "weight", 2),
    ("blocks.0.attn.bias", (192,), "bias", 2),
    ("blocks.0.conv", (64, 16, 3), "weight", 2),
    ("blocks.0.mlp.up", (256, 64), "weight", 2),
    ("blocks.0.mlp.down", (64, 256), "weight", 2),
    ("blocks.0.norm", (64,), "norm", 2),
    ("final_norm", (64,), "norm", None),
    ("head", (256, 64), "output", None),
]


def _golden_table(adam: Callable[[Any], float], sgd: Callable[[Any], float]) -> str:
    rows = []
    for name, shape, mup_type, depth in GOLDEN_MODEL:
        p = _param(shape, mup_type, depth)
        rows.append([name, mup_type, depth, str(shape), adam(p), sgd(p)])
    headers = [
        "parameter",
        "mup_type",
        "depth",
        "shape",
        "lr scale (adam)",
        "lr scale (sgd to_output_scale)",
    ]
    return tabulate(rows, headers=headers, floatfmt=".6g", missingval="None")


def test_lr_scale_funcs_golden_table() -> None:
    table = _golden_table(
        uo.lr_scale_func_adam, uo.lr_scale_func_sgd("to_output_scale")
    )
    assert table == _golden_table(
        uso.lr_scale_func_adam, uso.lr_scale_func_sgd("to_output_scale")
    )
    expecttest.assert_expected_inline(
        table,
        """\
parameter           mup_type      depth  shape          lr scale (adam)    lr scale (sgd to_output_scale)
------------------  ----------  -------  -----------  -----------------  --------------------------------
embed               weight         None  (256, 64)            0.125                               8
blocks.0.attn.qkv   weight            2  (192, 64)            0.0883883                           5.65685
blocks.0.attn.bias  bias              2  (192,)               0.707107                          135.765
blocks.0.conv       weight            2  (64, 16, 3)          0.102062                            4.89898
blocks.0.mlp.up     weight            2  (256, 64)            0.0883883                           5.65685
blocks.0.mlp.down   weight            2  (64, 256)            0.0441942                          11.3137
blocks.0.norm       norm              2  (64,)                0.707107                           45.2548
final_norm          norm           None  (64,)                1                                  64
head                output         None  (256, 64)            1                                   1""",
    )
