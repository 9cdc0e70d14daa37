"""Test helpers: tagged toy parameter sets, step drivers, state comparison, tolerances."""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.torch_version import TorchVersion

import umup_compile as uc
from umup_compile._engine import CompiledEngine
from umup_compile._runner import TRACED_STEP_SUPPORTED

TORCH = TorchVersion(torch.__version__)
# What older torch releases lack; tests of them skip there, with the reason.
TORCH_ADAM_DECOUPLED = (
    "decoupled_weight_decay" in inspect.signature(torch.optim.Adam).parameters
)
needs_torch_adam_decoupled = pytest.mark.skipif(
    not TORCH_ADAM_DECOUPLED,
    reason=f"torch {torch.__version__}'s Adam has no decoupled_weight_decay (the oracle)",
)
# The optimizer traced inside the user's torch.compile (Note [traced hypers]).
needs_traced_step = pytest.mark.skipif(
    not TRACED_STEP_SUPPORTED,
    reason=f"opt.step() inside torch.compile needs torch >= 2.11 (this is {TORCH})",
)


def _grad_dtype_may_differ() -> bool:
    p = torch.zeros(1)
    p.grad_dtype = None  # type: ignore[attr-defined]  # torch 2.13: allow any dtype
    try:
        p.grad = torch.zeros(1, dtype=torch.float64)
    except RuntimeError:  # older torch (2.6) refuses the assignment itself
        return False
    return True


needs_mixed_grad_dtype = pytest.mark.skipif(
    not _grad_dtype_may_differ(),
    reason=f"torch {torch.__version__} refuses a .grad of another dtype",
)

TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float64: {"rtol": 1e-10, "atol": 1e-12},
    torch.float32: {"rtol": 2e-5, "atol": 2e-6},
}

# (name, shape, mup_type, depth): embedding, depth-scaled 2-D and 3-D weights, bias,
# norm, output.
TOY_SPECS: list[tuple[str, tuple[int, ...], str, int | None]] = [
    ("embed", (32, 16), "weight", None),
    ("block.w", (16, 16), "weight", 4),
    ("block.w3", (2, 16, 8), "weight", 4),
    ("block.b", (16,), "bias", 4),
    ("norm", (16,), "norm", None),
    ("head", (10, 16), "output", None),
]


def toy_params(
    dtype: torch.dtype = torch.float32,
    specs: Sequence[tuple[str, tuple[int, ...], str, int | None]] = TOY_SPECS,
    tagged: bool = True,
) -> list[nn.Parameter]:
    """Fresh tagged (or plain) parameters of the given specs."""
    out = []
    for _, shape, mup_type, depth in specs:
        data = torch.randn(shape, dtype=dtype)
        out.append(
            uc.Parameter(data, mup_type, depth)  # type: ignore[arg-type]
            if tagged
            else nn.Parameter(data)
        )
    return out


def named_toy_params(
    dtype: torch.dtype = torch.float32,
) -> list[tuple[str, nn.Parameter]]:
    return [(spec[0], p) for spec, p in zip(TOY_SPECS, toy_params(dtype))]


def clone_params(params: Sequence[Tensor]) -> list[nn.Parameter]:
    """Deep copies that keep the u-μP tags."""
    return [copy.deepcopy(p) for p in params]


def set_grads(param_sets: Sequence[Sequence[Tensor]], seed: int) -> None:
    """Give every parameter list the same random gradients (deterministic by seed)."""
    gen = torch.Generator().manual_seed(seed)
    for params in zip(*param_sets):
        g = torch.randn(params[0].shape, generator=gen, dtype=torch.float64)
        for p in params:
            p.grad = g.to(p.dtype).clone()


def assert_states_close(
    a: torch.optim.Optimizer, b: torch.optim.Optimizer, **tol: Any
) -> None:
    """Parameters and every state tensor of two optimizers over aligned params agree."""
    pa = [p for g in a.param_groups for p in g["params"]]
    pb = [p for g in b.param_groups for p in g["params"]]
    # Reference optimizers may order params by group; compare by the caller's order.
    assert len(pa) == len(pb)
    for i, (x, y) in enumerate(zip(pa, pb)):
        torch.testing.assert_close(x, y, **tol, msg=lambda m, i=i: f"param {i}: {m}")
        sx, sy = a.state.get(x, {}), b.state.get(y, {})
        assert set(sx) == set(sy), (i, set(sx), set(sy))
        for key in sx:
            torch.testing.assert_close(
                torch.as_tensor(sx[key]).to(y.device).double(),
                torch.as_tensor(sy[key]).to(y.device).double(),
                **tol,
                msg=lambda m, key=key, i=i: f"param {i} state {key}: {m}",
            )


def use_backend(opt: torch.optim.Optimizer, backend: Any) -> None:
    """Route an optimizer's compiled engine through another torch.compile backend."""
    opt._engine = CompiledEngine(strict=True, backend=backend)  # type: ignore[attr-defined]


def run_steps(
    opts: Sequence[torch.optim.Optimizer],
    param_sets: Sequence[Sequence[Tensor]],
    n: int,
    after_each: Callable[[int], None] | None = None,
) -> None:
    """Step every optimizer ``n`` times on identical gradients."""
    for s in range(n):
        set_grads(param_sets, seed=s)
        for opt in opts:
            opt.step()
        if after_each is not None:
            after_each(s)


def step_scheduled_against(
    opt: torch.optim.Optimizer,
    ref: torch.optim.Optimizer,
    param_sets: Sequence[Sequence[Tensor]],
    n: int,
) -> None:
    """Step ``opt`` and ``ref`` ``n`` times on identical gradients, each with a
    ``LambdaLR`` that changes lr at every step, comparing their states after each
    step (float32 tolerances)."""
    scheds = [
        torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1 / (1 + s)) for o in (opt, ref)
    ]
    for _ in range(n):
        run_steps([opt, ref], param_sets, 1)
        for sched in scheds:
            sched.step()
        assert_states_close(opt, ref, **TOLERANCES[torch.float32])


class ToyUmupNet(nn.Module):
    """A tiny u-μP-tagged network (embedding, residual block, norm, readout)."""

    def __init__(self, vocab: int = 32, width: int = 16, depth: int = 2) -> None:
        super().__init__()
        self.embed = uc.Parameter(torch.randn(vocab, width), "weight")
        self.blocks = nn.ParameterList(
            uc.Parameter(torch.randn(width, width), "weight", depth)
            for _ in range(depth)
        )
        self.bias = uc.Parameter(torch.zeros(width), "bias", depth)
        self.norm = uc.Parameter(torch.ones(width), "norm")
        self.head = uc.Parameter(torch.randn(vocab, width), "output")
        self.width = width

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed[tokens]
        for w in self.blocks:
            x = (
                x
                + torch.tanh(x @ w.T / self.width**0.5 + self.bias)
                / len(self.blocks) ** 0.5
            )
        x = nn.functional.rms_norm(x, (self.width,)) * self.norm
        return x @ self.head.T / self.width

    def loss(self, tokens: Tensor, targets: Tensor) -> Tensor:
        logits = self(tokens)
        return nn.functional.cross_entropy(logits.flatten(0, -2), targets.flatten())


def fullgraph_train_step(
    loss_fn: Callable[..., Tensor],
    opt: torch.optim.Optimizer,
    backend: Any = "inductor",
) -> Callable[..., Tensor]:
    """``torch.compile(fullgraph=True)`` of a whole train step: ``loss_fn(*inputs)``,
    backward, ``opt.step()``, ``opt.zero_grad()``; returns the detached loss. With
    fullgraph, any graph break raises."""

    @torch.compile(fullgraph=True, backend=backend)
    def train_step(*inputs: Any) -> Tensor:
        loss = loss_fn(*inputs)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.detach()

    return train_step
