"""No host synchronisation in a steady step, checked on CPU with the profiler.

A capturable CUDA step must not read device values on the host (``.item()``,
``bool(tensor)``, ``torch.equal``...); each of those runs ``aten::_local_scalar_dense``
(or ``aten::is_nonzero``/``aten::equal``), which the profiler records on any device,
also around compiled calls. This checks our Python around the kernels on every CI run;
``tests/gpu`` checks the same under ``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from tests.helpers import set_grads, toy_params, use_backend
from umup_compile.optim import SGD, Adam, AdamW

HOST_READS = (
    "aten::_local_scalar_dense",
    "aten::item",
    "aten::is_nonzero",
    "aten::equal",
)

CASES: list[tuple[str, type, dict[str, Any]]] = [
    ("adam_tensor_lr", Adam, {"lr": torch.tensor(0.01), "weight_decay": 0.1}),
    ("adamw_amsgrad", AdamW, {"lr": 0.01, "amsgrad": True, "weight_decay": 0.1}),
    ("adam_bf16_sr", Adam, {"lr": 0.01, "stochastic_rounding": True}),
    ("sgd_nesterov", SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
]


def host_reads(fn: Any) -> list[str]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return [e.name for e in prof.events() if e.name in HOST_READS]


@pytest.mark.parametrize("engine", ["eager", "compiled"])
@pytest.mark.parametrize(
    "cls,kwargs", [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_steady_step_reads_nothing_on_the_host(
    cls: type, kwargs: dict[str, Any], engine: str
) -> None:
    dtype = torch.bfloat16 if kwargs.get("stochastic_rounding") else torch.float32
    params = toy_params(dtype)
    opt = cls(params, compile=engine == "compiled", **kwargs)
    if engine == "compiled":
        use_backend(opt, "aot_eager")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (1 + s))
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    scaler.scale(torch.ones(()))  # what a training loop's scaler.scale(loss) sets up
    for s in range(3):  # state, layouts and graphs are built here
        set_grads([params], seed=s)
        scaler.step(opt)
        scaler.update()
        sched.step()
    set_grads([params], seed=9)
    params[0].grad[0].view(-1)[0] = float("inf")  # this step is skipped, without a sync

    def steps() -> None:
        opt.step()  # plain
        scaler.step(opt)  # with grad_scale / found_inf
        sched.step()  # a new lr: float lrs are refreshed on the device

    assert host_reads(steps) == []
