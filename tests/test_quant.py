"""8-bit moments (``_quant``) and the 8-bit Adam update (``_quant_step``).

The reference is float64 and written from the maps' definitions (Note [8-bit
moments]): first moment ``round(127 m / absmax)``, second the nearest value of the log
table (code c >= 1: ``2**(e - 127) * (1 + f / 8)`` with ``8 e + f = c + 761``), per
block of consecutive elements. Codes may differ from it by one only where the
float64 position lies within ``TIE`` of a rounding boundary (float32 arithmetic may
round either way there).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import Tensor

from tests.edge_helpers import assert_engines_agree
from umup_compile._codegen_hints import codegen_hints
from umup_compile._functional import ADAM_HYPERS, AdamConfig
from umup_compile._quant import (
    BLOCK,
    SCALE_FLOOR,
    block_rows,
    decode_unsigned,
    dequantize,
    num_blocks,
    quantize_,
)
from umup_compile._quant_step import adam8_step_

TIE = 1e-4  # positions this close to k + 1/2 may round either way in float32
F64 = torch.float64
HYPERS = {"lr": 0.01, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.1}


def _log_table() -> Tensor:
    """The unsigned codes' values in float64, from the formula (not the bit trick)."""
    c = torch.arange(1, 256, dtype=F64) + 761
    values = 2.0 ** (torch.div(c, 8, rounding_mode="floor") - 127) * (1 + c % 8 / 8)
    return torch.cat([torch.zeros(1, dtype=F64), values])


LOG_TABLE = _log_table()


# Where positions are measured from: code 0 stands for 1.125 * 2**-32 (the value the
# bit pattern of code 0 would have) when rounding, and decodes to 0.
POSITION_TABLE = torch.cat([torch.tensor([1.125 * 2.0**-32], dtype=F64), LOG_TABLE[1:]])


def _log_position(u: Tensor) -> Tensor:
    """Interpolated code position of ``u`` in [0, 1]: rounding it is nearest-value."""
    t = POSITION_TABLE
    lo = (torch.searchsorted(t, u, right=True) - 1).clamp(0, 254)
    return lo + ((u - t[lo]) / (t[lo + 1] - t[lo])).clamp(0, 1)


def _reference_codes(x: Tensor, signed: bool, block: int) -> tuple[Tensor, Tensor]:
    """float64 positions (before rounding) and scales of ``x``, per block."""
    rows = block_rows(x.double(), block)
    positions, scales = [], []
    for r in rows:
        scale = r.abs().amax(-1, keepdim=True)
        u = r / (scale + SCALE_FLOOR)  # the floor only keeps a zero block's codes 0
        pos = 127 * u if signed else _log_position(u.clamp(0, 1).reshape(-1))
        positions.append(pos.reshape(-1))
        scales.append(scale.reshape(-1))
    return torch.cat(positions), torch.cat(scales)


def _check_codes(codes: Tensor, position: Tensor) -> None:
    """Codes equal round(position), or a neighbour where position is near a tie."""
    expected = position.round()
    got = codes.reshape(-1).double()
    near_tie = ((position - position.floor()) - 0.5).abs() < TIE
    assert torch.all((got == expected) | (near_tie & ((got - expected).abs() <= 1)))


def _quantized(x: Tensor, signed: bool, block: int) -> tuple[Tensor, Tensor]:
    codes = torch.empty(x.shape, dtype=torch.int8 if signed else torch.uint8)
    scales = torch.full((num_blocks(x.numel(), block), 1), math.nan)
    quantize_(x, codes, scales, signed=signed, block=block)
    return codes, scales


# -- the quantizer against float64 --------------------------------------------------


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
@pytest.mark.parametrize("numel", [1, 5, 128, 300, 1024])
def test_quantize_matches_float64_reference_and_error_bound(
    signed: bool, numel: int
) -> None:
    x = torch.randn(numel) * torch.logspace(-6, 2, numel)
    x = x if signed else x.square()
    codes, scales = _quantized(x, signed, BLOCK)
    position, ref_scales = _reference_codes(x, signed, BLOCK)
    _check_codes(codes, position)
    assert torch.equal(scales.reshape(-1).double(), ref_scales)  # max is exact
    back = dequantize(codes, scales, signed=signed).double()
    per_element = ref_scales.repeat_interleave(BLOCK)[:numel]
    if signed:  # linear: half a code step of the block absmax
        assert torch.all((back - x.double()).abs() <= per_element / 254 * (1 + 1e-5))
    else:  # log: half a step, 1/16 of the value (or code 1's value, below it)
        bound = torch.maximum(x.double() / 16, per_element * LOG_TABLE[1])
        assert torch.all((back - x.double()).abs() <= bound * (1 + 1e-6))


def test_zero_stays_zero_and_no_code_decodes_below_zero() -> None:
    x = torch.tensor([0.0, 0.0, 3.0, -2.0, 0.0, 1e-30])
    for signed in (True, False):
        values = x if signed else x.abs()
        codes, scales = _quantized(values, signed, 4)
        back = dequantize(codes, scales, signed=signed, block=4)
        assert torch.all(back[values == 0] == 0)
        assert torch.all(codes[values == 0] == 0)
    everything = torch.arange(256, dtype=torch.uint8).view(1, -1)
    assert torch.all(decode_unsigned(everything, torch.ones(1, 1)) >= 0)
    zeros, zero_scales = _quantized(torch.zeros(300), False, BLOCK)
    assert torch.all(zeros == 0) and torch.all(zero_scales == 0)


def test_quantize_subnormal_blocks_are_finite() -> None:
    tiny = torch.tensor([1e-40, -3e-39, 0.0, 2e-45])
    for signed in (True, False):
        values = tiny if signed else tiny.abs()
        codes, scales = _quantized(values, signed, 2)
        back = dequantize(codes, scales, signed=signed, block=2)
        assert torch.all(torch.isfinite(back))
        assert torch.all((back - values).abs() <= values.abs().max())


@settings(max_examples=60, deadline=None)
@example(values=[767945.0, 2777536828276736.0], block=2, signed=False)  # below code 1
@given(
    values=st.lists(
        st.floats(-(2.0**100), 2.0**100, allow_subnormal=True, width=32),
        min_size=1,
        max_size=300,
    ),
    block=st.sampled_from([1, 2, 7, 16, 128, 256]),
    signed=st.booleans(),
)
def test_quantize_property_codes_scales_and_bound(
    values: list[float], block: int, signed: bool
) -> None:
    x = torch.tensor(values, dtype=torch.float32)
    x = x if signed else x.abs()
    codes, scales = _quantized(x, signed, block)
    position, ref_scales = _reference_codes(x, signed, block)
    _check_codes(codes, position)
    assert torch.equal(scales.reshape(-1).double(), ref_scales)
    back = dequantize(codes, scales, signed=signed, block=block).double()
    assert torch.all(back[x == 0] == 0) and (signed or torch.all(back >= 0))
    per_element = ref_scales.repeat_interleave(block)[: x.numel()]
    slack = per_element.clamp_min(SCALE_FLOOR)  # subnormal blocks encode to 0
    assert torch.all((back - x.double()).abs() <= slack * (1 + 1e-5))


def test_quantize_pack_rows_equal_per_tensor_blocks() -> None:
    """Blocks never straddle parameters: a pack's rows (each parameter starting a
    row, zero padding) quantize as each parameter does on its own."""
    width = 16
    tensors = [torch.randn(37), torch.randn(16), torch.randn(5)]
    rows = [-(-t.numel() // width) for t in tensors]
    pack = torch.zeros(sum(rows), width)
    starts = [0, rows[0], rows[0] + rows[1]]
    for t, r in zip(tensors, starts):
        pack.view(-1)[r * width : r * width + t.numel()] = t
    codes, scales = _quantized(pack, True, width)
    for t, r, n in zip(tensors, starts, rows):
        alone_codes, alone_scales = _quantized(t, True, width)
        assert torch.equal(
            codes.view(-1)[r * width : r * width + t.numel()], alone_codes
        )
        assert torch.equal(scales[r : r + n], alone_scales)


# -- the 8-bit Adam update ----------------------------------------------------------


def _state(params: list[Tensor], block: int) -> dict[str, list[Tensor]]:
    """Random non-zero 8-bit state, as a few steps would leave it."""
    out: dict[str, list[Tensor]] = {"m": [], "v": [], "s": [], "step": []}
    for p in params:
        m, v = torch.randn(p.shape) * 1e-2, torch.rand(p.shape) * 1e-4
        mc, ms = _quantized(m, True, block)
        vc, vs = _quantized(v, False, block)
        out["m"].append(mc)
        out["v"].append(vc)
        out["s"].append(torch.cat([ms, vs], -1))
        out["step"].append(torch.full((1,), 3.0))
    return out


def _call(
    params: list[Tensor], grads: list[Tensor], state: dict[str, list[Tensor]],
    fn: Callable[..., None] = adam8_step_, n: int = 0, **kwargs: object,
) -> None:  # fmt: skip
    n = n or len(params)  # a pack: n parameters in one tensor
    hyper_t = torch.tensor([[HYPERS[k] for k in ADAM_HYPERS]], dtype=F64)
    fn(
        params,
        grads,
        state["m"],
        state["v"],
        state["s"],
        state["step"],
        hyper_t,
        torch.zeros(n, dtype=torch.int64),
        torch.ones(n, dtype=F64),
        torch.ones(n, dtype=F64),
        config=AdamConfig(weight_decay="decoupled"),
        **kwargs,
    )


def _reference_step(
    p: Tensor, g: Tensor, mc: Tensor, vc: Tensor, s: Tensor, step: float, block: int
) -> tuple[Tensor, Tensor, Tensor]:
    """float64 AdamW from the decoded moments: new parameter, new m, new v."""
    m = dequantize(mc, s[:, :1], signed=True, block=block).double()
    v = dequantize(vc, s[:, 1:], signed=False, block=block).double()
    h = HYPERS
    m = h["beta1"] * m + (1 - h["beta1"]) * g.double()
    v = h["beta2"] * v + (1 - h["beta2"]) * g.double().square()
    bc1, bc2 = 1 - h["beta1"] ** step, 1 - h["beta2"] ** step
    new = p.double() * (1 - h["lr"] * h["weight_decay"])
    new = new - h["lr"] / bc1 * m / ((v / bc2).sqrt() + h["eps"])
    return new, m, v


@pytest.mark.parametrize("shape", [(300,), (4, 128), (1,), (3, 5)])
def test_adam8_step_matches_float64_reference(shape: tuple[int, ...]) -> None:
    params, grads = [torch.randn(shape)], [torch.randn(shape) * 0.1]
    state = _state(params, BLOCK)
    p0, m0, v0, s0 = (t.clone() for t in (params[0], *(state[k][0] for k in "mvs")))
    _call(params, grads, state)
    new, m, v = _reference_step(p0, grads[0], m0, v0, s0, 4.0, BLOCK)
    torch.testing.assert_close(params[0].double(), new, rtol=1e-5, atol=1e-6)
    position_m, scales_m = _reference_codes(m.float(), True, BLOCK)
    _check_codes(state["m"][0], position_m)
    torch.testing.assert_close(state["s"][0][:, 0].double(), scales_m)
    position_v, scales_v = _reference_codes(v.float(), False, BLOCK)
    _check_codes(state["v"][0], position_v)
    torch.testing.assert_close(state["s"][0][:, 1].double(), scales_v)
    assert state["step"][0].item() == 4.0


def test_adam8_second_moment_scale_follows_values_down_after_a_spike() -> None:
    """Note [second-moment scale]: after a gradient spike the v scale comes down with
    the values (a scale 2**31 above them falls to their max in one step), and every
    value keeps a non-zero code over 50 quiet steps."""
    params, grads = [torch.zeros(256)], [torch.full((256,), 2.0**-10)]
    state = _state(params, BLOCK)
    state["v"][0].fill_(255 - 8 * 31)  # u = 2**-31 of the scale: 8 codes per octave
    state["s"][0][:, 1] = 2.0**11  # values: 2**-20, the scale 2**31 above them
    v_small = torch.full((256,), 2.0**-20)
    back = dequantize(state["v"][0], state["s"][0][:, 1:], signed=False, block=BLOCK)
    assert torch.equal(back, v_small)
    for _ in range(50):
        _call(params, grads, state)
        assert torch.all(state["v"][0] > 0)
        assert torch.all(state["s"][0][:, 1] <= 2.0**-19)


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_adam8_step_skipped_under_grad_scaler_leaves_everything_bitwise(
    bad: float,
) -> None:
    params = [torch.randn(300), torch.randn(4, 128)]
    grads = [torch.randn(300), torch.randn(4, 128)]
    grads[0][7] = bad
    state = _state(params, BLOCK)
    before = [t.clone() for t in [*params, *(t for k in "mvs" for t in state[k])]]
    _call(
        params,
        grads,
        state,
        grad_scale_t=torch.tensor(1024.0),
        found_inf_t=torch.tensor(1.0),
    )
    after = [*params, *(t for k in "mvs" for t in state[k])]
    for b, a in zip(before, after):
        assert torch.equal(b, a)
    assert [s.item() for s in state["step"]] == [3.0, 3.0]


def test_adam8_step_zero_gradient_keeps_zero_state_zero() -> None:
    params, grads = [torch.randn(260)], [torch.zeros(260)]
    state = _state(params, BLOCK)
    for k in "mvs":
        state[k][0].zero_()
    _call(params, grads, state)
    assert torch.all(state["m"][0] == 0) and torch.all(state["v"][0] == 0)
    assert torch.all(state["s"][0] == 0) and torch.all(torch.isfinite(params[0]))


def test_adam8_step_pack_rows_equal_per_parameter_calls() -> None:
    """A pack (each parameter starting a row of ``width``, block = width, per-row
    coefficients through ``segment_t``) updates as each parameter on its own."""
    width, sizes = 16, [37, 16, 5]
    params = [torch.randn(n) for n in sizes]
    grads = [torch.randn(n) for n in sizes]
    state = _state(params, width)
    rows = [-(-n // width) for n in sizes]
    starts = [sum(rows[:k]) * width for k in range(len(sizes))]

    def packed(ts: list[Tensor], dtype: torch.dtype) -> Tensor:
        flat = torch.zeros(sum(rows), width, dtype=dtype)
        for t, a in zip(ts, starts):
            flat.view(-1)[a : a + t.numel()] = t
        return flat

    pack_state = {
        "m": [packed(state["m"], torch.int8)],
        "v": [packed(state["v"], torch.uint8)],
        "s": [torch.cat(state["s"])],
        "step": [torch.full((len(sizes),), 3.0)],
    }
    pack_p = packed(params, torch.float32)
    segment_t = torch.repeat_interleave(torch.arange(3), torch.tensor(rows))
    alone = {k: [t.clone() for t in v] for k, v in state.items()}
    _call([pack_p], [packed(grads, torch.float32)], pack_state, block=width,
          segment_t=segment_t, n=len(sizes))  # fmt: skip
    alone_p = [p.clone() for p in params]
    _call(alone_p, grads, alone, block=width)
    for k, (p, a) in enumerate(zip(alone_p, starts)):
        n = p.numel()
        assert torch.equal(pack_p.view(-1)[a : a + n], p)
        assert torch.equal(pack_state["m"][0].view(-1)[a : a + n], alone["m"][k])
        assert torch.equal(pack_state["v"][0].view(-1)[a : a + n], alone["v"][k])
    assert torch.equal(pack_state["s"][0], torch.cat(alone["s"]))


def test_adam8_step_refuses_amsgrad() -> None:
    with pytest.raises(ValueError, match="amsgrad"):
        adam8_step_([], [], [], [], [], [], torch.zeros(1, 5), torch.zeros(0),
                    torch.zeros(0), torch.zeros(0), config=AdamConfig(amsgrad=True))  # fmt: skip


def test_adam8_step_compiled_matches_eager_bitwise() -> None:
    """Inductor's code (one pass per block, Note [one pass]) and the eager ops give
    the same bits: parameters, codes and scales, over 3 steps, with a tail block."""
    shapes = [(2, 128), (130,)]
    params = [torch.randn(s) for s in shapes]
    grads = [torch.randn(s) * 0.1 for s in shapes]
    state = _state(params, BLOCK)
    twin_p = [p.clone() for p in params]
    twin = {k: [t.clone() for t in v] for k, v in state.items()}
    compiled = torch.compile(adam8_step_, backend="inductor", fullgraph=True)
    for _ in range(3):
        _call(params, grads, state)
        with codegen_hints:  # as the engine compiles (Note [loop split guard])
            _call(twin_p, grads, twin, fn=compiled)
    for a, b in zip([*params, *(t for v in state.values() for t in v)],
                    [*twin_p, *(t for v in twin.values() for t in v)]):  # fmt: skip
        assert_engines_agree(a, b)
