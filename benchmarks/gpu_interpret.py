"""Run the Triton kernels Inductor generated for sm_90 in Triton's interpreter, on CPU
tensors, and compare them with the eager engine.

The calls come from a real optimizer stepping real CPU parameters (the same layout
policy as on CUDA: it does not look at the device); an engine (:class:`Keeper`) keeps
each call's arguments before running it eagerly. Each call's wrapper (lowered for CUDA
by ``gpu_lower``) then runs in the interpreter on copies of those arguments
(``gpu_interp_run.run_wrapper``: the substitutions it makes are listed there), and
:func:`compare` measures each tensor against eager.

What this checks: the kernels' indexing, masking, fusion, integer code (the
stochastic-rounding hash, shifts, bit masks) and float32 arithmetic, against eager.
What it cannot: sm_90's float behaviour where it differs from numpy (approximate
division or square roots, flush-to-zero), and the interpreter's float to bf16
conversion truncates (exact only where the value is already a bf16, as after the
stochastic rounding's masking), so a round-to-nearest bf16 store is compared in
bf16 ulps instead.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks import contestants, gpu_record, sets
from benchmarks.gpu_interp_run import run_wrapper
from umup_compile import _hypers

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
    if "cpu" not in _hypers.HOST_DEVICES:  # stand-in: host rows, as on CUDA
        _hypers.HOST_DEVICES = (*_hypers.HOST_DEVICES, "cpu")
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
