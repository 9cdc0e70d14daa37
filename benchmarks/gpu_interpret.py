"""Run the Triton kernels Inductor generated for sm_90 in Triton's interpreter, on CPU
tensors, and compare them with the eager engine.

The calls come from a real optimizer stepping real CPU parameters (the same layout
policy as on CUDA: it does not look at the device); an engine keeps each call's
arguments before running it eagerly. Each call's wrapper (lowered for CUDA by
``gpu_lower``) is then run as Inductor wrote it, with four substitutions: its CUDA
allocations and device guard become CPU ones, each kernel is imported from its own
file (in a process started with ``TRITON_INTERPRET=1``: Triton's own ``@jit``
helpers must be interpreted too), the
``triton_heuristics`` decorator becomes :data:`heuristics` (a launcher that computes the
grid the way Inductor's would, with fixed block sizes), and ``libdevice``, whose
functions the interpreter cannot run, becomes :data:`libdevice` (numpy).

What this checks: the kernels' indexing, masking, fusion, integer code (the
stochastic-rounding hash, shifts, bit masks) and float32 arithmetic, against eager.
What it cannot: sm_90's float behaviour where it differs from numpy (approximate
division or square roots, flush-to-zero), and the interpreter's float to bf16
conversion truncates (exact only where the value is already a bf16, as after the
stochastic rounding's masking), so a round-to-nearest bf16 store is compared in
bf16 ulps instead.
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

from benchmarks import contestants, gpu_record, sets
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
        reduction = "r0_numel" in named or "R0_BLOCK" in self.constexprs
        if "R0_BLOCK" in self.constexprs:
            rnumel = named.get("r0_numel", 1)
            persistent = self.kind == "persistent_reduction"
            block["R0_BLOCK"] = (
                _pow2(rnumel) if persistent else min(_pow2(rnumel), 1024)
            )
        for axis in ("X", "Y", "Z"):
            if f"{axis}BLOCK" in self.constexprs:
                block[f"{axis}BLOCK"] = (
                    1 if reduction else (1024 if axis == "X" else 16)
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
        self.fn[grid](*args, **passed)


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
    abs=_numpy(np.abs),
)


class _KernelLoader:
    """Imports each kernel of a wrapper from its own file, interpreted."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir

    def triton(self, name: str, source: str, device_str: str = "cuda") -> Launcher:
        source = source.replace("triton_helpers.set_driver_to_gpu()", "")
        source = source.replace("@triton_heuristics.", "@_interp.heuristics.")
        source = (
            "from benchmarks import gpu_interpret as _interp\n"
            + source.replace(
                "from torch._inductor.runtime.triton_helpers import libdevice,",
                "from torch._inductor.runtime.triton_helpers import",
            )
            + "\nlibdevice = _interp.libdevice\n"
        )
        source = source.replace("libdevice.", "_interp.libdevice.")
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


# -- real calls on the CPU ----------------------------------------------------------------


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone(memory_format=torch.preserve_format)
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(v) for v in value)
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    return value


class Keeper:
    """An engine that keeps a copy of each call's arguments, then runs it eagerly."""

    packs = True

    def __init__(self) -> None:
        self.calls: list[tuple[gpu_record.Call, tuple[Any, ...], dict[str, Any]]] = []

    def __call__(
        self,
        fn: Callable[..., None],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        kind: str = "",
        static: bool = False,
        site: Any = None,
    ) -> None:
        call = gpu_record.Call(
            fn,
            gpu_record.describe(args),
            gpu_record.describe(kwargs),
            kind.replace("@cpu:", "@meta:"),
            static,
        )
        self.calls.append((call, _clone(args), _clone(kwargs)))
        fn(*args, **kwargs)


def cpu_calls(
    workload: str, dtype: str, clip: bool, steps: int = 3
) -> list[tuple[gpu_record.Call, tuple[Any, ...], dict[str, Any]]]:
    """The calls of step ``steps`` of a real optimizer on CPU parameters (random
    values and gradients; earlier steps give the state values)."""
    spec = gpu_record.DTYPES[dtype]
    specs = gpu_record.workload_specs(workload)
    params = sets.build_params(specs, device=torch.device("cpu"), dtype=spec.param)
    opt = gpu_record.build_optimizer(params, spec, capturable=False, clip=clip)
    keeper = Keeper()
    opt._engine = keeper  # type: ignore[attr-defined]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, contestants._schedule)
    for _ in range(steps):
        keeper.calls.clear()
        opt.step()
        sched.step()
    return keeper.calls


def compare(kernel: dict[str, Any], eager: dict[str, Any]) -> dict[str, Any]:
    """Between the two runs' tensors: the worst relative error over float32/float64
    tensors (max |kernel - eager| / max |eager|), the bf16 tensors' differing
    elements and largest difference in ulps, and mismatches elsewhere."""
    worst, ulps, bf16_bad, exact_bad, checked = 0.0, 0, 0, 0, 0
    for path, a in kernel.items():
        b = eager[path]
        checked += 1
        if b.dtype in (torch.float32, torch.float64):
            scale = b.abs().max().item()
            err = (a - b).abs().max().item()
            worst = max(worst, err / scale if scale else err)
        elif b.dtype == torch.bfloat16:
            bits = (a.view(torch.int16).int() - b.view(torch.int16).int()).abs()
            ulps = max(ulps, int(bits.max().item()) if bits.numel() else 0)
            bf16_bad += int((bits != 0).sum().item())
        else:
            exact_bad += int((a != b).sum().item())
    return {
        "tensors": checked,
        "max_rel_err": worst,
        "bf16_max_ulps": ulps,
        "bf16_mismatches": bf16_bad,
        "mismatches": exact_bad,  # integer and bool tensors: must be 0
    }


def _tensors(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, torch.Tensor]:
    out = {}
    for name, value in [(f"a{i}", a) for i, a in enumerate(args)] + list(
        kwargs.items()
    ):
        if isinstance(value, torch.Tensor):
            out[name] = value
        elif isinstance(value, (list, tuple)):
            for j, t in enumerate(value):
                if isinstance(t, torch.Tensor):
                    out[f"{name}[{j}]"] = t
    return out


def check(
    workload: str,
    dtype: str,
    clip: bool,
    lower: Callable[[gpu_record.Call], Any],
    workdir: Path,
) -> dict[str, Any]:
    """Every call of a CPU step: its CUDA wrapper in the interpreter against eager.

    ``lower`` maps a call to its ``gpu_lower.Lowering`` (the caller's cache).
    """
    import triton

    from benchmarks import gpu_lower

    if not triton.knobs.runtime.interpret:
        # triton.language's own @jit helpers (tl.cdiv...) must be interpreted too,
        # which only an environment variable set before Triton's import achieves
        raise RuntimeError("run the interpreter check with TRITON_INTERPRET=1")
    workdir.mkdir(parents=True, exist_ok=True)
    per_call, errors = [], []
    for call, args, kwargs in cpu_calls(workload, dtype, clip):
        lowering = lower(call)
        if lowering.error or len(lowering.sources) != 1:
            errors.append(f"{call.kind}: not lowered ({lowering.error})")
            continue
        kernel_args, kernel_kwargs = _clone(args), _clone(kwargs)
        inputs = gpu_lower.pick(lowering.inputs[0], kernel_args, kernel_kwargs)
        try:
            run_wrapper(lowering.sources[0], inputs, workdir)
        except Exception as e:  # noqa: BLE001 - reported
            errors.append(f"{call.kind}: {type(e).__name__}: {e}"[:400])
            continue
        eager_args, eager_kwargs = _clone(args), _clone(kwargs)
        call.fn(*eager_args, **eager_kwargs)
        result = compare(
            _tensors(kernel_args, kernel_kwargs), _tensors(eager_args, eager_kwargs)
        )
        per_call.append({"kind": call.kind.replace("@meta:", "@cuda:"), **result})
    return {
        "workload": workload,
        "dtype": dtype,
        "clip": clip,
        "calls": per_call,
        "errors": errors,
        "max_rel_err": max((c["max_rel_err"] for c in per_call), default=None),
        "bf16_max_ulps": max((c["bf16_max_ulps"] for c in per_call), default=None),
        "bf16_mismatches": sum(c["bf16_mismatches"] for c in per_call),
        "mismatches": sum(c["mismatches"] for c in per_call),
        # round-to-nearest bf16 stores may differ by 1 ulp (the interpreter
        # truncates); stochastic rounding must match bit for bit
        "stochastic_rounding": gpu_record.DTYPES[dtype].stochastic_rounding,
    }
