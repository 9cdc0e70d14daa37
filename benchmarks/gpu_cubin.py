"""Build generated Triton kernels to sm_90 cubin on the CPU, and read their resources.

Each kernel's source (as Inductor wrote it) is imported from a file, which makes the
``CachingAutotuner`` that Inductor's generated module would make, and compiled with
``precompile(warm_cache_only=True)``: every candidate config, through Triton's own
pipeline (TTIR, TTGIR, LLVM IR, PTX, then the bundled ``ptxas`` to cubin), with the
options Inductor passes. Nothing is loaded: there is no device. ``ptxas -v`` is run
again on each PTX to read the registers and spills it reports.

Each build is timed (``seconds``; a kernel's time is shared among its configs), each
folder's from an empty Triton cache: the times of a first compile, on one core of this
machine (Inductor builds configs in parallel workers, each as long as here).

What a build cannot tell: which config autotuning would pick (it times them on a
device), and how fast any of them runs.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import gpu_standins
from umup_compile._codegen_hints import DISPATCH_CHAIN

_USED = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


@dataclass
class Build:
    """One config of one kernel, built."""

    kernel: str
    config: dict[str, Any]
    registers: int | None
    spill_bytes: int | None
    instructions: dict[str, int]  # counts of a few PTX instructions
    error: str | None = None
    seconds: float = 0.0  # its share of its kernel's build time


def _ptxas() -> Path:
    """The ``ptxas`` Triton itself uses for sm_90 (it bundles two)."""
    from triton.backends.nvidia.compiler import get_ptxas

    return Path(get_ptxas(gpu_standins.ARCH).path)


def resources(ptx: str, arch: str = "sm_90a") -> tuple[int | None, int | None]:
    """Registers and spilled bytes (stores + loads) that ``ptxas -v`` reports."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        done = subprocess.run(
            [str(_ptxas()), "-v", f"--gpu-name={arch}", str(src), "-o", f"{src}.o"],
            capture_output=True,
            text=True,
            check=False,
        )
    log = done.stderr + done.stdout
    if done.returncode:
        raise RuntimeError(f"ptxas failed ({done.returncode}): {log[:300]}")
    used, spill = _USED.search(log), _SPILL.search(log)
    regs = int(used.group(1)) if used else None
    spilled = int(spill.group(1)) + int(spill.group(2)) if spill else None
    return regs, spilled


# PTX instructions worth counting: fused multiply-adds, and which division a kernel
# uses (IEEE ``div.rn`` against the approximate ``div.full``).
INSTRUCTIONS = (
    "fma.rn.f32",
    "div.rn.f32",
    "div.full.f32",
    "sqrt.rn.f32",
    "cvt.rn.bf16",
)


def import_file(path: Path) -> Any:
    """Import a generated wrapper (``triton.jit`` needs its kernels in a file)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


def build(name: str, source: str, workdir: Path) -> list[Build]:
    """Build every config of kernel ``name`` (its module ``source``)."""
    gpu_standins.install()
    from torch._inductor import config
    from torch._inductor.runtime import triton_helpers

    if not gpu_standins.device_present():  # keep the stand-in driver active
        triton_helpers.set_driver_to_gpu = lambda: None
    if hasattr(config, "use_static_cuda_launcher"):
        config.use_static_cuda_launcher = False  # it would load the cubin
    path = workdir / f"{name}.py"
    path.write_text(source)
    start = time.perf_counter()
    try:
        autotuner = getattr(import_file(path), name)
        autotuner.precompile(warm_cache_only=True)
    except Exception as e:  # noqa: BLE001 - reported per kernel
        return [Build(name, {}, None, None, {}, _brief(f"{type(e).__name__}: {e}"))]
    share = (time.perf_counter() - start) / max(len(autotuner.compile_results), 1)
    builds = []
    for result in autotuner.compile_results:
        binary = result.kernel
        cfg = result.config
        ptx = binary.asm["ptx"]
        regs, spilled = resources(ptx)
        builds.append(
            Build(
                name,
                {
                    **cfg.kwargs,
                    "num_warps": cfg.num_warps,
                    "num_stages": cfg.num_stages,
                },
                regs,
                spilled,
                {op: ptx.count(op) for op in INSTRUCTIONS},
                seconds=share,
            )
        )
    return builds


def _brief(message: str) -> str:
    """The head and the tail of an error: Triton's start with the kernel's long
    signature and end with the cause."""
    return message if len(message) <= 800 else f"{message[:200]} ... {message[-600:]}"


def build_dir(config_dir: Path) -> list[Build]:
    """Build every distinct kernel of the wrappers written in ``config_dir``."""
    from benchmarks.gpu_lower import read_wrapper

    workdir = config_dir / "kernels"
    workdir.mkdir(exist_ok=True)
    seen: set[str] = set()
    builds: list[Build] = []
    for path in sorted(config_dir.glob("[0-9][0-9]-*.py")):
        for kernel in read_wrapper(path.read_text()).kernels:
            if kernel.source in seen:
                continue
            seen.add(kernel.source)
            builds += build(kernel.name, kernel.source, workdir)
    return builds


def summary(builds: list[Build]) -> dict[str, Any]:
    """What a configuration's JSON carries about its kernels' builds."""
    return {
        "cubin_ok": bool(builds) and all(b.error is None for b in builds),
        "max_registers": max((b.registers or 0 for b in builds), default=None),
        "spill_bytes": sum(b.spill_bytes or 0 for b in builds),
        "cubin_seconds": round(sum(b.seconds for b in builds), 1),
        "slowest_build_seconds": round(max((b.seconds for b in builds), default=0), 1),
        "cubin": [
            {
                "kernel": b.kernel,
                "config": b.config,
                "registers": b.registers,
                "spill_bytes": b.spill_bytes,
                "ptx": b.instructions,
                "error": b.error,
                "seconds": round(b.seconds, 2),
            }
            for b in builds
        ],
    }


def dispatch_check(members: int, workdir: Path, flat: bool = False) -> str | None:
    """Build, for sm_90, a kernel that dispatches ``members`` branches by an if/elif
    chain on the program id, as Inductor's combo kernels do (Triton walks the chain
    recursively), or with ``flat`` by chains of ``DISPATCH_CHAIN``, as they do under
    the engine's hints (Note [flat combo dispatch] in
    ``umup_compile/_codegen_hints.py``); return the error, None when it builds."""
    gpu_standins.install()
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    chain = DISPATCH_CHAIN if flat else members
    ptrs = ", ".join(f"p{i}" for i in range(members))
    lines = ["import triton", "", "", "@triton.jit", f"def combo(src, {ptrs}):"]
    lines.append("    pid = triton.language.program_id(0)")
    for i in range(members):
        chained = "elif" if i % chain else "if"
        lines.append(f"    {chained} pid % {members} == {i}:")
        lines.append(
            f"        triton.language.store(p{i}, triton.language.load(src + {i}))"
        )
    path = workdir / f"combo{members}.py"
    path.write_text("\n".join(lines) + "\n")
    signature = {"src": "*fp32", **{f"p{i}": "*fp32" for i in range(members)}}
    try:
        source = ASTSource(import_file(path).combo, signature)
        triton.compile(source, target=GPUTarget("cuda", gpu_standins.ARCH, 32))
    except Exception as e:  # noqa: BLE001 - the error is the answer
        return _brief(f"{type(e).__name__}: {e}")
    return None


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.gpu_cubin CONFIG_DIR... --json FILE``, or
    ``--dispatch N [--flat]`` (:func:`dispatch_check`: prints ``ok`` or the error)."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description="Build written kernels to cubin.")
    parser.add_argument("dirs", nargs="*", type=Path)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--dispatch", type=int, metavar="N")
    parser.add_argument(
        "--flat", action="store_true", help="--dispatch by short chains"
    )
    args = parser.parse_args(argv)
    if args.dispatch is not None:
        with tempfile.TemporaryDirectory() as tmp:
            error = dispatch_check(args.dispatch, Path(tmp), args.flat)
        print(error or "ok")
        return 0 if error is None else 1
    if not args.dirs or args.json is None:
        parser.error("give kernel folders and --json, or --dispatch N")
    out = {}
    for d in args.dirs:  # each from an empty cache: kernels repeat across configs
        with tempfile.TemporaryDirectory() as cache:
            os.environ["TRITON_CACHE_DIR"] = cache
            out[d.name] = summary(build_dir(d))
    args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
