"""Learning-rate transfer across width: u-μP with this package's AdamW vs standard SP.

What u-μP is for: the learning rate that is best on a narrow model stays best on a
wide one. This trains ``unit_scaling.TransformerDecoder`` (unit_scaling's own u-μP
model: unit-scaled modules, residual tau rule, ``mup_type``/``mup_scaling_depth`` tags)
with ``umup_compile.optim.AdamW`` (compiled, independent weight decay), and the same
architecture in standard parametrization (plain torch modules, default init,
``torch.optim.AdamW``, coupled weight decay), at several widths over a learning-rate
grid in powers of two, and reports the final validation loss per width and lr.

Architecture (both sides): byte-level (vocab 256) causal decoder, pre-norm, RMSNorm
without affine weights, multi-head causal self-attention without positional
embeddings (NoPE, as unit_scaling's model has none), SwiGLU MLP with 4x expansion, no
biases, untied readout. Fixed depth, heads, sequence length, batch and steps, so every
width sees the same tokens. Schedule: linear warm-up then cosine decay to 0.

Data: the English documentation that ships with every CPython (``pydoc_data.topics``,
~466 KB of text), as UTF-8 bytes, cut into 4 KiB chunks of which every 10th is the
validation split (fixed); training batches are random windows of the training split,
the same windows for every run of one seed.

Seeds: one seed (0) everywhere; where a width's curve is flat at its optimum (a grid
neighbour within ``--flat-tol`` nats of the best), the optimum and those neighbours are
rerun with seeds 1 .. ``--seeds``-1 and the optimum is taken on the mean.

Writes ``<date>_transfer_t<threads>.{md,csv,json,png}`` into ``--out`` (default
``benchmarks/results/<device>/``; ``--smoke`` without ``--out``: a temporary folder).

The models, data and training are in ``transfer_model``, the optima and their reading
in ``transfer_summary``, the files in ``transfer_report``.

Examples (from the repository root):
    python -m benchmarks transfer --threads 1                 # the committed CPU run
    python -m benchmarks transfer --widths 128,256,512 --steps 1000
    python -m benchmarks transfer --state-dtype int8 --tag int8   # 8-bit moments
    python -m benchmarks transfer --smoke --out /tmp/transfer   # tiny: checks it runs
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
import warnings
from typing import Any

import torch

from benchmarks import common, timer, transfer_report
from benchmarks.transfer_model import (
    KINDS,
    SP,
    UMUP,
    load_corpus,
    train_run,
    val_windows,
)
from benchmarks.transfer_summary import best, flat_neighbours, points


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _grid(text: str) -> list[int]:
    """``"-4:4"`` -> [-4, ..., 4] (log2 of the lrs); ``"-2,0,2"`` as given."""
    if ":" in text:
        a, b = (int(x) for x in text.split(":"))
        return list(range(a, b + 1))
    return _ints(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks transfer",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--widths", type=_ints, default=[64, 128, 256])
    parser.add_argument("--depth", type=int, default=2, help="transformer layers")
    parser.add_argument("--heads", type=int, default=4, help="fixed at every width")
    parser.add_argument("--seq", type=int, default=64, help="bytes per sequence")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=160)
    parser.add_argument("--warmup", type=float, default=0.1, help="share of steps")
    parser.add_argument(
        "--umup-lrs",
        type=_grid,
        default=_grid("-3:3"),
        help="log2 lr grid: --umup-lrs=a:b or =a,b,c",
    )
    parser.add_argument(
        "--sp-lrs",
        type=_grid,
        default=_grid("-11:-5"),
        help="log2 lr grid: --sp-lrs=a:b",
    )
    parser.add_argument(
        "--weight-decay",
        type=float,
        default=2**-13,
        help="u-μP: independent weight decay (the per-step decay is this x the "
        "schedule factor, whatever the peak lr)",
    )
    parser.add_argument(
        "--sp-weight-decay",
        type=float,
        default=0.01,
        help="SP: torch.optim.AdamW's weight decay (torch's default; multiplied by lr)",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=3,
        help="seeds for the optimum and its flat neighbours (1: no reruns)",
    )
    parser.add_argument(
        "--flat-tol",
        type=float,
        default=0.05,
        help="a neighbour within this many nats of the optimum makes the curve flat "
        "(the seed-to-seed spread of one u-μP point was up to 0.07 in the committed run)",
    )
    parser.add_argument(
        "--val-tokens", type=int, default=16384, help="validation bytes evaluated"
    )
    parser.add_argument(
        "--eager",
        action="store_true",
        help="umup_compile AdamW with compile=False (default: compile='strict')",
    )
    parser.add_argument(
        "--state-dtype",
        choices=["float32", "int8"],
        default="float32",
        help="umup_compile AdamW's state_dtype (int8: 8-bit moments)",
    )
    parser.add_argument("--threads", type=int, default=None)
    common.add_out_argument(parser)
    parser.add_argument(
        "--tag", default="", help="appended to the file names: <date>_transfer_t<n>_TAG"
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="widths 16,32, 1 layer, 8 steps, 3 lrs each, every optimum rerun with a "
        "2nd seed: checks it runs (~30 s)",
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bar on stderr"
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.widths, args.depth, args.heads = [16, 32], 1, 2
        args.seq, args.batch, args.steps, args.val_tokens = 16, 4, 8, 256
        args.umup_lrs, args.sp_lrs = [-1, 0, 1], [-8, -7, -6]
        args.seeds, args.flat_tol = 2, math.inf
    bad = [w for w in args.widths if w % args.heads]
    if bad:
        parser.error(f"widths {bad} are not divisible by --heads {args.heads}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = " ".join(sys.argv[1:] if argv is None else argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    # unit_scaling's modules go through torch.jit.script_method, deprecated in torch 2.13.
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    device = torch.device("cpu")
    head = common.header(device)
    corpus = load_corpus()
    val = val_windows(corpus, args)
    grids = {UMUP: args.umup_lrs, SP: args.sp_lrs}
    plan = [(w, kind, k) for w in args.widths for kind in KINDS for k in grids[kind]]
    bar = timer.ProgressBar("transfer", enabled=not args.no_progress)
    rows: list[dict[str, Any]] = []
    total = len(plan)

    def run(width: int, kind: str, k: int, seed: int) -> None:
        row = train_run(kind, width, 2.0**k, seed, corpus, val, args)
        rows.append(row)
        print(
            f"  {kind:4s} width {width:4d} lr 2^{k:<3d} seed {seed}: val "
            f"{row['val_loss']} (train {row['train_loss']}, {row['run_s']} s)",
            flush=True,
        )
        bar.update(len(rows), total)

    print(
        f"# transfer: widths {args.widths}, depth {args.depth}, heads {args.heads}, "
        f"{args.steps} steps x {args.batch} x {args.seq} bytes; "
        f"{len(plan)} runs + reruns; {corpus.source}",
        flush=True,
    )
    load_start = os.getloadavg()
    t0 = time.perf_counter()
    # A private Inductor cache (as the step workloads do): the compile times are cold.
    with tempfile.TemporaryDirectory(prefix="bench_transfer_inductor_") as cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        for width, kind, k in plan:
            run(width, kind, k, 0)
        if args.seeds > 1:  # rerun the optimum and its flat neighbours, more seeds
            again = []
            for (kind, width), curve in points(rows).items():
                near = flat_neighbours(curve, args.flat_tol)
                if near:
                    again += [
                        (width, kind, curve[j].log2_lr) for j in [best(curve), *near]
                    ]
            total += len(again) * (args.seeds - 1)
            for seed in range(1, args.seeds):
                for width, kind, k in again:
                    run(width, kind, k, seed)
    facts = {
        "wall": time.perf_counter() - t0,
        "load": (load_start, os.getloadavg()),
        "command": f"python -m benchmarks transfer {command}",
    }
    out = common.output_dir(args.out, args.smoke, head, "transfer")
    transfer_report.write(out, args, head, rows, corpus, val[1], facts)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
