"""``torch.distributed.checkpoint`` reshards u-μP training: save on 2 ranks, load on 4
or in one process.

Tensor parallel on 2 ranks trains, then saves the model and optimizer state
(``get_state_dict``, ``dcp.save``). FSDP2 × tensor parallel on 4 ranks (other
placements, other shards) and one process without a process group
(``dcp.load(..., no_dist=True)``, plain tensors) each load it into a model initialised
from another seed and a fresh optimizer, and train on: after every step both match the
single-process run that never stopped, with both engines; the groups' u-μP factors
come back as the global shapes give them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from tests.distributed._tp import LAYOUTS, make_parallel_model, make_tp_model
from tests.distributed._worker import (
    ENGINES,
    OPTIMIZERS,
    Snapshot,
    assert_snapshots_close,
    launch,
    make_optimizer,
    needs_fsdp2_on_cpu,
    train,
    train_reference,
)

pytestmark = needs_fsdp2_on_cpu

SAVED_AT = 2  # steps before the checkpoint
STEPS = 3  # steps after it
_, CLS, KWARGS = OPTIMIZERS[1]  # AdamW + amsgrad: every Adam state key


def _reference(dtype: torch.dtype) -> list[Snapshot]:
    """The single-process run that never stopped, after each step past the save."""
    return train_reference(dtype, CLS, KWARGS, SAVED_AT + STEPS, make=make_tp_model)[
        SAVED_AT:
    ]


def _resume(
    model: nn.Module, opt: torch.optim.Optimizer, folder: str, no_dist: bool = False
) -> None:
    """Load the checkpoint into ``model`` and ``opt`` (FQN-keyed state dicts)."""
    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=folder, no_dist=no_dist)
    set_state_dict(
        model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"]
    )
    fresh = make_optimizer(make_tp_model(torch.float64), "eager", CLS, **KWARGS)
    for group, want in zip(opt.param_groups, fresh.param_groups):
        assert group["lr_scales"] == want["lr_scales"]
        assert group["wd_scales"] == want["wd_scales"]


def _save_on_tensor_parallel(rank: int, engine: str, folder: str) -> None:
    _, dtype = ENGINES[engine]
    model, share, shares = make_parallel_model("tp", dtype)
    opt = make_optimizer(model, engine, CLS, **KWARGS)
    train(model, model, opt, range(SAVED_AT), share, shares)
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=folder)


def _resume_on_fsdp2_tp(rank: int, engine: str, folder: str) -> None:
    _, dtype = ENGINES[engine]
    model, share, shares = make_parallel_model("fsdp2_tp", dtype, seed=1)
    opt = make_optimizer(model, engine, CLS, **KWARGS)
    _resume(model, opt, folder)
    got = train(model, model, opt, range(SAVED_AT, SAVED_AT + STEPS), share, shares)
    assert_snapshots_close(got, _reference(dtype), dtype, f"rank {rank}, {engine}")


# The compiled engine compiles 7 times (2 + 4 ranks and the single process): 15 s on
# the shared 2-core machine at load 4, ~60 s at load 10.
@pytest.mark.parametrize("engine", ["eager", "aot_eager"])
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def test_checkpoint_saved_on_2_ranks_resumes_on_4_and_on_1(
    engine: str, tmp_path: Path
) -> None:
    folder = str(tmp_path / "checkpoint")
    launch(_save_on_tensor_parallel, engine, folder, world_size=LAYOUTS["tp"])
    launch(_resume_on_fsdp2_tp, engine, folder, world_size=LAYOUTS["fsdp2_tp"])
    # One process, no process group: plain tensors take the sharded checkpoint.
    _, dtype = ENGINES[engine]
    model = make_tp_model(dtype, seed=1)
    opt = make_optimizer(model, engine, CLS, **KWARGS)
    _resume(model, opt, folder, no_dist=True)
    got = train(model, model, opt, range(SAVED_AT, SAVED_AT + STEPS))
    assert_snapshots_close(got, _reference(dtype), dtype, f"one process, {engine}")
