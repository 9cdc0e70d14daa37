"""Checkpoints of 8-bit Adam state (Note [8-bit state]): plain tensors that
``torch.load(weights_only=True)`` reads, bitwise round trips, and conversion both
ways with one warning (float32 state from torch, unit_scaling or this package is
quantized; 8-bit state loads dequantized into float32 state, torch's layout)."""

from __future__ import annotations

import copy
import io
import warnings
from typing import Any

import pytest
import torch
import unit_scaling.optim as uso
from torch import Tensor, nn

import umup_compile as uc
from tests.helpers import use_backend
from umup_compile._quant import dequantize, num_blocks, quantize_
from umup_compile.optim import AdamW

INT8 = torch.int8
SHAPES = [(64, 128), (72, 70), (32,)]  # two quantized (4096+ elements), one small
KW = {"lr": 0.01, "weight_decay": 0.1}


def _params(dtype: torch.dtype = torch.float32) -> list[Any]:
    gen = torch.Generator().manual_seed(0)
    depth = [None, 4, None]
    types = ["weight", "weight", "norm"]
    return [
        uc.Parameter(torch.randn(s, generator=gen).to(dtype), t, d)  # type: ignore[arg-type]
        for s, t, d in zip(SHAPES, types, depth)
    ]


def _run(opt: torch.optim.Optimizer, params: list[Any], steps: range) -> None:
    for step in steps:
        gen = torch.Generator().manual_seed(step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        opt.step()


def _saved(sd: dict[str, Any]) -> dict[str, Any]:
    """``sd`` through ``torch.save`` and ``torch.load(weights_only=True)``."""
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)  # type: ignore[no-any-return]


def _load(opt: torch.optim.Optimizer, sd: dict[str, Any]) -> list[str]:
    """Load; return the warnings' messages."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.load_state_dict(sd)
    return [str(w.message) for w in caught]


@pytest.mark.parametrize("engine", ["eager", "aot_eager"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_int8_checkpoint_round_trips_bitwise_and_resumes(
    engine: str, dtype: torch.dtype
) -> None:
    params = _params(dtype)
    opt = AdamW(params, **KW, state_dtype=INT8, compile=engine != "eager")
    if engine != "eager":
        use_backend(opt, engine)
    _run(opt, params, range(3))
    sd = _saved(opt.state_dict())
    state = sd["state"][0]
    assert sorted(state) == ["exp_avg", "exp_avg_scales", "exp_avg_sq", "step"]
    assert state["exp_avg_scales"].dtype == torch.float32
    assert sd["param_groups"][0]["state_dtype"] == "int8"  # by name
    resumed = [p.detach().clone() for p in params]
    _run(opt, params, range(3, 6))  # uninterrupted

    params2 = [uc.Parameter(t, p.mup_type, p.mup_scaling_depth) for t, p in
               zip(resumed, params)]  # fmt: skip
    opt2 = AdamW(params2, **KW, state_dtype=INT8, compile=engine != "eager")
    if engine != "eager":
        use_backend(opt2, engine)
    assert _load(opt2, copy.deepcopy(sd)) == []  # no conversion, no warning
    for k, p in enumerate(params2):
        for key, value in sd["state"][k].items():
            got = opt2.state[p][key]
            assert got.dtype == value.dtype and torch.equal(got, value), key
    _run(opt2, params2, range(3, 6))
    for p, q in zip(params, params2):
        assert torch.equal(p, q)
        for key, value in opt.state[p].items():
            assert torch.equal(value, opt2.state[q][key]), key


def _float_checkpoints() -> dict[str, tuple[dict[str, Any], list[Tensor]]]:
    """float32-state checkpoints after 3 steps, and their parameters' values: this
    package's, torch.optim.AdamW's and unit_scaling's (one group per parameter)."""
    out = {}
    params = _params()
    ours = AdamW(params, **KW, compile=False)
    _run(ours, params, range(3))
    out["umup"] = (_saved(ours.state_dict()), [p.detach() for p in params])
    params = [nn.Parameter(p.detach().clone()) for p in _params()]
    theirs = torch.optim.AdamW(params, **KW)
    _run(theirs, params, range(3))
    out["torch"] = (_saved(theirs.state_dict()), [p.detach() for p in params])
    params = _params()
    us = uso.AdamW(params, **KW)
    _run(us, params, range(3))
    out["unit_scaling"] = (_saved(us.state_dict()), [p.detach() for p in params])
    return out


@pytest.mark.parametrize("source", ["umup", "torch", "unit_scaling"])
def test_float32_checkpoint_loads_quantized_with_one_warning(source: str) -> None:
    sd, _ = _float_checkpoints()[source]
    params = _params()
    opt = AdamW(params, **KW, state_dtype=INT8, compile=False)
    messages = _load(opt, copy.deepcopy(sd))
    assert len(messages) == 1 and "-> 8-bit (quantized)" in messages[0], messages
    assert "torch.int8" in messages[0]
    saved = sd["state"]
    for k, p in enumerate(params[:2]):
        s = opt.state[p]
        assert s["exp_avg"].dtype == torch.int8 and s["exp_avg_sq"].dtype == torch.uint8
        for col, key in enumerate(("exp_avg", "exp_avg_sq")):
            codes = torch.empty_like(s[key])
            scales = torch.empty(num_blocks(p.numel()), 1)
            quantize_(saved[k][key].float(), codes, scales, signed=col == 0)
            assert torch.equal(codes, s[key])
            assert torch.equal(scales, s["exp_avg_scales"][:, col : col + 1])
    small = opt.state[params[2]]  # fewer than 4096 elements: float32, as saved
    assert torch.equal(small["exp_avg"], saved[2]["exp_avg"])
    _run(opt, params, range(3, 5))  # and it trains on
    assert all(torch.isfinite(p).all() for p in params)


def test_int8_checkpoint_loads_dequantized_and_gives_torch_its_layout() -> None:
    params = _params()
    opt = AdamW(params, **KW, state_dtype=INT8, compile=False)
    _run(opt, params, range(3))
    sd = _saved(opt.state_dict())
    # The documented way back to torch's layout: load into float32 state ...
    params32 = _params()
    opt32 = AdamW(params32, **KW, state_dtype=torch.float32, compile=False)
    messages = _load(opt32, copy.deepcopy(sd))
    assert len(messages) == 1 and "8-bit -> torch.float32 (dequantized)" in messages[0]
    for k, p in enumerate(params32):
        s = opt32.state[p]
        assert sorted(s) == ["exp_avg", "exp_avg_sq", "step"]
        if k < 2:
            scales = sd["state"][k]["exp_avg_scales"]
            want = dequantize(sd["state"][k]["exp_avg"], scales[:, :1], signed=True)
            assert torch.equal(s["exp_avg"], want)
            assert s["exp_avg"].dtype == torch.float32
    # ... whose state_dict() torch.optim.AdamW loads as its own.
    plain = [nn.Parameter(p.detach().clone()) for p in params32]
    theirs = torch.optim.AdamW(plain, **KW)
    theirs.load_state_dict(opt32.state_dict())
    for p, q in zip(params32, plain):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt32.state[p][key], theirs.state[q][key])


def test_int8_checkpoint_with_wrong_scales_is_refused_unchanged() -> None:
    params = _params()
    opt = AdamW(params, **KW, state_dtype=INT8, compile=False)
    _run(opt, params, range(2))
    sd = _saved(opt.state_dict())
    sd["state"][1]["exp_avg_scales"] = sd["state"][1]["exp_avg_scales"][:-1]
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(
        ValueError, match=r"'exp_avg_scales' for parameter 1 .*\(40, 2\)"
    ):
        opt.load_state_dict(sd)
    after = opt.state_dict()
    for k, s in before["state"].items():
        for key, value in s.items():
            assert torch.equal(after["state"][k][key], value)
