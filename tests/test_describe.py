"""describe(): stable per-parameter tables of the u-μP factors (expecttest)."""

from __future__ import annotations

import pytest
import torch
from expecttest import assert_expected_inline
from torch import nn

import umup_compile as uc
from tests.helpers import ToyUmupNet, toy_params
from umup_compile.optim import SGD, Adam, describe


def test_describe_model_before_optimizer() -> None:
    table = describe(ToyUmupNet(), lr=0.01, weight_decay=0.1)
    assert_expected_inline(
        table,
        """\
parameter  shape     mup_type  depth  fan_in  lr scale  lr        wd scale  wd     bucket
---------  --------  --------  -----  ------  --------  --------  --------  -----  ------
embed      (32, 16)  weight    -      16      0.25      0.0025    400       40     0
bias       (16,)     bias      2      -       0.7071    0.007071  141.4     14.14  0
norm       (16,)     norm      -      -       1         0.01      100       10     0
head       (32, 16)  output    -      -       1         0.01      100       10     0
blocks.0   (16, 16)  weight    2      16      0.1768    0.001768  565.7     56.57  0
blocks.1   (16, 16)  weight    2      16      0.1768    0.001768  565.7     56.57  0
total: 6 tensors, 1,568 elements""",
    )


def test_describe_optimizer_groups_and_buckets() -> None:
    params = toy_params()
    params[4] = uc.Parameter(torch.ones(16, dtype=torch.float64), "norm")  # own bucket
    opt = Adam(
        [{"params": params[:2]}, {"params": params[2:], "amsgrad": True}], lr=0.01
    )
    assert_expected_inline(
        opt.describe(),
        """\
parameter  shape       mup_type  depth  fan_in  lr scale  lr         wd scale  wd  bucket  state B
---------  ----------  --------  -----  ------  --------  ---------  --------  --  ------  -------
g0[0]      (32, 16)    weight    -      16      0.25      0.0025     400       0   0       4100
g0[1]      (16, 16)    weight    4      16      0.125     0.00125    800       0   0       2052
g1[0]      (2, 16, 8)  weight    4      128     0.04419   0.0004419  2263      0   1       3076
g1[1]      (16,)       bias      4      -       0.5       0.005      200       0   1       196
g1[2]      (16,)       norm      -      -       1         0.01       100       0   2       388
g1[3]      (10, 16)    output    -      -       1         0.01       100       0   1       1924
total: 6 tensors, 1,216 elements, state 11,736 B (9.65 B per element)""",
    )


def test_describe_sgd_named_after_scheduler_step() -> None:
    opt = SGD(
        ToyUmupNet().named_parameters(), lr=0.1, readout_constraint="to_output_scale"
    )
    opt.param_groups[0]["lr"] = 0.05  # effective lr follows the group's current lr
    assert_expected_inline(
        opt.describe(),
        """\
parameter  shape     mup_type  depth  fan_in  lr scale  lr      wd scale  wd  bucket  state B
---------  --------  --------  -----  ------  --------  ------  --------  --  ------  -------
embed      (32, 16)  weight    -      16      4         0.2     2.5       0   0       0
bias       (16,)     bias      2      -       11.31     0.5657  0.8839    0   0       0
norm       (16,)     norm      -      -       16        0.8     0.625     0   0       0
head       (32, 16)  output    -      -       1         0.05    10        0   0       0
blocks.0   (16, 16)  weight    2      16      2.828     0.1414  3.536     0   0       0
blocks.1   (16, 16)  weight    2      16      2.828     0.1414  3.536     0   0       0
total: 6 tensors, 1,568 elements, state 0 B (0 B per element)""",
    )


def test_describe_rejects_untagged_like_the_optimizers() -> None:
    with pytest.raises(ValueError, match="'x' .* is not u-μP tagged"):
        describe([("x", nn.Parameter(torch.randn(2)))])
    assert "total: 1 tensors" in describe(
        [nn.Parameter(torch.randn(2))], allow_non_unit_scaling_params=True
    )


def test_describe_options_as_the_optimizers_name_them() -> None:
    # "adamw" was refused, and a readout constraint given with Adam's rule ignored.
    net = ToyUmupNet()
    assert describe(net, optimizer="adamw", lr=0.01) == describe(net, lr=0.01)
    with pytest.raises(ValueError, match="readout_constraint='bogus' is SGD's option"):
        describe(net, optimizer="adam", readout_constraint="bogus")
    with pytest.raises(ValueError, match="'adam', 'adamw' or 'sgd'"):
        describe(net, optimizer="lamb")
    # a tensor lr is shown as a number, not as tensor(...)
    assert describe(net, lr=torch.tensor(0.01)) == describe(net, lr=0.01)


def test_describe_with_a_state_entry_that_is_not_a_tensor() -> None:
    # torch keeps what a checkpoint holds (an old SGD's momentum_buffer None, a note
    # of the user's); describe() raised AttributeError on .dtype
    p = nn.Parameter(torch.randn(4, 3))
    opt = SGD([p], lr=0.1, momentum=0.9, allow_non_unit_scaling_params=True)
    p.grad = torch.ones_like(p)
    opt.step()
    opt.state[p]["note"] = 3
    assert "state 48 B" in opt.describe()  # the buffer's 12 floats, the note not
