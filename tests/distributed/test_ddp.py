"""DDP: u-μP training in 2 processes matches one process on the same global batch."""

from __future__ import annotations

import pytest
from torch.nn.parallel import DistributedDataParallel

import umup_compile as uc
from tests.distributed._worker import (
    ENGINES,
    OPTIMIZERS,
    assert_snapshots_close,
    launch,
    make_model,
    make_optimizer,
    train,
    train_reference,
)

STEPS = 3
# (engine, optimizer cases): every case eagerly; compiled on fewer (one compile each).
RUNS = [("eager", [c[0] for c in OPTIMIZERS]), ("aot_eager", ["adam", "sgd_momentum"])]


def _ddp_matches_single_process(rank: int, engine: str, cases: list[str]) -> None:
    _, dtype = ENGINES[engine]
    for name, cls, kwargs in OPTIMIZERS:
        if name not in cases:
            continue
        model = make_model(dtype)
        ddp = DistributedDataParallel(model)
        # DDP keeps the model's Parameter objects, so the tags survive.
        assert all(uc.has_parameter_data(p) for p in ddp.module.parameters())
        opt = make_optimizer(model, engine, cls, **kwargs)
        got = train(ddp, model, opt, range(STEPS), rank)
        want = train_reference(dtype, cls, kwargs, STEPS)
        assert_snapshots_close(got, want, dtype, f"rank {rank}, {name}, {engine}")


@pytest.mark.parametrize("engine,cases", RUNS, ids=[engine for engine, _ in RUNS])
def test_ddp_matches_single_process(engine: str, cases: list[str]) -> None:
    launch(_ddp_matches_single_process, engine, cases)
