"""Engines that run a functional update: eager, or compiled once per static config.

``torch.compile`` appears only in :func:`_compile`. A compiled engine keeps one compiled
callable per (function, config, kind); hyper-parameters are tensors, so schedules never
recompile, and the tensors of a dynamic-shape call (pack rows, flat chunks, factor
vectors, see ``_pack``) have a dynamic first dimension, so new sizes never recompile
either. Fallbacks are chosen
in one place, :func:`choose_engine`, and announced once.
"""

from __future__ import annotations

import functools
import inspect
import types
import warnings
from collections.abc import Callable, Hashable, Iterable
from typing import Any, Protocol

import torch
import torch.fx.experimental._config as fx_config

from ._codegen_hints import cache_key_pass, codegen_hints
from ._direct import Capture, Site

StepFn = Callable[..., None]


class Engine(Protocol):
    """Runs a functional update; ``packs`` says whether it wants ``_pack`` layouts."""

    packs: bool

    def __call__(
        self,
        fn: StepFn,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        kind: str = "",
        static: bool = False,
        site: Site | None = None,
    ) -> None: ...


class EagerEngine:
    """Runs ``fn`` directly over the per-parameter lists (no layouts, no copies)."""

    packs = False

    def __call__(
        self,
        fn: StepFn,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        kind: str = "",
        static: bool = False,
        site: Site | None = None,
    ) -> None:
        fn(*args, **kwargs)


run_eager = EagerEngine()


def _bind_config(fn: StepFn, config: Hashable) -> StepFn:
    """A copy of ``fn`` with its own code object and ``config`` as a bound default.

    Dynamo keeps its cache and its recompile limit per code object (a
    ``functools.partial`` would share one wrapper for all). With a private copy, each
    (optimizer, config) has its own, so one optimizer's shapes never evict or exhaust
    another's, and ``config`` is a constant of the graph.
    """
    if not isinstance(fn, types.FunctionType):
        raise TypeError(f"expected a plain function to compile, got {fn!r}")
    bound = types.FunctionType(
        fn.__code__.replace(),
        fn.__globals__,
        fn.__name__,
        fn.__defaults__,
        fn.__closure__,
    )
    bound.__kwdefaults__ = {**(fn.__kwdefaults__ or {}), "config": config}
    bound.__qualname__ = fn.__qualname__
    return bound


@functools.cache
def _combo_kernels() -> dict[str, Any]:
    """Note [combo kernels]: on a GPU, Inductor writes one Triton kernel per parameter
    of a unit (their shapes differ), each its own launch: the GPT-like set's unrolled
    unit made 53 launches a step, torch's fused Adam 2. Combo kernels put many of them
    in one launch (a range of program ids per member): 6 launches, the same bytes, and
    2 with Notes [combo kernel arguments] and [stacked counters] (lowered for sm_90
    without a GPU by ``benchmarks/gpu_codegen.py``, their numbers checked against
    eager in Triton's interpreter). Inductor groups GPU nodes only, so
    CPU code is unchanged. Options this torch lacks are left out, and all of them
    where Inductor would group CPU nodes too (torch 2.6: its C++ backend then asserts,
    and the 8-bit update's graphs fell back to eager)."""
    import torch._inductor.config as inductor_config

    if not _combo_skips_cpu():
        return {}

    wanted: dict[str, Any] = {
        "combo_kernels": True,
        "combo_kernel_allow_mixed_sizes": 2,  # members of any size together
        "combo_kernel_max_num_nodes": COMBO_MAX_NODES,
        "combo_kernel_peak_memory_pct_threshold": None,  # in place: no peak to guard
    }
    if cuda_driver_version() >= WIDE_ARGS_DRIVER:
        wanted["combo_kernel_max_num_args"] = WIDE_COMBO_ARGS
    return {k: v for k, v in wanted.items() if hasattr(inductor_config, k)}


# Note [combo kernel arguments]: Inductor caps a combo kernel at 250 buffer arguments
# (2 KB of pointers), within the 4 KB of parameters any CUDA driver takes; the
# GPT-like set's update then took 4 combo kernels. A driver from CUDA 12.1 on (530)
# takes 32 KB on Volta and later, which torch's multi-tensor apply uses when the
# driver says so, at run time; so do we: 1024, and the GPT-like set's update is one
# kernel, a step 2 launches as torch fused's (lowered for sm_90 without a GPU,
# ``benchmarks/gpu_codegen.py``). Inductor counts a member's reads and writes against
# the cap, each index of a buffer once (an Adam member: ~19 for its 7 pointers), so
# the count bounds the pointers from above (8 KB) and 1024 holds ~53 Adam members.
# Triton launches through the driver, so its version decides, not the CUDA runtime
# torch was built with.
# Inductor dispatches a combo kernel's members by an if/elif chain on the program
# id, which Triton's code generator walks recursively, ~6 frames a member (Triton
# 3.9): 160 members exceeded Python's default limit of 1000 and the compile fell back
# to eager. Under the hints it is cut into chains of 4 (Note [flat combo dispatch] in
# ``_codegen_hints``: 256 members build), and big kernels build in a third of the
# time; at most 64 members a kernel (the unrolled unit's most, UNROLL_WITH_SMALL_MAX)
# keeps the chain buildable where torch lacks the hint's hook.
# Compile time still grows faster than the members: Triton's TritonGPUCoalesce pass
# slices the whole kernel for every load and store (``MLIR_ENABLE_TIMING=1``). sm_90,
# one config, one core of this 2-core CPU, as Inductor chains them: 11 members 0.6 s,
# 51 14 s, 64 25 s, 75 38 s; in chains of 4: 53 6 s, 75 12 s. Fewer launches by bigger
# kernels are paid for in first-step compile time (Inductor's caches keep it for
# later runs): Note [unrolled unit on a GPU] in ``_layout``. At 32 members the
# GPT-like update would take one launch more (3 against torch fused's 2) and its
# slowest build 4 s instead of 14 (``benchmarks/results/paper-sm90``, experiments).
WIDE_ARGS_DRIVER = 12010
WIDE_COMBO_ARGS = 1024
COMBO_MAX_NODES = 64


@functools.cache
def cuda_driver_version() -> int:
    """The CUDA driver's version (12010 for 12.1); 0 without one (and on ROCm)."""
    if torch.version.hip is not None:
        return 0
    import ctypes

    for name in ("libcuda.so.1", "nvcuda.dll"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        version = ctypes.c_int(0)
        if lib.cuDriverGetVersion(ctypes.byref(version)) == 0:
            return int(version.value)
    return 0


def _combo_skips_cpu() -> bool:
    """Whether Inductor leaves CPU nodes out of combo kernels (read from its grouping
    function's source: no flag says so)."""
    try:
        from torch._inductor.scheduler import ForeachKernelSchedulerNode

        group = ForeachKernelSchedulerNode._default_group_nodes_for_combo_kernels
        source = inspect.getsource(group)
    except (ImportError, AttributeError, OSError, TypeError):
        return False
    return '"cpu"' in source


def _backend(backend: Any, dynamic: bool) -> Any:
    """``backend`` as a callable: Inductor with its per-input size/stride asserts
    dropped (the guards, or a site's checks, already cover every input, and the
    asserts cost ~2 µs per tensor per step: 3 % of a 33.6M-parameter CPU step, more
    with many small tensors), and combo kernels (Note [combo kernels])."""
    if backend != "inductor":
        return (
            torch._dynamo.lookup_backend(backend)
            if isinstance(backend, str)
            else backend
        )
    wrapper = getattr(torch, "_TorchCompileInductorWrapper", None)
    if wrapper is None:  # pragma: no cover - every supported torch has it
        return torch._dynamo.lookup_backend(backend)
    options = {"size_asserts": False, **_combo_kernels(), **_hints_key()}
    return wrapper(None, options, None if dynamic else False)


def _hints_key() -> dict[str, Any]:
    """Note [hints in the cache key] (``_codegen_hints``), unless the user set a
    post-grad pass of their own (which then keys the cache)."""
    import torch._inductor.config as inductor_config

    found = getattr(inductor_config, "post_grad_custom_post_pass", False)
    key = cache_key_pass()
    if found is not None or key is None:
        return {}
    return {"post_grad_custom_post_pass": key}


def _compile(
    fn: StepFn, config: Hashable, backend: Any, dynamic: bool
) -> tuple[StepFn, Capture]:
    """Compile ``fn`` with its static config bound: one graph per call signature,
    through a :class:`Capture` of the backend (Note [direct calls])."""
    bound = _bind_config(fn, config)
    capture = Capture(_backend(backend, dynamic), bound.__code__)
    compiled = torch.compile(
        bound,
        fullgraph=True,
        dynamic=None if dynamic else False,
        backend=capture,
    )
    return compiled, capture


def _mark_dynamic(args: Iterable[Any]) -> None:
    """Let the first dimension of every tensor of a call vary without recompiling
    (flat chunks, pack rows, per-parameter vectors, hyper-parameter rows).

    ``maybe_mark_dynamic`` tolerates sizes 0 and 1, which stay specialized.
    """
    for arg in args:
        for t in arg if isinstance(arg, list) else (arg,):
            if isinstance(t, torch.Tensor) and t.ndim >= 1:
                torch._dynamo.maybe_mark_dynamic(t, 0)


# Dynamo's markings (torch 2.6 to 2.13); absent names are skipped.
_MARKINGS = (
    "_dynamo_weak_dynamic_indices",
    "_dynamo_dynamic_indices",
    "_has_dynamo_dim_marking",
)


def _unmark_dynamic(args: Iterable[Any]) -> None:
    """Clear the markings a dynamic call left on tensors a static graph also takes
    (the hyper-parameter table): a static graph compiled without them guards on
    their absence, and recompiled at its next call through Dynamo."""
    for arg in args:
        for t in arg if isinstance(arg, list) else (arg,):
            if isinstance(t, torch.Tensor):
                for name in _MARKINGS:
                    if name in t.__dict__:
                        delattr(t, name)


class CompiledEngine:
    """Runs functional updates through ``torch.compile``; falls back to eager once.

    Args:
        strict: raise instead of falling back when compilation fails.
        backend: the ``torch.compile`` backend; tests count graphs with a cheap one.
    """

    packs = True  # the caller lays buckets out in units (see ``_pack``)

    def __init__(self, strict: bool = False, backend: Any = "inductor") -> None:
        self.strict = strict
        self.backend = backend
        self.failed: str | None = None
        self._cache: dict[tuple[StepFn, Hashable, str], tuple[StepFn, Capture]] = {}

    def __call__(
        self,
        fn: StepFn,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        kind: str = "",
        static: bool = False,
        site: Site | None = None,
    ) -> None:
        """Run ``fn(*args, **kwargs)`` compiled.

        The caller never calls it while an outer ``torch.compile`` traces (Note
        [nested compile]: the runner inlines the raw function there).

        Args:
            kind: names the call's graph class (e.g. ``"pack"``, ``"chunk8"``); each
                kind gets its own compiled callable, so Dynamo's recompile limit
                counts variants per kind, not across all of them.
            static: compile with static shapes; otherwise every tensor's first
                dimension is marked dynamic.
            site: the call site's :class:`Site`: a steady call there runs the
                compiled graph directly (Note [direct calls]).
        """
        config = kwargs["config"]
        rest = {k: v for k, v in kwargs.items() if k != "config"}
        if self.failed is not None or torch._C._len_torch_dispatch_stack():
            # Under a dispatch mode (FlopCounterMode, FakeTensorMode...) Dynamo skips
            # the frame, which fullgraph=True reports as a failure: run this call
            # eagerly instead, as Dynamo would without fullgraph, and compile again
            # once the mode is gone.
            fn(*args, **kwargs)
            return
        key = (fn, config, kind)
        entry = self._cache.get(key)
        if entry is None:
            entry = self._cache[key] = _compile(fn, config, self.backend, not static)
        if site is not None and site.run(args, rest):
            return
        compiled, capture = entry
        dynamic = not static
        if dynamic:
            _mark_dynamic((*args, *rest.values()))
        else:
            _unmark_dynamic((*args, *rest.values()))
        capture.last = None
        try:
            # A first call compiles here, under the code hints (Note [bf16 tiling],
            # Note [vector bitcast]). Without duck shaping, equal sizes get no
            # equality guard: the next chunk's different sizes reuse the graph.
            with codegen_hints:
                if dynamic:
                    with fx_config.patch(use_duck_shape=False):  # type: ignore[attr-defined]
                        compiled(*args, **rest)
                else:
                    compiled(*args, **rest)
            if site is not None:
                site.record(capture, fn, args, rest)
        except Exception as e:  # noqa: BLE001 - any backend failure means "cannot compile"
            if self.strict or not _is_compile_failure(e):
                raise
            self.failed = (
                f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            )
            warnings.warn(
                "umup_compile: torch.compile failed, falling back to the eager engine "
                f"(same numbers, slower). Reason: {self.failed}. Pass compile=False to "
                "choose eager silently, or compile='strict' to raise instead.",
                RuntimeWarning,
                stacklevel=3,
            )
            fn(*args, **kwargs)


def _is_compile_failure(e: Exception) -> bool:
    """Whether ``e`` came from Dynamo/Inductor rather than from the update itself."""
    module = type(e).__module__ or ""
    if module.startswith(("torch._dynamo", "torch._inductor")):
        return True
    return "compile" in type(e).__name__.lower() or "inductor" in str(e).lower()


def make_engine(
    compile: bool | str, *, env: bool | str | None, differentiable: bool
) -> Engine:
    """The engine :func:`choose_engine` picks, announcing a fallback to eager once
    (a ``UserWarning`` that names the flag which silences it)."""
    engine, reason = choose_engine(compile, env=env, differentiable=differentiable)
    if reason is not None and compile is not False:
        warnings.warn(
            f"umup_compile: using the eager engine because {reason}; pass "
            "compile=False to silence this warning.",
            UserWarning,
            stacklevel=4,
        )
    return engine


def choose_engine(
    compile: bool | str, *, env: bool | str | None, differentiable: bool
) -> tuple[Engine, str | None]:
    """Pick the engine; return it with the reason when eager replaces compiled.

    Args:
        compile: ``True`` (compiled, falling back to eager on failure), ``"strict"``
            (compiled, raising on failure) or ``False`` (eager).
        env: the value of ``UMUP_COMPILE`` (``None`` when unset); it overrides
            ``compile``.
        differentiable: autograd through the step needs the eager engine.

    Raises:
        ValueError: ``compile`` is not one of the accepted values.
    """
    if compile not in (True, False, "strict"):
        raise ValueError(
            f"compile={compile!r} is not supported; use True, False or 'strict'."
        )
    mode = compile if env is None else env
    if mode is False:
        return run_eager, None
    if differentiable:
        return run_eager, "differentiable=True needs autograd through the step"
    return CompiledEngine(strict=mode == "strict"), None
