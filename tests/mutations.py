"""The differential harness of ``test_mutations``: one optimizer four ways, stepped
side by side while a scenario mutates parameters, gradients and state between steps.

The four *variants* get the same parameters, gradients and mutations:

- ``direct``: the compiled engine, steady steps as direct calls (Note [direct calls]);
- ``dynamo``: the same compiled callables, every call through Dynamo (no sites);
- ``eager``: ``compile=False``;
- ``torch``: ``torch.optim`` on the same untagged parameters (where it accepts the
  scenario with the same semantics).

The compiled variants share one engine, so its graphs are compiled once for all
scenarios. Its backend (:func:`checked_backend`) wraps another one and asserts, at
every call, that each tensor input is what the graph was built for: dtype, device,
static sizes and strides, negative and conjugate bits, and which mutated inputs share
storage (Note [what a graph reads]). A fast path that hands a graph a tensor it was
not built for fails here even where the inner backend would compute the right numbers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from umup_compile._engine import CompiledEngine
from umup_compile.optim import SGD, Adam, AdamW

# A pack (small), two static-size chunks of 256 and 240 elements (large): with
# ``layout="chunks"``; one unrolled unit plus the pack: ``layout="unrolled"``.
SHAPES: tuple[tuple[int, ...], ...] = (
    (16, 16),
    (16, 16),
    (12, 20),
    (8, 8),
    (10,),
    (7, 3),
)
VARIANTS = ("direct", "dynamo", "eager", "torch")
TORCH_CLASSES = {Adam: torch.optim.Adam, AdamW: torch.optim.AdamW, SGD: torch.optim.SGD}
TOL = {"rtol": 1e-5, "atol": 1e-6}


def _meta(t: Tensor) -> tuple[Any, ...]:
    static = lambda xs: tuple(x if isinstance(x, int) else None for x in xs)  # noqa: E731
    return (
        t.dtype,
        t.device.type,
        static(t.shape),
        static(t.stride()),
        t.is_neg(),
        t.is_conj(),
    )


def _span(t: Tensor) -> tuple[int, int]:
    """The bytes ``t`` covers: ``[start, end)``."""
    if t.numel() == 0:
        return (0, 0)
    extent = sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride())) + 1
    start = t.data_ptr()
    return (start, start + extent * t.element_size())


def _overlaps(tensors: Sequence[Any], written: set[int]) -> set[tuple[int, int]]:
    """Pairs (written input, other input) whose memory overlaps."""
    spans = [_span(t) if isinstance(t, Tensor) else (0, 0) for t in tensors]
    return {
        (k, j)
        for k in written
        for j, (a, b) in enumerate(spans)
        if j != k and a < spans[k][1] and spans[k][0] < b
    }


def _mutated_inputs(gm: torch.fx.GraphModule) -> set[int]:
    """The placeholders an in-place op of the graph writes (its first argument)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    at = {n: k for k, n in enumerate(placeholders)}
    out: set[int] = set()
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method") or not node.args:
            continue
        name = (
            node.target
            if isinstance(node.target, str)
            else getattr(node.target, "__name__", "")
        )
        if not name.endswith("_") or name.endswith("__"):
            continue
        first = node.args[0]
        for arg in first if isinstance(first, (list, tuple)) else (first,):
            if arg in at:
                out.add(at[arg])
    return out


def checked_backend(inner: Any = "aot_eager") -> Callable[..., Any]:
    """A backend that runs ``inner`` and asserts that every call's tensor inputs
    match what the graph was built for (and that the inputs it writes overlap the
    same inputs in memory as then: none, unless they did)."""
    inner_fn = torch._dynamo.lookup_backend(inner) if isinstance(inner, str) else inner

    def backend(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> Any:
        compiled = inner_fn(gm, example_inputs)
        # The placeholders' fake values carry the graph's symbolic sizes; the
        # example inputs are the real tensors of the compiling call.
        fakes = [
            n.meta.get("example_value") for n in gm.graph.nodes if n.op == "placeholder"
        ]
        metas = [_meta(t) if isinstance(t, Tensor) else None for t in fakes]
        written = _mutated_inputs(gm)
        overlaps = _overlaps(example_inputs, written)

        def run(*args: Any) -> Any:
            for k, (t, meta) in enumerate(zip(args, metas)):
                if meta is None:
                    continue
                got = _meta(t)
                same = (
                    got[:2] == meta[:2]
                    and got[4:] == meta[4:]
                    and all(
                        e is None or g == e
                        for want, have in ((meta[2], got[2]), (meta[3], got[3]))
                        for e, g in zip(want, have)
                    )
                )
                assert same, f"graph input {k} is {got}, built for {meta}"
            now = _overlaps(args, written)
            assert now == overlaps, (
                f"written inputs overlap {now}, built for {overlaps}"
            )
            return compiled(*args)

        return run

    return backend


class NoSites:
    """``engine`` with every call through Dynamo (the reference path)."""

    packs = True

    def __init__(self, engine: CompiledEngine) -> None:
        self.engine = engine

    def __call__(
        self,
        fn: Any,
        args: Any,
        kwargs: Any,
        kind: str = "",
        static: bool = False,
        site: Any = None,
    ) -> None:
        self.engine(fn, args, kwargs, kind, static, None)


@dataclass
class Variant:
    """One way of running the optimizer, with its parameters and GradScaler."""

    name: str
    params: list[nn.Parameter]
    opt: torch.optim.Optimizer
    scaler: Any = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ours(self) -> bool:
        return self.name != "torch"


def make_variants(
    cls: type,
    kwargs: dict[str, Any],
    engine: CompiledEngine,
    *,
    shapes: Sequence[tuple[int, ...]] = SHAPES,
    names: Sequence[str] = VARIANTS,
    prepare: Callable[[list[nn.Parameter]], None] | None = None,
) -> list[Variant]:
    """The variants of ``cls(**kwargs)`` over equal copies of fresh parameters
    (``prepare`` edits each copy before the optimizer is built)."""
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(s, generator=gen) for s in shapes]
    out = []
    for name in names:
        params = [nn.Parameter(b.clone()) for b in base]
        # each variant its own tensor hyper-parameters (a scenario may rebind them)
        kwargs = {
            k: x.clone() if isinstance(x, Tensor) else x for k, x in kwargs.items()
        }
        if prepare is not None:
            prepare(params)
        if name == "torch":
            clip = {k: v for k, v in kwargs.items() if k != "max_grad_norm"}
            opt = TORCH_CLASSES[cls](params, **clip)
        else:
            opt = cls(  # torch's weight decay: parity with torch.optim
                params,
                allow_non_unit_scaling_params=True,
                independent_weight_decay=False,
                compile=name != "eager",
                **kwargs,
            )
            if name == "direct":
                opt._engine = engine  # type: ignore[attr-defined]
            elif name == "dynamo":
                opt._engine = NoSites(engine)  # type: ignore[attr-defined]
        out.append(Variant(name, params, opt))
    return out


def grads_for(step: int, params: Sequence[Tensor]) -> list[Tensor]:
    """The step's gradients (the same for every variant)."""
    gen = torch.Generator().manual_seed(100 + step)
    return [
        torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype)
        for p in params
    ]


def assert_variants_agree(
    variants: Sequence[Variant], step: int, with_torch: bool
) -> None:
    """Parameters and every state tensor of each variant equal the eager one's."""
    (ref,) = [v for v in variants if v.name == "eager"]
    for v in variants:
        if v is ref or (v.name == "torch" and not with_torch):
            continue
        for k, (p, q) in enumerate(zip(v.params, ref.params)):
            where = f"step {step}, {v.name} vs eager, param {k}"
            torch.testing.assert_close(
                p.double(),
                q.double(),
                **TOL,
                msg=lambda m, where=where: f"{where}: {m}",
            )
            sv, sr = v.opt.state.get(p, {}), ref.opt.state.get(q, {})
            assert set(sv) == set(sr), (where, sorted(sv), sorted(sr))
            for key in sr:
                a, b = torch.as_tensor(sv[key]), torch.as_tensor(sr[key])
                if b.dtype in (torch.int8, torch.uint8):
                    _assert_codes_close(a, b, f"{where}, state {key}")
                    continue
                torch.testing.assert_close(
                    a.double().cpu(),
                    b.double().cpu(),
                    **TOL,
                    msg=lambda m, key=key, where=where: f"{where}, state {key}: {m}",
                )


def _assert_codes_close(a: Tensor, b: Tensor, where: str) -> None:
    """8-bit codes: the same dtype, and equal but for a neighbouring code where a
    value rounded in the last bit (e.g. by a clip divisor computed in another
    order) lies at a rounding boundary: at most 1 % of them."""
    assert a.dtype == b.dtype, (where, a.dtype, b.dtype)
    diff = (a.to(torch.int16) - b.to(torch.int16)).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) <= 0.01, (
        f"{where}: {int((diff > 0).sum())} codes differ, by up to {int(diff.max())}"
    )


Mutation = Callable[[int, Variant], None]


@dataclass(frozen=True)
class Scenario:
    """Mutations between steps: ``mutate(step, variant)`` after the step's
    gradients are set, then ``step(step, variant)`` (default ``opt.step()``)."""

    mutate: Mutation = lambda s, v: None
    step: Callable[[int, Variant], None] | None = None
    cls: type = Adam
    kwargs: dict[str, Any] = field(default_factory=lambda: {"lr": 0.01})
    layout: str = "chunks"
    shapes: tuple[tuple[int, ...], ...] = SHAPES
    torch_oracle: bool = True  # torch.optim accepts it with the same semantics
    prepare: Callable[[list[nn.Parameter]], None] | None = None
    steps: int = 6


def run_scenario(
    scenario: Scenario, engine: CompiledEngine, names: Sequence[str] = VARIANTS
) -> list[Variant]:
    """Step every variant through ``scenario``, comparing them after every step."""
    names = [n for n in names if n != "torch" or scenario.torch_oracle]
    variants = make_variants(
        scenario.cls,
        scenario.kwargs,
        engine,
        shapes=scenario.shapes,
        names=names,
        prepare=scenario.prepare,
    )
    for s in range(scenario.steps):
        for v in variants:
            for p, g in zip(v.params, grads_for(s, v.params)):
                p.grad = g
            scenario.mutate(s, v)
            if scenario.step is not None:
                scenario.step(s, v)
            else:
                v.opt.step()
        assert_variants_agree(variants, s, scenario.torch_oracle)
    return variants


# -- mutation builders ------------------------------------------------------------


def at(steps: int | Sequence[int], fn: Mutation) -> Mutation:
    """``fn`` at the given step(s) only."""
    wanted = {steps} if isinstance(steps, int) else set(steps)
    return lambda s, v: fn(s, v) if s in wanted else None


def each(*fns: Mutation) -> Mutation:
    def mutate(s: int, v: Variant) -> None:
        for fn in fns:
            fn(s, v)

    return mutate


def rebind_state(k: int, key: str, fn: Callable[[Tensor], Tensor]) -> Mutation:
    """``opt.state[params[k]][key].data = fn(...)`` (no-op before the state exists)."""

    def mutate(s: int, v: Variant) -> None:
        t = v.opt.state.get(v.params[k], {}).get(key)
        if t is not None:
            t.data = fn(t.data)

    return mutate


def replace_state(k: int, key: str, fn: Callable[[Tensor], Any]) -> Mutation:
    """``opt.state[params[k]][key] = fn(...)``: a new object in the state dict
    (no-op before the state exists)."""

    def mutate(s: int, v: Variant) -> None:
        state = v.opt.state.get(v.params[k], {})
        if key in state:
            state[key] = fn(state[key])

    return mutate


def rebind_param(k: int, fn: Callable[[Tensor], Tensor]) -> Mutation:
    def mutate(s: int, v: Variant) -> None:
        v.params[k].data = fn(v.params[k].data)

    return mutate


def edit_grad(k: int, fn: Callable[[Tensor], Tensor]) -> Mutation:
    """``params[k].grad = fn(...)`` (no-op where an earlier mutation removed it)."""

    def mutate(s: int, v: Variant) -> None:
        grad = v.params[k].grad
        if grad is not None:
            v.params[k].grad = fn(grad)

    return mutate


def transposed(t: Tensor) -> Tensor:
    """The same values in transposed memory (1-D: unchanged)."""
    return t.t().contiguous().t() if t.ndim == 2 else t


def neg_bit(t: Tensor) -> Tensor:
    """The same values as a lazy negation (``z.conj().imag``): the negative bit set."""
    z = torch.complex(torch.zeros_like(t), -t)
    out = z.conj().imag
    assert out.is_neg()
    return out


def at_offset(t: Tensor) -> Tensor:
    """The same values at storage offset 5 of a larger buffer."""
    buf = torch.zeros(t.numel() + 5, dtype=t.dtype)
    buf[5:] = t.reshape(-1)
    return buf[5:].view(t.shape)


@contextlib.contextmanager
def layout(name: str) -> Iterator[None]:
    """Layout thresholds for the toy shapes (see :data:`SHAPES`); 8-bit moments
    from 60 elements."""
    from umup_compile import _layout, _state8

    saved = {
        k: getattr(_layout, k)
        for k in ("PACK_MAX_NUMEL", "UNROLL_MAX", "FOLD_SMALL_MAX")
    }
    min_numel = _state8.MIN_NUMEL
    # 8-bit moments (state_dtype=torch.int8) for the 16x16, 12x20 and 8x8 shapes
    _state8.MIN_NUMEL = 60
    try:
        if name in ("chunks", "unrolled"):
            _layout.PACK_MAX_NUMEL = 100
        if name == "chunks":
            _layout.UNROLL_MAX = 0
        if name == "unrolled":
            _layout.FOLD_SMALL_MAX = 0
        yield
    finally:
        _state8.MIN_NUMEL = min_numel
        for k, value in saved.items():
            setattr(_layout, k, value)
