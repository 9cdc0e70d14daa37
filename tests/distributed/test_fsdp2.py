"""FSDP2 with the compiled engine: local shards, one call per step, same numbers.

Note [sharded parameters] (umup_compile/_base.py): the update is elementwise, so with
FSDP2's DTensor parameters each rank hands the engine its plain local shards (params,
grads and state): no DTensor dispatch per op, one engine call per bucket. The eager
parity, tag and checkpoint tests are in ``test_fsdp2_parity.py``; these reuse them.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import pytest
from torch import Tensor
from torch.distributed.tensor import DTensor

from tests.distributed._worker import (
    ENGINES,
    launch,
    make_optimizer,
    make_sharded_model,
    needs_fsdp2_on_cpu,
    train,
)
from tests.distributed.test_fsdp2_parity import (
    _checkpoint_round_trips,
    _matches_single_process,
)
from umup_compile.optim import Adam

pytestmark = needs_fsdp2_on_cpu

STEPS = 3


class _EngineSpy:
    """Wraps an optimizer's engine; records the tensors of every call."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls: list[list[Tensor]] = []

    def __getattr__(self, name: str) -> Any:  # anything else the optimizer reads
        return getattr(self.inner, name)

    def __call__(self, fn: Any, args: tuple[Any, ...], *rest: Any) -> None:
        tensors = [a for a in args if isinstance(a, Tensor)]
        tensors += [t for a in args if isinstance(a, list) for t in a]
        self.calls.append(tensors)
        self.inner(fn, args, *rest)


def _engine_on_local_shards(rank: int, engine: str) -> None:
    _, dtype = ENGINES[engine]
    model = make_sharded_model(dtype)
    opt = make_optimizer(model, engine, Adam, lr=0.02)
    spy = opt._engine = _EngineSpy(opt._engine)  # type: ignore[attr-defined]
    train(model, model, opt, range(STEPS), rank)
    assert len(spy.calls) == STEPS  # one bucket: one engine call per step
    for tensors in spy.calls:
        dtensors = [tuple(t.shape) for t in tensors if isinstance(t, DTensor)]
        assert dtensors == [], f"rank {rank}: the engine got DTensors {dtensors}"


@pytest.mark.parametrize("engine", ["eager", "aot_eager"])
def test_fsdp2_engine_runs_on_local_shards_once_per_step(engine: str) -> None:
    launch(_engine_on_local_shards, engine)


# (engine, optimizer cases): each case compiles once per rank, so fewer of them.
COMPILED_RUNS = [("aot_eager", ["adam", "sgd_momentum"]), ("inductor", ["adam"])]


@pytest.mark.parametrize(
    "engine,cases", COMPILED_RUNS, ids=[engine for engine, _ in COMPILED_RUNS]
)
def test_fsdp2_matches_single_process_compiled(engine: str, cases: list[str]) -> None:
    launch(_matches_single_process, engine, cases)


def test_fsdp2_checkpoint_round_trips_compiled() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        launch(_checkpoint_round_trips, "aot_eager", os.path.join(tmp, "ckpt"))


def _sr_shards_draw_the_full_parameters_bits(rank: int, engine: str) -> None:
    """Note [shard streams]: bf16 parameters with stochastic rounding, gradients set
    by hand (no reduce-scatter rounding): each rank's shard rounds as the same rows
    of the whole parameter do in one process, bitwise."""
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from umup_compile.optim import AdamW

    def params() -> torch.nn.Module:
        gen = torch.Generator().manual_seed(0)
        module = torch.nn.Module()
        row = torch.randn(1, 512, generator=gen)  # equal rows: equal updates but for SR
        module.w = torch.nn.Parameter(row.repeat(6, 1).to(torch.bfloat16))
        return module

    def grads(step: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(10 + step)
        return torch.randn(1, 512, generator=gen).repeat(6, 1).to(torch.bfloat16)

    options = {"lr": 0.01, "stochastic_rounding": True,
               "state_dtype": torch.float32, "allow_non_unit_scaling_params": True}  # fmt: skip
    sharded, whole = params(), params()
    fully_shard(sharded)
    opts = [make_optimizer(m, engine, AdamW, **options) for m in (sharded, whole)]
    for step in range(3):
        full_grad = grads(step)
        w = sharded.w
        local = full_grad[w.to_local().shape[0] * rank :][: w.to_local().shape[0]]
        w.grad = DTensor.from_local(local, w.device_mesh, w.placements)
        whole.w.grad = full_grad
        for opt in opts:
            opt.step()
    gathered = sharded.w.full_tensor()
    assert torch.equal(gathered, whole.w.detach()), rank
    assert not torch.equal(gathered[0], gathered[-1])  # rows drew their own bits
    dist.barrier()


@pytest.mark.parametrize("engine", ["eager", "aot_eager"])
def test_fsdp2_stochastic_rounding_draws_the_full_parameters_bits(engine: str) -> None:
    launch(_sr_shards_draw_the_full_parameters_bits, engine)
