"""Stochastic rounding float32 -> bfloat16: neighbours, unbiasedness, seeds, compile.

The reference for "the two bf16 neighbours of x" is built independently of the
bit trick under test: round-to-nearest, then ``torch.nextafter`` on the bf16 grid.
Statistical checks use a 5-sigma bound from the binomial standard deviation; the
hash is deterministic, so they either always pass or always fail.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor
from torch._dynamo.testing import CompileCounterWithBackend

from umup_compile._rounding import random_bits16, stochastic_round_bf16

BF16 = torch.bfloat16
F32 = torch.float32
SIGMAS = 5.0
MAX_BF16 = torch.finfo(BF16).max
INF = math.inf


def _i64(n: int) -> Tensor:
    return torch.tensor(n, dtype=torch.int64)


def _from_bits(*patterns: int) -> Tensor:
    """float32 values from their bit patterns (given as unsigned 32-bit ints)."""
    signed = [p - (1 << 32) if p >= 1 << 31 else p for p in patterns]
    return torch.tensor(signed, dtype=torch.int32).view(F32)


def _bits(y: Tensor) -> Tensor:
    return y.view(torch.int16)


def _neighbours(x: Tensor) -> tuple[Tensor, Tensor]:
    """The bf16 values just below and just above x (both x when x is on the grid)."""
    nearest = x.to(BF16)
    down = torch.nextafter(nearest, torch.full_like(nearest, -INF))
    up = torch.nextafter(nearest, torch.full_like(nearest, INF))
    below = torch.where(nearest.float() > x, down, nearest)
    above = torch.where(nearest.float() < x, up, nearest)
    return below, above


def _mixed_values(n: int) -> Tensor:
    """Random magnitudes across float32's range (subnormals included), both signs."""
    exponent = torch.empty(n).uniform_(-44.0, 38.0)
    x = torch.randn(n, dtype=torch.float64) * 10.0**exponent
    x = x.clamp(-3.4e38, 3.4e38).float()
    x[: n // 8] = x[: n // 8].to(BF16).float()  # some already on the bf16 grid
    return x


@pytest.fixture(scope="module")
def compiled_round() -> tuple[CompileCounterWithBackend, Callable[..., Tensor]]:
    """The module's one Inductor compile (a first compile costs ~10-20 s on CPU)."""
    counter = CompileCounterWithBackend("inductor")
    return counter, torch.compile(
        stochastic_round_bf16, backend=counter, fullgraph=True
    )


# -- values -----------------------------------------------------------------------------


def test_stochastic_round_returns_a_bf16_neighbour() -> None:
    x = _mixed_values(4096)
    below, above = _neighbours(x)
    exact = below == above
    for offset in range(8):
        y = stochastic_round_bf16(x, _i64(0), _i64(offset))
        assert y.dtype == BF16 and y.shape == x.shape
        assert torch.all((_bits(y) == _bits(below)) | (_bits(y) == _bits(above)))
        assert torch.equal(_bits(y[exact]), _bits(x[exact].to(BF16)))
    assert exact.sum() >= 4096 // 8
    up = stochastic_round_bf16(x, _i64(0), _i64(0)) == above
    assert 0.2 < up[~exact].float().mean() < 0.8  # both directions occur


def test_stochastic_round_keeps_shape_and_handles_empty_and_0d() -> None:
    seed_t, offset_t = _i64(3), _i64(4)
    assert stochastic_round_bf16(torch.empty(0, 5), seed_t, offset_t).shape == (0, 5)
    scalar = stochastic_round_bf16(torch.tensor(1.5), seed_t, offset_t)
    assert scalar.shape == () and scalar.item() == 1.5
    # A one-element seed or offset is the same stream as a 0-d one.
    x = torch.randn(33)
    assert torch.equal(
        _bits(stochastic_round_bf16(x, seed_t.reshape(1), offset_t.reshape(1))),
        _bits(stochastic_round_bf16(x, seed_t, offset_t)),
    )


def test_stochastic_round_is_unbiased() -> None:
    # Values inside [1, 2), tiny, huge, subnormal, negative: every binade rounds alike.
    scales = torch.tensor([1.0, -1.0, 3e-30, -7e25, 1e-39, -2e-42])
    x = (torch.rand(6, 64) + 1.0) * scales[:, None]
    x = x.flatten()
    below, above = _neighbours(x)
    lo, hi = below.double(), above.double()
    width = hi - lo
    p = (x.double() - lo) / width
    assert torch.all(width > 0)

    samples = 2000
    total = torch.zeros_like(lo)
    for offset in range(samples):
        total += stochastic_round_bf16(x, _i64(11), _i64(offset)).double()
    mean = total / samples

    # Each sample is lo or hi, hi with probability p: a binomial mean.
    sigma = width * torch.sqrt(p * (1 - p) / samples)
    assert torch.all((mean - x.double()).abs() <= SIGMAS * sigma)
    # Pooled: the standardised errors sum to N(0, n) if there is no systematic bias.
    z = ((mean - x.double()) / sigma).sum() / math.sqrt(x.numel())
    assert abs(z) <= SIGMAS


def test_stochastic_round_tracks_tiny_updates_where_nearest_stalls() -> None:
    # An optimizer adding 1e-4 per step to bf16 parameters at 1.0 (ulp 2**-7).
    lr, steps, n = 1e-4, 1000, 4096
    nearest = torch.ones(n, dtype=BF16)
    stochastic = torch.ones(n, dtype=BF16)
    exact = torch.ones((), dtype=F32)
    for step in range(steps):
        nearest = (nearest.float() + lr).to(BF16)
        stochastic = stochastic_round_bf16(stochastic.float() + lr, _i64(5), _i64(step))
        exact = exact + lr

    assert torch.all(nearest == 1.0)  # every update is below half an ulp: lost
    # Per step each element moves by one ulp with probability q = lr / ulp (values
    # stay in [1, 2)), so after `steps` steps its variance is steps * ulp**2 * q(1-q).
    ulp = 2.0**-7
    q = lr / ulp
    sigma = ulp * math.sqrt(steps * q * (1 - q) / n)
    # float32 adds round too (at most half an ulp of 1.0 per step, in each sum).
    slack = 2 * steps * 2.0**-24
    drift = stochastic.double().mean().item() - exact.item()
    assert abs(drift) <= SIGMAS * sigma + slack, (drift, sigma)
    assert stochastic.double().mean().item() > 1.09


# -- the random stream ------------------------------------------------------------------


def test_stochastic_round_is_reproducible() -> None:
    x = torch.randn(1000)
    first = stochastic_round_bf16(x, _i64(42), _i64(7))
    again = stochastic_round_bf16(x.clone(), _i64(42), _i64(7))
    assert torch.equal(_bits(first), _bits(again))


@pytest.mark.parametrize(
    ("seed", "offset"),
    [(0, 1), (1, 0), (0, 1 << 32), (-1, 0), (0, -1), (1 << 40, 0)],
    ids=[
        "offset",
        "seed",
        "offset_high_half",
        "negative_seed",
        "negative_offset",
        "seed_high_half",
    ],
)
def test_random_bits16_differ_between_streams(seed: int, offset: int) -> None:
    n = 1 << 14
    base = random_bits16(n, _i64(0), _i64(0))
    other = random_bits16(n, _i64(seed), _i64(offset))
    # Equal 16-bit values by chance: 1 in 65536.
    assert (base == other).float().mean() < 1e-3
    # Rounding decisions differ too: halfway values go up about half the time.
    x = torch.full((n,), 1.0 + 2.0**-8)
    a = stochastic_round_bf16(x, _i64(0), _i64(0))
    b = stochastic_round_bf16(x, _i64(seed), _i64(offset))
    assert 0.45 < (a != b).float().mean() < 0.55


def test_random_bits16_are_uniform() -> None:
    n = 1 << 18
    bits = random_bits16(n, _i64(9), _i64(123))
    assert bits.dtype == torch.int64
    assert bits.min() >= 0 and bits.max() < 1 << 16
    # Each of the 16 bits is set half the time.
    ones = torch.stack([(bits >> k) & 1 for k in range(16)]).double().mean(dim=1)
    assert torch.all((ones - 0.5).abs() <= SIGMAS * 0.5 / math.sqrt(n))
    # Neighbouring elements are uncorrelated.
    u = bits.double() / (1 << 16) - 0.5
    corr = (u[1:] * u[:-1]).mean() / u.var()
    assert abs(corr) <= SIGMAS / math.sqrt(n)


# -- specials ---------------------------------------------------------------------------


def test_stochastic_round_specials() -> None:
    largest_f32 = torch.finfo(F32).max
    x = torch.tensor(
        [INF, -INF, 0.0, -0.0, MAX_BF16, -MAX_BF16, 2.0**-133, -(2.0**-140)]
    )
    nans = _from_bits(0x7FC00000, 0xFFC00000, 0x7F800001, 0xFFFFFFFF)
    for offset in range(64):
        y = stochastic_round_bf16(x, _i64(1), _i64(offset))
        assert torch.equal(_bits(y), _bits(x.to(BF16)))  # all on the grid: unchanged
        assert torch.equal(y.signbit(), x.signbit())  # -0.0 keeps its sign
        rounded_nans = stochastic_round_bf16(nans, _i64(1), _i64(offset))
        assert torch.all(rounded_nans.isnan())  # sign and payload are not kept
        big = stochastic_round_bf16(torch.tensor([largest_f32]), _i64(1), _i64(offset))
        assert big.item() in (MAX_BF16, INF)


def test_stochastic_round_beyond_bf16_range_and_subnormals() -> None:
    # Halfway between the largest finite bf16 and "2**128" (inf): inf half the time.
    # Halfway between 0 and the smallest bf16 subnormal 2**-133: each half the time.
    x = (
        torch.tensor([1.0, -1.0, 1.0, -1.0])
        * torch.tensor(
            [MAX_BF16 + 2.0**119, -MAX_BF16 - 2.0**119, 2.0**-134, -(2.0**-134)]
        )
        .float()
        .abs()
    )
    n = 4096
    up = stochastic_round_bf16(x.repeat(n, 1), _i64(2), _i64(0)).abs()
    assert set(up[:, 0].tolist()) == {MAX_BF16, INF}
    assert set(up[:, 2].tolist()) == {0.0, 2.0**-133}
    rate = (up == up.max(dim=0).values).double().mean(dim=0)
    assert torch.all((rate - 0.5).abs() <= SIGMAS * 0.5 / math.sqrt(n))


def test_stochastic_round_rejects_wrong_dtypes() -> None:
    with pytest.raises(TypeError, match="float32"):
        stochastic_round_bf16(torch.ones(2, dtype=torch.float64), _i64(0), _i64(0))
    with pytest.raises(TypeError, match="int64"):
        stochastic_round_bf16(
            torch.ones(2), torch.tensor(0, dtype=torch.int32), _i64(0)
        )


# -- compile ----------------------------------------------------------------------------


def test_stochastic_round_compiled_matches_eager_bitwise(
    compiled_round: tuple[CompileCounterWithBackend, Callable[..., Tensor]],
) -> None:
    counter, compiled = compiled_round
    # Transposed, so the kernel must map strides to the logical element index.
    x = (torch.randn(129, 37) * 10.0 ** torch.empty(129, 37).uniform_(-42, 38)).t()
    x[0, :10] = torch.cat(
        [
            _from_bits(0x7FC00000, 0xFFFFFFFF, 0x7F800001),
            torch.tensor([INF, -INF, 0.0, -0.0, MAX_BF16, torch.finfo(F32).max, 1e-45]),
        ]
    )
    assert not x.is_contiguous()
    for seed, offset in [(0, 0), (17, 1000), (-3, 1 << 33)]:
        seed_t, offset_t = _i64(seed), _i64(offset)
        got = compiled(x, seed_t, offset_t)
        want = stochastic_round_bf16(x, seed_t, offset_t)
        # bitwise, but NaN: NaN there (Note [vectorised rounding])
        nan = want.isnan()
        assert torch.equal(got.isnan(), nan)
        assert torch.equal(_bits(got)[~nan], _bits(want)[~nan])
    assert counter.frame_count == 1  # new seeds and offsets never recompile


def test_stochastic_round_traces_as_one_graph() -> None:
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(stochastic_round_bf16, backend=counter, fullgraph=True)
    x = torch.randn(8, 16)
    for offset in range(5):
        assert torch.equal(
            _bits(compiled(x, _i64(1), _i64(offset))),
            _bits(stochastic_round_bf16(x, _i64(1), _i64(offset))),
        )
    assert counter.frame_count == 1
    explained = torch._dynamo.explain(stochastic_round_bf16)(x, _i64(1), _i64(0))
    assert explained.graph_break_count == 0 and explained.graph_count == 1


def test_int32_lane_hash_gives_the_bits_of_the_uint32_function() -> None:
    # Note [32-bit lanes]: the per-element hash on int32 must be lowbias32 on uint32,
    # written here on int64 with explicit masks (no product reaches 2**63).
    from umup_compile._rounding import bits16

    def lowbias32(h: torch.Tensor) -> torch.Tensor:
        m = 0xFFFFFFFF
        h = h ^ (h >> 16)
        h = (h * 0x21F0AAAD) & m
        h = h ^ (h >> 15)
        h = (h * 0x735A2D97) & m
        return h ^ (h >> 15)

    gen = torch.Generator().manual_seed(3)
    index = torch.cat(
        [
            torch.arange(1 << 12),
            torch.randint(0, 1 << 40, (1 << 12,), generator=gen),  # past 2**32
        ]
    )
    for k1, k2 in [(0, 0), (0xFFFFFFFF, 0x80000000), (123456789, 0x7FFFFFFF)]:
        hashed_input = (index & 0xFFFFFFFF) ^ k1 ^ lowbias32(index >> 32)
        want = lowbias32(hashed_input) ^ k2
        got = bits16(index, _i64(k1), _i64(k2))
        assert got.dtype == torch.int32
        assert torch.equal(got.to(torch.int64), want >> 16)


def test_int32_index_gives_the_bits_of_the_int64_index() -> None:
    from umup_compile._rounding import bits16

    index = torch.arange(1 << 16) * 32749  # spread below 2**31
    for k1, k2 in [(0, 0), (0xFFFFFFFF, 0x80000000)]:
        wide = bits16(index, _i64(k1), _i64(k2))
        narrow = bits16(index.to(torch.int32), _i64(k1), _i64(k2))
        assert torch.equal(wide, narrow)
