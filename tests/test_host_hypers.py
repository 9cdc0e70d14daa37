"""Hyper-parameters as 0-d host tensors (Note [host hypers]) give the table's numbers.

On CUDA an uncaptured step with few param groups passes its hyper-parameters as rows
of 0-d CPU tensors, views of the host mirror, instead of the ``(groups, hypers)``
device tensor. The functional updates take either form; here both run on the CPU,
eagerly and compiled by Inductor, and must agree bit for bit, also after the values
change in place (a scheduler), without a recompile. The CUDA side (which form a step
gets, nothing copied to the device) is ``test_cuda_host``; the generated kernels are
``test_gpu_codegen``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor
from torch._dynamo.testing import CompileCounter

from tests.test_functional import adam_args, clone_args, new_grads_, sgd_args
from umup_compile._engine import CompiledEngine
from umup_compile._functional import AdamConfig, SGDConfig, adam_step_, sgd_step_
from umup_compile._quant import num_blocks
from umup_compile._state8 import adam_update_


def host_rows(table: Tensor) -> list[list[Tensor]]:
    """The table's entries as 0-d views, by row (what ``HyperTable`` passes)."""
    return [list(row.unbind()) for row in table.unbind()]


def _adam8_args(seed: int) -> tuple[Any, ...]:
    """``adam_update_``'s arguments with 8-bit moments, float32 parameters of a few
    blocks (one partial)."""
    params, grads, *_, steps, table, index, lrs, wds = adam_args(
        shapes=[(4, 96), (200,), (130,)], seed=seed
    )
    params = [p.float() for p in params]
    return (
        params,
        [g.float() for g in grads],
        [torch.zeros_like(p, dtype=torch.int8) for p in params],
        [torch.zeros_like(p, dtype=torch.uint8) for p in params],
        [],
        [torch.zeros(num_blocks(p.numel()), 2) for p in params],
        steps,
        table,
        index,
        lrs,
        wds,
    )


# update -> (its arguments, the index of the hyper table in them, its kwargs)
UPDATES: dict[str, tuple[Callable[..., Any], Callable[[], tuple], int, dict]] = {
    "adam": (
        adam_step_,
        lambda: adam_args(amsgrad=True),
        6,
        {"config": AdamConfig(amsgrad=True, weight_decay="decoupled")},
    ),
    "sgd": (
        sgd_step_,
        sgd_args,
        3,
        {"config": SGDConfig(momentum=True, nesterov=True, weight_decay=True)},
    ),
    "adam-int8": (
        adam_update_,
        lambda: _adam8_args(0),
        7,
        {"config": AdamConfig(weight_decay="l2", int8_state=True)},
    ),
}


def _tensors(args: tuple[Any, ...], at: int) -> list[Tensor]:
    """Every tensor argument but the hyper-parameters (argument ``at``)."""
    out: list[Tensor] = []
    for a in args[:at] + args[at + 1 :]:
        out += a if isinstance(a, list) else [a]
    return out


@pytest.fixture(scope="module")
def inductor() -> CompiledEngine:
    return CompiledEngine(strict=True)


@pytest.mark.parametrize("engine", ["eager", "inductor"])
@pytest.mark.parametrize("name", list(UPDATES))
def test_host_rows_match_the_table_bitwise(
    name: str, engine: str, inductor: CompiledEngine
) -> None:
    update, make, at, kwargs = UPDATES[name]
    table_args = make()
    host_args = clone_args(table_args)
    table = host_args[at]  # edited in place below, as the host mirror is
    host_args = (*host_args[:at], host_rows(table), *host_args[at + 1 :])
    for step in range(3):
        for t in (table_args[at], table):  # a scheduler: new lr, betas
            t[:, :2] *= torch.tensor([0.5, 0.99], dtype=t.dtype)
        new_grads_(table_args, step)
        new_grads_(host_args, step)
        for args in (table_args, host_args):
            if engine == "eager":
                update(*args, **kwargs)
            else:
                inductor(update, args, kwargs)
        pairs = list(zip(_tensors(table_args, at), _tensors(host_args, at)))
        assert pairs and all(torch.equal(a, b) for a, b in pairs), (name, step)


def test_host_rows_take_new_values_without_recompiling() -> None:
    counter = CompileCounter()
    engine = CompiledEngine(strict=True, backend=counter)
    update, make, at, kwargs = UPDATES["adam"]
    args = make()
    table = args[at]
    host_args = (*args[:at], host_rows(table), *args[at + 1 :])
    before = [p.clone() for p in args[0]]
    for step in range(3):
        table[:, 0] *= 0.5
        new_grads_(host_args, step)
        engine(update, host_args, kwargs)
    assert counter.frame_count == 1
    assert not any(torch.equal(p, b) for p, b in zip(args[0], before))


def test_one_group_of_host_rows_matches_its_table() -> None:
    # one row: no per-group selection at all
    update, make, at, kwargs = UPDATES["adam"]
    one = make()
    one = (
        *one[:at],
        one[at][:1].clone(),
        torch.zeros_like(one[at + 1]),
        *one[at + 2 :],
    )
    host = clone_args(one)
    host = (*host[:at], host_rows(host[at]), *host[at + 1 :])
    update(*one, **kwargs)
    update(*host, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(_tensors(one, at), _tensors(host, at)))
