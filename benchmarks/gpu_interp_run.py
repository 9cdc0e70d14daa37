"""Run a wrapper Inductor wrote for CUDA on CPU tensors, its Triton kernels in
Triton's interpreter (``TRITON_INTERPRET=1``, set before Triton is imported).

:func:`run_wrapper` runs the wrapper as Inductor wrote it, with four substitutions:
its CUDA allocations and device guard become CPU ones; each kernel is imported from
its own file (``triton.jit`` needs one, and Triton's own ``@jit`` helpers must be
interpreted too); the ``triton_heuristics`` decorator becomes :data:`heuristics` (a
:class:`Launcher` that computes the grid the way Inductor's would, with fixed block
sizes); and ``libdevice``, whose functions the interpreter cannot run, becomes
:data:`libdevice` (numpy), as ``triton_helpers.max2``/``min2`` become numpy
reductions. ``gpu_interpret`` compares what it computes with the eager engine.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.gpu_cubin import import_file


def _cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def _pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(int(n), 1))))


class Launcher:
    """A kernel and what Inductor knew about it; ``run`` launches it like
    Inductor's ``CachingAutotuner.run`` (fixed block sizes, no autotuning)."""

    def __init__(self, fn: Any, kind: str, meta: dict[str, Any]) -> None:
        self.fn, self.kind, self.meta = fn, kind, meta
        signature = inspect.signature(getattr(fn, "fn", fn))
        self.params = list(signature.parameters)
        self.constexprs = [
            name
            for name, p in signature.parameters.items()
            if "constexpr" in str(p.annotation)
        ]

    def run(self, *args: Any, stream: Any = None) -> None:
        named = dict(zip([p for p in self.params if p not in self.constexprs], args))
        meta = self.meta.get("inductor_meta", {})
        block: dict[str, int] = {}
        # a persistent combo member fixes its R0_BLOCK inside: its kind says it
        persistent = self.kind == "persistent_reduction"
        reduction = (
            persistent
            or self.kind == "reduction"
            or "r0_numel" in named
            or "R0_BLOCK" in self.constexprs
        )
        if "R0_BLOCK" in self.constexprs:
            rnumel = named.get("r0_numel", 1)
            block["R0_BLOCK"] = (
                _pow2(rnumel) if persistent else min(_pow2(rnumel), 1024)
            )
        for axis in ("X", "Y", "Z"):
            if f"{axis}BLOCK" in self.constexprs:
                # Persistent rows (at most 1024 elements) 32 at a time, one of
                # Inductor's configs for them: the interpreter runs each program in
                # Python, and one row per program made gpt-mini's 8-bit step ~30x
                # slower. A looped reduction: one row.
                block[f"{axis}BLOCK"] = (
                    (32 if persistent and axis == "X" else 1)
                    if reduction
                    else (1024 if axis == "X" else 16)
                )
        grid_type = meta.get("grid_type", "Grid1D")
        if "Combo" in grid_type:
            combo = meta["combo_grid_meta"]
            default = combo.get("default_config") or {}
            xblock = block.get("XBLOCK", default.get("XBLOCK", 1024))
            sizes = [
                combo.get(f"xnumel_{i}") or named[f"xnumel_{i}"]
                for i in range(combo["num_kernels"])
            ]
            blocks = [_cdiv(n, xblock) for n in sizes]
            if grid_type.startswith("Sequential"):
                grid: tuple[int, ...] = (sum(blocks),)
            else:  # round robin
                grid = (max(blocks) * len(blocks),)
        else:
            grid = tuple(
                _cdiv(
                    named.get(f"{axis}numel", 1), block.get(f"{axis.upper()}BLOCK", 1)
                )
                for axis in ("x", "y", "z")
                if f"{axis}numel" in named or axis == "x"
            )
        passed = {k: v for k, v in block.items() if k in self.constexprs}
        types = self.meta.get("triton_meta", {}).get("signature", {})
        params = [p for p in self.params if p not in self.constexprs]
        args = tuple(_typed(a, types.get(name)) for name, a in zip(params, args))
        self.fn[grid](*args, **passed)


def _typed(value: Any, kind: str | None) -> Any:
    """A float argument the kernel declares fp64 (a 0-d host input, Note [host
    hypers]) as an fp64 scalar: the interpreter types a Python float fp32, where the
    built kernel takes a double."""
    if kind != "fp64" or not isinstance(value, float):
        return value
    import numpy as np
    import triton.language as tl
    from triton.runtime.interpreter import TensorHandle

    return tl.tensor(
        TensorHandle(np.array([value], dtype=np.float64), tl.float64), tl.float64
    )


def _decorator(kind: str) -> Callable[..., Any]:
    def factory(*args: Any, **kwargs: Any) -> Callable[[Any], Launcher]:
        return lambda fn: Launcher(fn, kind, kwargs)

    return factory


heuristics = types.SimpleNamespace(
    **{
        k: _decorator(k)
        for k in (
            "pointwise",
            "reduction",
            "persistent_reduction",
            "foreach",
            "split_scan",
            "cooperative_reduction",
        )
    }
)


def _numpy(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A libdevice function computed by numpy on the interpreter's tensors."""
    import triton.language as tl
    from triton.runtime.interpreter import TensorHandle

    def call(*xs: Any, _builder: Any = None, **kwargs: Any) -> Any:
        tensors = [x for x in xs if isinstance(x, tl.tensor)]
        like = max(tensors, key=lambda t: t.handle.data.size)
        data = [x.handle.data if isinstance(x, tl.tensor) else x for x in xs]
        out = np.asarray(fn(*data)).astype(like.handle.data.dtype)
        return tl.tensor(TensorHandle(out, like.handle.dtype.scalar), like.type)

    return call


libdevice = types.SimpleNamespace(
    pow=_numpy(np.power),
    sqrt=_numpy(np.sqrt),
    rsqrt=_numpy(lambda x: 1 / np.sqrt(x)),
    exp=_numpy(np.exp),
    log=_numpy(np.log),
    isnan=_numpy(np.isnan),
    isinf=_numpy(np.isinf),
    floor=_numpy(np.floor),
    trunc=_numpy(np.trunc),
    signbit=_numpy(np.signbit),
    nextafter=_numpy(np.nextafter),
    nearbyint=_numpy(np.rint),  # round half to even, as torch.round (8-bit codes)
    abs=_numpy(np.abs),
)


def _reduce2(op: Callable[..., Any]) -> Callable[..., Any]:
    """``triton_helpers.max2``/``min2`` computed by numpy: the interpreter runs their
    combine function (``triton_helpers.maximum``) once per element pair in Python,
    which made a block-maxima kernel minutes long. numpy's ``max``/``min`` propagate
    NaN, as that combine function does (Triton's own ``tl.max`` in the interpreter,
    ``np.nanmax``, would not)."""
    from triton.runtime.interpreter import ReduceOps

    def reduce(a: Any, dim: Any, _builder: Any = None) -> Any:
        dim = int(getattr(dim, "value", dim))
        out = np.asarray(op(a.handle.data, axis=dim))
        return ReduceOps(dim, None, False).to_tensor(out, a.dtype)

    return reduce


max2, min2 = _reduce2(np.max), _reduce2(np.min)


class _KernelLoader:
    """Imports each kernel of a wrapper from its own file, interpreted."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir

    def triton(self, name: str, source: str, device_str: str = "cuda") -> Launcher:
        source = source.replace("triton_helpers.set_driver_to_gpu()", "")
        source = source.replace("@triton_heuristics.", "@_interp.heuristics.")
        source = (
            "from benchmarks import gpu_interp_run as _interp\n"
            + source.replace(
                "from torch._inductor.runtime.triton_helpers import libdevice,",
                "from torch._inductor.runtime.triton_helpers import",
            )
            + "\nlibdevice = _interp.libdevice\n"
        )
        source = source.replace("libdevice.", "_interp.libdevice.")
        for helper in ("max2", "min2"):
            source = source.replace(f"triton_helpers.{helper}(", f"_interp.{helper}(")
        path = self.workdir / f"interp_{name}.py"
        path.write_text(source)
        launcher: Launcher = getattr(import_file(path), name)
        return launcher

    def wait(self, scope: Any) -> None:
        pass


def run_wrapper(source: str, inputs: list[Any], workdir: Path) -> None:
    """Run a generated wrapper's ``call`` on CPU tensors (see the module docstring)."""
    from torch._C._dynamo import guards

    body = source.replace("async_compile.triton(", "_loader.triton(")
    body = body.replace("async_compile.wait(globals())", "_loader.wait(globals())")
    body = body.replace("del async_compile", "")
    scope: dict[str, Any] = {
        "__name__": "interp_wrapper",
        "_loader": _KernelLoader(workdir),
    }
    with _on_cpu(), np.errstate(all="ignore"):  # as a GPU: no warnings
        exec(compile(body, str(workdir / "wrapper.py"), "exec"), scope)
        scope["empty_strided_cuda"] = guards._empty_strided_cpu
        scope["call"](list(inputs))


@contextlib.contextmanager
def _on_cpu() -> Any:
    cuda = torch.cuda
    saved = cuda._DeviceGuard, cuda.set_device
    cuda._DeviceGuard = lambda index: contextlib.nullcontext()  # type: ignore[assignment,misc]
    cuda.set_device = lambda device: None  # type: ignore[assignment]
    try:
        yield
    finally:
        cuda._DeviceGuard, cuda.set_device = saved  # type: ignore[assignment,misc]
