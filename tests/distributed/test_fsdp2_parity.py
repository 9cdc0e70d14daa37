"""FSDP2 (``fully_shard``, DTensor parameters): same u-μP numbers as one process.

The parameters become ``DTensor``s sharded on dim 0 (unevenly here, see ``_worker``);
the tags are restored by name (``umup_compile.distributed``), the factors come from the
global shape, and training, including a ``torch.distributed.checkpoint`` round trip,
matches single-process training on the same global batch.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import umup_compile as uc
from tests.distributed._worker import (
    ENGINES,
    OPTIMIZERS,
    assert_snapshots_close,
    launch,
    make_model,
    make_optimizer,
    make_sharded_model,
    needs_fsdp2_on_cpu,
    train,
    train_reference,
)
from umup_compile.distributed import capture_tags, restore_tags
from umup_compile.optim import SGD, Adam

STEPS = 3
ALL_CASES = [c[0] for c in OPTIMIZERS]
# (engine, optimizer cases). The compiled engine's runs are in test_fsdp2.py: they
# need the core to hand the engine local shards (Note [sharded parameters]).
PARITY_RUNS = [("eager", ALL_CASES)]


def _tags_restored_and_scales_global(rank: int) -> None:
    model = make_model(torch.float64)
    names = [n for n, _ in model.named_parameters()]
    rules = ((Adam, {}), (SGD, {"readout_constraint": "to_output_scale"}))
    expected = [
        cls(model.named_parameters(), lr=0.01, **kwargs).param_groups[0]
        for cls, kwargs in rules
    ]
    tags = capture_tags(model)
    assert sorted(tags) == sorted(names)
    fully_shard(model)
    params = dict(model.named_parameters())
    assert all(isinstance(p, DTensor) for p in params.values())
    # fully_shard builds new Parameter objects: the attributes are gone ...
    assert not any(uc.has_parameter_data(p) for p in params.values())
    assert sorted(restore_tags(model, tags)) == sorted(names)
    # ... and are back, on the sharded parameters; a second restore has nothing to do.
    assert {n: (p.mup_type, p.mup_scaling_depth) for n, p in params.items()} == tags
    assert restore_tags(model, tags) == []
    assert params["embed"].to_local().shape[0] == (17 if rank == 0 else 16)
    for (cls, kwargs), want in zip(rules, expected):
        group = cls(model.named_parameters(), lr=0.01, **kwargs).param_groups[0]
        # Global shapes: SGD's bias/norm scale is the full width, not the shard's.
        assert group["lr_scales"] == want["lr_scales"], cls
        assert group["wd_scales"] == want["wd_scales"], cls


def test_fsdp2_tags_restored_and_scales_from_global_shape() -> None:
    launch(_tags_restored_and_scales_global)


def _matches_single_process(rank: int, engine: str, cases: list[str]) -> None:
    _, dtype = ENGINES[engine]
    for name, cls, kwargs in OPTIMIZERS:
        if name not in cases:
            continue
        model = make_sharded_model(dtype)
        opt = make_optimizer(model, engine, cls, **kwargs)
        got = train(model, model, opt, range(STEPS), rank)
        want = train_reference(dtype, cls, kwargs, STEPS)
        assert_snapshots_close(got, want, dtype, f"rank {rank}, {name}, {engine}")


@needs_fsdp2_on_cpu
@pytest.mark.parametrize(
    "engine,cases", PARITY_RUNS, ids=[engine for engine, _ in PARITY_RUNS]
)
def test_fsdp2_matches_single_process(engine: str, cases: list[str]) -> None:
    launch(_matches_single_process, engine, cases)


def _checkpoint_round_trips(rank: int, engine: str, folder: str) -> None:
    _, dtype = ENGINES[engine]
    _, cls, kwargs = OPTIMIZERS[1]  # AdamW + amsgrad: every Adam state key
    model = make_sharded_model(dtype)
    opt = make_optimizer(model, engine, cls, **kwargs)
    train(model, model, opt, range(2), rank)
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=folder)
    want = train(model, model, opt, range(2, 2 + STEPS), rank)

    # A differently initialised model and a fresh optimizer take the checkpoint.
    model2 = make_sharded_model(dtype, seed=1)
    opt2 = make_optimizer(model2, engine, cls, **kwargs)
    model_sd2, optim_sd2 = get_state_dict(model2, opt2)
    state = {"model": model_sd2, "optim": optim_sd2}
    dcp.load(state, checkpoint_id=folder)
    set_state_dict(
        model2, opt2, model_state_dict=state["model"], optim_state_dict=state["optim"]
    )
    for g1, g2 in zip(opt.param_groups, opt2.param_groups):
        assert g1["lr_scales"] == g2["lr_scales"]
        assert g1["wd_scales"] == g2["wd_scales"]
    got = train(model2, model2, opt2, range(2, 2 + STEPS), rank)
    assert_snapshots_close(got, want, dtype, f"rank {rank}, resumed, {engine}")


@needs_fsdp2_on_cpu
@pytest.mark.parametrize("engine", ["eager"])
def test_fsdp2_checkpoint_round_trips(engine: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        launch(_checkpoint_round_trips, engine, os.path.join(tmp, "ckpt"))
