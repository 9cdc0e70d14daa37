"""Fixes to Inductor's code for the optimizer's kernels: five in its CPU code, two in
its Triton (GPU) code.

Each changes the generated code (its speed, or whether it compiles), never a value:
every lane computes what it computed before. They act only while ``codegen_hints`` is
entered; the compiled engine enters it around its own calls, so the user's other
compiled code is untouched. They use internals of ``torch._inductor.codegen.cpp``,
``torch._inductor.loop_body``, ``torch._inductor.choices.InductorChoices`` and
``torch._inductor.codegen.triton_combo_kernel.ComboKernel`` (the same in torch 2.6 to
2.13) and do nothing where those are missing.

Note [bf16 tiling]: Inductor's C++ backend picks one vector width per fused kernel
(``TilingSelect.select_tiling``): the bf16/fp16 width (32 lanes on AVX-512) only when
*every* node of the kernel holds that low-precision dtype, else the float32 width (16
lanes). An update of bf16 parameters with float32 state always holds nodes without
bf16, the write-backs of the float32 moments (a plain load and store), so it got 16
float32 lanes: every bf16 load and store then fills half a vector, through masked
moves, which AMD Zen 4 runs far slower than full ones. Measured on this project's
2-core EPYC (8M elements, 1 thread): 6.3 ms, against 2.9 ms with 32 lanes (the float32
math then runs as pairs of 16-lane vectors, ``VectorizedN<float, 2>``); the update
moves 22 B per element and ran slower than the 28 B float32 one (3.9 ms). Under the
hints, a kernel whose low-precision nodes all agree on one dtype is tiled for it,
unless it also computes with 8-bit integers (the 8-bit update's codes, ``_quant_step``):
ATen's vectors convert between int32 and 8-bit integers in registers only 16 lanes at
a time (``at::vec::VecConvert``), so at 32 lanes every code went through its generic
fallback, a scalar loop per vector, and the update of bf16 parameters ran 2.7x slower
than that of float32 ones (Intel Xeon, 4.7M elements, 1 thread). Under the hints
those kernels get float32 lanes (16), even where every node also holds bf16 (which
Inductor itself would tile for bf16): bf16 parameters then update in 1.07-1.15x the
float32 time, against 1.37-1.40x at 32 lanes with the conversions written as AVX-512
instructions instead (tried, measured alternately on the same machine).

Note [vector bitcast]: Inductor writes ``Tensor.view(dtype)`` in a vectorised kernel
as a scalar loop through two stack buffers (its generic fallback). Stochastic rounding
views every float32 as int32 and back, and those two round trips cost more than the
whole update (16M elements: 13.7 ms against 6.2 ms, the hash excluded). A bitcast
between same-size types is one register reinterpretation: under the hints it is
written as a ``memcpy`` of the whole vector into one of the other type
(``Vectorized<T>`` and ``VectorizedN<T, n>`` are trivially copyable, and equal in size
for equal itemsize), which the compiler turns into register moves.

Note [persistent block reductions]: the 8-bit update (``_quant_step``) reduces each
block of ``_quant.BLOCK`` (128) elements to its two maxima, then encodes the block's
moments with them. Inductor's Triton backend keeps a reduction's row in registers (a
persistent reduction: one load of every input, no loop) only up to 64 elements
unless it proves the reduction "inner", which it does not for the update's fused
kernels (its hint is DEFAULT: many rows, or a strided scale store among the nodes).
A looped reduction over 128 elements then has to carry each block's new parameter or
moments from its first loop to the second through a float32 staging buffer in global
memory: sm_90's lowering of the GPT-like set (``benchmarks/gpu_codegen.py``, int8
state) moved 1.26x the 8-bit ideal bytes; with persistent rows, 1.01x. Under the
hints, a Triton reduction of at most :data:`PERSISTENT_MAX` elements is persistent
(``InductorChoices.should_use_persistent_reduction``); Inductor's own choice
otherwise, and always outside the hints.

Note [loop split guard]: torch 2.6's ``CppScheduling.try_loop_split`` (a split of a
loop whose index divides by a constant) recomputes every node of a kernel for the
split, and asserts when the nodes iterate over different numbers of dimensions: the
8-bit update's kernels (block rows beside their ``(blocks, 2)`` scales) failed to
compile there, and the engine fell back to eager. Later torch checks for this and
keeps the loop as it is; under the hints, such a kernel is left unsplit on every
version (the same decision, taken before any node changes; a split changes no value).

Note [local buffer guard]: Inductor's C++ outer-loop fusion keeps a buffer that only
the fused loop reads in a per-thread local buffer, after asking every user of it for
its read index (``LoopBody.get_read_expr``), including a user that is only ordered
after the buffer's node (a weak dependency: a later in-place write of an input that
node read), which reads nothing of it: a ``KeyError``, and the compile failed. The
8-bit update of bf16 parameters with stochastic rounding met it on tensors of 4096 to
~16,000 elements, and the engine fell back to eager (its numbers, several times its
time). Under the hints such a user answers an index that is never contiguous, so
Inductor leaves that buffer in memory, as it does every buffer it cannot localise.

Note [flat combo dispatch]: a combo kernel (Note [combo kernels] in ``_engine``)
picks its member by a chain on the program id, ``if pid < n0: ... elif pid < n1:
...``. Triton compiles an ``elif`` as an ``if`` inside the previous ``else``, so the
chain nests one region per member: its code generator recurses once per member (~6
frames each: 160 members exceeded Python's recursion limit and the compile failed),
and the build grows with the square of the members. Under the hints the chain is cut
into chains of :data:`DISPATCH_CHAIN` members, each starting with an ``if`` on its own
range of program ids, each ``elif`` in it bounded below by that range's start
(``(pid >= n3) & (pid < n5)``; round-robin dispatch, ``pid % k == i``, needs no bound).
The ranges are disjoint, so every program runs the member it ran before, by scalar
compares, and nothing recurses deeper than a chain. Measured (sm_90 builds of the
generated kernels, both configs, one core of this 2-core CPU, empty Triton cache;
nested / sibling ifs / chains of 4): 53 members 32.7 / 15.5 / 11.9 s, 75 members
~76 / 29.0 / 23.8 s, 11 members 1.4 / 1.9 / 1.2 s, 8 (round robin) 0.9 / 1.3 / 1.0 s:
sibling ifs alone build small kernels slower (LLVM's time), chains of 4 neither.
Triton's ``TritonGPUCoalesce`` still slices the whole kernel for each load and store,
so the build still grows faster than the members (``benchmarks/gpu_cubin.py
--dispatch`` builds either form). The text of the kernel is rewritten where Inductor
returns it (``ComboKernel.codegen_kernel``); lines that do not match are left as they
are.

Note [row prefetch]: the 8-bit update (``_quant_step``, Note [one pass]) walks each
tensor's blocks in one outer loop whose inner loops stream the block's rows: the
parameter, the gradient and both codes (4 streams of 2 sizes). The CPU's own
prefetchers do not keep those ahead: on this project's 2-core Xeon (33.6M elements,
1 thread) the loop stalled on memory, at 0.93x torch fused for a hand-written C++ loop
and 1.0x for Inductor's, where the same loops prefetching the rows 2 KiB ahead took
0.66x and 0.77x. Under the hints, every such block loop (an outer loop over ``x0`` with
step 1 whose inner loops load ``ptr + (x1 + width * x0)`` rows, one of them of 8-bit
codes) starts each block by prefetching the rows :data:`PREFETCH_BYTES` ahead
(``__builtin_prefetch``: a hint, it never faults, not even past the end). The text of
the kernel is edited where Inductor hands it to its compiler (``define_kernel``); a
kernel whose text does not match is left as it is.
"""

from __future__ import annotations

import functools
import hashlib
import re
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


class _Open(threading.local):
    """The codegen_hints contexts open in this thread (Inductor generates code in
    the caller's thread: another thread's compile, the user's, gets no hints)."""

    depth = 0


_open = _Open()
_installed: bool | None = None  # None: not tried yet
# Same-size pairs whose vectors reinterpret cleanly (AVX2, AVX-512, the scalar ISA).
_BITCASTABLE = {torch.float32, torch.int32, torch.float64, torch.int64}
# Note [persistent block reductions]: _quant.BLOCK (tests/test_codegen_hints.py ties them)
PERSISTENT_MAX = 128
DISPATCH_CHAIN = 4  # Note [flat combo dispatch]: members per if/elif chain
PREFETCH_BYTES = 2048  # how far ahead a block loop prefetches (widest row's bytes)
_CACHE_LINE = 64
_ITEMSIZE = {"int8_t": 1, "uint8_t": 1, "bool": 1, "at::BFloat16": 2, "at::Half": 2}
_ITEMSIZE |= {"float": 4, "int32_t": 4, "double": 8, "int64_t": 8}
_POINTER = re.compile(r"(?:const )?([\w:]+)\* ((?:in|out)_ptr\d+)[,)]")
_BLOCK_LOOP = re.compile(
    r"^(\s*)for\(int64_t x0=static_cast<int64_t>\(0L\); "
    r"x0<static_cast<int64_t>\(\d+L\); x0\+=static_cast<int64_t>\(1L\)\)$"
)
_ROW_LOAD = re.compile(
    r"loadu\(((?:in|out)_ptr\d+) \+ static_cast<int64_t>\(x1 \+ (\d+)L\*x0\)"
)


def _cpp_backend() -> Any | None:
    """Inductor's C++ codegen module when it has every hook this module needs."""
    try:
        from torch._inductor.codegen import cpp
    except ImportError:  # pragma: no cover - every supported torch has it
        return None
    hooks = (
        getattr(getattr(cpp, "TilingSelect", None), "select_tiling", None),
        getattr(cpp, "get_loop_body_lowp_fp", None),
        getattr(cpp, "_get_loop_body", None),
        getattr(cpp, "CppVecOverrides", type).__dict__.get("to_dtype_bitcast"),
        getattr(getattr(cpp, "CppVecKernel", None), "_get_num_vectors", None),
    )
    if not all(hooks) or not hasattr(cpp, "DTYPE_TO_CPP"):
        return None
    return cpp


def _holds_8bit(key: str, body: Any) -> bool:
    """Whether a loop body computes with 8-bit integers (Note [bf16 tiling]);
    ``key``: where Inductor keeps each node's dtype in its ``meta``."""
    for block in (body.root_block, *body.subblocks.values()):
        for node in block.graph.nodes:
            dtype = getattr(node.meta.get(key), "dtype", None)
            if dtype in (torch.int8, torch.uint8):
                return True
    return False


def _install_tiling(cpp: Any) -> None:
    """Wrap ``TilingSelect.select_tiling``; see Note [bf16 tiling]."""
    original: Callable[..., Any] = cpp.TilingSelect.select_tiling
    lowp_of: Callable[[Any], tuple[torch.dtype | None, bool]] = (
        cpp.get_loop_body_lowp_fp
    )
    meta_key = getattr(getattr(cpp, "OptimizationContext", None), "key", None)

    def select_tiling(self: Any, fn_list: Any, var_sizes_list: Any) -> Any:
        if _open.depth == 0:
            return original(self, fn_list, var_sizes_list)
        bodies = cpp._get_loop_body(fn_list)
        found = {lowp_of(body)[0] for body in bodies}
        found.discard(None)
        if len(found) != 1:  # none, or bf16 mixed with fp16: Inductor decides
            return original(self, fn_list, var_sizes_list)
        # 8-bit codes: float32 lanes, even where every body holds bf16.
        codes = meta_key is not None and any(_holds_8bit(meta_key, b) for b in bodies)
        dtype = None if codes else found.pop()

        def agreeing(body: Any) -> tuple[torch.dtype | None, bool]:
            lowp, needs_fp32 = lowp_of(body)
            return (dtype and (lowp or dtype)), needs_fp32

        # Read by select_tiling only through the module global, for this one call.
        cpp.get_loop_body_lowp_fp = agreeing
        try:
            return original(self, fn_list, var_sizes_list)
        finally:
            cpp.get_loop_body_lowp_fp = lowp_of

    select_tiling.__wrapped__ = original  # type: ignore[attr-defined]
    cpp.TilingSelect.select_tiling = select_tiling


def _install_bitcast(cpp: Any) -> None:
    """Replace the vectorised ``to_dtype_bitcast``; see Note [vector bitcast]."""
    from torch._inductor.virtualized import V

    original: Callable[..., Any] = cpp.CppVecOverrides.__dict__[
        "to_dtype_bitcast"
    ].__func__

    def to_dtype_bitcast(x: Any, dtype: torch.dtype, src_dtype: torch.dtype) -> Any:
        kernel = V.kernel
        if (
            _open.depth
            and getattr(x, "is_vec", False)
            and isinstance(kernel, cpp.CppVecKernel)
            and {dtype, src_dtype} <= _BITCASTABLE
            and dtype.itemsize == src_dtype.itemsize
        ):
            n = kernel._get_num_vectors(dtype)
            scalar = cpp.DTYPE_TO_CPP[dtype]
            vector = (
                f"at::vec::Vectorized<{scalar}>"
                if n == 1
                else f"at::vec::VectorizedN<{scalar},{n}>"
            )
            # memcpy, not c10::bit_cast: torch 2.11's requires a trivially
            # constructible destination, which Vectorized is not. Compilers turn it
            # into register moves.
            return (
                f"([&]() {{ {vector} out; static_assert(sizeof(out) == sizeof({x})); "
                f"std::memcpy(&out, &{x}, sizeof(out)); return out; }})()"
            )
        return original(x, dtype, src_dtype)

    # The scalar fallback of CppVecOverrides looks the op up by this name.
    to_dtype_bitcast.__name__ = "to_dtype_bitcast"
    to_dtype_bitcast.__wrapped__ = original  # type: ignore[attr-defined]
    cpp.CppVecOverrides.to_dtype_bitcast = staticmethod(to_dtype_bitcast)


def _install_persistent() -> None:
    """Wrap ``InductorChoices.should_use_persistent_reduction`` once; see Note
    [persistent block reductions]. Nothing where Inductor lacks it."""
    try:
        from torch._inductor import config
        from torch._inductor.choices import InductorChoices
        from torch._inductor.virtualized import V
    except ImportError:  # pragma: no cover - every supported torch has them
        return
    found = InductorChoices.__dict__.get("should_use_persistent_reduction")
    if not isinstance(found, staticmethod) or hasattr(found.__func__, "__wrapped__"):
        return  # missing, changed, or already wrapped
    original: Callable[..., bool] = found.__func__

    def should_use_persistent_reduction(
        features: Any, cooperative_reduction: bool
    ) -> bool:
        if (
            _open.depth
            and config.triton.persistent_reductions
            and V.graph.sizevars.statically_known_leq(
                features.reduction_numel, PERSISTENT_MAX
            )
        ):
            return True
        return original(features, cooperative_reduction)

    should_use_persistent_reduction.__wrapped__ = original  # type: ignore[attr-defined]
    InductorChoices.should_use_persistent_reduction = staticmethod(  # type: ignore[method-assign]
        should_use_persistent_reduction
    )


_NESTED_RANGE = re.compile(r"^(\s*)elif pid < (num_x?blocks)_(\d+):$", re.M)
_NESTED_ROBIN = re.compile(r"^(\s*)elif (pid % \d+ == (\d+)):$", re.M)


def flat_dispatch(source: str, chain: int = DISPATCH_CHAIN) -> str:
    """``source`` (a Triton combo kernel) with its member chain cut into chains of
    ``chain`` members; see Note [flat combo dispatch]."""

    def ranged(match: re.Match[str]) -> str:
        indent, name, k = match.group(1), match.group(2), int(match.group(3))
        before = k // chain * chain - 1  # the member before this chain's first
        if before < 0:  # the first chain: nothing before it to exclude
            return match.group(0)
        word = "if" if k % chain == 0 else "elif"
        return f"{indent}{word} (pid >= {name}_{before}) & (pid < {name}_{k}):"

    def robin(match: re.Match[str]) -> str:
        if int(match.group(3)) % chain:
            return match.group(0)
        return f"{match.group(1)}if {match.group(2)}:"

    return _NESTED_ROBIN.sub(robin, _NESTED_RANGE.sub(ranged, source))


def _install_flat_dispatch() -> None:
    """Wrap ``ComboKernel.codegen_kernel`` once; see Note [flat combo dispatch].
    Nothing where Inductor lacks it."""
    try:
        from torch._inductor.codegen.triton_combo_kernel import ComboKernel
    except ImportError:  # pragma: no cover - every supported torch has it
        return
    original = ComboKernel.__dict__.get("codegen_kernel")
    if not callable(original) or hasattr(original, "__wrapped__"):
        return  # missing, changed, or already wrapped

    def codegen_kernel(self: Any, *args: Any, **kwargs: Any) -> Any:
        # read at call time, not closed over: a test stands a source in for it
        source = codegen_kernel.__wrapped__(self, *args, **kwargs)  # type: ignore[attr-defined]
        return (
            flat_dispatch(source) if _open.depth and isinstance(source, str) else source
        )

    codegen_kernel.__wrapped__ = original  # type: ignore[attr-defined]
    ComboKernel.codegen_kernel = codegen_kernel  # type: ignore[method-assign]


def prefetch_rows(source: str) -> str:
    """``source`` (a C++ kernel) with prefetches in its 8-bit block loops; see Note
    [row prefetch]."""
    types = dict((name, kind) for kind, name in _POINTER.findall(source))
    lines = source.split("\n")
    out: list[str] = []
    k = 0
    while k < len(lines):
        loop = _BLOCK_LOOP.match(lines[k])
        if not (loop and k + 1 < len(lines) and lines[k + 1].strip() == "{"):
            out.append(lines[k])
            k += 1
            continue
        end, depth = k + 1, 0
        while end < len(lines):
            depth += lines[end].count("{") - lines[end].count("}")
            if depth <= 0:
                break
            end += 1
        rows = dict.fromkeys(_ROW_LOAD.findall("\n".join(lines[k + 1 : end + 1])))
        sizes = {ptr: _ITEMSIZE.get(types.get(ptr, ""), 0) for ptr, _ in rows}
        out += lines[k : k + 2]
        if rows and 1 in sizes.values() and all(sizes.values()):
            widest = max(int(width) * sizes[ptr] for ptr, width in rows)
            ahead = max(1, PREFETCH_BYTES // widest)
            for ptr, width in rows:
                step = _CACHE_LINE // sizes[ptr]
                for offset in range(0, int(width), step):
                    out.append(
                        f"{loop.group(1)}    __builtin_prefetch({ptr} + "
                        f"{width}L*(x0 + {ahead}) + {offset});"
                    )
        k += 2
    return "\n".join(out)


def _install_read_expr_guard() -> None:
    """Wrap ``LoopBody.get_read_expr``; see Note [local buffer guard]."""
    try:
        from torch._inductor.loop_body import LoopBody
    except ImportError:  # pragma: no cover - every supported torch has it
        return
    original: Callable[..., Any] = LoopBody.get_read_expr

    def get_read_expr(self: Any, buffer_name: str) -> Any:
        try:
            return original(self, buffer_name)
        except KeyError:
            if not _open.depth:
                raise
            import sympy  # type: ignore[import-untyped]

            return sympy.Integer(-1)  # no loop index is -1: never contiguous

    get_read_expr.__wrapped__ = original  # type: ignore[attr-defined]
    LoopBody.get_read_expr = get_read_expr  # type: ignore[method-assign]


def _install_loop_split_guard(cpp: Any) -> None:
    """Wrap ``CppScheduling.try_loop_split``; see Note [loop split guard]."""
    original: Callable[..., Any] = cpp.CppScheduling.try_loop_split

    def try_loop_split(self: Any, nodes: list[Any]) -> Any:
        if _open.depth:
            try:
                dims = {len(n.node.get_default_sizes_body()[0][0]) for n in nodes}
            except (AttributeError, TypeError, IndexError):  # another layout
                dims = set()
            if len(dims) > 1:
                return nodes
        return original(self, nodes)

    try_loop_split.__wrapped__ = original  # type: ignore[attr-defined]
    cpp.CppScheduling.try_loop_split = try_loop_split


def _install_prefetch(cpp: Any) -> None:
    """Wrap ``CppScheduling.define_kernel``; see Note [row prefetch]."""
    original: Callable[..., Any] = cpp.CppScheduling.define_kernel

    def define_kernel(self: Any, src_code: str, *args: Any, **kwargs: Any) -> Any:
        if _open.depth and isinstance(src_code, str):
            src_code = prefetch_rows(src_code)
        return original(self, src_code, *args, **kwargs)

    define_kernel.__wrapped__ = original  # type: ignore[attr-defined]
    cpp.CppScheduling.define_kernel = define_kernel


@functools.cache
def cache_key_pass() -> Any | None:
    """Note [hints in the cache key]: Inductor's FX graph cache keys a compile by its
    graph and Inductor's config, not by these hints, so after an upgrade that changes
    them a warm cache would keep serving the kernels of the previous hints (the same
    values, not the same speed). A no-op post-grad pass whose ``uuid`` is this
    module's source puts them in the key (the mechanism Inductor offers custom
    passes); the engine adds it to its compile options where the user set no pass of
    their own. ``None`` where Inductor lacks it."""
    try:
        from torch._inductor.custom_graph_pass import CustomGraphPass
    except ImportError:  # pragma: no cover - every supported torch has it
        return None
    key = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()

    class HintsKey(CustomGraphPass):
        def __call__(self, graph: Any) -> None:
            pass

        def uuid(self) -> str:
            return key

    return HintsKey()


class _CodegenHints:
    """See :data:`codegen_hints`; a class, not a generator: entered at every step."""

    def __enter__(self) -> None:
        global _installed
        if _installed is None:
            cpp = _cpp_backend()
            _installed = cpp is not None
            if cpp is not None:
                _install_tiling(cpp)
                _install_bitcast(cpp)
                # GCC and Clang only (MSVC has no __builtin_prefetch).
                scheduling = getattr(cpp, "CppScheduling", None)
                if hasattr(scheduling, "try_loop_split"):
                    _install_loop_split_guard(cpp)
                if sys.platform != "win32" and hasattr(scheduling, "define_kernel"):
                    _install_prefetch(cpp)
                _install_read_expr_guard()
            _install_persistent()
            _install_flat_dispatch()
        _open.depth += 1

    def __exit__(self, *exc: object) -> None:
        _open.depth -= 1


codegen_hints = _CodegenHints()
"""While ``with codegen_hints:`` is open, CPU kernels compiled in this thread get full
low-precision vectors (Note [bf16 tiling]), register bitcasts (Note [vector bitcast])
and, in 8-bit block loops, row prefetches (Note [row prefetch]); Triton reductions of
block rows are persistent (Note [persistent block reductions]) and combo kernels
dispatch by short chains (Note [flat combo dispatch]). Reentrant; a no-op
where Inductor lacks the hooks."""


def active() -> bool:
    """Whether the hooks are installed and a ``codegen_hints`` block is open."""
    return bool(_installed) and _open.depth > 0
