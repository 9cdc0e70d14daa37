"""The core's 8-bit codes for Adam's moments: blockwise, pure, traceable.

A moment is stored as one 8-bit code per element and one float32 scale per block of
at most :data:`BLOCK` consecutive elements of the flattened tensor (the last block of
a tensor may be shorter; blocks never straddle two tensors). Every function here works
on 2-D *rows*: ``(blocks, block)`` tensors whose rows are blocks, with a ``(blocks, 1)``
scale column; :func:`block_rows` cuts a contiguous tensor into them. A pack's
``(rows, width)`` buffer, each parameter starting a row, already is such rows.

Note [8-bit moments]: the maps, chosen by measurement (``benchmarks/quant_maps.py``):

- first moment: signed linear codes, ``round(127 m / absmax)`` in ``[-127, 127]``
  (int8), scale = the block's absmax;
- second moment: ``round(255 (v / max)^(1/4))`` in ``[0, 255]`` (uint8), scale = the
  block's max. The fourth root spends the codes where Adam needs them: the update
  divides by ``sqrt(v)``, and a linear or square-root map rounds the small ``v`` of a
  block to 0 (linear diverged; sqrt trained worse, see the results), while a fourth
  root keeps ``v`` down to ``max / 255^4`` (about ``2e-10 max``). Decoding is two
  squarings, encoding two square roots: no table, no search, fully vectorised.

A zero moment encodes to code 0, which decodes to 0; no code decodes below 0. Scales
below :data:`SCALE_FLOOR` are used as that floor to form the reciprocal (so that it
stays finite): such a block's elements, all below ``2**-120``, encode to 0.

Every function is a chain of elementwise ops and one row reduction, with no ``.item()``
and no branch on values, so Inductor fuses a whole update into one loop nest per row
block (``_quant_step``). Reciprocals are written out (``reciprocal() * k`` rather than
``k / x``) so that eager and compiled code round the same way.
"""

from __future__ import annotations

import torch
from torch import Tensor

BLOCK = 128
SIGNED_TOP = 127
UNSIGNED_TOP = 255
SCALE_FLOOR = 2.0**-120  # 127 / SCALE_FLOOR is finite in float32
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
    """float32 values of uint8 fourth-root ``codes`` with their ``(rows, 1)`` max."""
    x = codes.to(torch.float32) * (1.0 / UNSIGNED_TOP)
    x = x * x
    return x * x * top


def _inverse(scale: Tensor) -> Tensor:
    return scale.clamp_min(SCALE_FLOOR).reciprocal()


def encode_signed(x: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """int8 codes of float32 rows ``x`` and each row's absmax ``(rows, 1)``.

    ``noise``: uniform values in ``[0, 1)`` like ``x``: round stochastically (down,
    then up with the probability of the distance), else to nearest.
    """
    absmax = x.abs().amax(-1, keepdim=True)
    position = x * (_inverse(absmax) * SIGNED_TOP)
    rounded = position.round() if noise is None else (position + noise).floor()
    codes = rounded.clamp(-SIGNED_TOP, SIGNED_TOP).to(SIGNED_DTYPE)
    return codes, absmax


def encode_unsigned(v: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """uint8 fourth-root codes of non-negative float32 rows ``v``, and each row's max.

    ``noise`` as for :func:`encode_signed`; stochastic rounding of the fourth root
    (unbiased in the code, not in ``v``).
    """
    top = v.amax(-1, keepdim=True)
    u = (v * _inverse(top)).clamp(0.0, 1.0)
    position = u.sqrt().sqrt() * UNSIGNED_TOP
    rounded = position.round() if noise is None else (position + noise).floor()
    codes = rounded.clamp(0, UNSIGNED_TOP).to(UNSIGNED_DTYPE)
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
