"""Inductor CPU code hints (Note [bf16 tiling], Note [vector bitcast], Note [row
prefetch]): the generated C++ changes, the values do not, and only the engine's own
compiles are affected."""

from __future__ import annotations

import re
import types
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor
from torch._inductor import config as inductor_config
from torch._inductor.utils import run_and_get_code

from tests.edge_helpers import assert_engines_agree
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


def test_hints_are_in_the_fx_graph_cache_key() -> None:
    """Note [hints in the cache key]: the engine's Inductor options carry a pass whose
    uuid is the hints' source, and another uuid misses the FX graph cache."""
    import hashlib
    from pathlib import Path

    from torch._dynamo.utils import counters
    from torch._inductor.utils import fresh_inductor_cache

    from umup_compile import _engine

    key = _codegen_hints.cache_key_pass()
    source = Path(_codegen_hints.__file__).read_bytes()
    assert key is not None and key.uuid() == hashlib.sha256(source).hexdigest()
    backend = _engine._backend("inductor", dynamic=False)
    if "post_grad_custom_post_pass" not in backend.config:
        # torch 2.6's compile options keep no Optional-typed value (its
        # apply_options assigns inside the type check); later torch keeps them.
        assert torch.__version__ < (2, 7)
        pytest.skip("this torch drops Optional-typed compile options")
    assert backend.config["post_grad_custom_post_pass"] is key

    other = type(key)()
    other.uuid = lambda: "another version of the hints"  # type: ignore[method-assign]

    def compile_once(pass_: object) -> dict[str, int]:
        fn = torch.compile(
            _fresh(lambda x: x * 2 + 1),
            backend="inductor",
            options={"post_grad_custom_post_pass": pass_},
        )
        counters.clear()
        fn(torch.ones(8))
        return dict(counters["inductor"])

    with fresh_inductor_cache(), inductor_config.patch(fx_graph_cache=True):
        assert compile_once(key).get("fxgraph_cache_miss") == 1
        assert compile_once(key).get("fxgraph_cache_hit") == 1
        assert compile_once(other).get("fxgraph_cache_miss") == 1


def test_a_users_own_post_grad_pass_is_kept() -> None:
    from umup_compile import _engine

    with inductor_config.patch(post_grad_custom_post_pass=lambda graph: None):
        options = _engine._backend("inductor", False).config
    assert "post_grad_custom_post_pass" not in options


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
    assert not _scalar_fallbacks(source)
    # Note [vectorised rounding]: a NaN is found by one float compare, not by an
    # integer mask that then costs two more blends (stochastic rounding took 1.23x
    # the step without it on the 13.6M-parameter set, 1.16x with the compare).
    assert "VecMask<int32_t" not in source


def _scalar_fallbacks(source: str) -> list[str]:
    """Where a vector loop of the generated C++ spills a float vector to memory and
    works on its lanes one by one (Inductor's fallback for an op it cannot vectorise,
    e.g. ``isnan``); the prologue's int64 gathers are not counted."""
    return re.findall(r"std::array<(?:float|bool), \d+> tmpbuf\w*", source)


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_float32_step_keeps_its_update_loops_vectorised(name: str) -> None:
    """The float32 step's C++ works on whole vectors: a guard of the second moment
    by ``nan_to_num_`` (since gone, Note [second moment as torch's]) compiled to a
    scalar ``isnan`` per lane, and the GPT-like step took 2.3x as long (50 ms against
    torch fused's 22 ms, 1 thread)."""
    from umup_compile.optim import Adam, AdamW

    g = torch.Generator().manual_seed(2)
    params = [torch.nn.Parameter(torch.randn(64, 96, generator=g)) for _ in range(2)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    cls = Adam if name == "adam" else AdamW
    opt = cls(params, lr=0.01, allow_non_unit_scaling_params=True, compile="strict")
    with inductor_config.patch(force_disable_caches=True):
        opt.step()  # creates the state (eager), then the compiled steps
        _, code = run_and_get_code(opt.step)
    source = "\n".join(code)
    assert f"+=static_cast<int64_t>({_lanes(torch.float32)}L)" in source
    assert not _scalar_fallbacks(source)


def _wrapped_once(owner: type, name: str, install: Callable[[], None]) -> Any:
    """``owner.name`` after the hints are first entered: wrapped (``__wrapped__``),
    and not again by a second ``install``."""
    with codegen_hints:
        pass
    wrapped = getattr(owner, name)
    assert hasattr(wrapped, "__wrapped__")
    install()  # again: not wrapped twice
    assert getattr(owner, name) is wrapped
    return wrapped


def test_persistent_block_reductions_are_scoped() -> None:
    """Note [persistent block reductions]: Inductor's persistent-reduction choice is
    wrapped once, acts on rows up to an 8-bit block only under the hints."""
    from torch._inductor.choices import InductorChoices

    from umup_compile import _quant

    assert _codegen_hints.PERSISTENT_MAX == _quant.BLOCK
    wrapped = _wrapped_once(
        InductorChoices,
        "should_use_persistent_reduction",
        _codegen_hints._install_persistent,
    )

    class Features:
        reduction_numel = 128

    with torch._inductor.virtualized.V.set_graph_handler(  # type: ignore[attr-defined]
        types.SimpleNamespace(
            sizevars=types.SimpleNamespace(statically_known_leq=lambda a, b: a <= b)
        )
    ):
        with codegen_hints:
            assert wrapped(Features(), False) is True


# Note [row prefetch]: a block loop as Inductor writes it for the 8-bit update (float
# rows of 128 and int8 code rows of 128, stepping x1 by 16 lanes).
_LOOP = "for(int64_t x0=static_cast<int64_t>(0L); x0<static_cast<int64_t>(1024L); x0+=static_cast<int64_t>(1L))"  # noqa: E501
_INNER = "for(int64_t x1=static_cast<int64_t>(0L); x1<static_cast<int64_t>(128L); x1+=static_cast<int64_t>(16L))"  # noqa: E501


def _kernel(code_type: str) -> str:
    return "\n".join(
        [
            f'extern "C" void kernel(const float* in_ptr0, const {code_type}* in_ptr1,',
            "                       float* out_ptr0)",
            "{",
            "    {",
            "        #pragma GCC ivdep",
            f"        {_LOOP}",
            "        {",
            f"            {_INNER}",
            "            {",
            "                auto tmp0 = at::vec::Vectorized<float>::loadu(in_ptr0 + "
            "static_cast<int64_t>(x1 + 128L*x0), static_cast<int64_t>(16));",
            f"                auto tmp1 = at::vec::Vectorized<{code_type}>::loadu("
            "in_ptr1 + static_cast<int64_t>(x1 + 128L*x0), static_cast<int64_t>(16));",
            "                tmp0.store(out_ptr0 + static_cast<int64_t>(x1 + 128L*x0));",
            "            }",
            "        }",
            "    }",
            "}",
        ]
    )


def test_prefetch_rows_prefetches_each_row_of_an_8bit_block_loop() -> None:
    source = _kernel("int8_t")
    got = _codegen_hints.prefetch_rows(source).split("\n")
    lines = source.split("\n")
    start = lines.index(f"        {_LOOP}") + 2  # after the loop's "{"
    assert got[:start] == lines[:start] and got[start + 10 :] == lines[start:]
    # The widest row is 128 floats (512 B): 2048 B ahead is 4 blocks; one prefetch
    # per 64-byte line of each row the loop loads (8 for the floats, 2 for the codes).
    ahead = _codegen_hints.PREFETCH_BYTES // 512
    want = [f"in_ptr0 + 128L*(x0 + {ahead}) + {k}" for k in range(0, 128, 16)]
    want += [f"in_ptr1 + 128L*(x0 + {ahead}) + {k}" for k in (0, 64)]
    assert got[start : start + 10] == [
        f"            __builtin_prefetch({w});" for w in want
    ]


@pytest.mark.parametrize(
    "source",
    [
        _kernel("float"),  # no 8-bit row: not the 8-bit update's loop
        _kernel("mystery_t"),  # a row of unknown size: leave the loop alone
        _kernel("int8_t").replace(
            "x0+=static_cast<int64_t>(1L)", "x0+=static_cast<int64_t>(16L)"
        ),  # noqa: E501
        "void kernel(float* out_ptr0) { out_ptr0[0] = 1.0f; }",
        "",
    ],
    ids=["float-rows", "unknown-type", "vector-outer-loop", "other", "empty"],
)
def test_prefetch_rows_leaves_other_kernels_unchanged(source: str) -> None:
    assert _codegen_hints.prefetch_rows(source) == source


def _adam8_run(
    mode: str, monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype = torch.float32
) -> tuple[list[Tensor], str]:
    """3 steps of the 8-bit update from a random state, called as the engine calls
    it (``(blocks, 128)`` rows), parameters and gradients in ``dtype``: ``eager``,
    or compiled under the hints with (``prefetch``) or without (``plain``) Note [row
    prefetch]'s prefetches."""
    from umup_compile._functional import ADAM_HYPERS, AdamConfig
    from umup_compile._quant import quantize_
    from umup_compile._quant_step import adam8_step_

    g = torch.Generator().manual_seed(2)
    params = [torch.randn(rows, 128, generator=g).to(dtype) for rows in (6, 3)]
    grads = [(torch.randn(p.shape, generator=g) * 0.1).to(dtype) for p in params]
    m = [torch.empty_like(p, dtype=torch.int8) for p in params]
    v = [torch.empty_like(p, dtype=torch.uint8) for p in params]
    s = [torch.empty(p.shape[0], 2) for p in params]
    for k, p in enumerate(params):
        quantize_(torch.randn(p.shape, generator=g) * 1e-2, m[k], s[k][:, :1],
                  signed=True)  # fmt: skip
        quantize_(torch.rand(p.shape, generator=g) * 1e-4, v[k], s[k][:, 1:],
                  signed=False)  # fmt: skip
    hypers = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8}
    hyper_t = torch.tensor([[hypers.get(k, 0.01) for k in ADAM_HYPERS]]).double()
    n = len(params)
    args = (params, grads, m, v, s, [torch.full((1,), 3.0) for _ in params], hyper_t,
            torch.zeros(n, dtype=torch.int64), torch.ones(n).double(),
            torch.ones(n).double())  # fmt: skip
    config = AdamConfig(weight_decay="decoupled")
    state = [*params, *m, *v, *s]
    if mode == "eager":
        for _ in range(3):
            adam8_step_(*args, config=config)
        return state, ""
    if mode == "plain":
        monkeypatch.setattr(_codegen_hints, "prefetch_rows", lambda source: source)
    fresh = _fresh(adam8_step_)
    fresh.__kwdefaults__ = adam8_step_.__kwdefaults__
    fn = torch.compile(fresh, backend="inductor", fullgraph=True)
    with inductor_config.patch(force_disable_caches=True), codegen_hints:
        _, code = run_and_get_code(fn, *args, config=config)
        for _ in range(2):
            fn(*args, config=config)
    return state, "\n".join(code)


def test_prefetch_changes_no_value_of_the_8bit_update(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Compiled with the prefetches, without them, and eager: the same bits
    (parameters, codes, scales), and only the hinted kernels prefetch."""
    eager, _ = _adam8_run("eager", monkeypatch)
    hinted, code = _adam8_run("prefetch", monkeypatch)
    plain, plain_code = _adam8_run("plain", monkeypatch)
    assert "__builtin_prefetch(" in code
    assert "__builtin_prefetch(" not in plain_code
    for a, b, c in zip(eager, hinted, plain):
        assert torch.equal(b, c)  # the prefetches change no bit
        assert_engines_agree(a, b)


def test_8bit_kernels_keep_float32_lanes_with_bf16_parameters(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Note [bf16 tiling]: the 8-bit update of bf16 parameters is not tiled for bf16
    (its code conversions would leave the registers), and its values are eager's."""
    fp32, bf16 = _lanes(torch.float32), _lanes(torch.bfloat16)
    eager, _ = _adam8_run("eager", monkeypatch, torch.bfloat16)
    hinted, code = _adam8_run("prefetch", monkeypatch, torch.bfloat16)
    assert f"x1+=static_cast<int64_t>({fp32}L)" in code
    assert f"x1+=static_cast<int64_t>({bf16}L)" not in code
    for a, b in zip(eager, hinted):
        assert a.dtype == b.dtype and torch.equal(a, b)


# Note [flat combo dispatch]: the member chains Inductor writes (sequential, its
# flattened-grid variant, round robin), as the body of a Python function of ``pid``
# listing the members it runs (a kernel does not return early: every chain is tested).
def _chain(dispatch: str, sizes: list[int]) -> str:
    n = len(sizes)
    name = "num_blocks" if dispatch == "flattened grid" else "num_xblocks"
    lines = []
    if dispatch != "round robin":
        lines.append(f"{name}_0 = {sizes[0]}")
        lines += [f"{name}_{k} = {name}_{k - 1} + {sizes[k]}" for k in range(1, n)]
    for k in range(n):
        word = "elif" if k else "if"
        test = f"pid % {n} == {k}" if dispatch == "round robin" else f"pid < {name}_{k}"
        lines += [f"{word} {test}:", f"    ran.append({k})"]
    return "\n".join([*lines, "else:", "    pass"])


def _picker(source: str) -> Any:
    body = "".join(f"    {line}\n" for line in source.splitlines())
    namespace: dict[str, Any] = {}
    exec(f"def pick(pid):\n    ran = []\n{body}    return ran\n", namespace)
    return namespace["pick"]


def _longest_chain(source: str) -> int:
    longest = run = 0
    for line in source.splitlines():
        if line.startswith("if "):
            run = 1
        elif line.startswith("elif "):
            run += 1
        longest = max(longest, run)
    return longest


@pytest.mark.parametrize("chain", [1, 2, _codegen_hints.DISPATCH_CHAIN])
@pytest.mark.parametrize("dispatch", ["sequential", "flattened grid", "round robin"])
def test_flat_dispatch_runs_each_program_on_the_member_it_ran(
    dispatch: str, chain: int
) -> None:
    sizes = [3, 1, 4, 1, 5, 9, 2, 6, 5]
    nested = _chain(dispatch, sizes)
    flat = _codegen_hints.flat_dispatch(nested, chain)
    assert _longest_chain(nested) == len(sizes) and _longest_chain(flat) == chain
    assert len(flat.splitlines()) == len(nested.splitlines())  # conditions only
    before, after = _picker(nested), _picker(flat)
    pids = range(sum(sizes) + 3)
    assert [after(pid) for pid in pids] == [before(pid) for pid in pids]
    assert {k for pid in pids for k in before(pid)} == set(range(len(sizes)))
    assert all(len(before(pid)) <= 1 for pid in pids)


def test_flat_dispatch_leaves_other_text_alone() -> None:
    text = "if x < 3:\n    y = 1\nelif x < 4:\n    y = 2\nelif pid < n:\n    pass"
    assert _codegen_hints.flat_dispatch(text, 1) == text


def test_flat_dispatch_is_scoped(monkeypatch: pytest.MonkeyPatch) -> None:
    """``ComboKernel.codegen_kernel`` is wrapped once and flattens only under the
    hints (the user's own combo kernels keep Inductor's chain)."""
    from torch._inductor.codegen.triton_combo_kernel import ComboKernel

    wrapped = _wrapped_once(
        ComboKernel, "codegen_kernel", _codegen_hints._install_flat_dispatch
    )
    nested = _chain("sequential", [2] * 9)
    monkeypatch.setattr(wrapped, "__wrapped__", lambda self: nested)
    assert wrapped(None) == nested
    with codegen_hints:
        assert wrapped(None) == _codegen_hints.flat_dispatch(nested) != nested


def test_hints_are_open_in_the_entering_thread_only() -> None:
    # Inductor generates code in the compiling thread; another thread's compile (the
    # user's own model) must not get the optimizer's hints. The depth was a global.
    import threading

    seen: list[bool] = []
    with codegen_hints:
        assert _codegen_hints.active() or not _codegen_hints._installed
        worker = threading.Thread(target=lambda: seen.append(_codegen_hints.active()))
        worker.start()
        worker.join()
    assert seen == [False]
