"""``max_grad_norm`` across ranks: the norm is global, as in one process.

Under FSDP2 each rank holds shards of the gradients, so its squares are summed over
the mesh (Note [fused clipping]); under DDP the gradients are already all-reduced.
Either way training matches single-process training on the global batch with the
same clipping, and every rank reports the same norm.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from tests.distributed._worker import (
    ENGINES,
    assert_snapshots_close,
    launch,
    make_model,
    make_optimizer,
    make_sharded_model,
    needs_fsdp2_on_cpu,
    train,
)
from umup_compile.optim import Adam

STEPS = 3
# Small enough to clip at every step of the toy model.
KWARGS = {"lr": 0.02, "weight_decay": 0.1, "max_grad_norm": 0.05}


def _reference_norms(dtype: torch.dtype) -> tuple[list, list[float]]:
    model = make_model(dtype)
    opt = make_optimizer(model, "eager", Adam, **KWARGS)
    snaps, norms = [], []
    for step in range(STEPS):
        snaps += train(model, model, opt, range(step, step + 1))
        norms.append(float(opt.last_grad_norm))
    return snaps, norms


def _clipped_like_one_process(rank: int, engine: str, wrap: str) -> None:
    _, dtype = ENGINES[engine]
    if wrap == "fsdp2":
        model = make_sharded_model(dtype)
        forward = model
    else:
        model = make_model(dtype)
        forward = DistributedDataParallel(model)
    opt = make_optimizer(model, engine, Adam, **KWARGS)
    got, norms = [], []
    for step in range(STEPS):
        got += train(forward, model, opt, range(step, step + 1), rank)
        norms.append(float(opt.last_grad_norm))
    want, want_norms = _reference_norms(dtype)
    assert min(want_norms) > KWARGS["max_grad_norm"]  # the clip was active
    torch.testing.assert_close(torch.tensor(norms), torch.tensor(want_norms))
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, norms)
    assert every[0] == every[1]
    assert_snapshots_close(got, want, dtype, f"rank {rank}, {wrap}, {engine}")


@pytest.mark.parametrize(
    "wrap", [pytest.param("fsdp2", marks=needs_fsdp2_on_cpu), "ddp"]
)
def test_clipping_is_global_across_ranks(wrap: str) -> None:
    launch(_clipped_like_one_process, "eager", wrap)


@needs_fsdp2_on_cpu
def test_clipping_fsdp2_compiled_engine() -> None:
    launch(_clipped_like_one_process, "aot_eager", "fsdp2")
