"""Helpers for the edge-case and property tests: building, comparing, snapshots.

Comparisons here work pair by pair (our parameter, the reference's), so that the
reference may hold its parameters in another dtype (float64 for bf16/float32 ones) or
another group structure (unit_scaling's one group per parameter), and they compare
complex tensors through ``torch.view_as_real``.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from tests.helpers import TOLERANCES, use_backend

ENGINES = ["eager", "aot_eager"]
# torch's numbers on untagged parameters (see tests/parity/test_vs_torch.py).
UMUP = {"allow_non_unit_scaling_params": True, "independent_weight_decay": False}

# One bf16 step rounds once: within one bf16 ulp (2**-7 relative at worst) of the
# float64 result computed from the same inputs, for round-to-nearest and stochastic
# rounding alike; the float32 arithmetic before that rounding adds float32's absolute
# error on unit-scale operands (a result that cancels to ~0 keeps it). TOLERANCES has
# no bf16 entry (tests/helpers.py is not ours to edit); it belongs there.
BF16_ONE_STEP: dict[str, float] = {
    "rtol": 2.0**-7,
    "atol": TOLERANCES[torch.float32]["atol"],
}


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    """The comparison tolerance for a tensor stored in ``dtype``."""
    real = torch.empty((), dtype=dtype).real.dtype if dtype.is_complex else dtype
    if real in (torch.bfloat16, torch.float16):
        return BF16_ONE_STEP
    return TOLERANCES[real]


def build(
    cls: type[torch.optim.Optimizer], params: Any, engine: str, **kwargs: Any
) -> torch.optim.Optimizer:
    """Our optimizer on ``engine``: "eager", a cheap torch.compile backend, or
    "inductor" (the default compiled engine)."""
    opt = cls(params, compile=engine != "eager", **kwargs)
    if engine not in ("eager", "inductor"):
        use_backend(opt, engine)
    return opt


def as_real(t: Tensor) -> Tensor:
    """A real float64 view of ``t`` for comparisons (complex: ``view_as_real``)."""
    t = torch.as_tensor(t)
    if t.is_complex():
        t = torch.view_as_real(t)
    return t.detach().double()


def assert_pair_close(
    ours: torch.optim.Optimizer,
    ref: torch.optim.Optimizer,
    pairs: Sequence[tuple[Tensor, Tensor]],
    where: str = "",
) -> None:
    """Each (our param, reference param) pair and its state agree.

    The tolerance is that of our tensor's dtype; the state keys must be the same.
    """
    for k, (p, q) in enumerate(pairs):
        label = f"{where}param {k} (shape {tuple(p.shape)}, {p.dtype})"
        tol = tolerance(p.dtype)
        torch.testing.assert_close(
            as_real(p),
            as_real(q).to(p.device),
            **tol,
            msg=lambda m, label=label: f"{label}: {m}",
        )
        mine = ours.state.get(p, {})
        theirs = ref.state.get(q, {})
        assert set(mine) == set(theirs), (label, sorted(mine), sorted(theirs))
        for key, value in mine.items():
            if not isinstance(value, Tensor):
                assert value == theirs[key], (label, key)
                continue
            torch.testing.assert_close(
                as_real(value),
                as_real(theirs[key]).to(value.device),
                **tolerance(value.dtype),
                msg=lambda m, key=key, label=label: f"{label} state {key}: {m}",
            )


def assert_state_layout_like(
    ours: torch.optim.Optimizer,
    ref: torch.optim.Optimizer,
    pairs: Sequence[tuple[Tensor, Tensor]],
    strides: bool = False,
) -> None:
    """Our state tensors have the reference's keys, dtypes, devices and shapes (and
    strides, if asked)."""
    for k, (p, q) in enumerate(pairs):
        mine, theirs = ours.state.get(p, {}), ref.state.get(q, {})
        assert set(mine) == set(theirs), (k, sorted(mine), sorted(theirs))
        for key, value in theirs.items():
            got = (mine[key].dtype, mine[key].device, mine[key].shape)
            want = (value.dtype, value.device, value.shape)
            assert got == want, (k, key, got, want)
            if strides:
                assert mine[key].stride() == value.stride(), (
                    k,
                    key,
                    mine[key].stride(),
                    value.stride(),
                )


def snapshot(opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Everything a failed call must leave unchanged: params, state, groups."""
    params = [p for g in opt.param_groups for p in g["params"]]
    return {
        "params": [_copy(p) for p in params],
        "state_len": len(opt.state),
        "state": [
            {k: _copy(v) for k, v in opt.state[p].items()} if p in opt.state else None
            for p in params
        ],
        "groups": [
            {k: copy.deepcopy(v) for k, v in g.items() if k != "params"}
            for g in opt.param_groups
        ],
        "group_sizes": [len(g["params"]) for g in opt.param_groups],
    }


def assert_unchanged(opt: torch.optim.Optimizer, before: dict[str, Any]) -> None:
    """``opt`` is bitwise as ``snapshot`` saw it (meta tensors: metadata only)."""
    after = snapshot(opt)
    assert after["group_sizes"] == before["group_sizes"]
    assert after["state_len"] == before["state_len"], "opt.state grew"
    for k, (x, y) in enumerate(zip(before["params"], after["params"])):
        _assert_same(x, y, f"param {k}")
    for k, (x, y) in enumerate(zip(before["state"], after["state"])):
        if x is None or y is None:
            assert x is y, f"param {k}: state created or dropped"
            continue
        assert set(x) == set(y), (k, sorted(x), sorted(y))
        for key in x:
            _assert_same(x[key], y[key], f"param {k} state {key}")
    for k, (x, y) in enumerate(zip(before["groups"], after["groups"])):
        assert set(x) == set(y), (k, sorted(x), sorted(y))
        for key in x:
            if isinstance(x[key], Tensor):
                _assert_same(x[key], y[key], f"group {k} {key}")
            else:
                assert x[key] == y[key], (k, key, x[key], y[key])


def _copy(v: Any) -> Any:
    return v.detach().clone() if isinstance(v, Tensor) else copy.deepcopy(v)


def _assert_same(x: Any, y: Any, label: str) -> None:
    if not isinstance(x, Tensor):
        assert x == y, label
        return
    assert (x.dtype, x.shape, x.device) == (y.dtype, y.shape, y.device), label
    if x.device.type != "meta":
        assert torch.equal(x, y), f"{label} changed"


@functools.cache
def aten_sqrt_is_exact() -> bool:
    """Whether torch's float32 ``sqrt`` is correctly rounded on this machine.

    It is not everywhere: torch 2.13's CPU build on an AMD EPYC (AVX-512) rounds ~16 %
    of its results one ulp off, where Inductor's code and numpy compute the exact
    square root. The eager engine's Adam then differs from the compiled one by an
    ulp in a few parameter elements (the 8-bit codes, made before the root, agree).
    """
    x = torch.rand(4096, generator=torch.Generator().manual_seed(0))
    return torch.equal(x.sqrt(), x.double().sqrt().float())


def assert_engines_agree(eager: Tensor, compiled: Tensor) -> None:
    """Bitwise, as the engines compute the same operations; floating tensors within
    an ulp where torch's own square root is not correctly rounded
    (:func:`aten_sqrt_is_exact`)."""
    if eager.is_floating_point() and not aten_sqrt_is_exact():
        torch.testing.assert_close(compiled, eager, rtol=2.0**-23, atol=0.0)
    else:
        assert eager.dtype == compiled.dtype and torch.equal(eager, compiled)
