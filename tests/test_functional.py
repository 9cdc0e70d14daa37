"""The functional core against a float64 reference written from the textbook formulas.

``adam_step_`` and ``sgd_step_`` are called directly, with the flat-list layout the
optimizers build: one ``hyper_t`` row per param group, ``group_index_t`` mapping each
parameter to its row, and u-μP factors ``lr_scales_t`` / ``wd_scales_t`` (effective lr
``lr * lr_scale``, effective weight decay ``weight_decay * wd_scale``).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor
from torch._dynamo.testing import CompileCounter

from tests.helpers import TOLERANCES
from umup_compile._engine import CompiledEngine
from umup_compile._functional import (
    ADAM_HYPERS,
    SGD_HYPERS,
    AdamConfig,
    SGDConfig,
    adam_step_,
    sgd_step_,
)

F64 = torch.float64
TOL = TOLERANCES[F64]

# -- references -----------------------------------------------------------------------


def reference_adam_(
    params: list[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    hyper_t: Tensor,
    group_index_t: Tensor,
    lr_scales_t: Tensor,
    wd_scales_t: Tensor,
    *,
    config: AdamConfig,
) -> None:
    """Adam (Kingma & Ba) with L2 or decoupled (Loshchilov & Hutter) weight decay."""
    for i, p in enumerate(params):
        lr, beta1, beta2, eps, wd = hyper_t[int(group_index_t[i])].tolist()
        lr *= float(lr_scales_t[i])
        wd *= float(wd_scales_t[i])
        g = -grads[i] if config.maximize else grads[i]
        if config.weight_decay == "l2":
            g = g + wd * p
        elif config.weight_decay == "decoupled":
            p.copy_(p * (1 - lr * wd))
        steps[i].copy_(steps[i] + 1)
        t = float(steps[i])
        exp_avgs[i].copy_(beta1 * exp_avgs[i] + (1 - beta1) * g)
        exp_avg_sqs[i].copy_(beta2 * exp_avg_sqs[i] + (1 - beta2) * g * g)
        v = exp_avg_sqs[i]
        if config.amsgrad:
            max_exp_avg_sqs[i].copy_(torch.maximum(max_exp_avg_sqs[i], v))
            v = max_exp_avg_sqs[i]
        m_hat = exp_avgs[i] / (1 - beta1**t)
        v_hat = v / (1 - beta2**t)
        p.copy_(p - lr * m_hat / (v_hat.sqrt() + eps))


def reference_sgd_(
    params: list[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: list[Tensor],
    hyper_t: Tensor,
    group_index_t: Tensor,
    lr_scales_t: Tensor,
    wd_scales_t: Tensor,
    *,
    config: SGDConfig,
    fresh_buffers: Sequence[bool] = (),
) -> None:
    """SGD with L2 weight decay, (dampened) heavy-ball or Nesterov momentum.

    A fresh buffer starts as the gradient itself (torch.optim.SGD); an old one as
    ``momentum * buf + (1 - dampening) * grad``.
    """
    for i, p in enumerate(params):
        lr, momentum, dampening, wd = hyper_t[int(group_index_t[i])].tolist()
        lr *= float(lr_scales_t[i])
        wd *= float(wd_scales_t[i])
        g = -grads[i] if config.maximize else grads[i]
        if config.weight_decay:
            g = g + wd * p
        if config.momentum:
            buf = momentum_buffers[i]
            if fresh_buffers and fresh_buffers[i]:
                buf.copy_(g)
            else:
                buf.copy_(momentum * buf + (1 - dampening) * g)
            g = g + momentum * buf if config.nesterov else buf
        p.copy_(p - lr * g)


# -- cases ----------------------------------------------------------------------------

SHAPES = [(3, 4), (5,), (2, 1, 3)]
GROUP_INDEX = [1, 0, 1]  # not sorted: index_select must pick the right rows
LR_SCALES = [0.5, 2.0, 0.125]
WD_SCALES = [3.0, 0.25, 1.0]
ADAM_ROWS = [[1e-2, 0.9, 0.999, 1e-8, 0.1], [3e-2, 0.8, 0.95, 1e-6, 0.02]]
SGD_ROWS = [[1e-2, 0.9, 0.1, 0.1], [5e-2, 0.5, 0.0, 0.02]]


def _factors(group_index: Sequence[int], lr_scales, wd_scales) -> tuple[Tensor, ...]:
    return (
        torch.tensor(group_index, dtype=torch.int64),
        torch.tensor(lr_scales, dtype=F64),
        torch.tensor(wd_scales, dtype=F64),
    )


def adam_args(
    shapes: Sequence[tuple[int, ...]] = SHAPES,
    rows: Sequence[Sequence[float]] = ADAM_ROWS,
    group_index: Sequence[int] = GROUP_INDEX,
    lr_scales: Sequence[float] = LR_SCALES,
    wd_scales: Sequence[float] = WD_SCALES,
    *,
    amsgrad: bool = False,
    seed: int = 0,
) -> tuple[Any, ...]:
    """Arguments of ``adam_step_`` in float64, with random params and grads."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen, dtype=F64) for s in shapes]
    return (
        params,
        [torch.randn(s, generator=gen, dtype=F64) for s in shapes],
        [torch.zeros_like(p) for p in params],
        [torch.zeros_like(p) for p in params],
        [torch.zeros_like(p) for p in params] if amsgrad else [],
        [torch.zeros((), dtype=torch.float32) for _ in params],
        torch.tensor(rows, dtype=F64),
        *_factors(group_index, lr_scales, wd_scales),
    )


def sgd_args(
    shapes: Sequence[tuple[int, ...]] = SHAPES,
    rows: Sequence[Sequence[float]] = SGD_ROWS,
    group_index: Sequence[int] = GROUP_INDEX,
    lr_scales: Sequence[float] = LR_SCALES,
    wd_scales: Sequence[float] = WD_SCALES,
    *,
    momentum: bool = True,
    seed: int = 0,
) -> tuple[Any, ...]:
    """Arguments of ``sgd_step_`` in float64, with random params and grads."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen, dtype=F64) for s in shapes]
    return (
        params,
        [torch.randn(s, generator=gen, dtype=F64) for s in shapes],
        [torch.zeros_like(p) for p in params] if momentum else [],
        torch.tensor(rows, dtype=F64),
        *_factors(group_index, lr_scales, wd_scales),
    )


def clone_args(args: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(
        [t.clone() for t in a] if isinstance(a, list) else a.clone() for a in args
    )


def new_grads_(args: tuple[Any, ...], seed: int) -> None:
    """Fill the grads (argument 1) with fresh values, in place, deterministically."""
    gen = torch.Generator().manual_seed(seed)
    for g in args[1]:
        g.copy_(torch.randn(g.shape, generator=gen, dtype=g.dtype))


def assert_args_close(actual: tuple[Any, ...], expected: tuple[Any, ...]) -> None:
    for k, (a, e) in enumerate(zip(actual, expected)):
        if isinstance(a, list):
            assert len(a) == len(e)
            for i, (x, y) in enumerate(zip(a, e)):
                torch.testing.assert_close(
                    x, y, **TOL, msg=lambda m, k=k, i=i: f"argument {k}[{i}]: {m}"
                )
        else:
            torch.testing.assert_close(a, e, **TOL)


def _tensors(args: tuple[Any, ...]) -> list[Tensor]:
    return [t for a in args for t in (a if isinstance(a, list) else [a])]


ADAM_CONFIGS = [
    AdamConfig(amsgrad=a, maximize=m, weight_decay=w)
    for a, m, w in itertools.product(
        (False, True), (False, True), ("none", "l2", "decoupled")
    )
]


def _adam_id(c: AdamConfig) -> str:
    flags = ["amsgrad"] * c.amsgrad + ["maximize"] * c.maximize
    return "-".join([f"wd_{c.weight_decay}", *flags])


SGD_CONFIGS = [
    SGDConfig(),
    SGDConfig(weight_decay=True),
    SGDConfig(maximize=True, weight_decay=True),
    SGDConfig(momentum=True),
    SGDConfig(momentum=True, weight_decay=True),
    SGDConfig(momentum=True, nesterov=True),
    SGDConfig(momentum=True, nesterov=True, maximize=True, weight_decay=True),
]


def _sgd_id(c: SGDConfig) -> str:
    names = ("momentum", "nesterov", "maximize", "weight_decay")
    return "-".join(n for n in names if getattr(c, n)) or "plain"


# -- numerics -------------------------------------------------------------------------


@pytest.mark.parametrize("config", ADAM_CONFIGS, ids=_adam_id)
def test_adam_step_matches_reference(config: AdamConfig):
    args = adam_args(amsgrad=config.amsgrad)
    expected = clone_args(args)
    for step in range(4):
        new_grads_(args, step)
        new_grads_(expected, step)
        if step == 2:  # a scheduler moves lr and beta1 of group 0 in place
            for a in (args, expected):
                a[6][0, 0] *= 0.5
                a[6][0, 1] = 0.7
        assert adam_step_(*args, config=config) is None
        reference_adam_(*expected, config=config)
        assert_args_close(args, expected)


def test_adam_step_ignores_weight_decay_value_without_weight_decay_mode():
    args = adam_args()
    expected = clone_args(args)
    expected[6][:, ADAM_HYPERS.index("weight_decay")] = 0.0
    adam_step_(*args, config=AdamConfig(weight_decay="none"))
    reference_adam_(*expected, config=AdamConfig(weight_decay="l2"))
    assert_args_close(args[:6], expected[:6])


@pytest.mark.parametrize("config", SGD_CONFIGS, ids=_sgd_id)
def test_sgd_step_matches_reference(config: SGDConfig):
    args = sgd_args(momentum=config.momentum)
    expected = clone_args(args)
    for step in range(4):
        new_grads_(args, step)
        new_grads_(expected, step)
        if step == 2:  # a scheduler moves lr and momentum of group 1 in place
            for a in (args, expected):
                a[3][1, 0] *= 0.5
                a[3][1, 1] = 0.8
        fresh = [step == 0] * len(SHAPES) if config.momentum else []
        assert sgd_step_(*args, config=config, fresh_buffers=fresh) is None
        reference_sgd_(*expected, config=config, fresh_buffers=fresh)
        assert_args_close(args, expected)


def test_sgd_step_fresh_buffers_take_the_gradient():
    config = SGDConfig(momentum=True, weight_decay=True)
    args = sgd_args()
    params0, grads0 = clone_args(args)[:2]
    for buf in args[2]:
        buf.fill_(7.0)  # a fresh buffer's old contents must not leak in
    sgd_step_(*args, config=config, fresh_buffers=[True, False, True])
    for i, buf in enumerate(args[2]):
        _, momentum, dampening, wd = SGD_ROWS[GROUP_INDEX[i]]
        grad = grads0[i] + wd * WD_SCALES[i] * params0[i]
        expected = grad if i != 1 else momentum * 7.0 + (1 - dampening) * grad
        torch.testing.assert_close(buf, expected, **TOL)


def test_sgd_step_without_fresh_buffers_dampens_the_first_gradient():
    config = SGDConfig(momentum=True)
    args = sgd_args()
    sgd_step_(*args, config=config)
    fresh_grads = sgd_args()[1]
    for i, buf in enumerate(args[2]):
        dampening = SGD_ROWS[GROUP_INDEX[i]][SGD_HYPERS.index("dampening")]
        torch.testing.assert_close(buf, (1 - dampening) * fresh_grads[i], **TOL)


# -- in place, no allocation of results, empty lists ----------------------------------

ADAM_MUTATED = (0, 2, 3, 4, 5)  # params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps
SGD_MUTATED = (0, 2)  # params, momentum_buffers


def assert_updated_in_place(
    args: tuple[Any, ...], before: tuple[Any, ...], ptrs: list[int], mutated
) -> None:
    """Same storage everywhere; exactly the ``mutated`` arguments changed values."""
    assert [t.data_ptr() for t in _tensors(args)] == ptrs
    for k, (a, b) in enumerate(zip(args, before)):
        xs, ys = (a, b) if isinstance(a, list) else ([a], [b])
        assert len(xs) == len(ys), f"argument {k} changed length"
        for i, (x, y) in enumerate(zip(xs, ys)):
            assert x.dtype == y.dtype and x.shape == y.shape
            assert torch.equal(x, y) != (k in mutated), f"argument {k}[{i}]"


@pytest.mark.parametrize("weight_decay", ["l2", "decoupled"])
def test_adam_step_updates_in_place(weight_decay):
    config = AdamConfig(amsgrad=True, maximize=True, weight_decay=weight_decay)
    args = adam_args(amsgrad=True)
    before = clone_args(args)
    ptrs = [t.data_ptr() for t in _tensors(args)]
    assert adam_step_(*args, config=config) is None
    assert_updated_in_place(args, before, ptrs, ADAM_MUTATED)


def test_sgd_step_updates_in_place():
    config = SGDConfig(momentum=True, nesterov=True, maximize=True, weight_decay=True)
    args = sgd_args()
    before = clone_args(args)
    ptrs = [t.data_ptr() for t in _tensors(args)]
    assert sgd_step_(*args, config=config, fresh_buffers=[True, False, True]) is None
    assert_updated_in_place(args, before, ptrs, SGD_MUTATED)


@pytest.mark.parametrize(
    ("fn", "make_args", "config"),
    [
        (adam_step_, adam_args, AdamConfig(amsgrad=True, weight_decay="decoupled")),
        (sgd_step_, sgd_args, SGDConfig(momentum=True, weight_decay=True)),
    ],
    ids=["adam", "sgd"],
)
def test_step_empty_lists_are_noop(fn, make_args, config):
    args = make_args([], group_index=[], lr_scales=[], wd_scales=[])
    before = clone_args(args)
    assert fn(*args, config=config) is None
    assert_args_close(args, before)


# -- property: random shapes, groups and hyper-parameters ------------------------------

_shapes = st.lists(
    st.lists(st.integers(1, 3), min_size=0, max_size=3).map(tuple),
    min_size=1,
    max_size=3,
)


@st.composite
def _layout(draw, row):
    """Shapes, one row per group (1 or 2 groups), group index and u-μP factors."""
    shapes = draw(_shapes)
    n_groups = draw(st.integers(1, 2))
    rows = [draw(row) for _ in range(n_groups)]
    n = len(shapes)
    group_index = draw(st.lists(st.integers(0, n_groups - 1), min_size=n, max_size=n))
    scale = st.floats(0.0625, 16.0)
    lr_scales = draw(st.lists(scale, min_size=n, max_size=n))
    wd_scales = draw(st.lists(scale, min_size=n, max_size=n))
    return shapes, rows, group_index, lr_scales, wd_scales


_adam_row = st.tuples(
    st.floats(0.0, 0.1),  # lr
    st.floats(0.0, 0.99),  # beta1
    st.floats(0.0, 0.999),  # beta2
    st.floats(1e-10, 1e-3),  # eps
    st.floats(0.0, 0.5),  # weight_decay
)
_sgd_row = st.tuples(
    st.floats(0.0, 0.1),  # lr
    st.floats(0.0, 0.99),  # momentum
    st.floats(0.0, 0.9),  # dampening
    st.floats(0.0, 0.5),  # weight_decay
)


@settings(max_examples=60, deadline=None)
@given(
    layout=_layout(_adam_row),
    config=st.sampled_from(ADAM_CONFIGS),
    seed=st.integers(0, 2**16),
)
def test_adam_step_matches_reference_property(layout, config, seed):
    shapes, rows, group_index, lr_scales, wd_scales = layout
    args = adam_args(
        shapes,
        rows,
        group_index,
        lr_scales,
        wd_scales,
        amsgrad=config.amsgrad,
        seed=seed,
    )
    expected = clone_args(args)
    for step in range(2):
        new_grads_(args, seed + step)
        new_grads_(expected, seed + step)
        adam_step_(*args, config=config)
        reference_adam_(*expected, config=config)
    assert_args_close(args, expected)


@settings(max_examples=60, deadline=None)
@given(
    layout=_layout(_sgd_row),
    config=st.builds(
        SGDConfig, st.booleans(), st.booleans(), st.booleans(), st.booleans()
    ),
    seed=st.integers(0, 2**16),
)
def test_sgd_step_matches_reference_property(layout, config, seed):
    shapes, rows, group_index, lr_scales, wd_scales = layout
    args = sgd_args(
        shapes,
        rows,
        group_index,
        lr_scales,
        wd_scales,
        momentum=config.momentum,
        seed=seed,
    )
    expected = clone_args(args)
    for step in range(2):
        new_grads_(args, seed + step)
        new_grads_(expected, seed + step)
        fresh = [step == 0] * len(shapes) if config.momentum else []
        sgd_step_(*args, config=config, fresh_buffers=fresh)
        reference_sgd_(*expected, config=config, fresh_buffers=fresh)
    assert_args_close(args, expected)


# -- compiled: hyper-parameters are data, the config is structure ---------------------


def test_compiled_adam_step_new_hypers_do_not_recompile():
    counter = CompileCounter()
    engine = CompiledEngine(strict=True, backend=counter)
    config = AdamConfig(amsgrad=True, weight_decay="decoupled")
    args = adam_args(amsgrad=True)
    expected = clone_args(args)
    ptrs = [t.data_ptr() for t in _tensors(args)]
    schedule = [
        (1e-2, 0.9, 0.999),
        (5e-3, 0.8, 0.99),
        (1e-3, 0.5, 0.9),
        (0.0, 0.0, 0.0),
    ]
    for step, (lr, beta1, beta2) in enumerate(schedule):
        for a in (args, expected):  # a scheduler writes the group rows in place
            a[6][:, :3] = torch.tensor([lr, beta1, beta2], dtype=F64)
        new_grads_(args, step)
        new_grads_(expected, step)
        engine(adam_step_, args, {"config": config})
        reference_adam_(*expected, config=config)
        assert_args_close(args, expected)
    assert counter.frame_count == 1
    assert [t.data_ptr() for t in _tensors(args)] == ptrs

    other = AdamConfig(amsgrad=True, weight_decay="l2")
    engine(adam_step_, args, {"config": other})
    reference_adam_(*expected, config=other)
    assert_args_close(args, expected)
    assert counter.frame_count == 2
    engine(adam_step_, args, {"config": config})  # back to a known config: cached
    assert counter.frame_count == 2


def test_compiled_sgd_step_new_hypers_do_not_recompile():
    counter = CompileCounter()
    engine = CompiledEngine(strict=True, backend=counter)
    config = SGDConfig(momentum=True, weight_decay=True)
    args = sgd_args()
    expected = clone_args(args)
    schedule = [(1e-2, 0.9, 0.0), (5e-2, 0.5, 0.5), (0.1, 0.0, 0.1)]
    for step, (lr, momentum, dampening) in enumerate(schedule):
        for a in (args, expected):
            a[3][:, :3] = torch.tensor([lr, momentum, dampening], dtype=F64)
        new_grads_(args, step)
        new_grads_(expected, step)
        engine(sgd_step_, args, {"config": config})
        reference_sgd_(*expected, config=config)
        assert_args_close(args, expected)
    assert counter.frame_count == 1

    other = SGDConfig(momentum=True, nesterov=True, weight_decay=True)
    engine(sgd_step_, args, {"config": other})
    reference_sgd_(*expected, config=other)
    assert_args_close(args, expected)
    assert counter.frame_count == 2
