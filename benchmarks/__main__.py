"""The benchmarks' front door: ``python -m benchmarks <workload> [options]``.

A workload is one entry of ``WORKLOADS``: the module whose ``main(argv) -> int`` runs
it, the arguments put before the user's (the step module takes its parameter set
first), and a one-line summary. ``python -m benchmarks`` lists the workloads;
``python -m benchmarks <workload> --help`` shows one workload's options. Adding a
workload is one entry here, pointing at a module with such a ``main``; nothing is
imported until a workload runs, so the list shows without torch.
"""

from __future__ import annotations

import importlib
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Workload:
    """A module whose ``main(argv)`` runs the workload, with ``args`` put first."""

    module: str
    summary: str
    args: tuple[str, ...] = ()


WORKLOADS = {
    "gpt": Workload(
        "benchmarks.step",
        "Adam step time, state and bandwidth: u-muP GPT-like set, 51 tensors, 33.6M "
        "elements, every contestant in one process",
        ("gpt",),
    ),
    "many-small": Workload(
        "benchmarks.step",
        "the same on 256 (--n-small) weights of 64x64: launch/overhead-bound",
        ("many-small",),
    ),
    "gpt-124m": Workload(
        "benchmarks.step",
        "the same on GPT-2-small shapes, 162M elements (GPU only)",
        ("gpt-124m",),
    ),
    "gpt-1.2b": Workload(
        "benchmarks.step",
        "the same on 20 x 2048, vocab 50304: 1.21B elements (GPU only)",
        ("gpt-1.2b",),
    ),
    "host": Workload(
        "benchmarks.bench_host",
        "host cost per parameter: thousands of 16-element tensors, one group vs one "
        "group per parameter",
    ),
    "first-step": Workload(
        "benchmarks.bench_first_step",
        "the first compiled step of the GPT-like set: cold, warm cache, portable "
        "artifacts, with its compile phases",
    ),
    "compile": Workload(
        "benchmarks.bench_compile",
        "first-step (compile) time vs tensor count, a fresh process per point",
    ),
    "compile-plot": Workload(
        "benchmarks.plot_compile",
        "combine compile runs' CSVs into one table and plot",
    ),
    "lowp-curve": Workload(
        "benchmarks.bench_lowp_curve",
        "bf16 training curves: stochastic rounding vs round-to-nearest vs float32",
    ),
    "quant8-train": Workload(
        "benchmarks.train_quant8",
        "8-bit Adam state (state_dtype=torch.int8) vs float32 state: training loss on "
        "unit_scaling's TransformerDecoder and the demo model, quantization errors",
    ),
    "quant8-kernel": Workload(
        "benchmarks.bench_quant8",
        "the 8-bit Adam update alone on the GPT-like set (one static graph) vs torch "
        "fused on float32 state, torchao's and bitsandbytes' AdamW8bit",
    ),
    "quant-maps": Workload(
        "benchmarks.quant_maps",
        "8-bit code maps for Adam's moments, emulated: training loss and errors per map",
    ),
    "sr-shapes": Workload(
        "benchmarks.bench_sr_shapes",
        "stochastic rounding's cost on two GPT-like shapes (bf16 params, float32 state)",
    ),
    "transfer": Workload(
        "benchmarks.transfer",
        "learning-rate transfer across width: u-muP (unit_scaling's model, our AdamW) "
        "vs standard parametrization",
    ),
    "gpu-codegen": Workload(
        "benchmarks.gpu_codegen",
        "the step's CUDA kernels on paper, without a GPU (a simulation): kernels, "
        "launches, bytes, cubin, interpreter check",
    ),
}


def usage() -> str:
    """The workload list ``python -m benchmarks`` prints."""
    indent = " " * (max(map(len, WORKLOADS)) + 4)
    lines = [
        "usage: python -m benchmarks <workload> [options]",
        "       python -m benchmarks <workload> --help",
        "",
        "workloads:",
    ]
    for name, w in WORKLOADS.items():
        first = f"  {name:{len(indent) - 4}s}  {w.summary}"
        lines.append(textwrap.fill(first, 88, subsequent_indent=indent))
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        (sys.stdout if argv else sys.stderr).write(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in WORKLOADS:
        hint = ""
        if name.startswith("--workload"):  # the old flag: the workload comes first now
            old = name.partition("=")[2] or (rest[0] if rest else "gpt")
            hint = f"; write it first: python -m benchmarks {old} [options]"
        sys.stderr.write(usage() + f"\nunknown workload {name!r}{hint}\n")
        return 2
    workload = WORKLOADS[name]
    run = importlib.import_module(workload.module).main
    code = run([*workload.args, *rest])
    return 0 if code is None else int(code)


if __name__ == "__main__":
    raise SystemExit(main())
