"""FSDP2 with 8-bit Adam state (Note [8-bit state]): each shard holds whole blocks.

Width 128: every row of the weights is one block, so FSDP2's dim-0 shards (33 rows:
17 + 16) cut between blocks, never through one, and the sharded run's blocks are the
single process's. The codes are ``DTensor``s like their parameters, the scales
``(rows, blocks per row, 2)`` sharded the same way; training matches one process,
the compiled engine matches the eager one, and a ``torch.distributed.checkpoint``
round trip resumes bitwise.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard

from tests.distributed._worker import launch, needs_fsdp2_on_cpu, snapshot
from tests.helpers import ToyUmupNet, use_backend
from umup_compile.distributed import keep_tags
from umup_compile.optim import AdamW

pytestmark = needs_fsdp2_on_cpu

VOCAB, WIDTH, DEPTH, BATCH, SEQ = 33, 128, 1, 8, 4
KW: dict[str, Any] = {"lr": 0.02, "weight_decay": 1e-3, "state_dtype": torch.int8}


def _model(sharded: bool, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = ToyUmupNet(VOCAB, WIDTH, DEPTH)
    if sharded:
        with keep_tags(model):
            fully_shard(model)
    return model


def _optimizer(model: nn.Module, backend: str | None = None) -> Any:
    opt = AdamW(model.named_parameters(), compile=backend is not None, **KW)
    if backend is not None:
        use_backend(opt, backend)
    return opt


def _train(model: nn.Module, opt: Any, steps: range, rank: int | None) -> list[Any]:
    out = []
    for step in steps:
        gen = torch.Generator().manual_seed(1000 + step)
        tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=gen)
        if rank is not None:  # each rank its half of the global batch
            tokens = tokens[rank * BATCH // 2 : (rank + 1) * BATCH // 2]
        model.loss(tokens[:, :-1], tokens[:, 1:]).backward()  # type: ignore[operator]
        opt.step()
        opt.zero_grad()
        out.append(snapshot(model, opt))
    return out


def _assert_close(got: list[Any], want: list[Any], exact: bool, what: str) -> None:
    for step, (g, w) in enumerate(zip(got, want)):
        assert list(g) == list(w), (what, step)
        for key, value in w.items():
            a = g[key].reshape(value.shape)  # scales: FSDP2's (rows, 1, 2)
            if value.dtype in (torch.int8, torch.uint8):  # a code may move by one
                diff = (a.to(torch.int16) - value.to(torch.int16)).abs()
                assert exact and torch.equal(a, value) or int(diff.max()) <= 1, key
                assert float((diff > 0).float().mean()) <= 0.01, (what, step, key)
            elif exact:
                assert torch.equal(a, value), (what, step, key)
            else:
                torch.testing.assert_close(a, value, rtol=1e-3, atol=1e-4)


def _int8_under_fsdp2(rank: int, folder: str) -> None:
    model = _model(sharded=True)
    opt = _optimizer(model)
    got = _train(model, opt, range(3), rank)
    # The state's layout: codes like the parameter, scales of whole blocks per row.
    embed = model.embed  # type: ignore[attr-defined]
    state = opt.state[embed]
    assert (
        isinstance(state["exp_avg"], DTensor) and state["exp_avg"].dtype == torch.int8
    )
    assert state["exp_avg"].placements == (Shard(0),)
    scales = state["exp_avg_scales"]
    assert isinstance(scales, DTensor) and tuple(scales.shape) == (VOCAB, 1, 2)
    assert scales.to_local().shape[0] == embed.to_local().shape[0] == 17 - rank
    assert "exp_avg_scales" not in opt.state[model.bias]  # type: ignore[attr-defined]

    # One process on the whole batch: the same blocks, so the same numbers (to the
    # rounding of gradients averaged over ranks).
    ref_model = _model(sharded=False)
    want = _train(ref_model, _optimizer(ref_model), range(3), None)
    _assert_close(got, want, exact=False, what=f"rank {rank}, vs one process")

    # The compiled engine on the local shards: the eager engine's bits.
    compiled_model = _model(sharded=True)
    compiled = _optimizer(compiled_model, "aot_eager")
    _assert_close(
        _train(compiled_model, compiled, range(3), rank), got, True, "compiled"
    )

    # A DCP round trip resumes bitwise.
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=folder)
    after = _train(model, opt, range(3, 5), rank)
    model2 = _model(sharded=True, seed=1)
    opt2 = _optimizer(model2)
    model_sd2, optim_sd2 = get_state_dict(model2, opt2)
    loaded = {"model": model_sd2, "optim": optim_sd2}
    dcp.load(loaded, checkpoint_id=folder)
    set_state_dict(
        model2, opt2, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"]
    )
    assert isinstance(opt2.state[model2.embed]["exp_avg_scales"], DTensor)  # type: ignore[attr-defined]
    _assert_close(_train(model2, opt2, range(3, 5), rank), after, True, "resumed")


def test_fsdp2_int8_state_shards_blocks_matches_and_checkpoints() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        launch(_int8_under_fsdp2, os.path.join(tmp, "ckpt"))
