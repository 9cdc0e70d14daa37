"""The core's 8-bit codes for Adam's moments: blockwise, pure, traceable.

A moment is stored as one 8-bit code per element and one float32 scale per block of
at most :data:`BLOCK` consecutive elements of the flattened tensor (the last block of
a tensor may be shorter; blocks never straddle two tensors). Every function here works
on 2-D *rows*: ``(blocks, block)`` tensors whose rows are blocks, with a ``(blocks, 1)``
scale column; :func:`block_rows` cuts a contiguous tensor into them. A pack's
``(rows, width)`` buffer, each parameter starting a row, already is such rows.

Note [8-bit moments]: the maps, chosen by measurement (``benchmarks/quant_maps.py``,
results in ``benchmarks/results/<device>/*_quant_maps_*``):

- first moment: signed linear codes, ``round(127 m / absmax)`` in ``[-127, 127]``
  (int8), scale = the block's absmax;
- second moment: a logarithmic code (uint8) of ``u = v / scale``: code ``c >= 1`` is
  the float32 whose bits are ``(c + 761) << 20``, i.e. an exponent and 3 mantissa bits
  (8 codes per octave, code 255 = 1.0, code 1 = ``1.25 * 2**-32``), code 0 is 0 (``u``
  below ``1.1875 * 2**-32``: nearer the pattern of code 0). Encoding rounds ``u``'s
  bits to the nearest code (add ``2**19``, shift by 20). A log map keeps Adam's small
  ``v`` (a linear map rounds them to 0 and diverged; sqrt trained worse), and this one
  is integer adds and shifts on the bit pattern: no table, no search, and no square
  root beyond the update's own (a ``v^(1/4)`` map trains as well but needs a second one
  per element, and the update is compute-bound on CPU). Its error is at most 1/16 of
  the value (half a step); scale = the block's max (Note [second-moment scale] in
  ``_quant_step``).

A zero moment encodes to code 0, which decodes to 0; no code decodes below 0. Scales
get :data:`SCALE_FLOOR` added before their reciprocal is taken (which changes no scale
above ``2**-96`` and keeps the reciprocal finite): a block whose largest magnitude
``x`` is that small decodes scaled down by about ``x / (x + 2**-120)`` (0.8 at
``3e-36``, within the codes' own error above ``2**-110``, near 0 below ``2**-120``).

Every function is a chain of elementwise ops and one row reduction, with no ``.item()``
and no branch on values, so Inductor fuses a whole update into one loop nest per row
block (``_quant_step``). Reciprocals are written out (``reciprocal() * k`` rather than
``k / x``) so that eager and compiled code round the same way; so is rounding to the
nearest integer (Note [cheap codes]). The bit casts (``Tensor.view(torch.int32)``) are
vectorised under ``_codegen_hints`` (Note [vector bitcast]), which the compiled engine
enters.

Note [cheap codes]: the update is compute-bound on CPU (``benchmarks/bench_quant8.py``),
so each code costs as few vector instructions as its definition allows, all of them
plain IEEE float or integer ops (the same bits in eager and Inductor code):

- ``round`` then ``to(int8)`` is written as adding ``1.5 * 2**23`` (the float adder
  rounds to the nearest integer, ties to even, as ``round`` does) and subtracting that
  constant's bits: no clamp, since ``|127 m / absmax| <= 127`` when the scale is the
  exact absmax (the int32 to int8 conversion would wrap, never saturate). Inductor's
  float to int8 conversion and its NaN-propagating clamps cost 14 instructions per
  vector; these cost 3.
- Code 0 decodes to 0 through an AND with ``(-c) >> 31`` (all ones for ``c >= 1``):
  three integer ops where ``torch.where`` costs five (Inductor converts its mask).
"""

from __future__ import annotations

import torch
from torch import Tensor

BLOCK = 128
SIGNED_TOP = 127
UNSIGNED_TOP = 255
SCALE_FLOOR = 2.0**-120  # 127 / SCALE_FLOOR is finite in float32
LOG_BIAS = 761  # code c >= 1 is the float32 with bits (c + LOG_BIAS) << 20
MANTISSA_SHIFT = 20  # keeps the exponent and 3 mantissa bits
ROUNDER = 12582912.0  # 1.5 * 2**23: adding it rounds |x| < 2**22 to an integer
ROUNDER_BITS = 0x4B400000  # ... which its bits' low 23 bits then hold
SIGNED_DTYPE = torch.int8
UNSIGNED_DTYPE = torch.uint8


def num_blocks(numel: int, block: int = BLOCK) -> int:
    """How many scales a tensor of ``numel`` elements has (at least one)."""
    return max(1, -(-numel // block))


def block_rows(t: Tensor, block: int = BLOCK) -> list[Tensor]:
    """Row views of contiguous ``t``: its full blocks as ``(n // block, block)``, then
    its last partial block as ``(1, n % block)`` (each present only if not empty).

    A 0-element tensor gives no rows; a 0-d tensor is one block of one element.
    """
    flat = t.reshape(-1)
    n = flat.numel()
    full = n - n % block
    rows = []
    if full:
        rows.append(flat[:full].view(full // block, block))
    if n > full:
        rows.append(flat[full:].view(1, n - full))
    return rows


def scale_rows(scales: Tensor, numel: int, block: int = BLOCK) -> list[Tensor]:
    """The rows of a ``(blocks, k)`` scale tensor matching :func:`block_rows`."""
    full = numel // block
    rows = []
    if full:
        rows.append(scales[:full])
    if numel % block:
        rows.append(scales[full:])
    return rows


def decode_signed(codes: Tensor, absmax: Tensor) -> Tensor:
    """float32 values of int8 ``codes`` (rows) with their ``(rows, 1)`` absmax."""
    return codes.to(torch.float32) * (absmax * (1.0 / SIGNED_TOP))


def decode_unsigned(codes: Tensor, top: Tensor) -> Tensor:
    """float32 values of uint8 log ``codes`` with their ``(rows, 1)`` scale."""
    c = codes.to(torch.int32)
    # Note [cheap codes]: (-c) >> 31 is all ones for c >= 1, zero for code 0.
    bits = ((c + LOG_BIAS) << MANTISSA_SHIFT) & ((-c) >> 31)
    return bits.view(torch.float32) * top


def _inverse(scale: Tensor) -> Tensor:
    return (scale + SCALE_FLOOR).reciprocal()


def encode_signed(x: Tensor) -> tuple[Tensor, Tensor]:
    """int8 codes of float32 rows ``x`` (rounded to nearest) and each row's absmax
    ``(rows, 1)``."""
    absmax = x.abs().amax(-1, keepdim=True)
    position = x * (_inverse(absmax) * SIGNED_TOP)
    # Note [cheap codes]: round to nearest (ties to even) in the float adder.
    codes = ((position + ROUNDER).view(torch.int32) - ROUNDER_BITS).to(SIGNED_DTYPE)
    return codes, absmax


def encode_unsigned(v: Tensor) -> tuple[Tensor, Tensor]:
    """uint8 log codes of non-negative float32 rows ``v`` (rounded to nearest) and
    each row's max ``(rows, 1)``."""
    top = v.amax(-1, keepdim=True)
    bits = (v * _inverse(top)).view(torch.int32)
    position = (bits + (1 << (MANTISSA_SHIFT - 1))) >> MANTISSA_SHIFT
    codes = (position - LOG_BIAS).clamp(0, UNSIGNED_TOP).to(UNSIGNED_DTYPE)
    return codes, top


def quantize_(
    x: Tensor,
    codes: Tensor,
    scales: Tensor,
    *,
    signed: bool,
    block: int = BLOCK,
    keep: Tensor | None = None,
) -> None:
    """Store float32 ``x`` (any shape, contiguous like ``codes``) as ``codes`` (its
    shape, int8 or uint8) and ``scales`` (``(num_blocks(x.numel()), 1)`` float32).

    ``keep``: a 0-d bool tensor; where True, codes and scales stay as they are
    (a skipped step, Note [skipped steps] in ``_functional``).
    """
    encode = encode_signed if signed else encode_unsigned
    n = x.numel()
    for xs, cs, ss in zip(
        block_rows(x, block), block_rows(codes, block), scale_rows(scales, n, block)
    ):
        new_codes, new_scales = encode(xs)
        if keep is not None:
            new_codes = torch.where(keep, cs, new_codes)
            new_scales = torch.where(keep, ss, new_scales)
        cs.copy_(new_codes)
        ss.copy_(new_scales)


def dequantize(
    codes: Tensor, scales: Tensor, *, signed: bool, block: int = BLOCK
) -> Tensor:
    """The float32 values of ``codes`` (any shape) and their ``scales``."""
    decode = decode_signed if signed else decode_unsigned
    n = codes.numel()
    parts = [
        decode(cs, ss).reshape(-1)
        for cs, ss in zip(block_rows(codes, block), scale_rows(scales, n, block))
    ]
    if not parts:
        return torch.zeros(codes.shape, dtype=torch.float32, device=codes.device)
    return torch.cat(parts).view(codes.shape)
