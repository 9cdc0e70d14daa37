"""Demo: u-μP AdamW, compiled, against unit_scaling's, on real text.

Run ``python -m umup_compile.demo`` (``--help`` for options). A byte-level language
model learns Python's own documentation (``pydoc_data.topics``, shipped with Python),
three times from the same weights on the same batches: with
``unit_scaling.optim.AdamW`` (when ``unit_scaling`` is installed), with this package's
compiled ``AdamW``, and with its eager engine (``compile=False``, for debugging). The
losses agree to float32 rounding; the optimizer step times are compared by median.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

import torch
from torch import Tensor, nn

from ._demo_model import Block, TinyUmupLM, batches, corpus, text_batches
from .optim import AdamW, describe

MakeOptimizer = Callable[[nn.Module], torch.optim.Optimizer]
# The model and data live in ``_demo_model``; these names stay importable from here.
__all__ = ["Block", "TinyUmupLM", "batches", "corpus", "main", "text_batches"]


class Progress:
    """A bar redrawn in place on a terminal; plain lines every ``every`` steps else.

    Redirected output (a log file, CI) gets no carriage returns: one line per update.
    """

    def __init__(self, stream: TextIO, every: int) -> None:
        self.stream = stream
        self.every = max(1, every)
        self.tty = stream.isatty()

    def update(self, label: str, done: int, total: int, loss: float) -> None:
        """Report ``done`` of ``total`` steps of run ``label``."""
        last = done == total
        if self.tty:
            if done % max(1, total // 40) and not last:
                return
            filled = 30 * done // total
            bar = "#" * filled + "." * (30 - filled)
            line = f"\r{label:>14} [{bar}] {done}/{total} loss {loss:.4f}"
            self.stream.write(line + ("\n" if last else ""))
        elif done % self.every == 0 or last:
            self.stream.write(f"{label:>14}: step {done}/{total}, loss {loss:.4f}\n")
        self.stream.flush()


def schedule(steps: int, warmup: int) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to 10 %: a LambdaLR factor."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))

    return factor


@dataclass
class Run:
    """One training run: per-step losses, optimizer-step and whole-step seconds."""

    losses: list[float] = field(default_factory=list)
    opt_times: list[float] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)


def train(
    model: nn.Module,
    data: list[Tensor],
    make_opt: MakeOptimizer,
    *,
    label: str,
    progress: Progress,
    steps: int | None = None,
) -> Run:
    """Train on ``data`` (the first ``steps`` batches, if given) and time each step.

    The lr follows the same ``LambdaLR`` over all of ``data`` for every optimizer: a
    multiplicative schedule keeps the u-μP ratios, including with unit_scaling's one
    group per parameter.
    """
    opt = make_opt(model)
    warmup = max(1, len(data) // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule(len(data), warmup))
    run = Run()
    todo = data[:steps]
    for tokens in todo:
        start = time.perf_counter()
        logits = model(tokens[:, :-1])
        loss = nn.functional.cross_entropy(
            logits.flatten(0, 1), tokens[:, 1:].flatten()
        )
        opt.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        opt_start = time.perf_counter()
        opt.step()
        end = time.perf_counter()
        sched.step()
        run.losses.append(loss.item())
        run.opt_times.append(end - opt_start)
        run.step_times.append(end - start)
        progress.update(label, len(run.losses), len(todo), run.losses[-1])
    return run


def unit_scaling_adamw(lr: float, weight_decay: float) -> MakeOptimizer | None:
    """``unit_scaling.optim.AdamW`` with the same options, or ``None`` if missing."""
    try:
        import unit_scaling.optim as us_optim  # type: ignore[import-untyped,import-not-found,unused-ignore]
    except ImportError:
        return None

    def make(model: nn.Module) -> torch.optim.Optimizer:
        opt: torch.optim.Optimizer = us_optim.AdamW(
            model.parameters(), lr=lr, weight_decay=weight_decay
        )
        return opt

    return make


def umup_adamw(lr: float, weight_decay: float, compile: bool) -> MakeOptimizer:
    """This package's ``AdamW`` with the given engine."""

    def make(model: nn.Module) -> torch.optim.Optimizer:
        return AdamW(
            model.named_parameters(), lr=lr, weight_decay=weight_decay, compile=compile
        )

    return make


def describe_summary(model: TinyUmupLM, lr: float, weight_decay: float) -> str:
    """The ``describe()`` rows of the first block and the non-block parameters."""
    shown = [
        (name, p)
        for name, p in model.named_parameters()
        if not name.startswith("blocks.") or name.startswith("blocks.0.")
    ]
    lines = describe(shown, lr=lr, weight_decay=weight_decay).splitlines()[:-1]
    n_blocks = len(model.blocks)
    if n_blocks > 1:
        rest = (
            "blocks.1 repeats" if n_blocks == 2 else f"blocks.1-{n_blocks - 1} repeat"
        )
        lines.append(f"({rest} blocks.0; --describe prints every row)")
    return "\n".join(lines)


def median_ms(times: list[float]) -> float:
    """Median of the steady steps (the first one creates state and compiles), in ms."""
    return 1e3 * statistics.median(times[1:] if len(times) > 1 else times)


REFERENCE = "umup compiled"  # the run the others are compared with


def report(runs: dict[str, Run], every: int, out: TextIO) -> None:
    """Print the losses side by side, their largest differences, and step times."""
    names = list(runs)
    steps = max(len(r.losses) for r in runs.values())
    width = max(12, *map(len, names))
    out.write(
        f"\nloss in nats per byte, mean over the {every} steps up to each row "
        "(row 1: the first step)\n"
    )
    out.write(" | ".join(["step".rjust(5)] + [n.rjust(width) for n in names]) + "\n")
    for end in sorted({1, steps, *range(every, steps + 1, every)}):
        window = slice(max(0, end - every), end)
        cells = [
            f"{statistics.fmean(runs[n].losses[window]):>{width}.4f}"
            if end <= len(runs[n].losses)
            else " " * width
            for n in names
        ]
        out.write(" | ".join([f"{end:>5}"] + cells).rstrip() + "\n")
    ref = runs[REFERENCE]
    for name in names:
        if name != REFERENCE:
            pairs = list(zip(runs[name].losses, ref.losses))
            diff = max(abs(a - b) for a, b in pairs)
            out.write(
                f"max |loss difference| per step, {name} vs {REFERENCE}: {diff:.2e} "
                f"over {len(pairs)} steps\n"
            )
    out.write(
        "\nmedian times of the steady steps, ms: optimizer step, whole training step\n"
    )
    ref_ms = median_ms(ref.opt_times)
    for name in names:
        opt_ms = median_ms(runs[name].opt_times)
        step_ms = median_ms(runs[name].step_times)
        out.write(
            f"  {name:>{width}}: {opt_ms:8.2f} ms ({opt_ms / ref_ms:5.2f}x), "
            f"step {step_ms:7.1f} ms\n"
        )
    out.write(
        f"first {REFERENCE} step, including compilation: {ref.opt_times[0]:.1f} s\n"
    )
    if "unit_scaling" in runs:
        out.write(
            "unit_scaling.optim.AdamW runs torch's AdamW with its defaults (on CPU the "
            "per-tensor loop) over one param group per parameter.\n"
        )


def plot(path: str, curves: dict[str, list[float]]) -> None:
    """Write a PNG of the loss curves (needs matplotlib: ``pip install .[demo]``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise SystemExit(
            f"--plot needs matplotlib ({e}); pip install matplotlib"
        ) from e
    fig, ax = plt.subplots(figsize=(6, 4))
    styles = ["-", "--", ":"]
    for (name, losses), style in zip(curves.items(), styles):
        ax.plot(losses, label=name, linestyle=style)
    ax.set(xlabel="step", ylabel="training loss (nats/byte)", title="u-μP AdamW")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line; ``--help`` lists it."""
    parser = argparse.ArgumentParser(
        prog="python -m umup_compile.demo",
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--steps", type=int, default=40, help="training steps per run")
    parser.add_argument(
        "--eager-steps",
        type=int,
        default=10,
        help="steps of the eager run (the first ones, on the same schedule)",
    )
    parser.add_argument("--width", type=int, default=384, help="model width")
    parser.add_argument("--depth", type=int, default=4, help="residual blocks")
    parser.add_argument("--seq", type=int, default=24, help="bytes per sequence")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step")
    parser.add_argument("--lr", type=float, default=0.2, help="peak base lr")
    parser.add_argument(
        "--weight-decay", type=float, default=1e-4, help="independent weight decay"
    )
    parser.add_argument("--every", type=int, default=10, help="table row every N steps")
    parser.add_argument(
        "--describe", action="store_true", help="print the full describe() table"
    )
    parser.add_argument(
        "--no-unit-scaling",
        action="store_true",
        help="skip the unit_scaling.optim.AdamW run even when it is installed",
    )
    parser.add_argument("--plot", metavar="FILE", help="write a PNG of the loss curves")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (0: torch's default). One thread keeps the timings "
        "steady on a machine shared with other jobs, where OpenMP threads wait on "
        "each other",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Train with each optimizer and print the side-by-side comparison."""
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        _run(args)
    finally:
        torch.set_num_threads(threads)  # main() may run inside a larger program


def _run(args: argparse.Namespace) -> None:
    """The demo proper, under the chosen thread count."""
    torch.manual_seed(0)
    text, source = corpus()
    model = TinyUmupLM(256, args.width, args.depth)
    data = text_batches(text, args.seq, args.batch, args.steps, seed=1)
    params = list(model.parameters())
    print(
        f"byte-level u-μP LM: {sum(p.numel() for p in params):,} parameters in "
        f"{len(params)} tensors; {len(text):,} bytes of {source}; "
        f"{args.steps} steps of {args.batch} x {args.seq} bytes; "
        f"{torch.get_num_threads()} CPU thread(s)"
    )
    if args.describe:
        print(describe(model, lr=args.lr, weight_decay=args.weight_decay))
    else:
        print(describe_summary(model, args.lr, args.weight_decay))
    print(flush=True)

    makers: dict[str, tuple[MakeOptimizer, int]] = {}
    reference = (
        None if args.no_unit_scaling else unit_scaling_adamw(args.lr, args.weight_decay)
    )
    if reference is not None:
        makers["unit_scaling"] = (reference, args.steps)
    elif not args.no_unit_scaling:
        print("unit_scaling is not installed (pip install unit-scaling==0.3.5 to")
        print("compare with unit_scaling.optim.AdamW); comparing our engines only.\n")
    makers["umup compiled"] = (
        umup_adamw(args.lr, args.weight_decay, compile=True),
        args.steps,
    )
    makers["umup eager"] = (
        umup_adamw(args.lr, args.weight_decay, compile=False),
        min(args.steps, max(2, args.eager_steps)),
    )

    progress = Progress(sys.stderr, every=args.every)
    runs: dict[str, Run] = {}
    for name, (make, steps) in makers.items():
        sys.stdout.flush()
        runs[name] = train(
            copy.deepcopy(model), data, make, label=name, progress=progress, steps=steps
        )
    report(runs, args.every, sys.stdout)
    print(
        "\nThe eager engine runs the same update without compiling: debug with "
        "compile=False or UMUP_COMPILE=0."
    )
    if args.plot:
        plot(args.plot, {name: run.losses for name, run in runs.items()})


if __name__ == "__main__":
    main()
