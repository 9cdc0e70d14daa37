"""Stochastic rounding from float32 to bfloat16: pure, seeded and traceable.

An optimizer that keeps bf16 parameters computes its update in float32 and writes the
result back. Round-to-nearest loses every update smaller than half a bf16 ulp (at 1.0,
updates below ~0.004 vanish), so long runs stall. Stochastic rounding rounds up or down
at random, with probabilities that make the rounded value correct *on average*.

Note [stochastic rounding]: the scheme works on the float32 bit pattern. A bf16 value is
a float32 whose low 16 bits are zero, and within one binade (and across the subnormals)
the bit pattern of a non-negative float grows linearly with its value. For ``x`` between
two adjacent bf16 values ``lo`` and ``hi = lo + u`` (magnitudes), write its low 16 bits
as ``f`` (so ``|x| = |lo| + u * f / 2**16``). Adding 16 uniform random bits
``r ∈ [0, 2**16)`` to the pattern and clearing the low 16 bits carries into ``hi``
exactly when ``r >= 2**16 - f``: probability ``f / 2**16``. Hence

    E[round(x)] = lo + u * f / 2**16 = x,

unbiased for every finite float32, with no float arithmetic: the bf16 result is the
high half of the pattern (converted exactly, Note [vectorised rounding]). Exact bf16 values
(``f = 0``) never move. The sign bit is not touched, so negative values round their
magnitude the same way (the result stays unbiased), and ``±0`` stays ``±0``.

Specials, all bitwise identical eager vs compiled but NaN (still NaN):

* NaN stays NaN (its sign and payload are not kept; Note [vectorised rounding]).
* ``±inf`` stays ``±inf``: adding ``r`` to its pattern never reaches the next one.
* float32 subnormals round stochastically onto bf16's subnormal grid (spacing
  ``2**-133``), unbiased like any other value; no flush to zero.
* Above the largest finite bf16 (``(2 - 2**-7) * 2**127``), the next pattern is
  ``inf``: the scheme rounds up to ``±inf`` with probability ``f / 2**16``, exactly as
  if ``inf`` were ``2**128`` on the grid. This matches round-to-nearest, which sends
  these values to ``inf`` from half an ulp up; only float32 values beyond bf16's range
  are affected.

Note [counter-based hash]: ``torch.Generator`` cannot be traced, so the random bits
are a hash of (element index, seed, offset) built from integer tensor ops that Dynamo
traces and Inductor fuses into the rounding kernel; the index comes from
``torch.arange``, which Inductor turns into the loop index (nothing is materialised).
The mixer is ``lowbias32`` (Wellons' hash-prospector, ``[16 21f0aaad 15 735a2d97
15]``), a bijection on 32 bits. The per-stream keys run on int64 holding values below
``2**32`` (both multipliers are below ``2**31``, so no product reaches ``2**63`` and
masking with ``2**32 - 1`` gives the wrapped uint32 product); the per-element hash
runs on int32 lanes, see Note [32-bit lanes] (the same bits).
(seed, offset) is first hashed into a 64-bit key ``(k1, k2)`` on 0-d tensors; each
element then takes ``lowbias32(index_lo ^ k1 ^ lowbias32(index_hi)) ^ k2`` and keeps
the top 16 bits. Distinct offsets give unrelated streams, so any scheme works: the step
counter, or ``step * num_tensors + tensor_index`` for independent tensors.

One round per element: the keys already carry all the mixing of (seed, offset), and
one round of ``lowbias32`` (its measured bias is 0.17, near the ideal) decorrelates
neighbouring indices. Two rounds cost a third of a low-precision step (GPT-like set,
1 thread: 1.36x the run without rounding, against 1.2x with one). Below ``2**32``
the high half is 0 and ``lowbias32(0) = 0``, so an int32 index gives the same bits.
Past it, 2**64 indices share 2**32 inputs: element ``(lo, hi)`` repeats the bits of
``(lo ^ lowbias32(hi), 0)``, which rounding does not mind (each stays unbiased).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF
_HIGH16 = -0x10000  # 0xFFFF0000 as int32: keeps a pattern's bf16 half
# Arbitrary odd constants (golden ratio, murmur3) so that an all-zero input does not
# hit lowbias32's fixed point at 0.
_SEED_SALT = 0x9E3779B9
_OFFSET_SALT = 0x85EBCA6B


def _lowbias32_(h: Tensor) -> Tensor:
    """Wellons' ``lowbias32``, in place, on int64 values in ``[0, 2**32)``.

    Only ever applied to temporaries of this module. In place because eager CPU spends
    most of an out-of-place op on fresh pages for its result (6x slower at 16M
    elements); compiled, it is the same fused kernel.
    """
    h ^= h >> 16
    h.mul_(0x21F0AAAD).bitwise_and_(_MASK32)
    h ^= h >> 15
    h.mul_(0x735A2D97).bitwise_and_(_MASK32)
    h ^= h >> 15
    return h


def stream_keys(seed_t: Tensor, offset_t: Tensor) -> Tensor:
    """Hash (seed, offset) into two 32-bit keys, materialised as one ``(2, ...)`` tensor.

    Elementwise over broadcastable int64 ``seed_t`` and ``offset_t`` (one stream per
    element: an optimizer passes one seed and step per parameter). Stacking makes
    Inductor compute the keys once into a buffer, instead of inlining this chain of
    ops into every element of the rounding kernel.
    """
    seed, offset = seed_t, offset_t
    offset_lo = offset & _MASK32
    seed_digest = _lowbias32_((seed & _MASK32) ^ _SEED_SALT)
    seed_digest = _lowbias32_(seed_digest ^ ((seed >> 32) & _MASK32))
    k1 = _lowbias32_(_lowbias32_(seed_digest ^ offset_lo) ^ ((offset >> 32) & _MASK32))
    # Not a function of k1 alone: a k2 tied to k1 can cancel it for a fixed element
    # (k2 = lowbias32(k1) would give index 0 the bits 0 for every offset).
    k2 = _lowbias32_(k1 ^ offset_lo ^ _OFFSET_SALT)
    return torch.stack([k1, k2])


def random_bits16(
    numel: int, seed_t: Tensor, offset_t: Tensor, device: torch.device | None = None
) -> Tensor:
    """Uniform random integers in ``[0, 2**16)``, one per element index.

    Args:
        numel: number of values.
        seed_t: 0-d or one-element int64 tensor, the stream's seed.
        offset_t: 0-d or one-element int64 tensor; distinct offsets give independent
            streams. See Note [counter-based hash].
        device: where to build the result; ``seed_t``'s device by default.

    Returns:
        An int64 tensor of shape ``(numel,)``, a pure function of (index, seed,
        offset).
    """
    k1, k2 = stream_keys(seed_t.reshape(()), offset_t.reshape(())).unbind()
    index = torch.arange(numel, dtype=torch.int64, device=device or seed_t.device)
    return bits16(index, k1, k2).to(torch.int64)


def _lowbias32_i32(h: Tensor) -> Tensor:
    """``lowbias32`` on int32 tensors holding uint32 bit patterns (Note [32-bit lanes]).

    Masking after each arithmetic right shift makes it the logical shift of the
    uint32 function; the products wrap modulo ``2**32``.
    """
    h = h ^ ((h >> 16) & 0xFFFF)
    h = h * 0x21F0AAAD
    h = h ^ ((h >> 15) & 0x1FFFF)
    h = h * 0x735A2D97
    return h ^ ((h >> 15) & 0x1FFFF)


def bits16(index: Tensor, k1: Tensor, k2: Tensor) -> Tensor:
    """The random bits of element ``index`` of the stream with keys ``(k1, k2)``.

    Elementwise over broadcastable tensors (see :func:`stream_keys`): int64 keys,
    and an int64 index, or an int32 one where every index is below ``2**31`` (the
    same bits, with no 64-bit work per element). The result is int32 in
    ``[0, 2**16)``.

    Note [32-bit lanes]: the per-element hash runs on int32, the keys (computed once
    per stream, on int64) cut to their 32 bits. AVX2 multiplies eight int32 lanes in
    one instruction but has no 64-bit multiply (Inductor emulates it, about ten
    instructions for four lanes), so int64 made stochastic rounding cost several
    times the update itself. int32 products overflow, which C++ leaves undefined;
    eager kernels and Inductor's code both compile them to the wrapping instructions
    (``vpmulld``, ``imul``), which ``test_stochastic_round_compiled_matches_eager_bitwise``
    checks on every run.
    """
    h = index ^ _as_i32(k1) if index.dtype == torch.int32 else _wide_input(index, k1)
    return ((_lowbias32_i32(h) ^ _as_i32(k2)) >> 16) & 0xFFFF


def _wide_input(index: Tensor, k1: Tensor) -> Tensor:
    """The hash input of an int64 index: its high half folded into the low one, as
    ``lowbias32(hi)`` (0 below ``2**32``: the int32 index's input there)."""
    high = _lowbias32_i32((index >> 32).to(torch.int32))
    return index.to(torch.int32) ^ _as_i32(k1) ^ high  # .to wraps: the low 32 bits


def _as_i32(k: Tensor) -> Tensor:
    """A key in ``[0, 2**32)`` (int64) as the int32 with the same 32 bits."""
    return k.to(torch.int32)


def stochastic_round_bf16(x: Tensor, seed_t: Tensor, offset_t: Tensor) -> Tensor:
    """Round float32 to bfloat16 stochastically: unbiased, seeded, reproducible.

    Each element rounds to one of its two bf16 neighbours, up with probability equal
    to its distance from the lower one in ulps, so ``E[result] = x``. The random bits
    depend only on (element index in ``x.flatten()``, seed, offset): the same inputs
    give bitwise the same result, eager or compiled, and new values of ``seed_t`` /
    ``offset_t`` never recompile. Round-to-nearest is ``x.to(torch.bfloat16)``.

    Args:
        x: float32 tensor, any shape and strides.
        seed_t: 0-d or one-element int64 tensor, on ``x``'s device or the CPU.
        offset_t: 0-d or one-element int64 tensor like ``seed_t``, e.g. the step
            counter; distinct offsets give independent streams.

    Returns:
        A bfloat16 tensor of ``x``'s shape. NaN, ``±inf`` and ``±0`` pass through; see
        Note [stochastic rounding] for subnormals and values beyond bf16's range.

    Raises:
        TypeError: if ``x`` is not float32 or ``seed_t`` / ``offset_t`` are not int64.
    """
    if x.dtype != torch.float32:
        raise TypeError(
            f"stochastic_round_bf16 rounds float32 values, got {x.dtype}: "
            "convert with x.float() first"
        )
    if seed_t.dtype != torch.int64 or offset_t.dtype != torch.int64:
        raise TypeError(
            f"seed_t and offset_t must be int64 tensors, got {seed_t.dtype} and "
            f"{offset_t.dtype}: build them with torch.tensor(n, dtype=torch.int64)"
        )
    bits = random_bits16(x.numel(), seed_t, offset_t, x.device).reshape(x.shape)
    return round_bf16_with_bits(x, bits)


def round_bf16_with_bits(x: Tensor, bits: Tensor) -> Tensor:
    """Round float32 ``x`` to bfloat16, adding the random ``bits`` in ``[0, 2**16)``.

    See Note [stochastic rounding]; :func:`stochastic_round_bf16` draws the bits.

    Note [vectorised rounding]: Inductor's CPU code vectorises no kernel that touches
    int16, so the bf16 pattern is not cut from the int32 one (``>> 16``, then int16,
    then a bf16 view: that made the whole fused update scalar, 4x slower). The rounded
    pattern, its low half cleared, is a float32 that bf16 holds exactly, so converting
    it is exact and bitwise the same in every kernel. NaN is the exception: vectorised
    and scalar conversions give different NaN patterns (and Inductor stores bf16
    results through a float32 conversion whatever the op), so a NaN stays NaN, but
    its sign and payload are not kept.
    """
    summed = x.view(torch.int32) + bits.to(torch.int32)
    rounded = (summed & _HIGH16).view(torch.float32)
    # A NaN's pattern plus r can wrap (into -0.0) or lose a payload that is all in
    # the low half (into inf), so a NaN is converted as it is. One float compare: an
    # integer test of the pattern cost two more blends per vector, a quarter of the
    # rounding's cost (13.6M-parameter set, AMD, 1 thread: 1.23x the step without
    # rounding, now 1.16x).
    return torch.where(x != x, x, rounded).to(torch.bfloat16)


def parameter_seeds(group_seeds: Sequence[int], indices: Sequence[int]) -> list[int]:
    """Each parameter's stream seed: its group's ``sr_seed`` and its own index.

    ``indices`` are the parameters' positions in the optimizer (counted across
    groups), so any number of groups and of parameters per group gives distinct
    seeds: the low 32 bits hold the group's seed, the high bits the index (below
    ``2**31``, so the int64 stays positive). :func:`stream_keys` mixes the two halves
    with bijections of 32 bits, so distinct indices under one ``sr_seed`` give
    distinct keys at every step.
    """
    for index in indices:
        if not 0 <= index < 2**31:
            raise ValueError(
                f"a stochastic-rounding stream needs a parameter index in [0, 2**31), "
                f"got {index}"
            )
    return [(s & _MASK32) | (k << 32) for s, k in zip(group_seeds, indices)]
