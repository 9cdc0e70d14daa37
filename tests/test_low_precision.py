"""Low precision (Note [low precision]): bf16/fp16 parameters, ``state_dtype``,
stochastic rounding, mixed dtypes, checkpoints."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from torch import nn

import umup_compile as uc
from tests.helpers import clone_params, run_steps, set_grads, toy_params, use_backend
from umup_compile import _layout
from umup_compile.optim import SGD, Adam, AdamW

ENGINES = ["eager", "aot_eager"]


def build(cls, params, engine: str, **kwargs):  # noqa: ANN001, ANN201
    opt = cls(params, compile=engine != "eager", **kwargs)
    if engine != "eager":
        use_backend(opt, engine)
    return opt


def plain(dtype: torch.dtype) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    shapes = [(32, 16), (16,), (20000,)]  # the last is chunked, the rest packed
    return [nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(
    "ours,theirs,kwargs,dtype",
    [
        (Adam, torch.optim.Adam, {"lr": 0.01, "weight_decay": 0.1}, torch.bfloat16),
        (AdamW, torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.1}, torch.bfloat16),
        (
            SGD,
            torch.optim.SGD,
            {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.1},
            torch.bfloat16,
        ),
        (
            SGD,
            torch.optim.SGD,
            {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.1},
            torch.float16,
        ),
    ],
    ids=["adam-bf16", "adamw-bf16", "sgd-bf16", "sgd-fp16"],
)
def test_low_precision_params_match_torch(ours, theirs, kwargs, dtype, engine) -> None:  # noqa: ANN001
    """Default semantics (state in the parameter's dtype) as torch.optim, but closer
    to float64 math: torch rounds after every op (its bf16 AdamW loses the decay
    ``p * 0.999`` entirely), we round once per tensor. (torch's fp16 Adam overflows
    its fp16 intermediates here; fp16 Adam is checked against float32 math below.)
    """
    params, torch_params = plain(dtype), plain(dtype)
    exact = [nn.Parameter(p.detach().double()) for p in params]
    opt = build(
        ours,
        params,
        engine,
        allow_non_unit_scaling_params=True,  # lr scale 1: torch's numbers
        independent_weight_decay=False,
        **kwargs,
    )
    low = theirs(torch_params, foreach=False, **kwargs)
    ref = theirs(exact, foreach=False, **kwargs)
    run_steps([opt, low, ref], [params, torch_params, exact], 5)
    for p, q, r in zip(params, torch_params, exact):
        assert p.dtype == dtype and opt.state[p]
        for key, value in opt.state[p].items():
            assert key == "step" or value.dtype == dtype, key
        ours_err = (p.double() - r).abs().mean()
        torch_err = (q.double() - r).abs().mean()
        torch.testing.assert_close(p.double(), r, rtol=2e-2, atol=2e-2)
        assert ours_err <= torch_err * 1.05 + 1e-6, (ours_err, torch_err)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cls", [Adam, SGD])
def test_fp32_state_equals_fp32_math_rounded(cls, dtype, engine) -> None:  # noqa: ANN001
    """Low-precision params + fp32 state == fp32 training, params rounded each step."""
    kwargs = (
        {"lr": 0.01, "weight_decay": 0.1}
        if cls is Adam
        else {"lr": 0.1, "momentum": 0.9, "nesterov": True}
    )
    params = toy_params(dtype)
    ref_params = [
        uc.Parameter(p.detach().float(), p.mup_type, p.mup_scaling_depth)  # type: ignore[attr-defined]
        for p in params
    ]
    opt = build(cls, params, engine, state_dtype=torch.float32, **kwargs)
    ref = cls(ref_params, compile=False, **kwargs)
    for s in range(4):
        set_grads([ref_params], seed=s)
        for p, q in zip(params, ref_params):
            p.grad = q.grad.to(dtype)  # type: ignore[union-attr]
            q.grad = p.grad.float()
        opt.step()
        ref.step()
        with torch.no_grad():
            for q in ref_params:
                q.copy_(q.to(dtype).float())
    for p, q in zip(params, ref_params):
        assert p.dtype == dtype
        torch.testing.assert_close(p.float(), q, rtol=0, atol=0)
        for key, value in opt.state[p].items():
            if key != "step":
                assert value.dtype == torch.float32
                torch.testing.assert_close(value, ref.state[q][key], rtol=0, atol=0)


def test_fp32_state_inductor_close_to_eager() -> None:
    params = toy_params(torch.bfloat16)
    ref_params = clone_params(params)
    opt = Adam(params, lr=0.01, state_dtype=torch.float32, compile="strict")
    ref = Adam(ref_params, lr=0.01, state_dtype=torch.float32, compile=False)
    run_steps([opt, ref], [params, ref_params], 3)
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p, q, rtol=1e-2, atol=1e-2)  # one bf16 ulp
        torch.testing.assert_close(
            opt.state[p]["exp_avg_sq"], ref.state[q]["exp_avg_sq"], rtol=1e-5, atol=1e-7
        )


def sr_params() -> list[nn.Parameter]:
    return [
        uc.Parameter(torch.ones(4096, dtype=torch.bfloat16), "norm"),
        uc.Parameter(torch.ones(64, 300, dtype=torch.bfloat16), "output"),
    ]


def train_constant(rounding: bool, engine: str, steps: int = 200) -> list[float]:
    """Many tiny Adam updates (~1e-4, below half a bf16 ulp at 1.0) on ones."""
    torch.manual_seed(0)
    params = sr_params()
    opt = build(
        Adam,
        params,
        engine,
        lr=1e-4,
        state_dtype=torch.float32,
        stochastic_rounding=rounding,
    )
    for _ in range(steps):
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
    return [p.float().mean().item() for p in params]


@pytest.mark.parametrize("engine", ENGINES)
def test_stochastic_rounding_is_unbiased_and_nearest_stalls(engine: str) -> None:
    expected = 1.0 - 200 * 1e-4  # Adam's step is lr for a constant gradient
    # Per element, 200 roundings of at most half an ulp (2**-8 below 1.0) each: the
    # std of the mean over >= 4096 elements is < sqrt(200) * 2**-9 / 64 = 4.3e-4.
    bound = 5 * 4.3e-4
    for mean in train_constant(True, engine):
        assert abs(mean - expected) < bound, mean
    assert train_constant(False, engine) == [1.0, 1.0]  # round-to-nearest stalls


def test_stochastic_rounding_same_numbers_every_layout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The bits depend on (parameter seed, step, element), not on packs or chunks."""
    eager = train_constant(True, "eager", steps=20)
    assert train_constant(True, "aot_eager", steps=20) == eager
    monkeypatch.setattr(_layout, "PACK_MAX_NUMEL", 10**9)  # everything packed
    assert train_constant(True, "aot_eager", steps=20) == eager
    monkeypatch.setattr(_layout, "PACK_MAX_NUMEL", 1)  # everything chunked
    assert train_constant(True, "aot_eager", steps=20) == eager


def test_stochastic_rounding_reproducible_and_seeded() -> None:
    def run(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        p = uc.Parameter(torch.ones(1000, dtype=torch.bfloat16), "norm")
        opt = Adam([p], lr=1e-3, stochastic_rounding=True, compile=False)
        for _ in range(3):
            p.grad = torch.randn(1000, generator=torch.Generator().manual_seed(1)).to(
                torch.bfloat16
            )
            opt.step()
        return p.detach().clone()

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))


def test_mixed_dtypes_one_step_per_dtype_bucket() -> None:
    """fp32 norms and bf16 matrices in one optimizer equal two separate ones."""
    w = uc.Parameter(torch.randn(16, 16, dtype=torch.bfloat16), "weight")
    n = uc.Parameter(torch.ones(16), "norm")
    w2, n2 = clone_params([w, n])
    opt = Adam([w, n], lr=0.01, state_dtype=torch.float32, compile=False)
    ref_w = Adam([w2], lr=0.01, state_dtype=torch.float32, compile=False)
    ref_n = Adam([n2], lr=0.01, compile=False)
    run_steps([opt, ref_w, ref_n], [[w, n], [w2, n2]], 3)
    assert torch.equal(w, w2) and torch.equal(n, n2)
    assert len(opt._runner.plans) == 2  # one bucket per dtype, one step call


def test_checkpoint_keeps_state_dtype_and_converts_with_warning() -> None:
    params = toy_params(torch.bfloat16)
    opt = Adam(params, lr=0.01, state_dtype=torch.float32, compile=False)
    run_steps([opt], [params], 2)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    same = Adam(clone_params(params), lr=0.01, state_dtype=torch.float32, compile=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same.load_state_dict(saved)
    for q, p in zip(same.param_groups[0]["params"], params):
        assert torch.equal(same.state[q]["exp_avg"], opt.state[p]["exp_avg"])
        assert same.state[q]["exp_avg"].dtype == torch.float32
    other = Adam(clone_params(params), lr=0.01, compile=False)  # bf16 state
    with pytest.warns(UserWarning, match=r"torch.float32 -> torch.bfloat16"):
        other.load_state_dict(saved)
    q = other.param_groups[0]["params"][0]
    assert other.state[q]["exp_avg"].dtype == torch.bfloat16


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"state_dtype": torch.int32}, TypeError, "state_dtype must be None"),
        ({"state_dtype": "float32"}, TypeError, "state_dtype must be None"),
        ({"stochastic_rounding": 1}, TypeError, "stochastic_rounding must be a bool"),
    ],
)
def test_low_precision_options_are_validated(kwargs, error, match) -> None:  # noqa: ANN001
    with pytest.raises(error, match=match):
        Adam(toy_params(), lr=0.01, **kwargs)


def test_stochastic_rounding_refuses_fp16() -> None:
    p = uc.Parameter(torch.ones(4, dtype=torch.float16), "norm")
    with pytest.raises(ValueError, match="rounds bfloat16 parameters.*float16"):
        Adam([p], stochastic_rounding=True)


@pytest.mark.parametrize("cls", [Adam, SGD], ids=["adam", "sgd"])
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_floating_state_dtype_refuses_complex_params(cls, state_dtype) -> None:  # noqa: ANN001
    # It accepted them, and the first step failed on a broadcast after creating
    # real-valued state; the group is refused, naming the parameter and the fix.
    plain = torch.nn.Parameter(torch.randn(7, 3, dtype=torch.complex64))
    kwargs = {"momentum": 0.9} if cls is SGD else {}
    with pytest.raises(ValueError, match=r"index 0 .*complex64; put it in a param"):
        cls([plain], lr=0.01, state_dtype=state_dtype, **kwargs,
            allow_non_unit_scaling_params=True)  # fmt: skip
    opt = cls([plain], lr=0.01, allow_non_unit_scaling_params=True, **kwargs)
    with pytest.raises(ValueError, match="complex64; put it in a param group"):
        opt.add_param_group(
            {"params": [torch.nn.Parameter(torch.randn(2, dtype=torch.complex64))],
             "state_dtype": state_dtype}
        )  # fmt: skip
    assert len(opt.param_groups) == 1


def test_sgd_refuses_a_stochastic_rounding_group_key() -> None:
    # SGD's constructor has no stochastic_rounding; a group key asking for it was
    # accepted and ignored (bf16 parameters stayed at 1.0 over 100 steps of 1e-3).
    p = nn.Parameter(torch.ones(8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"stochastic_rounding=True .* not by SGD"):
        SGD(
            [{"params": [p], "stochastic_rounding": True}],
            lr=1e-3,
            allow_non_unit_scaling_params=True,
        )
    opt = SGD([p], lr=1e-3, allow_non_unit_scaling_params=True)
    q = nn.Parameter(torch.ones(8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"stochastic_rounding=True .* not by SGD"):
        opt.add_param_group({"params": [q], "stochastic_rounding": True})
    assert len(opt.param_groups) == 1
