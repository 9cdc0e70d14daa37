"""Stochastic rounding's cost per parameter set: SR step / non-SR step, one process.

bf16 parameters, float32 state, untagged (``allow_non_unit_scaling_params=True``),
``umup_compile.optim.AdamW`` compiled, on two GPT-like sets (issue 26): 13.6M
(d_model 384, 4 layers, vocab 8192, 27 tensors) and 33.6M (the harness's, 51
tensors). Each step is timed by wall clock and by the thread's CPU time (on a machine
shared with other jobs, CPU time is the steadier of the two), interleaved, medians.

Examples:
    python -m benchmarks sr-shapes --threads 1 --repeats 21
    python -m benchmarks sr-shapes --smoke --out /tmp/sr
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import umup_compile.optim as uo
from benchmarks import common, sets

SETS = {"13.6M": (384, 4, 8192), "33.6M": (512, 8, 8192)}
COLUMNS = "set tensors elements clock no_sr_ms sr_ms ratio".split()


def _optimizer(d: int, layers: int, vocab: int, sr: bool) -> torch.optim.Optimizer:
    gen = torch.Generator().manual_seed(0)
    params = []
    for spec in sets.gpt_like_specs(d_model=d, n_layers=layers, vocab=vocab):
        p = nn.Parameter(torch.randn(spec.shape, generator=gen).bfloat16())
        p.grad = torch.randn(spec.shape, generator=gen).bfloat16()
        params.append(p)
    return uo.AdamW(
        params,
        lr=1e-3,
        weight_decay=0.01,
        allow_non_unit_scaling_params=True,
        state_dtype=torch.float32,
        stochastic_rounding=sr,
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks sr-shapes",
        description=(__doc__ or "").split("\n\n")[0],
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--smoke", action="store_true", help="tiny sets, 2 repeats")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    shapes = {k: (64, 1, 256) for k in SETS} if args.smoke else SETS
    repeats = 2 if args.smoke else args.repeats
    head = common.header(torch.device("cpu"))
    steps: dict[tuple[str, bool], Callable[[], Any]] = {}
    sizes: dict[str, tuple[int, int]] = {}
    for name, shape in shapes.items():
        for sr in (False, True):
            opt = _optimizer(*shape, sr)
            opt.step()  # compiles
            steps[(name, sr)] = opt.step
            params = opt.param_groups[0]["params"]
            sizes[name] = (len(params), sum(p.numel() for p in params))
    samples: dict[tuple[str, bool], list[tuple[float, float]]] = {k: [] for k in steps}
    for r in range(repeats):
        keys = list(steps)
        for key in keys[r % len(keys) :] + keys[: r % len(keys)]:
            c0, w0 = time.thread_time(), time.perf_counter()
            steps[key]()
            samples[key].append((time.perf_counter() - w0, time.thread_time() - c0))
    rows = []
    for name in shapes:
        for k, clock in enumerate(("wall", "thread cpu")):
            a, b = (
                statistics.median(s[k] for s in samples[(name, sr)]) for sr in (0, 1)
            )
            rows.append(
                {
                    "set": name,
                    "tensors": sizes[name][0],
                    "elements": f"{sizes[name][1]:,}",
                    "clock": clock,
                    "no_sr_ms": f"{1e3 * a:.2f}",
                    "sr_ms": f"{1e3 * b:.2f}",
                    "ratio": f"{b / a:.3f}",
                }
            )
    out = args.out or (
        Path(tempfile.mkdtemp(prefix="sr_"))
        if args.smoke
        else common.RESULTS / head["device"]
    )
    stem = f"{head['date']}_sr_shapes_t{head['threads']}"
    common.write_csv(out / f"{stem}.csv", rows, COLUMNS)
    command = " ".join(sys.argv[1:] if argv is None else argv)
    table = common.markdown_table(rows, COLUMNS)
    (out / f"{stem}.md").write_text(
        "# Stochastic rounding: SR step / non-SR step per parameter set\n\n"
        + "\n".join(f"- {k}: {x}" for k, x in head.items())
        + f"\n- {repeats} interleaved steps each, medians\n"
        + f"- command: `python -m benchmarks sr-shapes {command}`\n\n"
        + table
        + "\n"
    )
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
