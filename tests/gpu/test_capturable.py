"""CUDA: capturable steps under CUDA-graph capture and replay, no host syncs.

Skipped where no CUDA device exists (``gpu`` marker, see ``conftest.py``).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import umup_compile as uc
from umup_compile.optim import Adam, AdamW

pytestmark = pytest.mark.gpu

SHAPES = [(64, 32), (32, 32), (32,), (32,), (10, 32)]
TYPES = ["weight", "weight", "bias", "norm", "output"]
TOL = {"rtol": 1e-5, "atol": 1e-6}


def cuda_params() -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    return [
        uc.Parameter(torch.randn(s, generator=gen).cuda(), t)  # type: ignore[arg-type]
        for s, t in zip(SHAPES, TYPES)
    ]


def clones(params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    return [uc.Parameter(p.detach().clone(), p.mup_type) for p in params]  # type: ignore[attr-defined]


def grads_for(step: int, params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=gen).cuda() for p in params]


def capture(
    step: Callable[[], None], warmup: Callable[[], None]
) -> torch.cuda.CUDAGraph:
    """Warm up on a side stream (compile, state, layouts), then capture one step."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        warmup()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph


@pytest.mark.parametrize("compile_", [True, False], ids=["compiled", "eager"])
@pytest.mark.parametrize("cls", [Adam, AdamW])
def test_capture_replay_matches_eager(cls: type, compile_: bool) -> None:
    params = cuda_params()
    ref_params = clones(params)
    lr = torch.tensor(0.01, device="cuda")
    opt = cls(params, lr=lr, weight_decay=0.1, capturable=True, compile=compile_)
    ref = cls(ref_params, lr=0.01, weight_decay=0.1, compile=False)
    static = [torch.zeros_like(p) for p in params]
    for p, g in zip(params, static):
        p.grad = g
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (1 + 0.1 * s))
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref, lambda s: 1 / (1 + 0.1 * s))

    def warmup() -> None:
        for s in range(3):
            for g, new in zip(static, grads_for(s, params)):
                g.copy_(new)
            opt.step()

    graph = capture(opt.step, warmup)  # captured, not run: replays are the steps
    for s in range(3):
        for p, g in zip(ref_params, grads_for(s, params)):
            p.grad = g
        ref.step()
    for s in range(50):
        new = grads_for(100 + s, params)
        for g, n in zip(static, new):
            g.copy_(n)
        graph.replay()
        sched.step()  # fills the lr tensor in place: no re-capture
        for p, n in zip(ref_params, new):
            p.grad = n.clone()
        ref.step()
        ref_sched.step()
    torch.cuda.synchronize()
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p, q, **TOL)


def test_step_has_no_host_sync() -> None:
    params = cuda_params()
    opt = Adam(params, lr=torch.tensor(0.01, device="cuda"), capturable=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    float_opt = Adam(clones(params), lr=0.01)  # float lr: pinned, async refresh
    float_sched = torch.optim.lr_scheduler.StepLR(float_opt, step_size=1)
    all_params = params + [p for g in float_opt.param_groups for p in g["params"]]
    for s in range(3):  # warm-up: compile, state, layouts
        for p, g in zip(all_params, grads_for(s, all_params)):
            p.grad = g
        opt.step()
        float_opt.step()
    torch.cuda.synchronize()
    for _ in range(3):  # schedulers change the lrs between steps, outside the check
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
            float_opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        sched.step()
        float_sched.step()


@torch._dynamo.config.patch(trace_autograd_ops=True)
def test_reduce_overhead_train_step() -> None:
    params = cuda_params()
    ref_params = clones(params)
    opt = Adam(params, lr=torch.tensor(0.01, device="cuda"), capturable=True)
    ref = Adam(ref_params, lr=0.01, compile=False)
    x = torch.randn(16, 32, device="cuda")

    def loss_of(ps: list[torch.nn.Parameter]) -> torch.Tensor:
        w0, w1, b, n, out = ps
        h = torch.tanh(x @ w1 + b) * n
        return ((h @ out.T) ** 2).mean() + (w0**2).mean()

    @torch.compile(mode="reduce-overhead")
    def train_step() -> None:
        loss_of(params).backward()
        opt.step()
        opt.zero_grad(set_to_none=False)

    for _ in range(10):
        train_step()
        loss_of(ref_params).backward()
        ref.step()
        ref.zero_grad()
    torch.cuda.synchronize()
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p, q, **TOL)
