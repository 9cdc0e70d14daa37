"""Inductor CPU code hints (Note [bf16 tiling], Note [vector bitcast]): the generated
C++ changes, the values do not, and only the engine's own compiles are affected."""

from __future__ import annotations

import types
from collections.abc import Callable

import pytest
import torch
from torch import Tensor
from torch._inductor import config as inductor_config
from torch._inductor.utils import run_and_get_code

from umup_compile import _codegen_hints
from umup_compile._codegen_hints import codegen_hints
from umup_compile._rounding import stochastic_round_bf16

# The caches are switched off on purpose (see _compiled_run).
pytestmark = pytest.mark.filterwarnings("ignore:dynamo_pgo force disabled")


def _update(p: Tensor, m: Tensor, seed: Tensor, step: Tensor) -> None:
    """bf16 values with float32 state, stochastically rounded: both hints apply."""
    m.add_(p.float())  # one IEEE add: the same bits in any kernel
    p.copy_(stochastic_round_bf16(m * 0.5, seed, step))


def _fresh(fn: Callable[..., None]) -> Callable[..., None]:
    """A copy with its own code object, so Dynamo compiles it anew."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__)


def _inputs() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    # 1,000 elements: whole vectors and a tail; magnitudes across many binades.
    scale = 10.0 ** torch.empty(1000).uniform_(-30, 30, generator=g)
    m = torch.randn(1000, generator=g) * scale
    m[:5] = torch.tensor([float("inf"), -float("inf"), 0.0, -0.0, 1e-45])
    p = (torch.randn(1000, generator=g) * scale).bfloat16()
    return p, m, torch.tensor(7, dtype=torch.int64), torch.tensor(3, dtype=torch.int64)


def _compiled_run(hinted: bool) -> tuple[Tensor, Tensor, str]:
    p, m, seed, step = _inputs()
    fn = torch.compile(_fresh(_update), backend="inductor", fullgraph=True)
    # Caches off: the FX graph cache's key does not see the hints.
    with inductor_config.patch(force_disable_caches=True):
        if hinted:
            with codegen_hints:
                _, code = run_and_get_code(fn, p, m, seed, step)
        else:
            _, code = run_and_get_code(fn, p, m, seed, step)
    return p, m, "\n".join(code)


@pytest.fixture(scope="module")
def runs() -> dict[bool, tuple[Tensor, Tensor, str]]:
    """The module's two Inductor compiles (~10 s each on CPU)."""
    return {hinted: _compiled_run(hinted) for hinted in (True, False)}


def _lanes(dtype: torch.dtype) -> int:
    from torch._inductor import cpu_vec_isa

    isa = cpu_vec_isa.pick_vec_isa()
    if not isa:
        pytest.skip("this CPU has no vector ISA Inductor uses")
    return int(isa.nelements(dtype=dtype))


def test_hints_change_no_value(runs: dict[bool, tuple[Tensor, Tensor, str]]) -> None:
    p, m, seed, step = _inputs()
    _update(p, m, seed, step)  # eager
    for hinted in (True, False):
        got_p, got_m, _ = runs[hinted]
        assert torch.equal(got_m, m)
        assert torch.equal(got_p.view(torch.int16), p.view(torch.int16)), hinted


def test_hints_tile_mixed_kernels_for_bf16(
    runs: dict[bool, tuple[Tensor, Tensor, str]],
) -> None:
    bf16, fp32 = _lanes(torch.bfloat16), _lanes(torch.float32)
    assert bf16 == 2 * fp32
    hinted, plain = runs[True][2], runs[False][2]
    assert f"x0+=static_cast<int64_t>({bf16}L)" in hinted
    # Unhinted, Inductor tiles this kernel for float32 (why the hint exists); the
    # user's own compiles keep that.
    assert f"x0+=static_cast<int64_t>({fp32}L)" in plain
    assert f"x0+=static_cast<int64_t>({bf16}L)" not in plain


def test_hints_bitcast_whole_vectors(
    runs: dict[bool, tuple[Tensor, Tensor, str]],
) -> None:
    _lanes(torch.float32)
    hinted, plain = runs[True][2], runs[False][2]
    assert "at::vec::VectorizedN<int32_t,2> out; static_assert" in hinted
    assert "at::vec::VectorizedN<float,2> out; static_assert" in hinted
    assert "tmpbuf_out" not in hinted  # no scalar round trip left
    assert "tmpbuf_out" in plain


def test_hints_are_scoped_and_exception_safe() -> None:
    assert not _codegen_hints.active()
    with pytest.raises(RuntimeError, match="boom"):
        with codegen_hints:
            with codegen_hints:  # reentrant
                assert _codegen_hints.active()
            assert _codegen_hints.active()
            raise RuntimeError("boom")
    assert not _codegen_hints.active()


def test_hints_do_nothing_where_inductor_lacks_the_hooks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_codegen_hints, "_installed", None)
    monkeypatch.setattr(_codegen_hints, "_cpp_backend", lambda: None)
    with codegen_hints:
        assert not _codegen_hints.active()
    assert _codegen_hints._installed is False  # looked up once, then remembered


def test_engine_compiles_under_the_hints(monkeypatch: pytest.MonkeyPatch) -> None:
    """The compiled engine's calls (where a first call compiles) run inside them."""
    from umup_compile import _engine

    seen: list[bool] = []

    def fn(x: Tensor, *, config: object) -> None:
        seen.append(_codegen_hints.active())
        x.add_(1)

    engine = _engine.CompiledEngine(strict=True, backend="eager")
    engine(fn, (torch.zeros(3),), {"config": ()}, static=True)
    assert seen == [True]  # Dynamo ran fn's Python while tracing, hints on
    assert not _codegen_hints.active()


def test_optimizer_compiles_its_kernels_with_the_hints() -> None:
    """bf16 parameters, float32 state, stochastic rounding, compile='strict' (a C++
    error would raise, not fall back): the step's kernels carry both hints and give
    the eager numbers to within one bf16 ulp (the float32 math may round apart)."""
    import umup_compile as uc
    from umup_compile.optim import Adam

    def build(compile_: object) -> tuple[list[torch.nn.Parameter], Adam]:
        g = torch.Generator().manual_seed(1)
        params = [
            uc.Parameter(torch.randn(shape, generator=g).bfloat16(), "weight")
            for shape in [(64, 96), (96, 64)]
        ]
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).bfloat16()
        opt = Adam(
            params,
            lr=0.01,
            state_dtype=torch.float32,
            stochastic_rounding=True,
            compile=compile_,  # type: ignore[arg-type]
        )
        return params, opt

    params, opt = build("strict")
    ref_params, ref = build(False)
    with inductor_config.patch(force_disable_caches=True):
        opt.step()  # creates the state (eager), then the compiled steps
        _, code = run_and_get_code(opt.step)
    ref.step()
    ref.step()
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p.float(), q.float(), rtol=2**-7, atol=0)
    source = "\n".join(code)
    # The pack's rows: some loop steps by bf16's width.
    assert f"+=static_cast<int64_t>({_lanes(torch.bfloat16)}L)" in source
    assert "std::memcpy(&out" in source


def test_persistent_block_reductions_are_scoped() -> None:
    """Note [persistent block reductions]: Inductor's persistent-reduction choice is
    wrapped once, acts on rows up to an 8-bit block only under the hints."""
    from torch._inductor.choices import InductorChoices

    from umup_compile import _quant

    assert _codegen_hints.PERSISTENT_MAX == _quant.BLOCK
    with codegen_hints:
        pass
    wrapped = InductorChoices.should_use_persistent_reduction
    assert hasattr(wrapped, "__wrapped__")
    _codegen_hints._install_persistent()  # again: not wrapped twice
    assert InductorChoices.should_use_persistent_reduction is wrapped

    class Features:
        reduction_numel = 128

    with torch._inductor.virtualized.V.set_graph_handler(  # type: ignore[attr-defined]
        types.SimpleNamespace(
            sizevars=types.SimpleNamespace(statically_known_leq=lambda a, b: a <= b)
        )
    ):
        with codegen_hints:
            assert wrapped(Features(), False) is True
