"""The step measured on a real device, beside the paper's figures (``gpu_codegen``).

For each workload: umup_compile's Adam (compiled, as ``gpu_record.build_optimizer``
builds it) and torch's fused Adam on copies of the same parameters, each timed over
steady steps (median; CUDA events on a GPU), each step's device kernels counted with
``torch.profiler``, and umup's steady steps run under
``torch.cuda.set_sync_debug_mode("error")`` (a host sync raises). Written as JSON.

Runs on the CPU too (``--device cpu``: times only, no kernel count or sync check), which
is how the test suite keeps it working without a GPU.

Example (on a GPU machine; ``benchmarks/gpu_suite.sh`` runs it):
    python -m benchmarks.gpu_measure --device cuda --workload gpt-124m,many-small \\
        --json /tmp/measured.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks import common, gpu_record, sets


def cuda_params(
    specs: list[Any], device: torch.device, dtype: torch.dtype
) -> list[torch.nn.Parameter]:
    """Tagged parameters and gradients drawn on ``device`` (gpt-1.2b's 1.2B
    elements are too slow to draw on the host)."""
    import umup_compile as uc

    gen = torch.Generator(device=device).manual_seed(0)
    params = []
    for spec in specs:
        data = torch.randn(spec.shape, device=device, generator=gen).to(dtype)
        p = uc.Parameter(data, spec.mup_type, spec.depth)
        p.grad = torch.randn(spec.shape, device=device, generator=gen).to(dtype)
        params.append(p)
    return params


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(step: Callable[[], Any], device: torch.device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def kernels_per_step(step: Callable[[], Any], device: torch.device) -> int | None:
    """Device kernels one step launches (CUDA only), from ``torch.profiler``."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    _sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        _sync(device)
    return sum(
        1
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA
        and not e.name.lower().startswith(("memcpy", "memset"))
    )


def sync_check(step: Callable[[], Any], device: torch.device, steps: int = 3) -> str:
    """``"ok"``, or the error a host sync raised under the sync debug mode."""
    if device.type != "cuda":
        return "not checked (no CUDA device)"
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(steps):
            step()
    except RuntimeError as e:
        return f"host sync: {e}"
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return "ok"


def measure(
    workload: str,
    dtype: str,
    device: torch.device,
    repeats: int,
    warmup: int,
    compile: bool = True,
) -> dict[str, Any]:
    spec = gpu_record.DTYPES[dtype]
    params = cuda_params(gpu_record.workload_specs(workload), device, spec.param)
    theirs = sets.copy_params(params)
    ours = gpu_record.build_optimizer(params, spec, capturable=False, clip=False)
    if not compile:  # the test suite's smoke run
        from umup_compile._engine import run_eager

        ours._engine = run_eager  # type: ignore[attr-defined]
    fused = torch.optim.Adam(theirs, lr=gpu_record.LR, fused=True)
    out: dict[str, Any] = {
        "workload": workload,
        "dtype": dtype,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else common.cpu_name(),
        "params": sum(p.numel() for p in params),
    }
    for name, opt in (("umup", ours), ("torch_fused", fused)):
        for _ in range(warmup):
            opt.step()
        out[f"{name}_ms"] = round(median_ms(opt.step, device, repeats), 4)
        out[f"{name}_kernels"] = kernels_per_step(opt.step, device)
    out["umup_sync_check"] = sync_check(ours.step, device)
    moved = spec.ideal_bytes([p.numel() for p in params])
    out["umup_gb_s"] = round(moved / out["umup_ms"] / 1e6, 1)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", default="gpt-124m,gpt-1.2b,many-small")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args(argv)
    bad = [w for w in args.workload.split(",") if w not in gpu_record.WORKLOADS]
    bad += [d for d in args.dtype.split(",") if d not in gpu_record.DTYPES]
    if bad:
        parser.error(f"unknown workload or dtype {bad}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    results = []
    for workload in args.workload.split(","):
        for dtype in args.dtype.split(","):
            print(f"measuring {workload} {dtype} on {device}", file=sys.stderr)
            results.append(measure(workload, dtype, device, args.repeats, args.warmup))
            torch._dynamo.reset()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"measured": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
