"""Tensor parallel, alone and under FSDP2 on a 2-D mesh: the numbers of one process.

``parallelize_module`` (``ColwiseParallel``/``RowwiseParallel``) replaces each sharded
module's parameters by new ``DTensor`` parameters, and the tags are lost;
``keep_tags`` re-applies them, and the u-μP factors come from the global shapes. Then
training on 2 ranks (tensor parallel) and on 4 (FSDP2 over 2 data-parallel groups of 2
tensor-parallel ranks) matches single-process training on the same global batch after
every step, with both engines, and so does global-norm clipping. The model, its plan
and its placements are in ``_tp``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import parallelize_module

import umup_compile as uc
from tests.distributed._tp import (
    HIDDEN,
    LAYOUTS,
    TP,
    make_parallel_model,
    make_tp_model,
    tp_plan,
)
from tests.distributed._worker import (
    ENGINES,
    OPTIMIZERS,
    WIDTH,
    assert_snapshots_close,
    launch,
    make_optimizer,
    needs_fsdp2_on_cpu,
    train,
    train_reference,
)
from umup_compile.distributed import capture_tags, restore_tags
from umup_compile.optim import SGD, Adam

STEPS = 3
ALL_CASES = [c[0] for c in OPTIMIZERS]
# The u-μP rules whose factors depend on shapes: Adam's weights (fan-in), SGD's
# biases and norms (width) and readout.
RULES: list[tuple[type[torch.optim.Optimizer], dict[str, Any]]] = [
    (Adam, {}),
    (SGD, {"readout_constraint": "to_output_scale"}),
]


def _scales(model: torch.nn.Module, cls: type[torch.optim.Optimizer], **kwargs: Any):
    group = cls(model.named_parameters(), lr=0.01, **kwargs).param_groups[0]
    return group["lr_scales"], group["wd_scales"]


def _tags_restored_and_scales_global(rank: int) -> None:
    model = make_tp_model(torch.float64)
    expected = [_scales(model, cls, **kwargs) for cls, kwargs in RULES]
    tags = capture_tags(model)
    parallelize_module(model, init_device_mesh("cpu", (TP,)), tp_plan())
    params = dict(model.named_parameters())
    sharded = sorted(n for n, p in params.items() if isinstance(p, DTensor))
    assert sharded == sorted(n for n in params if n != "norm")  # norm stays plain
    # parallelize_module builds new Parameter objects: their attributes are gone ...
    assert not any(uc.has_parameter_data(params[n]) for n in sharded)
    assert sorted(restore_tags(model, tags)) == sharded
    # ... and are back, on the DTensor parameters.
    assert {n: (p.mup_type, p.mup_scaling_depth) for n, p in params.items()} == tags
    # The local shards' shapes are not the global ones, uneven on dim 0 ...
    down, up_bias = params["blocks.0.down.weight"], params["blocks.0.up.bias"]
    assert down.to_local().shape == (WIDTH, HIDDEN // TP)  # Shard(1): the fan-in
    assert up_bias.to_local().shape == (HIDDEN // TP,)
    assert params["embed.weight"].to_local().shape[0] == (17 if rank == 0 else 16)
    local = torch.nn.Module()
    for i, p in enumerate(params.values()):
        shard = p.to_local() if isinstance(p, DTensor) else p
        tagged = uc.Parameter(shard.detach(), p.mup_type, p.mup_scaling_depth)
        local.register_parameter(f"p{i}", tagged)
    for (cls, kwargs), want in zip(RULES, expected):
        # ... so factors taken from the shards would differ; the optimizer's don't.
        assert _scales(local, cls, **kwargs) != want, cls
        assert _scales(model, cls, **kwargs) == want, cls


def test_tensor_parallel_tags_restored_and_scales_from_global_shape() -> None:
    launch(_tags_restored_and_scales_global, world_size=LAYOUTS["tp"])


def _matches_single_process(rank: int, layout: str, engine: str, cases: list[str]):
    _, dtype = ENGINES[engine]
    for name, cls, kwargs in OPTIMIZERS:
        if name not in cases:
            continue
        model, share, shares = make_parallel_model(layout, dtype)
        opt = make_optimizer(model, engine, cls, **kwargs)
        reference = make_optimizer(make_tp_model(dtype), "eager", cls, **kwargs)
        for group, want in zip(opt.param_groups, reference.param_groups):
            assert group["lr_scales"] == want["lr_scales"], (layout, name)
            assert group["wd_scales"] == want["wd_scales"], (layout, name)
        got = train(model, model, opt, range(STEPS), share, shares)
        want = train_reference(dtype, cls, kwargs, STEPS, make=make_tp_model)
        what = f"rank {rank}, {layout}, {name}, {engine}"
        assert_snapshots_close(got, want, dtype, what)


# (layout, engine, optimizer cases, slow): every case eagerly; compiled on one (each
# case compiles once per rank: 5-8 s a run on the shared 2-core machine at load 4,
# 40-50 s at load 10). Inductor is slower (17 s and 118 s): its engine sees the same
# plain local shards as under FSDP2, whose Inductor run is in test_fsdp2.py.
RUNS = [
    ("tp", "eager", ALL_CASES, False),
    ("tp", "aot_eager", ["adam"], False),
    ("tp", "aot_eager", ["sgd_momentum", "adamw_amsgrad"], True),
    ("tp", "inductor", ["adam"], True),
    ("fsdp2_tp", "eager", ALL_CASES, False),
    ("fsdp2_tp", "aot_eager", ["adam"], False),
]


@pytest.mark.parametrize(
    "layout,engine,cases",
    [
        pytest.param(
            layout,
            engine,
            cases,
            id=f"{layout}-{engine}-{'all' if cases == ALL_CASES else '-'.join(cases)}",
            marks=[
                *([needs_fsdp2_on_cpu] if layout == "fsdp2_tp" else []),
                *([pytest.mark.slow] if slow else []),
            ],
        )
        for layout, engine, cases, slow in RUNS
    ],
)
def test_tensor_parallel_matches_single_process(
    layout: str, engine: str, cases: list[str]
) -> None:
    launch(_matches_single_process, layout, engine, cases, world_size=LAYOUTS[layout])


# Small enough to clip at every step of the toy model.
CLIPPED = {"lr": 0.02, "weight_decay": 0.1, "max_grad_norm": 0.05}


def _norms(model: torch.nn.Module, opt: torch.optim.Optimizer, share, shares):
    snaps, norms = [], []
    for step in range(STEPS):
        snaps += train(model, model, opt, range(step, step + 1), share, shares)
        norms.append(float(opt.last_grad_norm))
    return snaps, norms


def _clipped_like_one_process(rank: int, layout: str, engine: str) -> None:
    _, dtype = ENGINES[engine]
    model, share, shares = make_parallel_model(layout, dtype)
    opt = make_optimizer(model, engine, Adam, **CLIPPED)
    got, norms = _norms(model, opt, share, shares)
    reference = make_tp_model(dtype)
    want, want_norms = _norms(
        reference, make_optimizer(reference, "eager", Adam, **CLIPPED), None, 1
    )
    assert min(want_norms) > CLIPPED["max_grad_norm"]  # the clip was active
    torch.testing.assert_close(torch.tensor(norms), torch.tensor(want_norms))
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, norms)
    assert all(n == norms for n in every), every
    # The norm is float32 (Note [fused clipping]), and tensor parallel sums its
    # squares in another order: the clip coefficient carries float32 rounding.
    assert_snapshots_close(got, want, torch.float32, f"rank {rank}, {layout}")


@pytest.mark.parametrize(
    "layout", ["tp", pytest.param("fsdp2_tp", marks=needs_fsdp2_on_cpu)]
)
def test_tensor_parallel_clipping_is_global(layout: str) -> None:
    launch(_clipped_like_one_process, layout, "eager", world_size=LAYOUTS[layout])
